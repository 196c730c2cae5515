//! Client Status Discovery Service (CSDS): the [`Registry`]'s per-stream sync status as
//! `envoy.service.status.v3.ClientStatusDiscoveryService`.
//!
//! The conversion is a pure function, [`client_status`], from the streams' [`StreamStatus`]
//! (and optionally a cache [`Snapshot`] for resource contents) to a `ClientStatusResponse`;
//! [`CsdsServer`] is the thin tonic service around it (unary `FetchClientStatus` and the
//! bidirectional `StreamClientStatus`, which answers each request with the status at that
//! moment).
//!
//! What a response holds, per connected node (streams of one `node.id` are merged into one
//! `ClientConfig`), per type the node asked for, one `GenericXdsConfig`:
//! - for every resource the server last sent and the client is taken to hold: its name and
//!   version, and `client_status` ACKED when the type's last response was ACKed, NACKED (with
//!   `error_state`: the client's `error_detail.message` and the rejected version) when it was
//!   NACKed, REQUESTED while the response awaits an ACK;
//! - for every explicitly subscribed name the server has answered without (it does not
//!   exist): DOES_NOT_EXIST; REQUESTED when nothing was sent for the type yet;
//! - `config_status` is the type's state from the server's side: SYNCED, STALE (sent, not
//!   ACKed), ERROR (NACKed) or NOT_SENT;
//! - `xds_config` carries the resource body when the cache still holds the version that was
//!   sent and the request did not set `exclude_resource_contents`.
//!
//! NACKs are tracked per type, not per resource: every resource of a NACKed type is reported
//! NACKED. Node matchers: `node_id` matches with `exact`, `prefix`, `suffix` or `contains`
//! (with `ignore_case`); several matchers match a node when any of them does. Regex and custom
//! string matchers and `node_metadatas` are refused with `INVALID_ARGUMENT` rather than
//! silently ignored, and so are more than [`MAX_NODE_MATCHERS`] matchers or one longer than
//! [`MAX_MATCHER_BYTES`]: every matcher is tried on every stream.
//!
//! A response is built up to a size limit ([`DEFAULT_MAX_RESPONSE_BYTES`], see
//! [`CsdsServer::with_max_response_bytes`]): every node may hold every resource, bodies
//! included, so a fleet's status could otherwise take many times the server's memory. Past the
//! limit the request fails with `RESOURCE_EXHAUSTED`, saying how many nodes matched and how to
//! narrow it (node matchers, `exclude_resource_contents`); CSDS has no paging, and a partial
//! answer would look like a complete one.

use std::{collections::BTreeMap, pin::Pin, sync::Arc};

use envoy_types::pb::envoy::{
    admin::v3::{ClientResourceStatus, UpdateFailureState},
    config::core::v3::Node,
    service::status::v3::{
        ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus,
        client_config::GenericXdsConfig,
        client_status_discovery_service_server::{
            ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
        },
    },
    r#type::matcher::v3::{NodeMatcher, StringMatcher, string_matcher::MatchPattern},
};
use futures::{Stream, StreamExt};
use prost::Message as _;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    cache::{Cache, Snapshot, View},
    registry::Registry,
    server::StreamContext,
    status::{StreamStatus, SyncState, TypeStatus},
    types::{Partition, TypeUrl},
};

/// The most node matchers one CSDS request may carry.
pub const MAX_NODE_MATCHERS: usize = 16;

/// The longest string a node matcher may match with (node ids are at most
/// [`MAX_NODE_FIELD_BYTES`](crate::protocol::MAX_NODE_FIELD_BYTES) long).
pub const MAX_MATCHER_BYTES: usize = crate::protocol::MAX_NODE_FIELD_BYTES;

