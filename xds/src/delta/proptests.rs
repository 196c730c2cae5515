//! Property tests: random interleavings of client requests (subscribe, unsubscribe, wildcard,
//! ACK, NACK, stale nonce), reconnects with `initial_resource_versions`, and cache writes.
//!
//! The test plays a client that mirrors its own subscription and applies every response to
//! a `name -> version` map, and checks after every step:
//! - nonces never repeat within a stream, and `system_version_info` is the version of the
//!   client's map;
//! - a NACKed resource version is not resent until that resource changes in the cache or the
//!   client (re)subscribes to it, which the protocol says must resend;
//! - a stale nonce changes no ACK state;
//! - what the client holds equals what the server thinks it holds, which equals the cache
//!   restricted to the subscription (so pending state is bounded by the subscription);
//! - at the end, once the client ACKs and goes quiet, nothing more is sent and every type is
//!   `SYNCED`.

use std::collections::{BTreeMap, HashMap, HashSet};

use envoy_types::pb::{google::protobuf::Any, google::rpc::Status as RpcStatus};
use proptest::prelude::*;

use super::*;
use crate::{
    cache::{Cache, CacheWriter, Update, cache},
    status::{Notice, SyncState},
    subscription::Subscription,
};

const TYPES: [&str; 2] = [
    "type.googleapis.com/test.One",
    "type.googleapis.com/test.Two",
];
const NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// A name in a subscribe or unsubscribe list: one of `NAMES`, or `*` for the last index.
fn name(index: usize) -> &'static str {
    NAMES.get(index).copied().unwrap_or(WILDCARD)
}

#[derive(Debug, Clone)]
enum NonceChoice {
    /// No nonce.
    Empty,
    /// The last nonce received for the type: an ACK.
    Ack,
    /// The last nonce received for the type, with `error_detail`: a NACK.
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
        subscribe: Vec<usize>,
        unsubscribe: Vec<usize>,
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
    let names = || proptest::collection::vec(0usize..=NAMES.len(), 0..3);
    prop_oneof![
        4 => (0usize..2, 0..NAMES.len(), 0u8..3, proptest::bool::weighted(0.8)).prop_map(
            |(type_idx, name_idx, value, notify)| Op::Put { type_idx, name_idx, value, notify }
        ),
        2 => (0usize..2, 0..NAMES.len(), proptest::bool::weighted(0.8)).prop_map(
            |(type_idx, name_idx, notify)| Op::Delete { type_idx, name_idx, notify }
        ),
        6 => (0usize..2, names(), names(), nonce_choice()).prop_map(
            |(type_idx, subscribe, unsubscribe, nonce)| Op::Request {
                type_idx,
                subscribe,
                unsubscribe,
                nonce,
            }
        ),
        1 => any::<bool>().prop_map(|carry_nonce| Op::Reconnect { carry_nonce }),
    ]
}

/// The client's side of one type.
#[derive(Debug, Default)]
struct ClientType {
    /// Whether the client sent a request for this type on the current stream.
    started: bool,
    subscription: Subscription,
    held: BTreeMap<ResourceName, Version>,
    /// Nonces received for this type on the current stream, oldest first.
    received: Vec<String>,
    /// The resources of each response received on this stream, by nonce.
    sent_by_nonce: HashMap<String, Vec<(ResourceName, Version)>>,
    /// Resource versions the client rejected, not to be resent until they change or the
    /// client subscribes to them again.
    nacked: HashMap<ResourceName, Version>,
}

struct World {
    cache: Cache,
    writer: CacheWriter,
    view: View,
    stream: DeltaStream,
    n_streams: u64,
    /// Nonces of the current stream.
    stream_nonces: HashSet<String>,
    /// Every nonce any stream sent, for stale choices.
    all_nonces: Vec<String>,
    clients: [ClientType; 2],
    /// A cache write not yet followed by `on_snapshot`.
    pending_notify: bool,
}

