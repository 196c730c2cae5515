//! `metadata watch` and `definition watch`: a [`crate::client`] subscription printed as JSON
//! lines, one per update: `{"event", "name", "version", "resources": {name: value}}`, where
//! `resources` is everything held after the update.

use std::collections::BTreeMap;

use futures::StreamExt;

use super::ClientArgs;
use crate::client::{Client, Resource, Update};

/// Subscribes to `names` (all when empty) and prints updates until `count` were printed.
pub(super) async fn run<T: Resource>(
    args: &ClientArgs,
    names: Vec<String>,
    count: Option<usize>,
    value_of: impl Fn(&T) -> String,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let config = args
        .config()?
        .node_id(format!("pixiu-metadata-cli-{}", std::process::id()));
    let client = Client::connect(config).await?;
    let mut updates = client.subscribe::<T>(names);
    let mut held = BTreeMap::new();
    let mut n_seen = 0;
    while count.is_none_or(|c| n_seen < c) {
        let Some(update) = updates.next().await else {
            return Err(match updates.refusal() {
                Some(status) => super::status_error(status.clone()),
                None => anyhow::anyhow!("the subscription ended"),
            });
        };
        let (event, version) = match &update {
            Update::Added {
                name,
                version,
                resource,
            }
            | Update::Updated {
                name,
                version,
                resource,
            } => {
                held.insert(name.clone(), serde_json::Value::String(value_of(resource)));
                let event = if matches!(update, Update::Added { .. }) {
                    "added"
                } else {
                    "updated"
                };
                (event, version.clone())
            }
            Update::Removed { name } => {
                held.remove(name);
                ("removed", String::new())
            }
        };
        let line = serde_json::json!({
            "event": event,
            "name": update.name(),
            "version": version,
            "resources": held,
        });
        writeln!(out, "{line}")?;
        out.flush()?;
        n_seen += 1;
    }
    Ok(())
}