/// The default limit on the encoded size of one CSDS response.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A CSDS request this server cannot answer faithfully, or will not: every matcher is tried
/// on every stream, so their number and size are bounded, and so is the response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsdsError {
    /// A node matcher uses something other than a plain string match on the node id.
    #[error("unsupported node matcher: {0}")]
    UnsupportedMatcher(&'static str),
    /// More than [`MAX_NODE_MATCHERS`] matchers.
    #[error("{0} node matchers, more than the {MAX_NODE_MATCHERS} allowed")]
    TooManyMatchers(usize),
    /// A matcher's string longer than [`MAX_MATCHER_BYTES`].
    #[error("a node matcher of {0} bytes, more than the {MAX_MATCHER_BYTES} allowed")]
    MatcherTooLong(usize),
    /// The answer would be larger than the limit.
    #[error(
        "the status of the matching nodes ({nodes}) is over {limit} bytes{with_contents}; \
         narrow it with node_matchers (a node id prefix)",
        with_contents = if *contents { " with resource contents (or set exclude_resource_contents)" } else { "" }
    )]
    TooLarge {
        /// The nodes that matched the request's matchers.
        nodes: usize,
        /// The limit.
        limit: usize,
        /// Whether resource bodies were being included.
        contents: bool,
    },
}

impl From<CsdsError> for Status {
    fn from(error: CsdsError) -> Self {
        match error {
            CsdsError::TooLarge { .. } => Status::resource_exhausted(error.to_string()),
            _ => Status::invalid_argument(error.to_string()),
        }
    }
}

