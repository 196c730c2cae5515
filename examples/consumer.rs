//! A Dubbo-style consumer: knows an interface, follows which applications provide it (the
//! service-name mapping) and the metadata of the revisions it is told about, over one ADS
//! connection. Prints one line per update.
//!
//! ```text
//! cargo run --example consumer -- --server http://127.0.0.1:15010 \
//!     --interface org.example.Greeter --metadata greeter/rev-1
//! ```

use clap::Parser;
use futures::StreamExt;
use pixiu_metadata::{
    client::{Client, ClientConfig, Update},
    pb::metadata::{Metadata, ServiceMapping},
};

#[derive(Debug, Parser)]
struct Args {
    /// The pixiu-metadata server.
    #[arg(long, default_value = "http://127.0.0.1:15010")]
    server: String,
    /// Namespace (the server's default when absent).
    #[arg(long)]
    namespace: Option<String>,
    /// Interfaces whose providers to follow.
    #[arg(long = "interface", default_value = "org.example.Greeter")]
    interfaces: Vec<String>,
    /// Metadata to follow, `<application>/<revision>`.
    #[arg(long = "metadata")]
    metadata: Vec<String>,
    /// Exit after this many updates.
    #[arg(long)]
    count: Option<usize>,
}

fn describe<T>(update: &Update<T>, show: impl Fn(&T) -> String) -> String {
    match update {
        Update::Added { name, resource, .. } => format!("added {name}: {}", show(resource)),
        Update::Updated { name, resource, .. } => format!("updated {name}: {}", show(resource)),
        Update::Removed { name } => format!("removed {name}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = ClientConfig::new(&args.server);
    if let Some(namespace) = &args.namespace {
        config = config.namespace(namespace);
    }
    let client = Client::connect(config).await?;
    let mappings = client
        .subscribe::<ServiceMapping>(args.interfaces.clone())
        .map(|u| {
            describe(&u, |m| {
                format!("providers [{}]", m.application_names.join(","))
            })
        });
    let metadata = client
        .subscribe::<Metadata>(args.metadata.clone())
        .map(|u| describe(&u, |m| m.metadata_info.clone()));
    let mut lines = futures::stream::select(mappings, metadata);
    let mut n_seen = 0;
    while args.count.is_none_or(|count| n_seen < count) {
        let Some(line) = lines.next().await else {
            break;
        };
        println!("{line}");
        n_seen += 1;
    }
    Ok(())
}