impl World {
    fn new() -> Self {
        let (cache, writer) = cache();
        let view = View::new(["p".into()]);
        Self {
            stream: DeltaStream::new(view.clone(), "s1", Limits::default()),
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

    fn type_idx(type_url: &str) -> usize {
        TYPES
            .iter()
            .position(|t| *t == type_url)
            .expect("responses carry a requested type")
    }

    fn version_of(&self, type_idx: usize, name: &str) -> Option<Version> {
        let type_url = TypeUrl::new(TYPES[type_idx]);
        self.cache
            .snapshot()
            .get(&self.view, &type_url, name)
            .map(|r| r.version.clone())
    }

    fn write(
        &mut self,
        type_idx: usize,
        name_idx: usize,
        update: Update,
        notify: bool,
    ) -> Result<(), TestCaseError> {
        let name = NAMES[name_idx];
        let before = self.version_of(type_idx, name);
        self.writer.apply([update]);
        if self.version_of(type_idx, name) != before {
            self.clients[type_idx].nacked.remove(name);
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

    /// The client's side of a response step.
    fn receive(&mut self, step: Step) -> Result<(), TestCaseError> {
        for response in step.responses.iter().map(DeltaResponse::decoded) {
            prop_assert!(
                self.stream_nonces.insert(response.nonce.clone()),
                "nonce {} repeated within a stream",
                response.nonce
            );
            self.all_nonces.push(response.nonce.clone());
            let client = &mut self.clients[Self::type_idx(&response.type_url)];
            prop_assert!(client.started, "a response for a type never requested");
            let mut carried = Vec::new();
            for resource in &response.resources {
                let name = ResourceName::new(&resource.name);
                let version = Version::new(&resource.version);
                prop_assert_ne!(
                    client.nacked.get(&name),
                    Some(&version),
                    "NACKed version of {} resent before it changed",
                    name
                );
                carried.push((name, version));
            }
            for name in &response.removed_resources {
                client.held.remove(name.as_str());
            }
            client.held.extend(carried.iter().cloned());
            let held_version = Version::of_set(client.held.iter());
            prop_assert_eq!(response.system_version_info.as_str(), held_version.as_str());
            client.received.push(response.nonce.clone());
            client.sent_by_nonce.insert(response.nonce, carried);
        }
        Ok(())
    }

    fn request(
        &mut self,
        type_idx: usize,
        subscribe: &[usize],
        unsubscribe: &[usize],
        nonce: &NonceChoice,
    ) -> Result<(), TestCaseError> {
        let subscribe: Vec<String> = subscribe.iter().map(|i| name(*i).to_string()).collect();
        let unsubscribe: Vec<String> = unsubscribe.iter().map(|i| name(*i).to_string()).collect();
        let client = &self.clients[type_idx];
        let latest = client.received.last().cloned();
        let (response_nonce, error_detail) = match nonce {
            NonceChoice::Empty => (String::new(), None),
            NonceChoice::Ack => (latest.clone().unwrap_or_default(), None),
            NonceChoice::Nack => match &latest {
                Some(latest) => (
                    latest.clone(),
                    Some(RpcStatus {
                        code: 3,
                        message: "rejected".into(),
                        details: vec![],
                    }),
                ),
                None => (String::new(), None),
            },
            NonceChoice::Stale(pick) => {
                let candidate = self
                    .all_nonces
                    .get(*pick)
                    .cloned()
                    .unwrap_or_else(|| format!("never-sent-{pick}"));
                if Some(&candidate) == latest.as_ref() {
                    (format!("never-sent-{pick}"), None)
                } else {
                    (candidate, None)
                }
            }
        };
        self.send(
            type_idx,
            subscribe,
            unsubscribe,
            response_nonce,
            error_detail,
            HashMap::new(),
        )
    }

    fn send(
        &mut self,
        type_idx: usize,
        subscribe: Vec<String>,
        unsubscribe: Vec<String>,
        response_nonce: String,
        error_detail: Option<RpcStatus>,
        initial_resource_versions: HashMap<String, String>,
    ) -> Result<(), TestCaseError> {
        let type_url = TypeUrl::new(TYPES[type_idx]);
        let client = &mut self.clients[type_idx];
        let first = !client.started;
        client.started = true;
        client
            .subscription
            .apply_delta(&subscribe, &unsubscribe, first);
        let is_ack =
            !first && !response_nonce.is_empty() && client.received.last() == Some(&response_nonce);
        if is_ack && error_detail.is_some() {
            let rejected = client
                .sent_by_nonce
                .get(&response_nonce)
                .cloned()
                .unwrap_or_default();
            client.nacked.extend(rejected);
        }

        // A (re)subscription or unsubscription is a fresh start for that name, even in the
        // request that NACKs it: the protocol says a subscribed name is always resent.
        for name in subscribe.iter().chain(&unsubscribe) {
            if name == WILDCARD {
                client.nacked.clear();
            } else {
                client.nacked.remove(name.as_str());
            }
        }
        for name in unsubscribe.iter().filter(|n| *n != WILDCARD) {
            client.held.remove(name.as_str());
        }
        let before = self.status_of(&type_url);
        let request = DeltaDiscoveryRequest {
            type_url: type_url.to_string(),
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            initial_resource_versions,
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
                    &after.acked_version,
                    &before.as_ref().and_then(|b| b.sent_version.clone())
                );
                prop_assert!(after.nack.is_none());
                prop_assert!(
                    matches!(step.notices.as_slice(), [Notice::Ack { .. }]),
                    "an ACK is noticed"
                );
            }
        } else {
            let unchanged = before.as_ref().map_or((None, None, 0, 0), ack_fields);
            prop_assert_eq!(
                ack_fields(&after),
                unchanged,
                "a stale or missing nonce changed ACK state"
            );
            let stale = !first && !response_nonce.is_empty();
            prop_assert_eq!(
                step.notices
                    .iter()
                    .any(|n| matches!(n, Notice::StaleNonce { .. })),
                stale
            );
            prop_assert_eq!(step.notices.len(), usize::from(stale));
        }
        prop_assert_eq!(&after.subscription, &self.clients[type_idx].subscription);
        self.receive(step)?;
        self.check_type(type_idx)?;
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
        self.stream = DeltaStream::new(
            self.view.clone(),
            format!("s{}", self.n_streams),
            Limits::default(),
        );
        self.stream_nonces.clear();
        self.pending_notify = false;
        let mut first_requests = Vec::new();
        for (type_idx, client) in self.clients.iter_mut().enumerate() {
            let old_nonce = client.received.last().cloned();
            client.received.clear();
            client.sent_by_nonce.clear();
            client.nacked.clear();
            if !std::mem::take(&mut client.started) {
                continue;
            }
            let subscription = std::mem::take(&mut client.subscription);
            if subscription.is_empty() {
                prop_assert!(
                    client.held.is_empty(),
                    "held resources without a subscription"
                );
                continue;
            }
            let mut subscribe: Vec<String> =
                subscription.names().iter().map(|n| n.to_string()).collect();
            if subscription.is_wildcard() {
                subscribe.push(WILDCARD.to_string());
            }
            let initial: HashMap<String, String> = client
                .held
                .iter()
                .map(|(name, version)| (name.to_string(), version.to_string()))
                .collect();
            let nonce = match old_nonce {
                Some(nonce) if carry_nonce => nonce,
                _ => String::new(),
            };
            first_requests.push((type_idx, subscribe, nonce, initial));
        }
        for (type_idx, subscribe, nonce, initial) in first_requests {
            self.send(type_idx, subscribe, Vec::new(), nonce, None, initial)?;
        }
        Ok(())
    }

    /// What the client should hold for a type: the cache restricted to its subscription.
    fn desired(&self, type_idx: usize) -> BTreeMap<ResourceName, Version> {
        let type_url = TypeUrl::new(TYPES[type_idx]);
        let snapshot = self.cache.snapshot();
        snapshot
            .resources(&self.view, &type_url)
            .into_iter()
            .filter(|r| self.clients[type_idx].subscription.matches(r.name.as_str()))
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect()
    }

    fn check_type(&self, type_idx: usize) -> Result<(), TestCaseError> {
        let client = &self.clients[type_idx];
        if !client.started {
            return Ok(());
        }
        let server = self
            .status_of(&TypeUrl::new(TYPES[type_idx]))
            .expect("a started type has a status");
        prop_assert_eq!(
            &client.held,
            &server.resources,
            "client and server disagree"
        );
        prop_assert_eq!(
            &client.held,
            &self.desired(type_idx),
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
            let Some(latest) = client.received.last().cloned() else {
                continue;
            };
            let type_url = TypeUrl::new(type_url);
            let request = DeltaDiscoveryRequest {
                type_url: type_url.to_string(),
                response_nonce: latest,
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

fn body(type_idx: usize, value: u8) -> Any {
    Any {
        type_url: TYPES[type_idx].into(),
        value: vec![value],
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn delta_stream_keeps_the_client_in_sync(ops in proptest::collection::vec(op(), 1..40)) {
        let mut world = World::new();
        for op in ops {
            match op {
                Op::Put { type_idx, name_idx, value, notify } => {
                    let update = Update::Put {
                        partition: "p".into(),
                        type_url: TYPES[type_idx].into(),
                        name: NAMES[name_idx].into(),
                        body: body(type_idx, value),
                    };
                    world.write(type_idx, name_idx, update, notify)?;
                }
                Op::Delete { type_idx, name_idx, notify } => {
                    let update = Update::Delete {
                        partition: "p".into(),
                        type_url: TYPES[type_idx].into(),
                        name: NAMES[name_idx].into(),
                    };
                    world.write(type_idx, name_idx, update, notify)?;
                }
                Op::Request { type_idx, subscribe, unsubscribe, nonce } => {
                    world.request(type_idx, &subscribe, &unsubscribe, &nonce)?;
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

/// One step of a client that subscribes to every name of one type and holds what it is sent,
/// on a stream with [`Quirks::withhold_resourceless`].
#[derive(Debug, Clone)]
enum WithheldOp {
    Put(usize, u8),
    Delete(usize),
    Ack,
    /// A new stream whose first request carries what the client holds and a stale nonce.
    Reconnect,
}

fn withheld_op() -> impl Strategy<Value = WithheldOp> {
    prop_oneof![
        (0..NAMES.len(), 0u8..3).prop_map(|(i, v)| WithheldOp::Put(i, v)),
        (0..NAMES.len()).prop_map(WithheldOp::Delete),
        Just(WithheldOp::Ack),
        Just(WithheldOp::Reconnect),
    ]
}

fn withholding_stream(n: usize) -> DeltaStream {
    DeltaStream::new(View::new(["p".into()]), format!("w{n}"), Limits::default()).with_quirks(
        Quirks {
            withhold_resourceless: true,
            ..Quirks::default()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// A stream that withholds responses without resources never sends one, and whenever it
    /// does send, the client ends up holding exactly the cache (for clients that apply every
    /// response as their complete state, both are what matters).
    #[test]
    fn withholding_stream_never_sends_nothing_and_each_response_is_complete(
        ops in proptest::collection::vec(withheld_op(), 1..50)
    ) {
        let (cache, writer) = cache();
        let type_url = TYPES[0];
        let mut n_streams = 0;
        let mut stream = withholding_stream(n_streams);
        let mut held: BTreeMap<String, String> = BTreeMap::new();
        let mut last_nonce = String::new();
        let subscribe_all = |held: &BTreeMap<String, String>, nonce: &str| DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: NAMES.iter().map(|n| n.to_string()).collect(),
            initial_resource_versions: held.clone().into_iter().collect(),
            response_nonce: nonce.to_string(),
            ..Default::default()
        };
        let mut responses = stream
            .on_request(&subscribe_all(&held, ""), &cache.snapshot())
            .unwrap()
            .responses;
        // The trailing ACK lets the loop check the last operation's responses.
        for op in ops.into_iter().chain([WithheldOp::Ack]) {
            for response in responses.drain(..).map(|r| r.decoded()) {
                prop_assert!(!response.resources.is_empty(), "a response without resources: {response:?}");
                for name in &response.removed_resources {
                    held.remove(name);
                }
                for resource in &response.resources {
                    held.insert(resource.name.clone(), resource.version.clone());
                }
                let snapshot = cache.snapshot();
                let current: BTreeMap<String, String> = snapshot
                    .resources(stream.view(), &TypeUrl::new(type_url))
                    .into_iter()
                    .map(|r| (r.name.to_string(), r.version.to_string()))
                    .collect();
                prop_assert_eq!(&held, &current, "a response leaves the client complete");
                last_nonce = response.nonce.clone();
            }
            match op {
                WithheldOp::Put(i, value) => {
                    writer.apply([Update::Put {
                        partition: "p".into(),
                        type_url: type_url.into(),
                        name: NAMES[i].into(),
                        body: body(0, value),
                    }]);
                    responses = stream.on_snapshot(&cache.snapshot()).responses;
                }
                WithheldOp::Delete(i) => {
                    writer.apply([Update::Delete {
                        partition: "p".into(),
                        type_url: type_url.into(),
                        name: NAMES[i].into(),
                    }]);
                    responses = stream.on_snapshot(&cache.snapshot()).responses;
                }
                WithheldOp::Ack => {
                    let ack = DeltaDiscoveryRequest {
                        type_url: type_url.into(),
                        response_nonce: last_nonce.clone(),
                        ..Default::default()
                    };
                    responses = stream.on_request(&ack, &cache.snapshot()).unwrap().responses;
                }
                WithheldOp::Reconnect => {
                    n_streams += 1;
                    stream = withholding_stream(n_streams);
                    responses = stream
                        .on_request(&subscribe_all(&held, &last_nonce), &cache.snapshot())
                        .unwrap()
                        .responses;
                }
            }
        }
    }
}
