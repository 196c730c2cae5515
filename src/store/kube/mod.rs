//! The Kubernetes backend: records as custom resources, shared by any number of replicas.
//!
//! # Objects
//!
//! A record is one namespaced custom resource in the record's namespace: a `Metadata`
//! (`kubectl get md`) or a `ServiceDefinition` (`kubectl get sd`), see [`resources`]. The
//! object's name is the record's name [encoded](names) for Kubernetes; the original
//! application, revision or identifier and the raw value live in the spec, byte for byte, and
//! are what the API returns. The lease stamp is the annotation
//! [`REFRESHED_AT`](resources::REFRESHED_AT). A record's [`revision`](super::Record::revision)
//! is its object's `resourceVersion` (kube-apiserver's etcd revision, a number).
//!
//! Record namespaces are Kubernetes namespaces, so they must be DNS-1123 labels and exist:
//! a write to any other fails with [`Error::Rejected`]. The store does not create namespaces.
//!
//! # Writes
//!
//! A put creates the object (`POST`) when the store knows no object for the record, and
//! otherwise replaces it (`PUT`) with the `resourceVersion` it knows: a conflict (409, another
//! writer got there first, or the mirror lagged) reads the object and retries against what is
//! really there, so the outcome (`Created`, `Updated { previous }`, `Refreshed`) is exact with
//! several replicas. A refresh rewrites the annotation: it is a write with a new
//! resourceVersion, which watchers see as [`Event::Refreshed`]. Deletes carry a
//! `resourceVersion` precondition when given a revision, so a sweeper loses against a
//! re-publish. Objects are refused by the API server beyond its size limit (etcd's request
//! limit, 1.5 MiB by default, for the whole object); that is [`Error::TooLarge`].
//!
//! Every request is bounded by [`REQUEST_TIMEOUT`]; when the API server does not answer,
//! writes fail with [`Error::Unavailable`]. `ready()` fails from such a request until one
//! succeeds; a probe lists one object every second ([`super::probe`]) so that a replica with
//! no traffic notices too, and `ready()` itself never waits on the API server.
//!
//! # Reads and watches: the mirror
//!
//! `get`, `list` and watches are served from an in-memory mirror (`mirror.rs`) kept by one
//! `kube_runtime::watcher` per kind over all namespaces, so reads and pushes keep working
//! while the API server is down, and objects created or edited with kubectl are records like
//! any other. A watch that ends normally (the server's timeout) resumes from the last
//! resourceVersion it saw. After a watch *error* (API server unreachable, 410 Gone) the store
//! lists that kind again, as client-go's reflector does, replaces it in the mirror and sends
//! watchers an [`Event::Reset`]; the xDS cache dedups identical content, so only differences
//! are pushed. (Resuming instead can wait on a restarted API server's watch cache for seconds
//! before it answers 410.) Puts and deletes return once the mirror has seen them
//! (bounded by [`REQUEST_TIMEOUT`]), so a replica reads its own writes.
//!
//! # Sweeping
//!
//! Only the replica holding the `coordination.k8s.io/v1` Lease
//! [`DEFAULT_LEASE_NAME`](election::DEFAULT_LEASE_NAME) (in the client's namespace) deletes
//! expired records; see [`election`] and [`Store::leadership`].

use std::{collections::BTreeSet, fmt, future::Future, path::PathBuf, sync::Arc, time::SystemTime};

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams, Preconditions},
    core::{DynamicObject, ObjectMeta},
    runtime::watcher,
};
use parking_lot::Mutex;
use tokio::{
    sync::{broadcast, watch},
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Error, Event, Key, Kind, ListQuery, PutOutcome, Record, Result, Store, WATCH_BUFFER, epoch_ms,
    probe::{self, Failing},
};

pub mod election;
mod mirror;
pub mod names;
pub mod resources;

use mirror::{Mirror, Object, ObjectRef};

