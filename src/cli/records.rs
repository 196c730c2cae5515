//! `metadata list|delete` and `definition list|delete`, and the `-o table|json|yaml`
//! rendering shared by every command that reads records.
//!
//! Listing follows the server's pages (`next_page_token`) until `--limit` records are
//! printed or the last page is read, so a listing never holds more than one page in flight.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;
use tonic::Request;

use super::{ClientArgs, Output, output, status_error};
use crate::pb::metadata::{
    self as proto, metadata_service_client::MetadataServiceClient,
    service_definition_service_client::ServiceDefinitionServiceClient,
};

/// One record as read commands print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordView {
    /// The record's namespace; unknown for a `get` without `-n` (the server resolves it from
    /// the caller's identity or its default), and then left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `<application>/<revision>` or the definition's identifier.
    pub name: String,
    /// The application (metadata only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application: Option<String>,
    /// The revision (metadata only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// When a publish last refreshed the record (RFC 3339), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refreshed_at: Option<String>,
    /// Size of the raw value in bytes.
    pub value_bytes: usize,
    /// The raw value; absent with `--names-only`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl RecordView {
    fn from_metadata(record: proto::MetadataRecord, names_only: bool) -> Self {
        Self {
            name: format!("{}/{}", record.application_name, record.revision),
            namespace: Some(record.namespace),
            application: Some(record.application_name),
            revision: Some(record.revision),
            refreshed_at: rfc3339(record.refreshed_at_ms),
            value_bytes: value_bytes(record.value_bytes, &record.metadata_info),
            value: (!names_only).then_some(record.metadata_info),
        }
    }

    fn from_definition(record: proto::ServiceDefinitionRecord, names_only: bool) -> Self {
        Self {
            name: record.identifier,
            namespace: Some(record.namespace),
            application: None,
            revision: None,
            refreshed_at: rfc3339(record.refreshed_at_ms),
            value_bytes: value_bytes(record.value_bytes, &record.service_definition),
            value: (!names_only).then_some(record.service_definition),
        }
    }
}

/// `refreshed_at_ms` as RFC 3339 (seconds), `None` when unset.
fn rfc3339(ms: i64) -> Option<String> {
    let ms = u64::try_from(ms).ok().filter(|ms| *ms > 0)?;
    let time = UNIX_EPOCH + Duration::from_millis(ms);
    Some(humantime::format_rfc3339_seconds(time).to_string())
}

/// How long ago `refreshed_at` was, for the table (`3m`, `2h`, `-`).
fn age(refreshed_at: Option<&str>, now: SystemTime) -> String {
    let Some(time) = refreshed_at.and_then(|t| humantime::parse_rfc3339(t).ok()) else {
        return "-".into();
    };
    let secs = now.duration_since(time).map_or(0, |d| d.as_secs());
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Prints `records` in the chosen format. The table shows names, sizes and ages, never the
/// values (use `-o json` or `get` for those).
pub fn print(
    records: &[RecordView],
    output: Output,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    if output.write_structured(records, out)? {
        return Ok(());
    }
    if records.is_empty() {
        writeln!(out, "no records")?;
        return Ok(());
    }
    let now = SystemTime::now();
    let rows: Vec<[String; 4]> = records
        .iter()
        .map(|r| {
            [
                r.namespace.clone().unwrap_or_else(|| "-".into()),
                r.name.clone(),
                r.value_bytes.to_string(),
                age(r.refreshed_at.as_deref(), now),
            ]
        })
        .collect();
    output::write_table(["NAMESPACE", "NAME", "BYTES", "REFRESHED"], &rows, out)?;
    Ok(())
}

/// Prints the one record `get` read: the object itself for JSON and YAML (as `kubectl get
/// <kind> <name>` does), a one-row table otherwise.
pub fn print_one(
    record: RecordView,
    output: Output,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    if output.write_structured(&record, out)? {
        return Ok(());
    }
    print(&[record], output, out)
}

/// Follows `next_page_token` from the first page until `limit` records or the last page.
/// `fetch(page_token, page_size)` reads one page: its records and the next token.
async fn pages<F, Fut>(limit: usize, mut fetch: F) -> anyhow::Result<Vec<RecordView>>
where
    F: FnMut(String, u32) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Vec<RecordView>, String)>>,
{
    let mut records = Vec::new();
    let mut page_token = String::new();
    loop {
        let page_size =
            u32::try_from(limit.saturating_sub(records.len()).min(1000)).unwrap_or(1000);
        let (page, next_page_token) = fetch(page_token, page_size).await?;
        records.extend(page);
        if next_page_token.is_empty() || records.len() >= limit {
            records.truncate(limit);
            return Ok(records);
        }
        page_token = next_page_token;
    }
}

