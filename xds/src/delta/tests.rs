//! Data-driven tests: each test is one script run through [`check`], which replays the client
//! and cache lines and compares the whole transcript (inputs and outputs) with the script.
//!
//! Input lines:
//! - `put NAME VALUE`, `delete NAME`: a cache write, followed by `on_snapshot` as the driver
//!   would, unless the line ends in `quiet` (the driver has not woken up yet);
//! - `req TOKENS`: a request. Tokens: `@t2` (type, default `t1`), `+NAME` subscribe, `-NAME`
//!   unsubscribe, `ack=rN` (echo response N's nonce, as a real client's ACK), `nack=rN` (the
//!   rejected nonce plus `error_detail`), `nonce=RAW` (a nonce as is), `err` (an
//!   `error_detail`), `have=NAME=VALUE`
//!   (`initial_resource_versions` at the version of VALUE's bytes), `have=NAME~RAW` (at a
//!   version string as is);
//! - `reconnect`: a new stream over the same cache; `reconnect withhold`: one with
//!   [`Quirks::withhold_resourceless`] and `@t2` without the legacy wildcard;
//! - `status [@t2]`: the type's sync state and what the client holds.
//!
//! Output lines (indented): `<- rN [@t2] +NAME=VALUE -NAME` for a response (`rN` counts
//! responses over the whole script), `!! ack rN`, `!! nack rN: MESSAGE`, `!! stale NONCE`,
//! `== STATE holds NAME=VALUE,...`, `error: ...`.
//!
//! The helper also plays the client: it applies every response to a `name -> version` map,
//! checks `system_version_info` against that map, and checks that nonces never repeat.

use std::collections::{BTreeMap, HashMap, HashSet};

use envoy_types::pb::{
    envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse},
    google::protobuf::Any,
    google::rpc::Status as RpcStatus,
};

use super::*;
use crate::{
    cache::{Cache, CacheWriter, Update, cache},
    status::Notice,
};

const T1: &str = "type.googleapis.com/test.One";
const T2: &str = "type.googleapis.com/test.Two";

fn type_url(label: &str) -> &'static str {
    match label {
        "t2" => T2,
        _ => T1,
    }
}

fn type_label(type_url: &str) -> &'static str {
    if type_url == T2 { "t2" } else { "t1" }
}

struct Script {
    cache: Cache,
    writer: CacheWriter,
    stream: DeltaStream,
    n_streams: usize,
    /// Response label by nonce, and nonce by label.
    labels: HashMap<String, String>,
    nonces: HashMap<String, String>,
    /// Value by the version derived from it, to print versions readably.
    values: HashMap<Version, String>,
    /// The client's view of what it holds, per type.
    client: HashMap<String, BTreeMap<ResourceName, Version>>,
    seen_nonces: HashSet<String>,
    out: Vec<String>,
}

impl Script {
    fn new() -> Self {
        let (cache, writer) = cache();
        Self {
            cache,
            writer,
            stream: new_stream(1),
            n_streams: 1,
            labels: HashMap::new(),
            nonces: HashMap::new(),
            values: HashMap::new(),
            client: HashMap::new(),
            seen_nonces: HashSet::new(),
            out: Vec::new(),
        }
    }

    fn value_of(&self, version: &Version) -> String {
        self.values
            .get(version)
            .cloned()
            .unwrap_or_else(|| format!("~{version}"))
    }