/// The CSDS answer to `request` for the given open streams.
///
/// `snapshot`, when given, supplies resource bodies (only for resources whose version in the
/// snapshot equals the version sent, and only when the request does not exclude contents).
/// Fails with [`CsdsError::TooLarge`] as soon as the response's encoded size would pass
/// `max_bytes`, before copying the body that would pass it.
pub fn client_status(
    streams: &[StreamStatus],
    request: &ClientStatusRequest,
    snapshot: Option<&Snapshot>,
    max_bytes: usize,
) -> Result<ClientStatusResponse, CsdsError> {
    let matchers = Matchers::of(&request.node_matchers)?;
    let snapshot = snapshot.filter(|_| !request.exclude_resource_contents);
    let mut budget = Budget {
        left: max_bytes,
        limit: max_bytes,
        contents: snapshot.is_some(),
    };
    let mut by_node: BTreeMap<&str, ClientConfig> = BTreeMap::new();
    let selected: Vec<&StreamStatus> = streams
        .iter()
        .filter(|stream| matchers.select(&stream.node_id))
        .collect();
    let too_large = |budget: &Budget| {
        let mut nodes: Vec<&str> = selected.iter().map(|s| s.node_id.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        budget.exceeded(nodes.len())
    };
    for stream in &selected {
        let config = match by_node.entry(stream.node_id.as_str()) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => {
                let config = ClientConfig {
                    node: Some(Node {
                        id: stream.node_id.clone(),
                        cluster: stream.node_cluster.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                // Its length prefix grows with the entries added to it: up to 4 bytes more.
                if !budget.take(config.encoded_len() + 4) {
                    return Err(too_large(&budget));
                }
                entry.insert(config)
            }
        };
        let view = View::new(stream.partitions.iter().map(Partition::new));
        for (type_url, status) in &stream.types {
            if !type_configs(type_url, status, &view, snapshot, &mut budget, |entry| {
                config.generic_xds_configs.push(entry);
            }) {
                return Err(too_large(&budget));
            }
        }
    }
    Ok(ClientStatusResponse {
        config: by_node.into_values().collect(),
    })
}

/// What is left of a response's size limit.
struct Budget {
    left: usize,
    limit: usize,
    /// Whether bodies are included (for the message).
    contents: bool,
}

impl Budget {
    /// Takes `bytes` of a repeated field's element (plus its key and length prefix); false
    /// when they do not fit.
    fn take(&mut self, bytes: usize) -> bool {
        let framed = bytes + 1 + prost::encoding::encoded_len_varint(bytes as u64);
        match self.left.checked_sub(framed) {
            Some(left) => {
                self.left = left;
                true
            }
            None => false,
        }
    }

    fn exceeded(&self, nodes: usize) -> CsdsError {
        CsdsError::TooLarge {
            nodes,
            limit: self.limit,
            contents: self.contents,
        }
    }
}

/// The per-resource entries of one type of one stream, each given to `add` once `budget`
/// holds it; false when one does not fit.
fn type_configs(
    type_url: &TypeUrl,
    status: &TypeStatus,
    view: &View,
    snapshot: Option<&Snapshot>,
    budget: &mut Budget,
    mut add: impl FnMut(GenericXdsConfig),
) -> bool {
    let state = status.state();
    let (config_status, held_status) = match state {
        SyncState::Synced => (ConfigStatus::Synced, ClientResourceStatus::Acked),
        SyncState::Nacked => (ConfigStatus::Error, ClientResourceStatus::Nacked),
        SyncState::Stale => (ConfigStatus::Stale, ClientResourceStatus::Requested),
        SyncState::NotSent => (ConfigStatus::NotSent, ClientResourceStatus::Requested),
    };
    let error_state = match (&status.nack, state) {
        (Some(nack), SyncState::Nacked) => Some(UpdateFailureState {
            details: nack.message.clone(),
            version_info: nack.version.to_string(),
            ..Default::default()
        }),
        _ => None,
    };
    for (name, version) in &status.resources {
        let mut entry = GenericXdsConfig {
            type_url: type_url.to_string(),
            name: name.to_string(),
            version_info: version.to_string(),
            config_status: config_status as i32,
            client_status: held_status as i32,
            error_state: error_state.clone(),
            ..Default::default()
        };
        let body = snapshot
            .and_then(|s| s.get(view, type_url, name.as_str()))
            .filter(|r| &r.version == version);
        // The body's `Any` is `packed` as it will be encoded; it is copied only once it fits.
        let body_len = body.map_or(0, |r| {
            let len = r.packed().len();
            1 + prost::encoding::encoded_len_varint(len as u64) + len
        });
        if !budget.take(entry.encoded_len() + body_len) {
            return false;
        }
        entry.xds_config = body.map(|r| r.body());
        add(entry);
    }
    let missing_status = match state {
        SyncState::NotSent => ClientResourceStatus::Requested,
        _ => ClientResourceStatus::DoesNotExist,
    };
    for name in status.subscription.names() {
        if status.resources.contains_key(name) {
            continue;
        }
        let entry = GenericXdsConfig {
            type_url: type_url.to_string(),
            name: name.to_string(),
            config_status: config_status as i32,
            client_status: missing_status as i32,
            ..Default::default()
        };
        if !budget.take(entry.encoded_len()) {
            return false;
        }
        add(entry);
    }
    true
}

/// A request's node matchers, checked and with their strings folded once.
struct Matchers {
    /// `(pattern, ignore_case)`; `None` matches every node.
    patterns: Vec<Option<(Pattern, bool)>>,
    /// Whether any pattern ignores case (node ids are then folded once each).
    fold: bool,
}

enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

impl Matchers {
    fn of(matchers: &[NodeMatcher]) -> Result<Self, CsdsError> {
        if matchers.len() > MAX_NODE_MATCHERS {
            return Err(CsdsError::TooManyMatchers(matchers.len()));
        }
        let mut patterns = Vec::with_capacity(matchers.len());
        for matcher in matchers {
            if !matcher.node_metadatas.is_empty() {
                return Err(CsdsError::UnsupportedMatcher("node_metadatas"));
            }
            let Some(StringMatcher {
                ignore_case,
                match_pattern: Some(pattern),
            }) = &matcher.node_id
            else {
                patterns.push(None);
                continue;
            };
            let (make, want): (fn(String) -> Pattern, &String) = match pattern {
                MatchPattern::Exact(want) => (Pattern::Exact, want),
                MatchPattern::Prefix(want) => (Pattern::Prefix, want),
                MatchPattern::Suffix(want) => (Pattern::Suffix, want),
                MatchPattern::Contains(want) => (Pattern::Contains, want),
                MatchPattern::SafeRegex(_) => {
                    return Err(CsdsError::UnsupportedMatcher("safe_regex"));
                }
                MatchPattern::Custom(_) => return Err(CsdsError::UnsupportedMatcher("custom")),
            };
            if want.len() > MAX_MATCHER_BYTES {
                return Err(CsdsError::MatcherTooLong(want.len()));
            }
            let want = if *ignore_case {
                want.to_lowercase()
            } else {
                want.clone()
            };
            patterns.push(Some((make(want), *ignore_case)));
        }
        let fold = patterns
            .iter()
            .flatten()
            .any(|(_, ignore_case)| *ignore_case);
        Ok(Self { patterns, fold })
    }

    /// Whether a stream of `node_id` is selected: always without matchers, else when any
    /// matcher matches.
    fn select(&self, node_id: &str) -> bool {
        if self.patterns.is_empty() {
            return true;
        }
        let folded = self.fold.then(|| node_id.to_lowercase());
        self.patterns.iter().any(|pattern| {
            let Some((pattern, ignore_case)) = pattern else {
                return true;
            };
            let id = match (&folded, ignore_case) {
                (Some(folded), true) => folded.as_str(),
                _ => node_id,
            };
            match pattern {
                Pattern::Exact(want) => id == want,
                Pattern::Prefix(want) => id.starts_with(want.as_str()),
                Pattern::Suffix(want) => id.ends_with(want.as_str()),
                Pattern::Contains(want) => id.contains(want.as_str()),
            }
        })
    }
}

/// Decides which streams a CSDS caller may see, from the caller's request context.
///
/// The embedding server's authorization lives here, as the [`ViewResolver`](crate::ViewResolver)
/// decides what a stream reads: a stream the filter drops is absent from the answer, as if
/// it were not connected.
pub trait StatusFilter: Send + Sync + 'static {
    /// The streams of `streams` the caller described by `context` may see, or the status
    /// refusing the caller altogether.
    fn filter(
        &self,
        context: &StreamContext,
        streams: Vec<StreamStatus>,
    ) -> Result<Vec<StreamStatus>, Status>;
}

/// A filter that shows every stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShowAll;

impl StatusFilter for ShowAll {
    fn filter(
        &self,
        _context: &StreamContext,
        streams: Vec<StreamStatus>,
    ) -> Result<Vec<StreamStatus>, Status> {
        Ok(streams)
    }
}

/// The CSDS service over a [`Registry`] (and the [`Cache`] for resource contents).
#[derive(Clone)]
pub struct CsdsServer {
    registry: Registry,
    cache: Cache,
    filter: Arc<dyn StatusFilter>,
    max_response_bytes: usize,
}

impl std::fmt::Debug for CsdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsdsServer").finish_non_exhaustive()
    }
}