/// Reads metadata pages until `limit` records or the last page.
pub async fn list_metadata(
    client: &ClientArgs,
    application: Option<String>,
    names_only: bool,
    limit: usize,
) -> anyhow::Result<Vec<RecordView>> {
    let grpc = MetadataServiceClient::new(client.channel().await?);
    pages(limit, |page_token, page_size| {
        let mut grpc = grpc.clone();
        let request = Request::new(proto::ListMetadataRequest {
            application_name: application.clone().unwrap_or_default(),
            page_size,
            page_token,
            names_only,
        });
        async move {
            let page = grpc.list(request).await.map_err(status_error)?.into_inner();
            let records = page.records.into_iter();
            Ok((
                records
                    .map(|r| RecordView::from_metadata(r, names_only))
                    .collect(),
                page.next_page_token,
            ))
        }
    })
    .await
}

/// Reads definition pages until `limit` records or the last page.
pub async fn list_definitions(
    client: &ClientArgs,
    prefix: Option<String>,
    names_only: bool,
    limit: usize,
) -> anyhow::Result<Vec<RecordView>> {
    let grpc = ServiceDefinitionServiceClient::new(client.channel().await?);
    pages(limit, |page_token, page_size| {
        let mut grpc = grpc.clone();
        let request = Request::new(proto::ListServiceDefinitionsRequest {
            identifier_prefix: prefix.clone().unwrap_or_default(),
            page_size,
            page_token,
            names_only,
        });
        async move {
            let page = grpc.list(request).await.map_err(status_error)?.into_inner();
            let records = page.records.into_iter();
            Ok((
                records
                    .map(|r| RecordView::from_definition(r, names_only))
                    .collect(),
                page.next_page_token,
            ))
        }
    })
    .await
}

/// A single record read with `get`, for `-o json|yaml|table`.
pub fn got(
    namespace: Option<&str>,
    name: String,
    application_revision: Option<(String, String)>,
    value: String,
) -> RecordView {
    let (application, revision) = application_revision.unzip();
    RecordView {
        namespace: namespace.map(str::to_string),
        name,
        application,
        revision,
        refreshed_at: None,
        value_bytes: value.len(),
        value: Some(value),
    }
}

/// Deletes one metadata revision.
pub async fn delete_metadata(
    client: &ClientArgs,
    application: String,
    revision: String,
) -> anyhow::Result<()> {
    let request = Request::new(proto::DeleteMetadataRequest {
        application_name: application,
        revision,
    });
    MetadataServiceClient::new(client.channel().await?)
        .delete(request)
        .await
        .map_err(status_error)
        .context("deleting")?;
    Ok(())
}

/// Deletes one definition.
pub async fn delete_definition(client: &ClientArgs, identifier: String) -> anyhow::Result<()> {
    let request = Request::new(proto::DeleteServiceDefinitionRequest { identifier });
    ServiceDefinitionServiceClient::new(client.channel().await?)
        .delete(request)
        .await
        .map_err(status_error)
        .context("deleting")?;
    Ok(())
}