    fn run_line(&mut self, line: &str) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("put") => {
                let name = words.next().expect("put NAME VALUE");
                let value = words.next().expect("put NAME VALUE");
                self.values
                    .insert(Version::of_bytes(value.as_bytes()), value.to_string());
                self.writer.apply([Update::Put {
                    partition: "p".into(),
                    type_url: T1.into(),
                    name: name.into(),
                    body: Any {
                        type_url: T1.into(),
                        value: value.as_bytes().to_vec(),
                    },
                }]);
                self.changed_unless(words.next());
            }
            Some("put2") => {
                let name = words.next().expect("put2 NAME VALUE");
                let value = words.next().expect("put2 NAME VALUE");
                self.values
                    .insert(Version::of_bytes(value.as_bytes()), value.to_string());
                self.writer.apply([Update::Put {
                    partition: "p".into(),
                    type_url: T2.into(),
                    name: name.into(),
                    body: Any {
                        type_url: T2.into(),
                        value: value.as_bytes().to_vec(),
                    },
                }]);
                self.changed();
            }
            Some("delete") => {
                let name = words.next().expect("delete NAME");
                self.writer.apply([Update::Delete {
                    partition: "p".into(),
                    type_url: T1.into(),
                    name: name.into(),
                }]);
                self.changed_unless(words.next());
            }
            Some("req") => {
                let request = self.request(words);
                // The client drops what it unsubscribes from and, on a first request,
                // holds what it announces.
                let held = self.client.entry(request.type_url.clone()).or_default();
                if !request.initial_resource_versions.is_empty() {
                    *held = request
                        .initial_resource_versions
                        .iter()
                        .map(|(name, version)| (ResourceName::new(name), Version::new(version)))
                        .collect();
                }
                for name in &request.resource_names_unsubscribe {
                    held.remove(name.as_str());
                }
                let snapshot = self.cache.snapshot();
                match self.stream.on_request(&request, &snapshot) {
                    Ok(step) => self.record(step, &request.response_nonce),
                    Err(error) => self.out.push(format!("  error: {error}")),
                }
            }
            Some("reconnect") => {
                self.n_streams += 1;
                self.stream = new_stream(self.n_streams);
                if words.next() == Some("withhold") {
                    let stream = std::mem::replace(&mut self.stream, new_stream(0));
                    self.stream = stream.with_quirks(Quirks {
                        withhold_resourceless: true,
                        no_legacy_wildcard: [TypeUrl::new(T2)].into(),
                    });
                }
                self.seen_nonces.clear();
            }
            Some("status") => {
                let ty = match words.next() {
                    Some("@t2") => T2,
                    _ => T1,
                };
                let status = self
                    .stream
                    .status()
                    .find(|(t, _)| t.as_str() == ty)
                    .map(|(_, s)| s.clone())
                    .expect("status of a requested type");
                let holds: Vec<String> = status
                    .resources
                    .iter()
                    .map(|(name, version)| format!("{name}={}", self.value_of(version)))
                    .collect();
                self.out.push(format!(
                    "  == {} holds {}",
                    status.state().as_str(),
                    holds.join(",")
                ));
            }
            other => panic!("unknown script line {other:?}"),
        }
    }

    fn request<'a>(&self, words: impl Iterator<Item = &'a str>) -> DeltaDiscoveryRequest {
        let mut request = DeltaDiscoveryRequest {
            type_url: T1.into(),
            ..Default::default()
        };
        for word in words {
            if let Some(label) = word.strip_prefix('@') {
                request.type_url = type_url(label).into();
            } else if let Some(name) = word.strip_prefix('+') {
                request.resource_names_subscribe.push(name.into());
            } else if let Some(name) = word.strip_prefix('-') {
                request.resource_names_unsubscribe.push(name.into());
            } else if let Some(label) = word.strip_prefix("ack=") {
                request.response_nonce = self.nonces[label].clone();
            } else if let Some(label) = word.strip_prefix("nack=") {
                request.response_nonce = self.nonces[label].clone();
                request.error_detail = Some(RpcStatus {
                    code: 3,
                    message: "cannot parse".into(),
                    details: vec![],
                });
            } else if word == "err" {
                request.error_detail = Some(RpcStatus {
                    code: 3,
                    message: "cannot parse".into(),
                    details: vec![],
                });
            } else if let Some(raw) = word.strip_prefix("nonce=") {
                request.response_nonce = raw.into();
            } else if let Some(have) = word.strip_prefix("have=") {
                let (name, version) = match have.split_once('=') {
                    Some((name, value)) => (name, Version::of_bytes(value.as_bytes())),
                    None => {
                        let (name, raw) =
                            have.split_once('~').expect("have=NAME=VALUE or NAME~RAW");
                        (name, Version::new(raw))
                    }
                };
                request
                    .initial_resource_versions
                    .insert(name.into(), version.to_string());
            } else {
                panic!("unknown request token {word:?}");
            }
        }
        request
    }

    fn changed_unless(&mut self, quiet: Option<&str>) {
        if quiet != Some("quiet") {
            self.changed();
        }
    }

    fn changed(&mut self) {
        let snapshot = self.cache.snapshot();
        let step = self.stream.on_snapshot(&snapshot);
        self.record(step, "");
    }

    /// Records a step's output; `request_nonce` is the nonce of the request it answers.
    fn record(&mut self, step: Step, request_nonce: &str) {
        for notice in &step.notices {
            let line = match notice {
                Notice::Ack { .. } => format!("  !! ack {}", self.label(request_nonce)),
                Notice::Nack { nack, .. } => {
                    format!(
                        "  !! nack {}: {}",
                        self.label(nack.nonce.as_str()),
                        nack.message
                    )
                }
                Notice::StaleNonce { nonce, .. } => {
                    format!("  !! stale {}", self.label(nonce.as_str()))
                }
            };
            self.out.push(line);
        }
        for response in step.responses.iter().map(DeltaResponse::decoded) {
            assert!(
                self.seen_nonces.insert(response.nonce.clone()),
                "nonce {} repeated within a stream",
                response.nonce
            );
            let label = format!("r{}", self.labels.len() + 1);
            self.labels.insert(response.nonce.clone(), label.clone());
            self.nonces.insert(label.clone(), response.nonce.clone());
            let held = self.client.entry(response.type_url.clone()).or_default();
            apply(held, &response);
            assert_eq!(
                response.system_version_info,
                Version::of_set(held.iter()).as_str(),
                "system_version_info is the version of everything the client holds"
            );
            let mut line = format!("  <- {label}");
            if response.type_url != T1 {
                line.push_str(&format!(" @{}", type_label(&response.type_url)));
            }
            for resource in &response.resources {
                let body = resource
                    .resource
                    .as_ref()
                    .expect("a sent resource has a body");
                assert_eq!(body.type_url, response.type_url);
                assert_eq!(resource.version, Version::of_bytes(&body.value).as_str());
                line.push_str(&format!(
                    " +{}={}",
                    resource.name,
                    String::from_utf8_lossy(&body.value)
                ));
            }
            for name in &response.removed_resources {
                line.push_str(&format!(" -{name}"));
            }
            self.out.push(line);
        }
    }

    fn label(&self, nonce: &str) -> String {
        self.labels
            .get(nonce)
            .cloned()
            .unwrap_or_else(|| nonce.to_string())
    }
}

