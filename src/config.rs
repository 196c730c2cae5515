//! The server's configuration: a plain tree of per-component structs.
//!
//! Parsing (flags, environment, files) lives in `cli`; everything below it receives these
//! structs and never reads the environment itself.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::api::ApiConfig;

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The gRPC port.
    pub grpc: GrpcConfig,
    /// The admin HTTP port.
    pub admin: AdminConfig,
    /// Where records live.
    pub store: StoreConfig,
    /// The metadata API.
    pub api: ApiConfig,
    /// The ADS server.
    pub xds: pixiu_xds::ServerConfig,
    /// Record leases.
    pub lease: LeaseConfig,
    /// Standard Envoy resources from a watched directory.
    pub envoy: crate::push::envoy::EnvoyConfig,
    /// Pixiu listeners and clusters (served over ECDS) from a watched directory.
    pub pixiu: crate::push::pixiu::PixiuConfig,
    /// TLS, authentication, authorization and connection limits.
    pub security: crate::security::SecurityConfig,
}

/// Record leases: a record not re-published within `ttl` is deleted.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// How long a record lives after its last publish (default 24 h, the seed's "one day").
    pub ttl: Duration,
}

/// The gRPC listener.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// Address to bind (default `127.0.0.1:15010`, the xDS port Istio-style control planes
    /// use).
    pub addr: SocketAddr,
    /// How long connections may take to finish on shutdown (default 10 s): in-flight
    /// publishes complete and streams end within it; connections still open after it (a
    /// client that never finishes its request or never reads) are closed, so shutdown is
    /// bounded.
    pub drain_timeout: Duration,
}

/// The admin HTTP listener (health, metrics, debug pages, the operators' page).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address to bind (default `127.0.0.1:15014`, the port istiod serves its monitoring
    /// on); loopback by default because the debug pages show every record.
    pub addr: SocketAddr,
    /// How long in-flight admin requests may take to finish on shutdown (default 5 s), so a
    /// client that never hangs up cannot hold the process.
    pub shutdown_timeout: Duration,
}

/// Which backend stores records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// In memory: nothing survives a restart. For tests and demos.
    Memory,
    /// Embedded durable store (redb) under `--data-dir`: the default.
    Embedded,
    /// etcd v3 at `--etcd-endpoints`, shared by any number of replicas.
    Etcd,
    /// Kubernetes custom resources (kubeconfig or in-cluster), shared by any number of
    /// replicas.
    Kubernetes,
}

/// The store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Which backend (default embedded).
    pub backend: Backend,
    /// Directory of the embedded store (default `./data`).
    pub data_dir: PathBuf,
    /// Most records per namespace and kind (default 100,000), so one namespace cannot fill
    /// the store.
    pub max_records_per_namespace: usize,
    /// etcd client URLs (`http://host:2379`) of the etcd backend.
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every etcd key of the etcd backend (default `/pixiu-metadata`).
    pub etcd_prefix: String,
    /// Kubeconfig file of the Kubernetes backend; `None` infers it as kubectl does
    /// (`$KUBECONFIG`, `~/.kube/config`, in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// This replica's name in the Kubernetes backend's sweeper election (default: random;
    /// deployments pass the pod name).
    pub kube_identity: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc: GrpcConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], 15010)),
                drain_timeout: Duration::from_secs(10),
            },
            store: StoreConfig {
                backend: Backend::Embedded,
                data_dir: PathBuf::from("./data"),
                max_records_per_namespace: 100_000,
                etcd_endpoints: Vec::new(),
                etcd_prefix: crate::store::etcd::DEFAULT_PREFIX.to_string(),
                kubeconfig: None,
                kube_identity: None,
            },
            api: ApiConfig::default(),
            admin: AdminConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], 15014)),
                shutdown_timeout: Duration::from_secs(5),
            },
            xds: pixiu_xds::ServerConfig::default(),
            lease: LeaseConfig {
                ttl: Duration::from_secs(24 * 60 * 60),
            },
            envoy: crate::push::envoy::EnvoyConfig::default(),
            pixiu: crate::push::pixiu::PixiuConfig::default(),
            security: crate::security::SecurityConfig::default(),
        }
    }
}
