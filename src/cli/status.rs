//! `status`: per client and type, what was sent and whether it was accepted, like
//! `istioctl proxy-status`, read from the admin port's `/debug/syncz`.

use std::time::Duration;

use anyhow::{Context, bail};
use axum::body::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde::Serialize;

use super::{Output, output};
use crate::admin::views::{StreamSync, SyncStatus};

/// Flags of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The server's admin HTTP address (its `serve --admin-addr`).
    #[arg(
        long,
        env = "PIXIU_METADATA_ADMIN",
        default_value = "http://127.0.0.1:15014"
    )]
    pub admin: String,
    /// File holding the admin port's bearer token (the server's `--admin-token-file`).
    #[arg(long, env = "PIXIU_METADATA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

/// One row of `status`: one client and one type.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The client's node id.
    pub node_id: String,
    /// The client's namespace.
    pub namespace: String,
    /// The type URL (`-` before the client subscribed to anything).
    pub type_url: String,
    /// `SYNCED`, `STALE`, `NACKED` or `NOT SENT`.
    pub state: String,
    /// The version last sent.
    pub sent_version: Option<String>,
    /// The version last ACKed.
    pub acked_version: Option<String>,
    /// The NACK's `error_detail.message`, while NACKed.
    pub error: Option<String>,
    /// The peer address.
    pub peer: Option<String>,
    /// `sotw` or `delta`.
    pub protocol: String,
    /// The stream id.
    pub stream_id: u64,
    /// When the stream opened.
    pub connected_since: String,
}

/// The rows of a sync status: one per stream and type, ordered by node id then type.
pub fn rows(status: &SyncStatus) -> Vec<Row> {
    let mut rows = Vec::new();
    for stream in &status.streams {
        let row = |s: &StreamSync| Row {
            node_id: s.node_id.clone(),
            namespace: s.namespace.clone(),
            type_url: "-".into(),
            state: "NOT SENT".into(),
            sent_version: None,
            acked_version: None,
            error: None,
            peer: s.peer.clone(),
            protocol: s.protocol.clone(),
            stream_id: s.stream_id,
            connected_since: s.connected_since.clone(),
        };
        if stream.types.is_empty() {
            rows.push(row(stream));
        }
        for t in &stream.types {
            rows.push(Row {
                type_url: t.type_url.clone(),
                state: t.state.clone(),
                sent_version: t.sent_version.clone(),
                acked_version: t.acked_version.clone(),
                error: t.nack.as_ref().map(|n| n.error_detail.message.clone()),
                ..row(stream)
            });
        }
    }
    rows.sort_by(|a, b| {
        (&a.node_id, a.stream_id, &a.type_url).cmp(&(&b.node_id, b.stream_id, &b.type_url))
    });
    rows
}

/// Runs `status`.
pub async fn run(args: StatusArgs, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let token = match &args.admin_token_file {
        Some(path) => Some(crate::security::admin_token(path)?),
        None => None,
    };
    let status = fetch(&args.admin, token.as_deref()).await?;
    let rows = rows(&status);
    if !args.output.write_structured(&rows, out)? {
        write_table(&rows, out)?;
    }
    Ok(())
}

fn write_table(rows: &[Row], out: &mut impl std::io::Write) -> anyhow::Result<()> {
    if rows.is_empty() {
        writeln!(out, "no clients connected")?;
        return Ok(());
    }
    let short = |v: &Option<String>| {
        v.as_deref()
            .map_or("-".to_string(), |v| v.chars().take(12).collect())
    };
    let table: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.node_id.clone(),
                r.namespace.clone(),
                r.type_url
                    .rsplit(['/', '.'])
                    .next()
                    .unwrap_or("")
                    .to_string(),
                r.state.clone(),
                short(&r.sent_version),
                short(&r.acked_version),
                r.peer.clone().unwrap_or_else(|| "-".into()),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let header = [
        "NODE",
        "NAMESPACE",
        "TYPE",
        "STATE",
        "SENT",
        "ACKED",
        "PEER",
        "ERROR",
    ];
    output::write_table(header, &table, out)?;
    Ok(())
}

/// Reads `/debug/syncz` from the admin port at `admin`, with `token` as bearer token.
pub async fn fetch(admin: &str, token: Option<&str>) -> anyhow::Result<SyncStatus> {
    let url = format!("{}/debug/syncz", admin.trim_end_matches('/'));
    let uri: http::Uri = url.parse().with_context(|| {
        format!("bad --admin {admin:?}: give an http:// URL like http://127.0.0.1:15014")
    })?;
    if uri.scheme_str() != Some("http") {
        bail!("bad --admin {admin:?}: give an http:// URL like http://127.0.0.1:15014");
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let unreachable = || {
        format!(
            "cannot reach the admin port at {admin}; is `pixiu-metadata serve` running, and \
             does --admin match its --admin-addr?"
        )
    };
    let mut request = http::Request::get(uri);
    if let Some(token) = token {
        let mut value = http::HeaderValue::try_from(format!("Bearer {token}"))
            .context("the admin token holds characters a header cannot carry")?;
        value.set_sensitive(true);
        request = request.header(http::header::AUTHORIZATION, value);
    }
    let request = request.body(Empty::<Bytes>::new())?;
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 5s"))
        .with_context(unreachable)?
        .with_context(unreachable)?;
    let code = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading /debug/syncz")?
        .to_bytes();
    if !code.is_success() {
        bail!(
            "{url} answered {code}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    serde_json::from_slice(&body).with_context(|| {
        format!("{url} did not answer a sync status; is {admin} the admin port of pixiu-metadata?")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::views::{ErrorDetail, NackView, TypeSync};

    fn type_sync(type_url: &str, state: &str) -> TypeSync {
        TypeSync {
            type_url: type_url.into(),
            state: state.into(),
            wildcard: true,
            names: vec![],
            sent_version: Some("v2".into()),
            sent_nonce: Some("n2".into()),
            acked_version: Some("v1".into()),
            nack: None,
            n_resources: 1,
            n_acks: 1,
            n_nacks: 0,
        }
    }

    #[test]
    fn one_row_per_client_and_type_with_a_table() {
        let mut nacked = type_sync(
            "type.googleapis.com/pixiu.pkg.metadata.ServiceDefinition",
            "NACKED",
        );
        nacked.nack = Some(NackView {
            version: "v2".into(),
            nonce: "n2".into(),
            error_detail: ErrorDetail {
                code: 3,
                message: "bad definition".into(),
            },
        });
        let status = SyncStatus {
            streams: vec![StreamSync {
                stream_id: 1,
                node_id: "consumer-1".into(),
                node_cluster: String::new(),
                namespace: "default".into(),
                partitions: vec!["default".into(), String::new()],
                peer: Some("127.0.0.1:5000".into()),
                protocol: "sotw".into(),
                connected_since: "2026-01-01T00:00:00Z".into(),
                types: vec![
                    type_sync("type.googleapis.com/pixiu.pkg.metadata.Metadata", "SYNCED"),
                    nacked,
                ],
            }],
        };
        let rows = rows(&status);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].error.as_deref(), Some("bad definition"));
        let mut out = Vec::new();
        write_table(&rows, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "NODE        NAMESPACE  TYPE               STATE   SENT  ACKED  PEER            ERROR\n\
             consumer-1  default    Metadata           SYNCED  v2    v1     127.0.0.1:5000\n\
             consumer-1  default    ServiceDefinition  NACKED  v2    v1     127.0.0.1:5000  bad definition\n"
        );
    }
}
