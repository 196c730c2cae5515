//! Property tests: random interleavings of client requests (resource lists, wildcard, ACK,
//! NACK, stale nonce), reconnects carrying the last accepted `version_info`, and cache writes.
//!
//! The test plays a client that mirrors its own subscription and keeps the content of the
//! last response per type, and checks after every step:
//! - nonces never repeat within a stream, and `version_info` is the version of the content;
//! - a NACKed version is not resent until the type's content changes in the cache or the
//!   client changes its subscription;
//! - a stale nonce changes no ACK state;
//! - once every cache write has been notified, the client's content equals the cache
//!   restricted to its subscription;
//! - at the end, once the client ACKs and goes quiet, nothing more is sent and every type is
//!   `SYNCED`.

use std::collections::{BTreeMap, HashSet};

use envoy_types::pb::{google::protobuf::Any, google::rpc::Status as RpcStatus};
use proptest::prelude::*;

use super::*;
use crate::{
    cache::{Cache, CacheWriter, Update, cache},
    status::{Notice, SyncState},
    subscription::Subscription,
    types::WILDCARD,
};

const TYPES: [&str; 2] = [
    "type.googleapis.com/test.One",
    "type.googleapis.com/test.Two",
];
const NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// A name in a request's list: one of `NAMES`, or `*` for the last index.
fn name(index: usize) -> &'static str {
    NAMES.get(index).copied().unwrap_or(WILDCARD)
}

#[derive(Debug, Clone)]
enum NonceChoice {
    /// No nonce.
    Empty,
    /// The last nonce received for the type, echoing its version: an ACK.
    Ack,
    /// The last nonce received for the type, the previously accepted version and
    /// `error_detail`: a NACK.
    Nack,
    /// Some other nonce: an earlier one (picked by index) or one never sent.
    Stale(usize),
}

#[derive(Debug, Clone)]
enum Op {
    Put {
        type_idx: usize,
        name_idx: usize,
        value: u8,
        notify: bool,
    },
    Delete {
        type_idx: usize,
        name_idx: usize,
        notify: bool,
    },
    Request {
        type_idx: usize,
        /// A new resource list, or `None` to repeat the current one.
        names: Option<Vec<usize>>,
        nonce: NonceChoice,
    },
    Reconnect {
        carry_nonce: bool,
    },
}