/// Longest wait for one API request before the operation fails with [`Error::Unavailable`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`KubeStore::connect`] waits for the first list of every kind.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Puts retried after a conflict before giving up.
const MAX_PUT_ATTEMPTS: usize = 16;

/// First and longest pause after a watch error.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How to reach the API server and run the election.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// A kubeconfig file; `None` infers the configuration as kubectl does (`$KUBECONFIG`,
    /// `~/.kube/config`, then the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// Most records per namespace and kind (checked against the mirror, so concurrent creates
    /// may exceed it by the number in flight).
    pub max_records_per_namespace: usize,
    /// The sweeper's leader election; its Lease lives in `lease_namespace`.
    pub election: election::ElectionConfig,
    /// Namespace of the election's Lease; `None` is the client's default namespace (the pod's
    /// namespace in a cluster, the kubeconfig context's namespace outside).
    pub lease_namespace: Option<String>,
}

impl KubeOptions {
    /// Inferred configuration, no record cap, a random identity.
    pub fn new() -> Self {
        Self {
            kubeconfig: None,
            max_records_per_namespace: usize::MAX,
            election: election::ElectionConfig::new(random_identity()),
            lease_namespace: None,
        }
    }
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// `pixiu-metadata-<16 hex digits>`, unique enough to tell replicas apart.
pub fn random_identity() -> String {
    let seed = format!(
        "{}-{:?}-{:?}",
        std::process::id(),
        SystemTime::now(),
        std::thread::current().id()
    );
    format!(
        "pixiu-metadata-{:016x}",
        xxhash_rust::xxh3::xxh3_64(seed.as_bytes())
    )
}

/// The Kubernetes [`Store`].
///
/// Cloning is cheap and shares the store. Dropping the last clone stops its watches and the
/// election (releasing the Lease when leading); the streams returned by [`Store::watch`] then
/// end.
#[derive(Clone)]
pub struct KubeStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    max_records_per_namespace: usize,
    shared: Arc<Shared>,
    leader: watch::Receiver<bool>,
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Shared {
    mirror: Mutex<Mirror>,
    events: broadcast::Sender<Event>,
    /// Bumped after every change to the mirror, for read-your-writes waits.
    changed: watch::Sender<u64>,
    /// The kinds listed at least once.
    initialized: watch::Sender<BTreeSet<Kind>>,
    /// Per kind, since when and why its watch is failing.
    down: Mutex<std::collections::BTreeMap<Kind, (Instant, String)>>,
    /// Whether requests (the store's own and the probe's) find the API server unavailable.
    failing: Failing,
}

/// Runs one API request, bounded by [`REQUEST_TIMEOUT`]: `Ok(Err(status))` for the answers
/// the store handles (404, 409), [`Error::Unavailable`] when the API server does not answer.
async fn bounded<T>(
    doing: &str,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<Result<T, Box<kube::core::Status>>> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(response)) => Ok(Ok(response)),
        Ok(Err(kube::Error::Api(status))) => match status.code {
            404 | 409 => Ok(Err(status)),
            _ => Err(api_error(doing, &status)),
        },
        Ok(Err(e)) => Err(Error::Unavailable(format!("{doing}: {e}"))),
        Err(_) => Err(Error::Unavailable(format!(
            "{doing}: the API server did not answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

/// Lists one object's metadata every [`probe::PROBE_INTERVAL`] until `stop`, recording
/// whether the API server answered as the store's own requests do.
async fn probe(client: Client, shared: Arc<Shared>, stop: CancellationToken) {
    let api: Api<DynamicObject> = Api::all_with(client, &resources::api_resource(Kind::Metadata));
    let doing = "checking the API server";
    probe::run(&shared.failing, stop, || async {
        bounded(doing, api.list_metadata(&ListParams::default().limit(1)))
            .await?
            .map_err(|status| api_error(doing, &status))
            .map(drop)
    })
    .await;
}

impl fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeStore")
            .field("revision", &self.inner.shared.mirror.lock().max_revision())
            .finish_non_exhaustive()
    }
}

/// A client for `options.kubeconfig` (or the inferred configuration).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                Error::Storage(format!("reading the kubeconfig {}: {e}", path.display()))
            })?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| {
                    Error::Storage(format!("loading the kubeconfig {}: {e}", path.display()))
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Storage(format!("finding a Kubernetes configuration: {e}")))?,
    };
    let mut config = config;
    config.connect_timeout = Some(REQUEST_TIMEOUT);
    Client::try_from(config)
        .map_err(|e| Error::Storage(format!("building the Kubernetes client: {e}")))
}