impl CsdsServer {
    /// A service reporting the streams of `registry`, with bodies read from `cache`.
    pub fn new(registry: Registry, cache: Cache) -> Self {
        Self {
            registry,
            cache,
            filter: Arc::new(ShowAll),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }

    /// Refuses requests whose answer would be larger than `bytes`, encoded (default
    /// [`DEFAULT_MAX_RESPONSE_BYTES`]).
    #[must_use]
    pub fn with_max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Shows each caller only the streams `filter` lets it see (default: all).
    #[must_use]
    pub fn with_filter(mut self, filter: Arc<dyn StatusFilter>) -> Self {
        self.filter = filter;
        self
    }

    /// The tonic service to add to a router.
    pub fn into_service(self) -> ClientStatusDiscoveryServiceServer<Self> {
        ClientStatusDiscoveryServiceServer::new(self)
    }

    fn answer(
        &self,
        context: &StreamContext,
        request: &ClientStatusRequest,
    ) -> Result<ClientStatusResponse, Status> {
        let snapshot = self.cache.snapshot();
        let streams = self.filter.filter(context, self.registry.streams())?;
        Ok(client_status(
            &streams,
            request,
            Some(&snapshot),
            self.max_response_bytes,
        )?)
    }
}

/// The response stream of `StreamClientStatus`.
pub type CsdsStream = Pin<Box<dyn Stream<Item = Result<ClientStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ClientStatusDiscoveryService for CsdsServer {
    type StreamClientStatusStream = CsdsStream;

    async fn stream_client_status(
        &self,
        request: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<CsdsStream>, Status> {
        let server = self.clone();
        let (context, requests) = context_of(request);
        let responses = requests.map(move |request| {
            request
                .map_err(crate::server::request_error)
                .and_then(|r| server.answer(&context, &r))
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn fetch_client_status(
        &self,
        request: Request<ClientStatusRequest>,
    ) -> Result<Response<ClientStatusResponse>, Status> {
        let (context, request) = context_of(request);
        self.answer(&context, &request).map(Response::new)
    }
}

/// The context of a CSDS call and its message.
fn context_of<T>(request: Request<T>) -> (StreamContext, T) {
    let peer = request.remote_addr();
    let (metadata, extensions, message) = request.into_parts();
    (
        StreamContext {
            metadata,
            extensions,
            peer,
        },
        message,
    )
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use envoy_types::pb::google::protobuf::Any;

    use super::*;
    use crate::{
        cache::{Update, cache},
        status::{Nack, Protocol},
        subscription::Subscription,
        types::{Nonce, ResourceName, Version},
    };

    const T: &str = "type.googleapis.com/test.T";

    fn matcher(pattern: MatchPattern, ignore_case: bool) -> NodeMatcher {
        NodeMatcher {
            node_id: Some(StringMatcher {
                ignore_case,
                match_pattern: Some(pattern),
            }),
            node_metadatas: vec![],
        }
    }

    fn stream(node_id: &str, types: Vec<(&str, TypeStatus)>) -> StreamStatus {
        StreamStatus {
            stream_id: 1,
            node_id: node_id.into(),
            node_cluster: "c".into(),
            partitions: vec!["p".into()],
            peer: None,
            protocol: Protocol::Sotw,
            connected_since: SystemTime::UNIX_EPOCH,
            types: types
                .into_iter()
                .map(|(t, s)| (TypeUrl::new(t), s))
                .collect(),
        }
    }

    fn sent(names: &[(&str, &str)], subscribed: &[&str]) -> TypeStatus {
        TypeStatus {
            subscription: Subscription::named(subscribed),
            sent_version: Some("v1".into()),
            sent_nonce: Some("1-1".into()),
            resources: names
                .iter()
                .map(|(n, v)| (ResourceName::new(n), Version::new(v)))
                .collect(),
            ..Default::default()
        }
    }

    /// `(name, version, client_status, config_status, error detail)` per entry.
    fn summary(response: &ClientStatusResponse) -> Vec<(String, String, String, i32, String)> {
        response
            .config
            .iter()
            .flat_map(|c| &c.generic_xds_configs)
            .map(|g| {
                (
                    g.name.clone(),
                    g.version_info.clone(),
                    ClientResourceStatus::try_from(g.client_status)
                        .unwrap()
                        .as_str_name()
                        .to_string(),
                    g.config_status,
                    g.error_state
                        .as_ref()
                        .map(|e| format!("{}@{}", e.details, e.version_info))
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn acked_nacked_requested_and_missing() {
        let mut acked = sent(&[("a", "va")], &["a", "gone"]);
        acked.acked_version = Some("v1".into());
        let mut nacked = sent(&[("b", "vb")], &["b"]);
        nacked.nack = Some(Nack {
            version: "v1".into(),
            nonce: Nonce::new("1-1"),
            message: "bad listener".into(),
            code: 3,
        });
        let pending = sent(&[("c", "vc")], &["c"]);
        let not_sent = TypeStatus {
            subscription: Subscription::named(["d"]),
            ..Default::default()
        };
        let streams = [stream(
            "node-1",
            vec![
                ("t/1", acked),
                ("t/2", nacked),
                ("t/3", pending),
                ("t/4", not_sent),
            ],
        )];
        let response =
            client_status(&streams, &ClientStatusRequest::default(), None, usize::MAX).unwrap();
        assert_eq!(response.config.len(), 1);
        assert_eq!(response.config[0].node.as_ref().unwrap().id, "node-1");
        let synced = ConfigStatus::Synced as i32;
        let error = ConfigStatus::Error as i32;
        let stale = ConfigStatus::Stale as i32;
        let not_sent = ConfigStatus::NotSent as i32;
        let s = |x: &str| x.to_string();
        assert_eq!(
            summary(&response),
            vec![
                (s("a"), s("va"), s("ACKED"), synced, s("")),
                (s("gone"), s(""), s("DOES_NOT_EXIST"), synced, s("")),
                (s("b"), s("vb"), s("NACKED"), error, s("bad listener@v1")),
                (s("c"), s("vc"), s("REQUESTED"), stale, s("")),
                (s("d"), s(""), s("REQUESTED"), not_sent, s("")),
            ]
        );
    }

    #[test]
    fn streams_of_one_node_merge_and_matchers_filter() {
        let streams = [
            stream("node-a", vec![("t/1", sent(&[("x", "1")], &["x"]))]),
            stream("node-a", vec![("t/2", sent(&[("y", "1")], &["y"]))]),
            stream("node-b", vec![("t/1", sent(&[("z", "1")], &["z"]))]),
        ];
        let all =
            client_status(&streams, &ClientStatusRequest::default(), None, usize::MAX).unwrap();
        assert_eq!(all.config.len(), 2);
        assert_eq!(all.config[0].generic_xds_configs.len(), 2);

        let only = |matchers: Vec<NodeMatcher>| {
            let request = ClientStatusRequest {
                node_matchers: matchers,
                ..Default::default()
            };
            client_status(&streams, &request, None, usize::MAX)
                .unwrap()
                .config
                .iter()
                .map(|c| c.node.as_ref().unwrap().id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            only(vec![matcher(MatchPattern::Exact("node-b".into()), false)]),
            ["node-b"]
        );
        assert_eq!(
            only(vec![matcher(MatchPattern::Exact("NODE-A".into()), true)]),
            ["node-a"]
        );
        assert_eq!(
            only(vec![matcher(MatchPattern::Prefix("node-".into()), false)]),
            ["node-a", "node-b"]
        );
        assert!(only(vec![matcher(MatchPattern::Suffix("-c".into()), false)]).is_empty());

        let unsupported = ClientStatusRequest {
            node_matchers: vec![NodeMatcher {
                node_id: None,
                node_metadatas: vec![Default::default()],
            }],
            ..Default::default()
        };
        let error = client_status(&streams, &unsupported, None, usize::MAX).unwrap_err();
        assert_eq!(Status::from(error).code(), tonic::Code::InvalidArgument);

        // Several matchers: any of them; a case-folded one beside a case-sensitive one.
        assert_eq!(
            only(vec![
                matcher(MatchPattern::Contains("DE-B".into()), true),
                matcher(MatchPattern::Suffix("-A".into()), false),
            ]),
            ["node-b"]
        );
        // Bounded: every matcher is tried on every stream.
        let refused = |matchers: Vec<NodeMatcher>| {
            let request = ClientStatusRequest {
                node_matchers: matchers,
                ..Default::default()
            };
            client_status(&streams, &request, None, usize::MAX).unwrap_err()
        };
        let many = vec![matcher(MatchPattern::Prefix("n".into()), false); MAX_NODE_MATCHERS + 1];
        assert_eq!(
            refused(many),
            CsdsError::TooManyMatchers(MAX_NODE_MATCHERS + 1)
        );
        let long = "x".repeat(MAX_MATCHER_BYTES + 1);
        assert_eq!(
            refused(vec![matcher(MatchPattern::Contains(long), true)]),
            CsdsError::MatcherTooLong(MAX_MATCHER_BYTES + 1)
        );
        let most = vec![matcher(MatchPattern::Prefix("node-a".into()), false); MAX_NODE_MATCHERS];
        assert_eq!(only(most), ["node-a"]);
    }

    #[test]
    fn contents_only_for_the_version_sent() {
        let (reader, writer) = cache();
        let body = Any {
            type_url: T.into(),
            value: b"one".to_vec(),
        };
        writer.apply([Update::Put {
            partition: "p".into(),
            type_url: T.into(),
            name: "a".into(),
            body: body.clone(),
        }]);
        let current = Version::of_bytes(b"one");
        let streams = [stream(
            "n",
            vec![(
                T,
                sent(&[("a", current.as_str()), ("b", "old")], &["a", "b"]),
            )],
        )];
        let snapshot = reader.snapshot();
        let response = client_status(
            &streams,
            &ClientStatusRequest::default(),
            Some(&snapshot),
            usize::MAX,
        )
        .unwrap();
        let configs = &response.config[0].generic_xds_configs;
        assert_eq!(configs[0].xds_config.as_ref(), Some(&body));
        assert_eq!(configs[1].xds_config, None, "b is not in the cache");
        let excluded = ClientStatusRequest {
            exclude_resource_contents: true,
            ..Default::default()
        };
        let response = client_status(&streams, &excluded, Some(&snapshot), usize::MAX).unwrap();
        assert_eq!(response.config[0].generic_xds_configs[0].xds_config, None);
    }

    #[test]
    fn a_response_past_the_limit_is_refused_before_it_is_built() {
        let (reader, writer) = cache();
        let bodies: Vec<Any> = ["a", "b"]
            .iter()
            .map(|name| Any {
                type_url: T.into(),
                value: name.repeat(10_000).into_bytes(),
            })
            .collect();
        writer.apply(
            ["a", "b"]
                .iter()
                .zip(&bodies)
                .map(|(name, body)| Update::Put {
                    partition: "p".into(),
                    type_url: T.into(),
                    name: (*name).into(),
                    body: body.clone(),
                }),
        );
        let held: Vec<(String, String)> = ["a", "b"]
            .iter()
            .zip(&bodies)
            .map(|(name, body)| (name.to_string(), Version::of_bytes(&body.value).to_string()))
            .collect();
        let held: Vec<(&str, &str)> = held.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let streams: Vec<StreamStatus> = ["n1", "n2", "n3"]
            .iter()
            .map(|node| stream(node, vec![(T, sent(&held, &["a", "b", "gone"]))]))
            .collect();
        let snapshot = reader.snapshot();
        let all = ClientStatusRequest::default();
        let answer = |request: &ClientStatusRequest, limit| {
            client_status(&streams, request, Some(&snapshot), limit)
        };
        let full = answer(&all, usize::MAX).unwrap();
        let size = full.encoded_len();
        assert!(size > 60_000, "{size}");

        // At most 4 bytes of slack per node: the nodes' length prefixes.
        assert_eq!(answer(&all, size + 3 * 4).unwrap(), full);
        for limit in (0..size).step_by(997).chain(size - 64..size + 12) {
            match answer(&all, limit) {
                Ok(response) => assert!(response.encoded_len() <= limit, "{limit}"),
                Err(error) => assert_eq!(
                    error,
                    CsdsError::TooLarge {
                        nodes: 3,
                        limit,
                        contents: true
                    }
                ),
            }
        }
        let refused = Status::from(answer(&all, size - 1).unwrap_err());
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("matching nodes (3)")
                && refused.message().contains("exclude_resource_contents"),
            "{}",
            refused.message()
        );

        // Without the bodies the same nodes fit, and narrowing to one node fits too.
        let names_only = ClientStatusRequest {
            exclude_resource_contents: true,
            ..Default::default()
        };
        let small = answer(&names_only, size - 1).unwrap();
        assert_eq!(small.config.len(), 3);
        assert!(small.encoded_len() < 1_000);
        let one = ClientStatusRequest {
            node_matchers: vec![matcher(MatchPattern::Exact("n2".into()), false)],
            ..Default::default()
        };
        assert_eq!(answer(&one, size / 2).unwrap().config.len(), 1);
        let refused = answer(&names_only, small.encoded_len() - 1).unwrap_err();
        assert!(
            !refused.to_string().contains("exclude_resource_contents"),
            "{refused}"
        );
    }
}