fn nonce_choice() -> impl Strategy<Value = NonceChoice> {
    prop_oneof![
        2 => Just(NonceChoice::Empty),
        4 => Just(NonceChoice::Ack),
        2 => Just(NonceChoice::Nack),
        2 => (0usize..8).prop_map(NonceChoice::Stale),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let names =
        proptest::option::weighted(0.5, proptest::collection::vec(0usize..=NAMES.len(), 0..3));
    prop_oneof![
        4 => (0usize..2, 0..NAMES.len(), 0u8..3, proptest::bool::weighted(0.8)).prop_map(
            |(type_idx, name_idx, value, notify)| Op::Put { type_idx, name_idx, value, notify }
        ),
        2 => (0usize..2, 0..NAMES.len(), proptest::bool::weighted(0.8)).prop_map(
            |(type_idx, name_idx, notify)| Op::Delete { type_idx, name_idx, notify }
        ),
        6 => (0usize..2, names, nonce_choice()).prop_map(|(type_idx, names, nonce)| {
            Op::Request { type_idx, names, nonce }
        }),
        1 => any::<bool>().prop_map(|carry_nonce| Op::Reconnect { carry_nonce }),
    ]
}

/// Resource content: the name and a value, so the client can tell names apart in a
/// response's bare `Any`s.
type Content = BTreeMap<String, Vec<u8>>;

/// The client's side of one type.
#[derive(Debug, Default)]
struct ClientType {
    /// Whether the client sent a request for this type on the current stream.
    started: bool,
    names: Vec<String>,
    subscription: Subscription,
    /// The last response's version and content.
    latest: Option<(String, Content)>,
    /// The last version and content the client ACKed.
    accepted: Option<(String, Content)>,
    /// Nonces received for this type on the current stream, oldest first, with versions.
    received: Vec<(String, String)>,
    /// Versions the client rejected, not to be resent until something changes.
    nacked: HashSet<String>,
}

struct World {
    cache: Cache,
    writer: CacheWriter,
    view: View,
    stream: SotwStream,
    n_streams: u64,
    stream_nonces: HashSet<String>,
    all_nonces: Vec<String>,
    clients: [ClientType; 2],
    pending_notify: bool,
}

impl World {
    fn new() -> Self {
        let (cache, writer) = cache();
        let view = View::new(["p".into()]);
        Self {
            stream: SotwStream::new(view.clone(), "s1", Limits::default()),
            cache,
            writer,
            view,
            n_streams: 1,
            stream_nonces: HashSet::new(),
            all_nonces: Vec::new(),
            clients: Default::default(),
            pending_notify: false,
        }
    }

    fn generation(&self, type_idx: usize) -> u64 {
        self.cache
            .snapshot()
            .generation(&self.view, &TypeUrl::new(TYPES[type_idx]))
    }

    fn write(
        &mut self,
        type_idx: usize,
        update: Update,
        notify: bool,
    ) -> Result<(), TestCaseError> {
        let before = self.generation(type_idx);
        self.writer.apply([update]);
        if self.generation(type_idx) != before {
            self.clients[type_idx].nacked.clear();
            self.pending_notify = true;
        }
        if notify {
            self.notify()?;
        }
        Ok(())
    }

    fn notify(&mut self) -> Result<(), TestCaseError> {
        let snapshot = self.cache.snapshot();
        let step = self.stream.on_snapshot(&snapshot);
        self.pending_notify = false;
        self.receive(step)
    }

    fn receive(&mut self, step: Step) -> Result<(), TestCaseError> {
        for response in step.responses.iter().map(SotwResponse::decoded) {
            prop_assert!(
                self.stream_nonces.insert(response.nonce.clone()),
                "nonce {} repeated within a stream",
                response.nonce
            );
            self.all_nonces.push(response.nonce.clone());
            let type_idx = TYPES
                .iter()
                .position(|t| *t == response.type_url)
                .expect("responses carry a requested type");
            let client = &mut self.clients[type_idx];
            prop_assert!(client.started, "a response for a type never requested");
            prop_assert!(
                !client.nacked.contains(&response.version_info),
                "NACKed version {} resent before anything changed",
                response.version_info
            );
            let mut content = Content::new();
            for body in &response.resources {
                let text = String::from_utf8(body.value.clone()).expect("test bodies are text");
                let (name, _) = text.split_once(':').expect("test bodies are NAME:VALUE");
                content.insert(name.to_string(), body.value.clone());
            }
            let versions: Vec<(ResourceName, Version)> = content
                .iter()
                .map(|(name, bytes)| (ResourceName::new(name), Version::of_bytes(bytes)))
                .collect();
            let expected_version = Version::of_set(versions.iter().map(|(n, v)| (n, v)));
            prop_assert_eq!(response.version_info.as_str(), expected_version.as_str());
            client
                .received
                .push((response.nonce.clone(), response.version_info.clone()));
            client.latest = Some((response.version_info, content));
        }
        Ok(())
    }

    fn request(
        &mut self,
        type_idx: usize,
        names: Option<&[usize]>,
        nonce: &NonceChoice,
    ) -> Result<(), TestCaseError> {
        let client = &self.clients[type_idx];
        let names: Vec<String> = match names {
            Some(names) => names.iter().map(|i| name(*i).to_string()).collect(),
            None => client.names.clone(),
        };
        let latest = client.received.last().cloned();
        let accepted_version = client
            .accepted
            .as_ref()
            .map(|(v, _)| v.clone())
            .unwrap_or_default();
        let (response_nonce, version_info, error_detail) = match (nonce, &latest) {
            (NonceChoice::Ack, Some((nonce, version))) => (nonce.clone(), version.clone(), None),
            (NonceChoice::Nack, Some((nonce, _))) => (
                nonce.clone(),
                accepted_version,
                Some(RpcStatus {
                    code: 3,
                    message: "rejected".into(),
                    details: vec![],
                }),
            ),
            (NonceChoice::Stale(pick), _) => {
                let candidate = self
                    .all_nonces
                    .get(*pick)
                    .cloned()
                    .unwrap_or_else(|| format!("never-sent-{pick}"));
                let nonce = if Some(&candidate) == latest.as_ref().map(|(n, _)| n) {
                    format!("never-sent-{pick}")
                } else {
                    candidate
                };
                (nonce, accepted_version, None)
            }
            _ => (String::new(), accepted_version, None),
        };
        self.send(type_idx, names, version_info, response_nonce, error_detail)
    }

    fn send(
        &mut self,
        type_idx: usize,
        names: Vec<String>,
        version_info: String,
        response_nonce: String,
        error_detail: Option<RpcStatus>,
    ) -> Result<(), TestCaseError> {
        let type_url = TypeUrl::new(TYPES[type_idx]);
        let client = &mut self.clients[type_idx];
        let first = !client.started;
        client.started = true;
        let is_ack = !first
            && !response_nonce.is_empty()
            && client.received.last().map(|(n, _)| n) == Some(&response_nonce);
        if is_ack {
            let (_, version) = client.received.last().cloned().expect("checked above");
            match &error_detail {
                Some(_) => {
                    client.nacked.insert(version);
                }
                None => client.accepted = client.latest.clone(),
            }
        }
        let subscription = client.subscription.sotw_next(&names, first);
        if subscription != client.subscription {
            client.nacked.clear();
        }
        client.subscription = subscription;
        client.names = names.clone();

        let before = self.status_of(&type_url);
        let request = DiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names: names,
            version_info: version_info.clone(),
            response_nonce: response_nonce.clone(),
            error_detail: error_detail.clone(),
            ..Default::default()
        };
        let snapshot = self.cache.snapshot();
        let step = self.stream.on_request(&request, &snapshot);
        prop_assert!(step.is_ok(), "request refused: {:?}", step.err());
        let step = step.expect("checked above");
        let after = self
            .status_of(&type_url)
            .expect("a requested type has a status");

        let ack_fields =
            |s: &TypeStatus| (s.acked_version.clone(), s.nack.clone(), s.n_acks, s.n_nacks);
        if is_ack {
            if error_detail.is_some() {
                prop_assert_eq!(
                    after.nack.as_ref().map(|n| n.nonce.as_str()),
                    Some(response_nonce.as_str())
                );
                prop_assert!(
                    matches!(step.notices.as_slice(), [Notice::Nack { .. }]),
                    "a NACK is noticed"
                );
            } else {
                prop_assert_eq!(
                    after.acked_version.as_ref().map(|v| v.as_str()),
                    Some(version_info.as_str())
                );
                prop_assert!(
                    matches!(step.notices.as_slice(), [Notice::Ack { .. }]),
                    "an ACK is noticed"
                );
            }
        } else if let Some(before) = &before {
            prop_assert_eq!(
                ack_fields(&after),
                ack_fields(before),
                "a stale or missing nonce changed ACK state"
            );
            let stale = !response_nonce.is_empty();
            prop_assert_eq!(step.notices.len(), usize::from(stale));
        } else {
            prop_assert!(
                step.notices.is_empty(),
                "a first request is neither ACK nor stale"
            );
        }
        prop_assert_eq!(&after.subscription, &self.clients[type_idx].subscription);
        self.receive(step)?;
        // A request only answers subscription changes; a cache write catches up through
        // `on_snapshot`, so the client is in sync once no write awaits it.
        if !self.pending_notify {
            self.check_all()?;
        }
        Ok(())
    }

    fn status_of(&self, type_url: &TypeUrl) -> Option<TypeStatus> {
        self.stream
            .status()
            .find(|(t, _)| *t == type_url)
            .map(|(_, s)| s.clone())
    }

    fn reconnect(&mut self, carry_nonce: bool) -> Result<(), TestCaseError> {
        self.n_streams += 1;
        self.stream = SotwStream::new(
            self.view.clone(),
            format!("s{}", self.n_streams),
            Limits::default(),
        );
        self.stream_nonces.clear();
        self.pending_notify = false;
        let mut first_requests = Vec::new();
        for (type_idx, client) in self.clients.iter_mut().enumerate() {
            let old_nonce = client.received.last().map(|(n, _)| n.clone());
            client.received.clear();
            client.nacked.clear();
            // What the client runs with is what it accepted.
            client.latest = client.accepted.clone();
            if !std::mem::take(&mut client.started) {
                continue;
            }
            if std::mem::take(&mut client.subscription).is_empty() {
                continue;
            }
            let version_info = client
                .accepted
                .as_ref()
                .map(|(v, _)| v.clone())
                .unwrap_or_default();
            let nonce = match old_nonce {
                Some(nonce) if carry_nonce => nonce,
                _ => String::new(),
            };
            first_requests.push((type_idx, client.names.clone(), version_info, nonce));
        }
        for (type_idx, names, version_info, nonce) in first_requests {
            self.send(type_idx, names, version_info, nonce, None)?;
        }
        Ok(())
    }

    /// What the client should hold for a type: the cache restricted to its subscription.
    fn desired(&self, type_idx: usize) -> Content {
        let type_url = TypeUrl::new(TYPES[type_idx]);
        let snapshot = self.cache.snapshot();
        snapshot
            .resources(&self.view, &type_url)
            .into_iter()
            .filter(|r| self.clients[type_idx].subscription.matches(r.name.as_str()))
            .map(|r| (r.name.to_string(), r.value().to_vec()))
            .collect()
    }

    fn check_type(&self, type_idx: usize) -> Result<(), TestCaseError> {
        let client = &self.clients[type_idx];
        if !client.started {
            return Ok(());
        }
        let held = client
            .latest
            .as_ref()
            .map(|(_, c)| c.clone())
            .unwrap_or_default();
        prop_assert_eq!(
            held,
            self.desired(type_idx),
            "client is not in sync with the cache"
        );
        Ok(())
    }

    fn check_all(&self) -> Result<(), TestCaseError> {
        for type_idx in 0..TYPES.len() {
            self.check_type(type_idx)?;
        }
        Ok(())
    }

    /// The client ACKs the last response of every type and goes quiet.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        if self.pending_notify {
            self.notify()?;
        }
        self.check_all()?;
        for (type_url, client) in TYPES.iter().zip(&self.clients) {
            if !client.started {
                continue;
            }
            let Some((nonce, version)) = client.received.last().cloned() else {
                continue;
            };
            let type_url = TypeUrl::new(type_url);
            let request = DiscoveryRequest {
                type_url: type_url.to_string(),
                resource_names: client.names.clone(),
                version_info: version,
                response_nonce: nonce,
                ..Default::default()
            };
            let step = self
                .stream
                .on_request(&request, &self.cache.snapshot())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(
                step.responses.is_empty(),
                "a quiet, synced client was sent more"
            );
            let status = self.status_of(&type_url).expect("started");
            prop_assert_eq!(status.state(), SyncState::Synced);
        }
        let step = self.stream.on_snapshot(&self.cache.snapshot());
        prop_assert!(step.responses.is_empty());
        self.check_all()
    }
}