/// A record's size as the server reports it; a server that predates the field reports 0,
/// and then the value itself (when listed) says.
fn value_bytes(reported: u64, value: &str) -> usize {
    match reported {
        0 => value.len(),
        n => usize::try_from(n).unwrap_or(usize::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, refreshed_at_ms: i64) -> RecordView {
        RecordView::from_metadata(
            proto::MetadataRecord {
                application_name: name.into(),
                revision: "r1".into(),
                metadata_info: "{\"app\":1}".into(),
                refreshed_at_ms,
                namespace: "default".into(),
                value_bytes: 9,
            },
            false,
        )
    }

    #[test]
    fn table_has_a_header_and_aligned_rows_without_values() {
        let mut out = Vec::new();
        print(
            &[view("greeter", 1_000), view("a-much-longer-app", 0)],
            Output::Table,
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("NAMESPACE  NAME"), "{text}");
        let name_col = lines[0].find(" NAME").unwrap() + 1;
        assert_eq!(lines[1].find("greeter/r1"), Some(name_col), "{text}");
        assert_eq!(
            lines[2].find("a-much-longer-app/r1"),
            Some(name_col),
            "{text}"
        );
        assert!(lines[2].ends_with('-'), "an unknown age is '-': {text}");
        assert!(
            !text.contains("app\":1"),
            "values stay out of the table: {text}"
        );
    }

    #[test]
    fn json_and_yaml_carry_the_raw_value_and_the_refresh_time() {
        let records = [view("greeter", 1_700_000_000_000)];
        let mut json = Vec::new();
        print(&records, Output::Json, &mut json).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed[0]["value"], "{\"app\":1}");
        assert_eq!(parsed[0]["application"], "greeter");
        assert_eq!(parsed[0]["refreshed_at"], "2023-11-14T22:13:20Z");
        let mut yaml = Vec::new();
        print(&records, Output::Yaml, &mut yaml).unwrap();
        let parsed: serde_json::Value = serde_norway::from_slice(&yaml).unwrap();
        assert_eq!(parsed[0]["name"], "greeter/r1");
    }

    #[test]
    fn one_record_is_printed_as_the_object_and_an_unknown_namespace_is_left_out() {
        let record = || got(None, "org.Greeter".into(), None, "{}".into());
        let mut json = Vec::new();
        print_one(record(), Output::Json, &mut json).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed["name"], "org.Greeter");
        assert_eq!(parsed["value"], "{}");
        assert!(parsed.get("namespace").is_none(), "{parsed}");
        let mut yaml = Vec::new();
        let given = got(
            Some("team-a"),
            "a/r1".into(),
            Some(("a".into(), "r1".into())),
            "v".into(),
        );
        print_one(given, Output::Yaml, &mut yaml).unwrap();
        let parsed: serde_json::Value = serde_norway::from_slice(&yaml).unwrap();
        assert_eq!(parsed["namespace"], "team-a");
        assert_eq!(parsed["revision"], "r1");
        let mut table = Vec::new();
        print_one(record(), Output::Table, &mut table).unwrap();
        let table = String::from_utf8(table).unwrap();
        assert!(table.lines().nth(1).unwrap().starts_with("-  "), "{table}");
    }

    #[test]
    fn empty_table_says_so() {
        let mut out = Vec::new();
        print(&[], Output::Table, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "no records\n");
    }

    #[test]
    fn ages_are_short() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |secs_ago: u64| {
            humantime::format_rfc3339_seconds(now - Duration::from_secs(secs_ago)).to_string()
        };
        assert_eq!(age(Some(&at(5)), now), "5s");
        assert_eq!(age(Some(&at(600)), now), "10m");
        assert_eq!(age(Some(&at(3 * 3600)), now), "3h");
        assert_eq!(age(Some(&at(3 * 86_400)), now), "3d");
        assert_eq!(age(None, now), "-");
    }
}
