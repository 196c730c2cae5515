//! pixiu-metadata: a metadata control plane for Pixiu and Dubbo meshes.
//!
//! One gRPC port serves the seed's `MetadataService` and `ServiceDefinitionService`, an
//! Aggregated Discovery Service that pushes the stored metadata as xDS resources, gRPC health
//! and server reflection. [`run`] wires it all together; `main.rs` only parses flags.
//!
//! Data flow: `api` validates and writes to a [`store::Store`]; `push` follows the store's
//! watch and writes the xDS cache; `pixiu_xds` streams the cache to subscribers.

// The test helpers of `tests/common`, which the store's unit tests also include by path,
// name this crate as the integration tests do.
#[cfg(test)]
extern crate self as pixiu_metadata;

use std::{sync::Arc, time::Duration};
use tonic::service::LayerExt;

use clap::ValueEnum as _;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub mod admin;
pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod clients;
pub mod config;
pub mod ecds;
pub mod lease;
pub mod loopback;
pub mod metrics;
pub mod model;
pub mod pb;
pub mod poll;
pub mod push;
pub mod security;
pub mod status;
pub mod store;
pub mod transport;
pub mod watches;

pub use config::Config;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be opened.
    #[error("opening the store")]
    Store(#[source] store::Error),
    /// Reflection could not load the descriptor sets.
    #[error("building server reflection")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The gRPC transport failed.
    #[error("serving gRPC")]
    Transport(#[source] tonic::transport::Error),
    /// The TLS, token, policy or admin token settings could not be loaded.
    #[error("loading the security settings")]
    Security(#[source] security::Error),
}

/// Opens the store named by `config`.
///
/// `lease_ttl` is the records' lease; the embedded store keeps refreshes in memory between
/// checkpoints of it.
pub async fn open_store(
    config: &config::StoreConfig,
    lease_ttl: Duration,
) -> Result<Arc<dyn store::Store>, Error> {
    Ok(match config.backend {
        config::Backend::Memory => Arc::new(store::memory::MemoryStore::new(
            config.max_records_per_namespace,
        )),
        config::Backend::Embedded => {
            // Replaying a long journal takes a while: off the async workers, which serve the
            // admin port meanwhile.
            let (data_dir, max_records_per_namespace) =
                (config.data_dir.clone(), config.max_records_per_namespace);
            let opened = tokio::task::spawn_blocking(move || {
                store::embedded::EmbeddedStore::open_with(
                    &data_dir,
                    store::embedded::Options {
                        max_records_per_namespace,
                        lease_ttl: Some(lease_ttl),
                        checkpoint: store::embedded::CheckpointPolicy::default(),
                    },
                )
            })
            .await
            .map_err(|e| Error::Store(store::Error::Storage(format!("opening the store: {e}"))))?;
            Arc::new(opened.map_err(Error::Store)?)
        }
        config::Backend::Etcd => Arc::new(
            store::etcd::EtcdStore::connect(
                &config.etcd_endpoints,
                &config.etcd_prefix,
                config.max_records_per_namespace,
            )
            .await
            .map_err(Error::Store)?,
        ),
        config::Backend::Kubernetes => {
            let mut options = store::kube::KubeOptions::new();
            options.kubeconfig = config.kubeconfig.clone();
            options.max_records_per_namespace = config.max_records_per_namespace;
            if let Some(identity) = &config.kube_identity {
                options.election.identity = identity.clone();
            }
            Arc::new(
                store::kube::KubeStore::connect(options)
                    .await
                    .map_err(Error::Store)?,
            )
        }
    })
}

/// The already-bound listeners the server runs on.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC port.
    pub grpc: TcpListener,
    /// The admin HTTP port; `None` serves no admin HTTP.
    pub admin: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    /// Only the gRPC port, no admin HTTP.
    fn from(grpc: TcpListener) -> Self {
        Self { grpc, admin: None }
    }
}

/// Runs the server on already-bound listeners until `shutdown` is cancelled.
///
/// Taking listeners (rather than addresses) lets tests bind port 0 and learn the ports
/// before the server starts.
///
/// While the store opens (an etcd or Kubernetes store loads its first list, the embedded one
/// replays its journal) the admin port already answers: `/healthz` 200, everything else 503
/// saying the store is opening. A `shutdown` meanwhile stops the opening.
pub async fn run(
    config: Config,
    listeners: impl Into<Listeners>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let Listeners { grpc, admin } = listeners.into();
    // The admin port stops with the server, or when the server fails to start.
    let admin_stop = shutdown.child_token();
    let stop_admin = admin_stop.clone().drop_guard();
    let admin = admin
        .map(|listener| AdminPort::start(listener, &config, admin_stop))
        .transpose()?;
    let store = tokio::select! {
        store = open_store(&config.store, config.lease.ttl) => store?,
        () = shutdown.cancelled() => return Ok(()),
    };
    let served = serve_on(config, store, grpc, admin, shutdown).await;
    if served.is_ok() {
        stop_admin.disarm();
    }
    served
}

/// The admin HTTP port, answering from the moment it is started: first with
/// [`admin::opening_router`], then with the full router once the server is wired.
struct AdminPort {
    router: watch::Sender<axum::Router>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl AdminPort {
    fn start(
        listener: TcpListener,
        config: &Config,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        if let Ok(addr) = listener.local_addr() {
            // Refused before anything answers on a non-loopback admin port without a token.
            security::check_admin_exposure(addr, config.security.admin_token_file.is_some())
                .map_err(Error::Security)?;
            info!(admin.addr = %addr, "admin HTTP serving");
        }
        let backend = config
            .store
            .backend
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_owned());
        let (router, routes) = watch::channel(admin::opening_router(&backend));
        let task = tokio::spawn(admin::serve(
            listener,
            routes,
            shutdown,
            config.admin.shutdown_timeout,
        ));
        Ok(Self { router, task })
    }
}

/// Runs the server over an already-open store.
pub async fn serve(
    config: Config,
    store: Arc<dyn store::Store>,
    listeners: impl Into<Listeners>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let Listeners { grpc, admin } = listeners.into();
    let admin = admin
        .map(|listener| AdminPort::start(listener, &config, shutdown.clone()))
        .transpose()?;
    serve_on(config, store, grpc, admin, shutdown).await
}

async fn serve_on(
    config: Config,
    store: Arc<dyn store::Store>,
    grpc: TcpListener,
    admin: Option<AdminPort>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let metrics = metrics::Metrics::new();
    // Every user of the store goes through one timed wrapper.
    let store: Arc<dyn store::Store> = Arc::new(metrics::InstrumentedStore::new(store, &metrics));
    let (cache, writer) = pixiu_xds::cache();
    // Envoy resources are in the cache before ADS serves, like the store's first state.
    let envoy_task = push::envoy::start(&config.envoy, writer.clone(), shutdown.clone());
    let pixiu_task = push::pixiu::start(&config.pixiu, writer.clone(), shutdown.clone());
    let (warmed_tx, mut warmed) = watch::channel(false);
    let push_task = tokio::spawn(push::run(
        store.clone(),
        writer,
        warmed_tx,
        shutdown.clone(),
    ));
    let secured = security::load(&config.security, &config.api.default_namespace, &metrics)
        .map_err(Error::Security)?;
    let registry = pixiu_xds::Registry::new();
    let pushes = admin::PushLog::new();
    // Admin HTTP starts before the cache is warmed, so /readyz can say it is not.
    let admin_task = admin.map(|port| {
        let state = admin::AdminState::new(
            store.clone(),
            cache.clone(),
            registry.clone(),
            metrics.clone(),
            warmed.clone(),
            pushes.clone(),
        );
        let router = match &secured.admin_token {
            Some(token) => security::require_admin_token(admin::router(state), token.clone()),
            None => admin::router(state),
        };
        drop(port.router.send_replace(router));
        port.task
    });
    // Do not serve ADS from an empty cache as if it were the truth.
    let _ = warmed.wait_for(|w| *w).await;

    let expired = metrics.expired_records.clone();
    let sweeper = tokio::spawn(lease::run(
        store.clone(),
        config.lease.ttl,
        Arc::new(move |kind| {
            expired.get_or_create(&metrics::Metrics::kind(kind)).inc();
        }),
        shutdown.clone(),
    ));
    let watch_hub = watches::WatchHub::new(cache.clone(), config.xds.max_streams, shutdown.clone());
    let api = api::Api::new(store.clone(), config.api.clone(), metrics.clone())
        .with_security(secured.authorizer.clone(), secured.publish_rate.clone())
        .with_watch(watch_hub);
    let csds = pixiu_xds::CsdsServer::new(registry.clone(), cache.clone()).with_filter(Arc::new(
        security::CsdsAccess::new(secured.authorizer.clone()),
    ));
    let ads = pixiu_xds::AdsServer::new(
        cache,
        Arc::new(clients::WithQuirks(
            push::NamespaceResolver::with_authorizer(secured.authorizer.clone()),
        )),
        registry,
        config.xds.clone(),
        shutdown.clone(),
    )
    .with_observer(admin::observer(
        metrics::XdsObserver(metrics.clone()),
        pushes,
    ));
    let ecds = ecds::EcdsService::new(&ads);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::metadata::metadata_service_server::MetadataServiceServer<api::Api>>()
        .await;
    health_reporter
        .set_serving::<pb::metadata::service_definition_service_server::ServiceDefinitionServiceServer<api::Api>>()
        .await;
    health_reporter
        .set_serving::<pb::metadata::service_mapping_service_server::ServiceMappingServiceServer<api::Api>>()
        .await;
    health_reporter
        .set_serving::<pb::dubbo_networking::service_metadata_service_server::ServiceMetadataServiceServer<api::Api>>()
        .await;
    health_reporter
        .set_serving::<envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::ExtensionConfigDiscoveryServiceServer<ecds::EcdsService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(Error::Reflection)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(Error::Reflection)?;

    let addr = grpc.local_addr().ok();
    let shown = addr.map_or_else(String::new, |a| a.to_string());
    info!(grpc.addr = %shown, store = store.backend(), tls = secured.tls.is_some(), auth = secured.authorizer.required(), "serving");
    if secured.tls.is_none() && addr.is_some_and(|a| !a.ip().is_loopback()) {
        tracing::error!(
            grpc.addr = %shown,
            "PLAINTEXT gRPC ON A NON-LOOPBACK ADDRESS: anyone who can reach this port can read \
             and overwrite every namespace's metadata. Use --tls-cert/--tls-key/--client-ca \
             outside local development."
        );
    }
    let limits = &config.security.limits;
    // Only the services that take published values say what bounds one.
    let value_hint =
        tower::util::MapResponseLayer::new(security::value_size_hint(config.api.max_value_bytes));
    let router = limits
        .apply(tonic::transport::Server::builder())
        // Before any service: a header list too large for the limit is RESOURCE_EXHAUSTED.
        .layer(tower::filter::FilterLayer::new(
            security::header_list_limit(limits.max_header_list_bytes),
        ))
        // tonic reports a request it could not read as INTERNAL (bad bytes) or OUT_OF_RANGE
        // (over the size limit); our contract is INVALID_ARGUMENT and RESOURCE_EXHAUSTED.
        .layer(tower::util::MapResponseLayer::new(
            security::request_error_status,
        ))
        .add_service(value_hint.named_layer(api.metadata_service()))
        .add_service(value_hint.named_layer(api.definition_service()))
        .add_service(api.mapping_service())
        .add_service(value_hint.named_layer(api.upstream_mapping_service()))
        .add_service(ads.into_service())
        .add_service(ecds.into_service())
        .add_service(value_hint.named_layer(api.upstream_metadata_service()))
        .add_service(csds.into_service())
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let reload_interval = config
        .security
        .tls_reload_interval
        .unwrap_or(Duration::from_secs(5));
    tokio::spawn({
        let authorizer = secured.authorizer.clone();
        let admin_token = secured.admin_token.clone();
        let security = config.security.clone();
        let shutdown = shutdown.clone();
        async move {
            security::watch_files(
                authorizer,
                admin_token,
                &security,
                reload_interval,
                shutdown,
            )
            .await;
        }
    });
    let serving = async {
        match secured.tls {
            Some(tls) => {
                tokio::spawn(tls.clone().watch(reload_interval, shutdown.clone()));
                let incoming = security::tls::incoming_tls(
                    grpc,
                    tls,
                    limits.accept(),
                    Arc::new(HandshakeMetrics(metrics.clone())),
                    shutdown.clone(),
                );
                router
                    .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
                    .await
            }
            None => {
                let incoming =
                    security::tls::incoming_plain(grpc, limits.accept(), shutdown.clone());
                router
                    .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
                    .await
            }
        }
    };
    // Graceful shutdown waits for every connection to finish; bound that wait, so a client
    // that never completes a request cannot hold the process.
    let drain_timeout = config.grpc.drain_timeout;
    let drained = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain_timeout).await;
    };
    let result = tokio::select! {
        result = serving => result.map_err(Error::Transport),
        () = drained => {
            tracing::warn!(?drain_timeout, "connections still open after the drain timeout; closing them");
            Ok(())
        }
    };
    shutdown.cancel();
    let _ = push_task.await;
    if let Some(Ok(Err(error))) = match admin_task {
        Some(task) => Some(task.await),
        None => None,
    } {
        tracing::warn!(%error, "admin HTTP failed");
    }
    if let Some(envoy_task) = envoy_task {
        let _ = envoy_task.await;
    }
    if let Some(pixiu_task) = pixiu_task {
        let _ = pixiu_task.await;
    }
    let _ = sweeper.await;
    info!("stopped");
    result
}

/// The accept loop's failed handshakes, counted in the metrics.
struct HandshakeMetrics(metrics::Metrics);

impl security::tls::AcceptObserver for HandshakeMetrics {
    fn handshake_failed(&self, reason: &'static str) {
        self.0.tls_handshake_failed(reason);
    }
}
