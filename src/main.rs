//! The `pixiu-metadata` binary: parse flags, set up logging, run.

use anyhow::Context;
use pixiu_metadata::cli::{Command, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

// Every push allocates a little (responses, frames, status); glibc's allocator was an eighth
// of the server's CPU in a fan-out to 10,000 streams (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The error and its causes on one line, for operators and scripts; never a
            // backtrace, whatever RUST_BACKTRACE says (a missing record is not a crash).
            eprintln!("Error: {}", pixiu_metadata::cli::one_line(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = match pixiu_metadata::cli::parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(error) => match error.downcast::<clap::Error>() {
            Ok(error) => error.exit(),
            Err(error) => return Err(error),
        },
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only, not for a file or a log collector.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli.command {
        Command::Serve(args) => {
            disable_transparent_huge_pages();
            let config = args.config()?;
            if args.print_config {
                print!("{}", args.effective_config);
                return Ok(());
            }
            let listener = tokio::net::TcpListener::bind(config.grpc.addr)
                .await
                .with_context(|| format!("binding the gRPC port {}", config.grpc.addr))?;
            let admin = tokio::net::TcpListener::bind(config.admin.addr)
                .await
                .with_context(|| format!("binding the admin port {}", config.admin.addr))?;
            // Machine-readable lines, so scripts and tests can bind port 0. A closed stdout
            // must not stop the server, so write errors are ignored.
            {
                use std::io::Write;
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "grpc listening on {}", listener.local_addr()?);
                let _ = writeln!(stdout, "admin listening on {}", admin.local_addr()?);
                let _ = stdout.flush();
            }
            let shutdown = CancellationToken::new();
            tokio::spawn(signal(shutdown.clone()));
            let listeners = pixiu_metadata::Listeners {
                grpc: listener,
                admin: Some(admin),
            };
            pixiu_metadata::run(config, listeners, shutdown)
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

/// Turns transparent huge pages off for the server's process (and what it starts).
///
/// mimalloc asks for huge pages on its arenas; the kernel then zeroes 2 MiB at every first
/// touch, and again after each purge. In a run of new publishes that zeroing was a seventh of
/// the server's CPU and doubled the p99 (docs/benchmarks.md). Failure (a kernel without the
/// flag) only leaves things as they were.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!(%error, "transparent huge pages stay as they are");
    }
}