fn body(type_idx: usize, name_idx: usize, value: u8) -> Any {
    Any {
        type_url: TYPES[type_idx].into(),
        value: format!("{}:{value}", NAMES[name_idx]).into_bytes(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn sotw_stream_keeps_the_client_in_sync(ops in proptest::collection::vec(op(), 1..40)) {
        let mut world = World::new();
        for op in ops {
            match op {
                Op::Put { type_idx, name_idx, value, notify } => {
                    let update = Update::Put {
                        partition: "p".into(),
                        type_url: TYPES[type_idx].into(),
                        name: NAMES[name_idx].into(),
                        body: body(type_idx, name_idx, value),
                    };
                    world.write(type_idx, update, notify)?;
                }
                Op::Delete { type_idx, name_idx, notify } => {
                    let update = Update::Delete {
                        partition: "p".into(),
                        type_url: TYPES[type_idx].into(),
                        name: NAMES[name_idx].into(),
                    };
                    world.write(type_idx, update, notify)?;
                }
                Op::Request { type_idx, names, nonce } => {
                    world.request(type_idx, names.as_deref(), &nonce)?;
                }
                Op::Reconnect { carry_nonce } => world.reconnect(carry_nonce)?,
            }
            if !world.pending_notify {
                world.check_all()?;
            }
        }
        world.settle()?;
    }
}
