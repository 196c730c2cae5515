//! Prometheus metrics of the service: one registry, counters named by Prometheus conventions.
//!
//! The handles are cheap to clone; `api/`, `lease/` and the xDS observer increment them and the
//! admin endpoint encodes the registry.

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{family::Family, gauge::Gauge, histogram::exponential_buckets},
    registry::Registry,
};

use crate::model::Kind;

pub(crate) mod sharded;
mod store;

pub use sharded::{Counter, Histogram};
pub use store::InstrumentedStore;

/// Labels of store operation histograms.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// The backend: `memory`, `embedded`, `etcd`, ...
    pub backend: &'static str,
    /// `put`, `get`, `delete`, `list`.
    pub operation: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of series kept per store backend.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// The backend: `memory`, `embedded`, `etcd`, ...
    pub backend: &'static str,
}

/// Buckets from 50 µs to about 3 s: a memory read to an etcd write timing out.
fn store_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// Labels of per-kind counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `metadata` or `definition`.
    pub kind: String,
}

/// Labels of per-request counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `metadata` or `definition`.
    pub kind: &'static str,
    /// `publish`, `get`, `list`, `delete`.
    pub method: &'static str,
    /// The gRPC status code name, e.g. `Ok`, `NotFound`.
    pub code: &'static str,
}

/// Labels of per-type xDS counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// The resource type URL.
    pub type_url: TypeUrlLabel,
}

/// A type URL as a label value: the xDS server's shared string, so counting a push or an
/// ACK copies nothing.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct TypeUrlLabel(pub pixiu_xds::TypeUrl);

impl EncodeLabelValue for TypeUrlLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        EncodeLabelValue::encode(&self.0.as_str(), encoder)
    }
}

impl TypeLabels {
    /// The label set of `type_url`.
    pub fn new(type_url: &pixiu_xds::TypeUrl) -> Self {
        Self {
            type_url: TypeUrlLabel(type_url.clone()),
        }
    }
}

/// Most type URLs with series of their own in the xDS families.
pub const MAX_LABELLED_TYPES: usize = 64;

/// The `type_url` label of every type URL past [`MAX_LABELLED_TYPES`].
pub const OTHER_TYPES: &str = "other";

/// The xDS series of one type URL, taken from their families once: counting a push, an ACK
/// or a NACK is one lookup of the type, not one per family.
#[derive(Debug)]
pub struct TypeSeries {
    /// The label set of these series.
    pub labels: TypeLabels,
    /// Its series of [`Metrics::xds_pushes`].
    pub pushes: Counter,
    /// Its series of [`Metrics::xds_acks`].
    pub acks: Counter,
    /// Its series of [`Metrics::xds_nacks`].
    pub nacks: Counter,
    /// Its series of [`Metrics::xds_push_latency`].
    pub push_latency: Histogram,
}

impl TypeSeries {
    fn new(metrics: &Metrics, type_url: &pixiu_xds::TypeUrl) -> Self {
        let labels = TypeLabels::new(type_url);
        Self {
            pushes: metrics.xds_pushes.get_or_create(&labels).clone(),
            acks: metrics.xds_acks.get_or_create(&labels).clone(),
            nacks: metrics.xds_nacks.get_or_create(&labels).clone(),
            push_latency: metrics.xds_push_latency.get_or_create(&labels).clone(),
            labels,
        }
    }
}

/// Labels of per-protocol gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// `sotw` or `delta`.
    pub protocol: &'static str,
}

/// Labels of per-namespace record gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    /// The namespace.
    pub namespace: String,
    /// `metadata` or `definition`.
    pub kind: String,
}

/// Labels of security counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    /// The operation (`publish`, `get`, `list`, `delete`, `subscribe`, `status`).
    pub operation: String,
    /// Why (`unauthenticated`, `bad_credentials`, `permission_denied`, `rate_limited`).
    pub reason: String,
}

/// Labels of TLS handshake failures.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `handshake`, `timeout` or `too_many_pending`.
    pub reason: String,
}

/// The series of each type URL with series of its own, then of [`OTHER_TYPES`], in the
/// order they were first counted (see [`Metrics::type_series`]).
///
/// Slots are filled once and never emptied, so a lookup reads them without a lock: with a
/// read-write lock, every push and ACK of every stream wrote the lock's word, one cache line
/// that both cores then passed back and forth.
#[derive(Debug)]
struct TypeSlots {
    slots: Box<[OnceLock<TypeSeries>]>,
    /// Held while a slot is being filled.
    filling: Mutex<()>,
}

