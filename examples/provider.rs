//! A Dubbo-style provider: publishes its application metadata, registers itself as the
//! provider of its interfaces, and keeps both alive until stopped.
//!
//! ```text
//! cargo run --example provider -- --server http://127.0.0.1:15010 \
//!     --application greeter --revision rev-1 --interface org.example.Greeter
//! ```

use std::time::Duration;

use clap::Parser;
use pixiu_metadata::client::{Client, ClientConfig};

#[derive(Debug, Parser)]
struct Args {
    /// The pixiu-metadata server.
    #[arg(long, default_value = "http://127.0.0.1:15010")]
    server: String,
    /// Namespace (the server's default when absent).
    #[arg(long)]
    namespace: Option<String>,
    /// Application name.
    #[arg(long, default_value = "greeter")]
    application: String,
    /// Revision of this deployment's metadata.
    #[arg(long, default_value = "rev-1")]
    revision: String,
    /// Interfaces it provides.
    #[arg(long = "interface", default_value = "org.example.Greeter")]
    interfaces: Vec<String>,
    /// The server's lease TTL; leases are refreshed every third of it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    lease_ttl: Duration,
    /// Exit after this long instead of running until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    run_for: Option<Duration>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = ClientConfig::new(&args.server).lease_ttl(args.lease_ttl);
    if let Some(namespace) = &args.namespace {
        config = config.namespace(namespace);
    }
    let client = Client::connect(config).await?;
    let services: serde_json::Map<String, serde_json::Value> = args
        .interfaces
        .iter()
        .map(|interface| {
            (
                format!("{interface}:1.0.0:tri"),
                serde_json::json!({"name": interface, "version": "1.0.0", "protocol": "tri"}),
            )
        })
        .collect();
    let metadata = serde_json::json!({
        "app": args.application,
        "revision": args.revision,
        "services": services,
    })
    .to_string();
    client
        .publish_metadata(&args.application, &args.revision, &metadata)
        .await?;
    println!("published {}/{}", args.application, args.revision);
    for interface in &args.interfaces {
        client
            .register_mapping(interface, &args.application)
            .await?;
        println!("registered {interface} -> {}", args.application);
    }
    match args.run_for {
        Some(duration) => tokio::time::sleep(duration).await,
        None => tokio::signal::ctrl_c().await?,
    }
    Ok(())
}