impl KubeStore {
    /// Connects as `options` say, loads every object and starts following them.
    pub async fn connect(options: KubeOptions) -> Result<Self> {
        let client = client(options.kubeconfig.as_deref()).await?;
        Self::with_client(client, options).await
    }

    /// Like [`connect`](Self::connect) with an already-built client.
    ///
    /// Fails with [`Error::Unavailable`] when the objects cannot be listed within
    /// [`STARTUP_TIMEOUT`] (API server unreachable, CRDs not installed, no permission: the
    /// message says which).
    pub async fn with_client(client: Client, options: KubeOptions) -> Result<Self> {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let shared = Arc::new(Shared {
            mirror: Mutex::default(),
            events,
            changed: watch::Sender::new(0),
            initialized: watch::Sender::new(BTreeSet::new()),
            down: Mutex::default(),
            failing: Failing::default(),
        });
        let stop = CancellationToken::new();
        for kind in Kind::ALL {
            let api: Api<DynamicObject> =
                Api::all_with(client.clone(), &resources::api_resource(kind));
            tokio::spawn(follow(kind, api, shared.clone(), stop.clone()));
        }
        let mut initialized = shared.initialized.subscribe();
        let ready = tokio::time::timeout(
            STARTUP_TIMEOUT,
            initialized.wait_for(|kinds| kinds.len() == Kind::ALL.len()),
        )
        .await;
        if !matches!(ready, Ok(Ok(_))) {
            stop.cancel();
            let reasons: Vec<String> = shared
                .down
                .lock()
                .iter()
                .map(|(kind, (_, reason))| format!("{kind}: {reason}"))
                .collect();
            return Err(Error::Unavailable(format!(
                "cannot list the custom resources within {STARTUP_TIMEOUT:?} ({}); are the CRDs \
                 installed (`pixiu-metadata crds | kubectl apply -f -`) and may this identity \
                 list them?",
                if reasons.is_empty() {
                    "no answer".to_string()
                } else {
                    reasons.join("; ")
                }
            )));
        }

        let lease_namespace = options
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        tokio::spawn(probe(client.clone(), shared.clone(), stop.clone()));
        let (leader_tx, leader) = watch::channel(false);
        tokio::spawn(election::run(
            Api::<Lease>::namespaced(client.clone(), &lease_namespace),
            options.election.clone(),
            leader_tx,
            stop.clone(),
        ));
        let mirror = shared.mirror.lock();
        info!(
            records = mirror.records().len(),
            revision = mirror.max_revision(),
            lease.namespace = lease_namespace,
            identity = options.election.identity,
            "kubernetes store open"
        );
        drop(mirror);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                max_records_per_namespace: options.max_records_per_namespace,
                shared,
                leader,
                stop,
            }),
        })
    }

    fn api(&self, kind: Kind, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.inner.client.clone(),
            namespace,
            &resources::api_resource(kind),
        )
    }

    /// Runs one API request, bounded by [`REQUEST_TIMEOUT`]; see [`bounded`].
    async fn call<T>(
        &self,
        doing: &str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, Box<kube::core::Status>>> {
        let result = bounded(doing, request).await;
        self.inner.shared.failing.record(&result);
        result
    }

    /// Waits (bounded) until `done` holds for the mirror.
    async fn caught_up(&self, what: &str, done: impl Fn(&Mirror) -> bool) {
        let mut rx = self.inner.shared.changed.subscribe();
        let wait = async {
            loop {
                if done(&self.inner.shared.mirror.lock()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(REQUEST_TIMEOUT, wait).await.is_err() {
            warn!(
                what,
                "the watch has not delivered a write yet; reads on this replica may lag"
            );
        }
    }

    /// Reads the object at `at` (after a conflict).
    async fn read(&self, at: &ObjectRef) -> Result<Option<Object>> {
        let got = self
            .call(
                &format!("reading {}/{}", at.namespace, at.name),
                self.api(at.kind, &at.namespace).get(&at.name),
            )
            .await?;
        Ok(match got {
            Ok(object) => parse_object(at.kind, object).1,
            Err(_) => None,
        })
    }

    fn check_room(&self, key: &Key) -> Result<()> {
        let limit = self.inner.max_records_per_namespace;
        if limit == usize::MAX {
            return Ok(());
        }
        let count = self
            .inner
            .shared
            .mirror
            .lock()
            .count(key.kind, &key.namespace);
        if count >= limit {
            return Err(Error::NamespaceFull {
                namespace: key.namespace.clone(),
                limit,
            });
        }
        Ok(())
    }
}

/// Maps an API error status (other than 404 and 409, which callers handle).
fn api_error(doing: &str, status: &kube::core::Status) -> Error {
    let message = format!(
        "{doing}: {} ({}, {})",
        status.message, status.code, status.reason
    );
    let text = status.message.to_ascii_lowercase();
    if status.code == 413
        || text.contains("too large")
        || text.contains("too long")
        || text.contains("larger than")
        || text.contains("exceeds the maximum")
    {
        Error::TooLarge(message)
    } else if status.code == 422 || status.code == 400 {
        Error::Rejected(message)
    } else if status.code == 429 || status.code >= 500 {
        Error::Unavailable(message)
    } else {
        // 401, 403 and the like: the deployment is wrong, a retry will not help.
        Error::Storage(message)
    }
}

fn not_found_namespace(status: &kube::core::Status) -> bool {
    status.code == 404
        && status
            .details
            .as_ref()
            .is_some_and(|d| d.kind == "namespaces")
}

/// An object's identity, what it holds (`None` when its spec names no record) and its
/// resourceVersion.
fn parse_object(kind: Kind, object: DynamicObject) -> (ObjectRef, Option<Object>, u64) {
    let at = ObjectRef {
        kind,
        namespace: object.metadata.namespace.clone().unwrap_or_default(),
        name: object.metadata.name.clone().unwrap_or_default(),
    };
    let revision = object
        .metadata
        .resource_version
        .as_deref()
        .and_then(|rv| rv.parse::<u64>().ok())
        .unwrap_or(0);
    let parsed = match resources::parse_spec(kind, &object) {
        Ok(parsed) => parsed,
        Err(reason) => {
            warn!(%kind, namespace = at.namespace, object = at.name, reason, "ignoring an object that holds no record");
            return (at, None, revision);
        }
    };
    let mut meta: ObjectMeta = object.metadata;
    meta.managed_fields = None;
    let record = Record {
        key: Key {
            kind,
            namespace: at.namespace.clone(),
            name: parsed.name,
        },
        value: Arc::from(parsed.value),
        revision,
        refreshed_at_ms: resources::refreshed_at_ms(&meta),
    };
    let object = Object {
        at: at.clone(),
        record,
        meta,
    };
    (at, Some(object), revision)
}

/// Follows one kind's objects into the mirror until `stop`.
async fn follow(kind: Kind, api: Api<DynamicObject>, shared: Arc<Shared>, stop: CancellationToken) {
    let start = || watcher(api.clone(), watcher::Config::default()).boxed();
    let mut stream = start();
    let mut listing: Option<Vec<Object>> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        let item = tokio::select! {
            () = stop.cancelled() => return,
            item = stream.next() => item,
        };
        let event = match item {
            None => return,
            Some(Ok(event)) => event,
            Some(Err(error)) => {
                shared.set_down(kind, error.to_string());
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                // Start over with a list, as client-go's reflector does after a failed watch:
                // resuming from our last resourceVersion can wait on a restarted API server's
                // watch cache (seconds, then 410 Gone), while a list reads etcd at once.
                stream = start();
                listing = None;
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        shared.set_up(kind);
        match event {
            watcher::Event::Init => listing = Some(Vec::new()),
            watcher::Event::InitApply(object) => {
                if let (Some(listing), (_, Some(object), _)) =
                    (listing.as_mut(), parse_object(kind, object))
                {
                    listing.push(object);
                }
            }
            watcher::Event::InitDone => {
                let objects = listing.take().unwrap_or_default();
                debug!(%kind, objects = objects.len(), "listed");
                shared.replace(kind, objects);
            }
            watcher::Event::Apply(object) => {
                let (at, object, revision) = parse_object(kind, object);
                shared.apply(&at, object, revision);
            }
            watcher::Event::Delete(object) => {
                let (at, _, revision) = parse_object(kind, object);
                shared.apply(&at, None, revision);
            }
        }
    }
}

impl super::Subscribe for Shared {
    fn subscribe(&self) -> (Event, broadcast::Receiver<Event>) {
        let mirror = self.mirror.lock();
        let rx = self.events.subscribe();
        (mirror.reset(), rx)
    }
}

impl Shared {
    fn replace(&self, kind: Kind, objects: Vec<Object>) {
        {
            let mut mirror = self.mirror.lock();
            let reset = mirror.replace_kind(kind, objects);
            let _ = self.events.send(reset);
        }
        self.initialized.send_modify(|kinds| {
            kinds.insert(kind);
        });
        self.changed.send_modify(|n| *n += 1);
    }

    fn apply(&self, at: &ObjectRef, object: Option<Object>, revision: u64) {
        {
            let mut mirror = self.mirror.lock();
            for event in mirror.apply(at, object, revision) {
                // Sent under the lock so watchers see events in order.
                let _ = self.events.send(event);
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn set_down(&self, kind: Kind, reason: String) {
        let mut down = self.down.lock();
        match down.get_mut(&kind) {
            None => {
                warn!(%kind, reason = %reason, "lost the Kubernetes watch; serving reads from memory, writes fail until the API server is back");
                down.insert(kind, (Instant::now(), reason));
            }
            Some((_, old)) => {
                debug!(%kind, reason = %reason, "Kubernetes watch still down");
                *old = reason;
            }
        }
    }

    fn set_up(&self, kind: Kind) {
        if let Some((since, _)) = self.down.lock().remove(&kind) {
            info!(%kind, down_for = ?since.elapsed(), "Kubernetes watch re-established");
        }
    }
}

#[async_trait::async_trait]
impl Store for KubeStore {
    async fn put(&self, key: &Key, value: &str, now: SystemTime) -> Result<PutOutcome> {
        if !names::is_dns1123_label(&key.namespace) {
            return Err(Error::Rejected(format!(
                "namespace {:?} is not a Kubernetes namespace name (lower-case letters, digits \
                 and '-', at most 63)",
                key.namespace
            )));
        }
        let refreshed_at_ms = epoch_ms(now);
        let canonical = ObjectRef {
            kind: key.kind,
            namespace: key.namespace.clone(),
            name: names::object_name(&key.name),
        };
        let doing = format!("writing {key}");
        let api = self.api(key.kind, &key.namespace);
        let mut current: Option<Object> = self.inner.shared.mirror.lock().visible(key).cloned();
        for _ in 0..MAX_PUT_ATTEMPTS {
            if let Some(object) = &current
                && object.record.key != *key
            {
                return Err(Error::Storage(format!(
                    "{doing}: the object {}/{} already holds the record {}",
                    object.at.namespace, object.at.name, object.record.key
                )));
            }
            let written = match &current {
                None => {
                    self.check_room(key)?;
                    let meta = ObjectMeta {
                        name: Some(canonical.name.clone()),
                        namespace: Some(key.namespace.clone()),
                        ..ObjectMeta::default()
                    };
                    let object = resources::object_of(key, value, refreshed_at_ms, meta);
                    self.call(&doing, api.create(&PostParams::default(), &object))
                        .await?
                }
                Some(existing) => {
                    let object =
                        resources::object_of(key, value, refreshed_at_ms, existing.meta.clone());
                    self.call(
                        &doing,
                        api.replace(&existing.at.name, &PostParams::default(), &object),
                    )
                    .await?
                }
            };
            match written {
                Ok(object) => {
                    let (at, _, revision) = parse_object(key.kind, object);
                    let outcome = match current {
                        None => PutOutcome::Created { revision },
                        Some(previous) if *previous.record.value == *value => {
                            PutOutcome::Refreshed { revision }
                        }
                        Some(previous) => PutOutcome::Updated {
                            revision,
                            previous: previous.record.value,
                        },
                    };
                    self.caught_up(&doing, |m| {
                        m.object(&at).is_some_and(|o| o.record.revision >= revision)
                            || m.revision(key.kind) >= revision
                    })
                    .await;
                    return Ok(outcome);
                }
                Err(status) if not_found_namespace(&status) => {
                    return Err(Error::Rejected(format!(
                        "namespace {:?} does not exist in Kubernetes",
                        key.namespace
                    )));
                }
                Err(status) => {
                    // 409: created or changed meanwhile; 404: deleted meanwhile. Retry
                    // against what is there now.
                    debug!(%key, code = status.code, reason = status.reason, "write conflict; retrying");
                    let at = current.as_ref().map_or(&canonical, |o| &o.at).clone();
                    current = self.read(&at).await?;
                }
            }
        }
        Err(Error::Unavailable(format!(
            "{doing}: lost {MAX_PUT_ATTEMPTS} races with concurrent writers"
        )))
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>> {
        Ok(self.inner.shared.mirror.lock().get(key))
    }

    async fn delete(&self, key: &Key, if_revision: Option<u64>) -> Result<bool> {
        if !names::is_dns1123_label(&key.namespace) {
            return Ok(false);
        }
        let at = self
            .inner
            .shared
            .mirror
            .lock()
            .visible(key)
            .map(|o| o.at.clone())
            .unwrap_or_else(|| ObjectRef {
                kind: key.kind,
                namespace: key.namespace.clone(),
                name: names::object_name(&key.name),
            });
        let params = DeleteParams {
            preconditions: if_revision.map(|rv| Preconditions {
                resource_version: Some(rv.to_string()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let doing = format!("deleting {key}");
        let deleted = self
            .call(
                &doing,
                self.api(key.kind, &key.namespace).delete(&at.name, &params),
            )
            .await?;
        match deleted {
            Ok(_) => {
                self.caught_up(&doing, |m| m.object(&at).is_none()).await;
                Ok(true)
            }
            // Gone already, or changed since `if_revision`.
            Err(_) => Ok(false),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<Record>> {
        let mirror = self.inner.shared.mirror.lock();
        Ok(query.scan(mirror.range(query.first_map_key())).collect())
    }

    fn watch(&self) -> BoxStream<'static, Event> {
        super::follow(Arc::downgrade(&self.inner.shared))
    }

    async fn ready(&self) -> Result<()> {
        self.inner.shared.failing.check("the Kubernetes API server")
    }

    fn backend(&self) -> &'static str {
        "kubernetes"
    }

    fn leadership(&self) -> Option<watch::Receiver<bool>> {
        Some(self.inner.leader.clone())
    }
}

// The etcd store's tests load the same helper; both need it at their own path.
#[cfg(test)]
#[allow(clippy::duplicate_mod)]
#[path = "../../../tests/common/etcd.rs"]
mod etcd;
#[cfg(test)]
#[path = "../../../tests/common/kube.rs"]
mod kube_process;
#[cfg(test)]
mod tests;
