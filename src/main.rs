//! The `pixiu-metadata` binary: parse flags, set up logging, run.

use anyhow::Context;
use clap::Parser;
use pixiu_metadata::cli::{Cli, Command};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => {
            let config = args.config()?;
            let listener = tokio::net::TcpListener::bind(config.grpc.addr)
                .await
                .with_context(|| format!("binding the gRPC port {}", config.grpc.addr))?;
            let shutdown = CancellationToken::new();
            tokio::spawn(signal(shutdown.clone()));
            pixiu_metadata::run(config, listener, shutdown)
                .await
                .map_err(anyhow::Error::new)?;
            Ok(())
        }
        command => pixiu_metadata::cli::run_client(command, &mut std::io::stdout().lock()).await,
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    shutdown.cancel();
}