fn new_stream(n: usize) -> DeltaStream {
    DeltaStream::new(View::new(["p".into()]), format!("s{n}"), Limits::default())
}

/// Applies a response to a client's `name -> version` map, the way a client does.
fn apply(held: &mut BTreeMap<ResourceName, Version>, response: &DeltaDiscoveryResponse) {
    for name in &response.removed_resources {
        held.remove(name.as_str());
    }
    for resource in &response.resources {
        held.insert(
            ResourceName::new(&resource.name),
            Version::new(&resource.version),
        );
    }
}

/// Runs the input lines of `script` and compares the transcript with all of `script`.
fn check(script: &str) {
    let mut run = Script::new();
    let mut input = Vec::new();
    for line in script
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
    {
        if line.starts_with("  ") {
            continue;
        }
        input.push(line.to_string());
    }
    for line in input {
        run.out.push(line.clone());
        run.run_line(&line);
    }
    for line in &mut run.out {
        line.truncate(line.trim_end().len());
    }
    let expected: Vec<&str> = script
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let actual = run.out.join("\n");
    assert_eq!(
        expected.join("\n"),
        actual,
        "\n--- expected ---\n{}\n--- actual ---\n{actual}\n",
        expected.join("\n")
    );
}

/// Strips the common indentation of a raw string, so scripts can be indented in the source.
fn script(text: &str) -> String {
    let indent = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    text.lines()
        .map(|l| {
            if l.len() >= indent {
                &l[indent..]
            } else {
                l.trim_start()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn subscribe_before_publish_then_push() {
    check(&script(
        "
        req +a
        put a A1
          <- r1 +a=A1
        req ack=r1
          !! ack r1
        status
          == SYNCED holds a=A1
        put b B1
        ",
    ));
}

#[test]
fn named_resources_changes_and_removal() {
    check(&script(
        "
        put a A1
        put b B1
        put c C1
        req +a +b
          <- r1 +a=A1 +b=B1
        req ack=r1
          !! ack r1
        put a A2
          <- r2 +a=A2
        put c C2
        delete b
          <- r3 -b
        req ack=r3
          !! ack r3
        put b B2
          <- r4 +b=B2
        ",
    ));
}

#[test]
fn nack_is_recorded_and_not_answered_with_the_same_content() {
    check(&script(
        "
        put a A1
        req +a
          <- r1 +a=A1
        req ack=r1
          !! ack r1
        put a A2
          <- r2 +a=A2
        req nack=r2
          !! nack r2: cannot parse
        status
          == NACKED holds a=A2
        put zzz other
        put a A3
          <- r3 +a=A3
        req ack=r3
          !! ack r3
        status
          == SYNCED holds a=A3
        ",
    ));
}

#[test]
fn a_request_with_a_nonce_still_subscribes_and_unsubscribes() {
    // quilkin treats such a request as a pure ACK and drops the subscription change.
    check(&script(
        "
        put a A1
        put b B1
        put c C1
        req +a +c
          <- r1 +a=A1 +c=C1
        req ack=r1 +b -c
          !! ack r1
          <- r2 +b=B1
        status
          == STALE holds a=A1,b=B1
        req nack=r2 -b
          !! nack r2: cannot parse
        status
          == NACKED holds a=A1
        put b B2
        put c C2
        ",
    ));
}

#[test]
fn stale_nonce_is_neither_ack_nor_nack_but_changes_subscription() {
    check(&script(
        "
        put a A1
        put b B1
        req +a
          <- r1 +a=A1
        put a A2
          <- r2 +a=A2
        req nack=r1 +b
          !! stale r1
          <- r3 +b=B1
        status
          == STALE holds a=A2,b=B1
        req nonce=bogus
          !! stale bogus
        req ack=r3
          !! ack r3
        status
          == SYNCED holds a=A2,b=B1
        ",
    ));
}

#[test]
fn unsubscribe_forgets_without_a_response() {
    check(&script(
        "
        put a A1
        put b B1
        req +a +b
          <- r1 +a=A1 +b=B1
        req ack=r1 -a
          !! ack r1
        status
          == SYNCED holds b=B1
        put a A2
        req +a
          <- r2 +a=A2
        ",
    ));
}

#[test]
fn resubscribing_resends_what_the_client_should_already_hold() {
    // DeltaDiscoveryRequest: the server must respond with all resources listed in
    // resource_names_subscribe, even if it believes the client has their latest version.
    check(&script(
        "
        put a A1
        req +a
          <- r1 +a=A1
        req ack=r1 +a
          !! ack r1
          <- r2 +a=A1
        req +missing
        ",
    ));
}

#[test]
fn resubscribing_to_a_resource_that_is_gone_removes_it() {
    // Found by the property test: a resubscribed name must stay "held" until answered, or
    // the client is never told it is gone.
    check(&script(
        "
        put a A1
        req +a
          <- r1 +a=A1
        delete a quiet
        req ack=r1 +a
          !! ack r1
          <- r2 -a
        ",
    ));
}

#[test]
fn legacy_wildcard_and_its_end() {
    check(&script(
        "
        put a A1
        put b B1
        req
          <- r1 +a=A1 +b=B1
        put c C1
          <- r2 +c=C1
        req ack=r2
          !! ack r2
        delete b
          <- r3 -b
        req ack=r3 +a
          !! ack r3
          <- r4 +a=A1 -c
        put c C2
        ",
    ));
}

#[test]
fn explicit_wildcard_beside_names() {
    check(&script(
        "
        put a A1
        req +x
        req +*
          <- r1 +a=A1
        put x X1
          <- r2 +x=X1
        req -x
          <- r3 +x=X1
        req -*
          <- r4 -a -x
        status
          == STALE holds
        ",
    ));
}

#[test]
fn empty_wildcard_is_answered_once_empty_names_are_not() {
    check(&script(
        "
        req
          <- r1
        req ack=r1
          !! ack r1
        req @t2 +nothing
        put2 nothing here
          <- r2 @t2 +nothing=here
        ",
    ));
}

#[test]
fn reconnect_with_initial_resource_versions() {
    check(&script(
        "
        put a A1
        put b B1
        put c C1
        req +a +b +c
          <- r1 +a=A1 +b=B1 +c=C1
        req ack=r1
          !! ack r1
        reconnect
        put b B2
        delete c
        req +a +b +c have=a=A1 have=b=B1 have=c=C1 nonce=s1-1
          <- r2 +b=B2 -c
        status
          == STALE holds a=A1,b=B2
        req ack=r2
          !! ack r2
        reconnect
        req +a +b have=a=A1 have=b=B2
        status
          == NOT SENT holds a=A1,b=B2
        put a A2
          <- r3 +a=A2
        ",
    ));
}

#[test]
fn reconnect_with_wildcard_and_unknown_versions() {
    check(&script(
        "
        put a A1
        put b B1
        reconnect
        req have=a~old have=gone~old have=b=B1
          <- r1 +a=A1 -gone
        reconnect
        req have=a=A1 have=b=B1
          <- r2
        ",
    ));
}

#[test]
fn first_request_with_a_nack_from_an_earlier_stream_is_ignored() {
    check(&script(
        "
        put a A1
        req +a have=a=A1 nonce=s0-7 err
        status
          == NOT SENT holds a=A1
        req +b nonce=s0-7
          !! stale s0-7
        ",
    ));
}

#[test]
fn types_are_independent() {
    check(&script(
        "
        put a A1
        put2 a A2
        req +a
          <- r1 +a=A1
        req @t2 +a ack=r1
          <- r2 @t2 +a=A2
        req @t2 ack=r2
          !! ack r2
        status
          == STALE holds a=A1
        status @t2
          == SYNCED holds a=A2
        ",
    ));
}

#[test]
fn protocol_errors_and_limits() {
    let (cache, _writer) = cache();
    let snap = cache.snapshot();
    let mut tight = DeltaStream::new(
        View::new(["p".into()]),
        "s",
        Limits {
            max_subscribed_names: 2,
            max_types: 1,
        },
    );
    let request = |type_url: &str, names: &[&str]| DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..Default::default()
    };
    assert_eq!(
        tight
            .on_request(&DeltaDiscoveryRequest::default(), &snap)
            .unwrap_err(),
        ProtocolError::MissingTypeUrl
    );
    tight.on_request(&request(T1, &["a", "b"]), &snap).unwrap();
    assert!(matches!(
        tight.on_request(&request(T1, &["c"]), &snap),
        Err(ProtocolError::TooManySubscriptions { limit: 2 })
    ));
    assert!(matches!(
        tight.on_request(&request(T2, &["a"]), &snap),
        Err(ProtocolError::TooManyTypes { limit: 1 })
    ));
    let mut fresh = DeltaStream::new(
        View::new(["p".into()]),
        "s",
        Limits {
            max_subscribed_names: 2,
            max_types: 1,
        },
    );
    let mut reconnect = request(T1, &[]);
    for name in ["a", "b", "c"] {
        reconnect
            .initial_resource_versions
            .insert(name.into(), "v".into());
    }
    assert!(matches!(
        fresh.on_request(&reconnect, &snap),
        Err(ProtocolError::TooManySubscriptions { limit: 2 })
    ));
    assert_eq!(
        fresh.status().count(),
        0,
        "a refused request changes nothing"
    );
}

#[test]
fn quirk_withholds_removal_only_and_empty_responses() {
    check(&script(
        "
        reconnect withhold
        req +a +b
        put a A1
          <- r1 +a=A1
        req ack=r1
          !! ack r1
        delete a
        put b B1
          <- r2 +b=B1 -a
        delete b
        put a A2
          <- r3 +a=A2 -b
        req @t2
        put c C1
        ",
    ));
}

#[test]
fn quirk_client_reconnecting_to_a_server_without_the_resource_keeps_it() {
    check(&script(
        "
        reconnect withhold
        req +a have=a=A1 nonce=9-9
        put a A1
        put a A2
          <- r1 +a=A2
        ",
    ));
}