impl Default for TypeSlots {
    fn default() -> Self {
        Self {
            // The labelled types and `other`.
            slots: (0..=MAX_LABELLED_TYPES).map(|_| OnceLock::new()).collect(),
            filling: Mutex::new(()),
        }
    }
}

impl TypeSlots {
    /// The filled slots, in order.
    fn filled(&self) -> impl Iterator<Item = &TypeSeries> {
        self.slots.iter().map_while(OnceLock::get)
    }

    fn find(&self, type_url: &str) -> Option<&TypeSeries> {
        self.filled()
            .find(|series| series.labels.type_url.0.as_str() == type_url)
    }
}

/// Every metric of the service.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// The series of each type URL with series of its own, and of [`OTHER_TYPES`]: one
    /// lookup counts a push or an ACK.
    by_type: Arc<TypeSlots>,
    /// Requests by kind, method and status code.
    pub requests: Family<RequestLabels, Counter>,
    /// Publishes that overwrote a different value under the same key.
    pub revision_conflicts: Family<KindLabels, Counter>,
    /// Identical re-publishes that only refreshed a lease.
    pub lease_refreshes: Family<KindLabels, Counter>,
    /// Records deleted because their lease expired.
    pub expired_records: Family<KindLabels, Counter>,
    /// xDS responses written, by type.
    pub xds_pushes: Family<TypeLabels, Counter>,
    /// ACKs received, by type.
    pub xds_acks: Family<TypeLabels, Counter>,
    /// NACKs received, by type.
    pub xds_nacks: Family<TypeLabels, Counter>,
    /// Open ADS streams, by protocol.
    pub xds_streams: Family<ProtocolLabels, Gauge>,
    /// Seconds from a cache change to a response carrying it being written, by type.
    pub xds_push_latency: Family<TypeLabels, Histogram>,
    /// Connected xDS clients (streams past their first request). Set when scraped.
    pub xds_clients: Gauge,
    /// Streams subscribed to each type. Set when scraped.
    pub xds_subscriptions: Family<TypeLabels, Gauge>,
    /// Records held, by namespace and kind. Set when scraped.
    pub records: Family<NamespaceLabels, Gauge>,
    /// Seconds each store operation took, by backend, operation and result.
    pub store_operations: Family<StoreLabels, Histogram>,
    /// Times a follower of the store's watch (the push layer, the lease sweeper) fell behind
    /// and started over from the whole state, by backend.
    pub store_watch_resets: Family<BackendLabels, Counter>,
    /// Requests and streams refused by authentication, authorization or rate limits.
    pub denials: Family<DenialLabels, Counter>,
    /// TLS connections that did not finish their handshake.
    pub tls_handshake_failures: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered under the `pixiu_metadata` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pixiu_metadata");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Metadata API requests by kind, method and gRPC status code",
            requests.clone(),
        );
        let revision_conflicts = Family::<KindLabels, Counter>::default();
        registry.register(
            "revision_conflicts",
            "Publishes that overwrote different content under the same key",
            revision_conflicts.clone(),
        );
        let lease_refreshes = Family::<KindLabels, Counter>::default();
        registry.register(
            "lease_refreshes",
            "Identical re-publishes that only refreshed a lease",
            lease_refreshes.clone(),
        );
        let expired_records = Family::<KindLabels, Counter>::default();
        registry.register(
            "expired_records",
            "Records deleted because their lease expired",
            expired_records.clone(),
        );
        let xds_pushes = Family::<TypeLabels, Counter>::default();
        registry.register(
            "xds_pushes",
            "xDS responses written, by type",
            xds_pushes.clone(),
        );
        let xds_acks = Family::<TypeLabels, Counter>::default();
        registry.register("xds_acks", "xDS ACKs received, by type", xds_acks.clone());
        let xds_nacks = Family::<TypeLabels, Counter>::default();
        registry.register(
            "xds_nacks",
            "xDS NACKs received, by type",
            xds_nacks.clone(),
        );
        let xds_streams = Family::<ProtocolLabels, Gauge>::default();
        registry.register(
            "xds_streams",
            "Open ADS streams, by protocol",
            xds_streams.clone(),
        );
        let xds_push_latency = Family::<TypeLabels, Histogram>::new_with_constructor(
            push_latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "xds_push_latency_seconds",
            "Seconds from a cache change (a committed publish or delete) to the response carrying it being written, by type",
            xds_push_latency.clone(),
        );
        let xds_clients = Gauge::default();
        registry.register("xds_clients", "Connected xDS clients", xds_clients.clone());
        let xds_subscriptions = Family::<TypeLabels, Gauge>::default();
        registry.register(
            "xds_subscriptions",
            "xDS streams subscribed to each type",
            xds_subscriptions.clone(),
        );
        let records = Family::<NamespaceLabels, Gauge>::default();
        registry.register(
            "records",
            "Records held, by namespace and kind",
            records.clone(),
        );
        let store_operations = Family::<StoreLabels, Histogram>::new_with_constructor(
            store_latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "store_operation_duration_seconds",
            "Seconds a store operation took (a put includes its durable commit), by backend, operation and result",
            store_operations.clone(),
        );
        let store_watch_resets = Family::<BackendLabels, Counter>::default();
        registry.register(
            "store_watch_resets",
            "Times a follower of the store's changes (the push layer, the lease sweeper) fell behind and started over from the whole state, by backend",
            store_watch_resets.clone(),
        );
        let denials = Family::<DenialLabels, Counter>::default();
        registry.register(
            "denials",
            "Requests and streams refused by authentication, authorization or rate limits, by operation and reason",
            denials.clone(),
        );
        let tls_handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS connections that did not finish their handshake, by reason",
            tls_handshake_failures.clone(),
        );
        Self {
            registry: Arc::new(registry),
            denials,
            tls_handshake_failures,
            requests,
            revision_conflicts,
            lease_refreshes,
            expired_records,
            xds_pushes,
            xds_acks,
            xds_nacks,
            xds_streams,
            xds_push_latency,
            xds_clients,
            xds_subscriptions,
            records,
            store_operations,
            store_watch_resets,
            by_type: Arc::default(),
        }
    }

    /// Counts one request. Every label is static: counting allocates nothing.
    pub fn request(&self, kind: Kind, method: &'static str, code: tonic::Code) {
        self.requests
            .get_or_create(&RequestLabels {
                kind: kind.as_str(),
                method,
                code: code_name(code),
            })
            .inc();
    }

    /// Counts one denial.
    pub fn denial(&self, operation: &str, reason: &str) {
        self.denials
            .get_or_create(&DenialLabels {
                operation: operation.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The label set of `type_url` for the xDS families (see [`Metrics::type_series`]).
    pub fn type_labels(&self, type_url: &pixiu_xds::TypeUrl) -> TypeLabels {
        self.type_series(type_url).labels.clone()
    }

    /// The xDS series of `type_url`. Clients choose type URLs (an unknown type is answered
    /// with no resources), so only the first [`MAX_LABELLED_TYPES`] get series of their own;
    /// later ones share [`OTHER_TYPES`]'s.
    pub fn type_series(&self, type_url: &pixiu_xds::TypeUrl) -> &TypeSeries {
        let types = &*self.by_type;
        if let Some(series) = types.find(type_url.as_str()) {
            return series;
        }
        let _filling = types.filling.lock();
        if let Some(series) = types.find(type_url.as_str()) {
            return series;
        }
        let filled = types.filled().count();
        let other = types.find(OTHER_TYPES);
        let labelled = filled - usize::from(other.is_some());
        if let Some(other) = other.filter(|_| labelled >= MAX_LABELLED_TYPES) {
            return other;
        }
        let key = if labelled < MAX_LABELLED_TYPES {
            type_url.clone()
        } else {
            pixiu_xds::TypeUrl::new(OTHER_TYPES)
        };
        // The first empty slot.
        types.slots[filled].get_or_init(|| TypeSeries::new(self, &key))
    }

    /// The label set of a kind.
    pub fn kind(kind: Kind) -> KindLabels {
        KindLabels {
            kind: kind.as_str().to_string(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Metrics {
    /// Counts a TLS handshake that failed or timed out, or a connection refused because too
    /// many handshakes were in progress.
    pub fn tls_handshake_failed(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }
}

/// A gRPC status code's name as the `code` label spells it (its variant name).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Buckets of the push latency histogram: 100 µs to ~13 s.
fn push_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Feeds xDS stream events into the metrics.
#[derive(Debug, Clone)]
pub struct XdsObserver(pub Metrics);

impl XdsObserver {
    /// Records the time from a cache change to the hand-over of a push of `type_url` that
    /// carries it.
    pub fn push_latency(&self, type_url: &pixiu_xds::TypeUrl, latency: std::time::Duration) {
        self.0
            .type_series(type_url)
            .push_latency
            .observe(latency.as_secs_f64());
    }
}

impl pixiu_xds::StreamObserver for XdsObserver {
    fn stream_opened(&self, protocol: pixiu_xds::Protocol) {
        self.0
            .xds_streams
            .get_or_create(&ProtocolLabels {
                protocol: protocol.as_str(),
            })
            .inc();
    }

    fn stream_closed(&self, protocol: pixiu_xds::Protocol) {
        self.0
            .xds_streams
            .get_or_create(&ProtocolLabels {
                protocol: protocol.as_str(),
            })
            .dec();
    }

    fn response_sent(
        &self,
        type_url: &pixiu_xds::TypeUrl,
        _n_resources: usize,
        _snapshot_seq: u64,
    ) {
        self.0.type_series(type_url).pushes.inc();
    }

    fn pushed(&self, push: &pixiu_xds::Pushed<'_>) {
        if let Some(changed_at) = push.changed_at {
            self.push_latency(push.type_url, changed_at.elapsed());
        }
    }

    fn notice(&self, notice: &pixiu_xds::Notice) {
        match notice {
            pixiu_xds::Notice::Ack { type_url, .. } => {
                self.0.type_series(type_url).acks.inc();
            }
            pixiu_xds::Notice::Nack { type_url, .. } => {
                self.0.type_series(type_url).nacks.inc();
            }
            pixiu_xds::Notice::StaleNonce { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams on several threads that count the same new types at once get one series per
    /// type, each counted in full.
    #[test]
    fn type_series_found_at_once_from_many_threads_are_one() {
        use pixiu_xds::StreamObserver;
        let metrics = Metrics::new();
        let observer = XdsObserver(metrics.clone());
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for i in 0..10 {
                        let type_url = pixiu_xds::TypeUrl::new(format!("type.example/T{i}"));
                        observer.response_sent(&type_url, 0, 1);
                    }
                });
            }
        });
        let text = metrics.encode();
        let series: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("pixiu_metadata_xds_pushes_total{"))
            .collect();
        assert_eq!(series.len(), 10, "{text}");
        assert!(series.iter().all(|line| line.ends_with(" 8")), "{text}");
    }

    /// A client cycling through made-up type URLs adds at most [`MAX_LABELLED_TYPES`] series.
    #[test]
    fn type_url_series_are_bounded() {
        use pixiu_xds::StreamObserver;
        let metrics = Metrics::new();
        let observer = XdsObserver(metrics.clone());
        for i in 0..(MAX_LABELLED_TYPES + 100) {
            let type_url = pixiu_xds::TypeUrl::new(format!("type.example/T{i}"));
            observer.response_sent(&type_url, 0, 1);
        }
        let first = pixiu_xds::TypeUrl::new("type.example/T0");
        observer.response_sent(&first, 0, 1);
        let text = metrics.encode();
        let series = text
            .lines()
            .filter(|line| line.starts_with("pixiu_metadata_xds_pushes_total{"))
            .count();
        assert_eq!(series, MAX_LABELLED_TYPES + 1, "{text}");
        let late = pixiu_xds::TypeUrl::new("type.example/late");
        // The ACK and NACK counters of a type come with its series, also for `other`.
        for type_url in [&late, &first] {
            observer.notice(&pixiu_xds::Notice::Ack {
                type_url: type_url.clone(),
                version: pixiu_xds::Version::new("v1"),
            });
        }
        let text = metrics.encode();
        for line in [
            r#"pixiu_metadata_xds_pushes_total{type_url="other"} 100"#,
            r#"pixiu_metadata_xds_pushes_total{type_url="type.example/T0"} 2"#,
            r#"pixiu_metadata_xds_acks_total{type_url="other"} 1"#,
            r#"pixiu_metadata_xds_acks_total{type_url="type.example/T0"} 1"#,
        ] {
            assert!(text.contains(line), "{line} is missing from {text}");
        }
        let other = pixiu_xds::TypeUrl::new(OTHER_TYPES);
        assert_eq!(metrics.type_labels(&late), TypeLabels::new(&other));
    }

    /// The label is the variant's name, as `Debug` prints it, for every code.
    #[test]
    fn code_labels_are_the_variant_names() {
        for n in 0..=16 {
            let code = tonic::Code::from_i32(n);
            assert_eq!(code_name(code), format!("{code:?}"));
        }
    }

    #[test]
    fn encodes_prometheus_text() {
        let metrics = Metrics::new();
        metrics.request(Kind::Metadata, "publish", tonic::Code::Ok);
        metrics
            .revision_conflicts
            .get_or_create(&Metrics::kind(Kind::Definition))
            .inc();
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"pixiu_metadata_requests_total{kind="metadata",method="publish",code="Ok"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"pixiu_metadata_revision_conflicts_total{kind="definition"} 1"#));
        assert!(text.contains("# EOF"));
    }
}
