//! A Rust client for pixiu-metadata: publish, keep leases alive, subscribe over ADS.
//!
//! ```no_run
//! # async fn example() -> Result<(), pixiu_metadata::client::Error> {
//! use futures::StreamExt;
//! use pixiu_metadata::{client::{Client, ClientConfig, Update}, pb::metadata::Metadata};
//!
//! let client = Client::connect(ClientConfig::new("http://127.0.0.1:15010")).await?;
//! // Published now, and re-published before its lease expires for as long as `client` lives.
//! client.publish_metadata("greeter", "rev-1", r#"{"app":"greeter"}"#).await?;
//! let mut updates = client.subscribe::<Metadata>(["greeter/rev-1"]);
//! while let Some(update) = updates.next().await {
//!     if let Update::Added { name, resource, .. } = update {
//!         println!("{name}: {}", resource.metadata_info);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! - One [`Client`] holds one HTTP/2 connection; its publishes, gets and subscriptions share
//!   it (tonic reconnects it when the server comes back).
//! - Publishes and registrations are remembered and refreshed every
//!   [`ClientConfig::refresh_interval`] (a third of the lease TTL by default) until the last
//!   clone of the client is dropped.
//! - [`Client::subscribe`] speaks Delta ADS, falls back to State of the World when the server
//!   answers `UNIMPLEMENTED`, reconnects with jittered exponential back-off and resumes from
//!   what it holds, so a reconnect reports neither duplicates nor gaps. A resource that does
//!   not decode is NACKed (see [`protocol`]).
//!
//! - TLS and mTLS with [`ClientConfig::tls`]; a bearer token with [`ClientConfig::token`],
//!   sent on every call and stream (see [`Credentials`]).
//!
//! What it does not do: caching of `get`s.

pub mod backoff;
pub mod protocol;
mod subscribe;
mod transport;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use envoy_types::pb::{
    envoy::config::core::v3::Node,
    google::protobuf::{Struct, Value, value::Kind as ValueKind},
};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::Request;
use tracing::{debug, warn};

pub use backoff::Backoff;
pub use protocol::{Subscription, Update};
pub use subscribe::Variant;
pub use transport::{BearerToken, Credentials, Transport, connect_transport};

use crate::pb::{
    dubbo_networking::ServiceMappingXdsResponse,
    metadata::{
        GetMetadataRequest, GetServiceDefinitionRequest, GetServiceMappingRequest, Metadata,
        PublishMetadataRequest, PublishServiceDefinitionRequest, RegisterServiceMappingRequest,
        ServiceDefinition, ServiceMapping, metadata_service_client::MetadataServiceClient,
        service_definition_service_client::ServiceDefinitionServiceClient,
        service_mapping_service_client::ServiceMappingServiceClient,
    },
};

/// A resource type the client can subscribe to.
pub trait Resource: prost::Message + Default + Clone + Send + Sync + 'static {
    /// Its xDS type URL.
    const TYPE_URL: &'static str;
    /// Its resource name, derived from its content (State of the World carries no names).
    fn name(&self) -> String;
}

impl Resource for Metadata {
    const TYPE_URL: &'static str = crate::pb::METADATA_TYPE_URL;
    fn name(&self) -> String {
        format!("{}/{}", self.application_name, self.revision)
    }
}

impl Resource for ServiceDefinition {
    const TYPE_URL: &'static str = crate::pb::SERVICE_DEFINITION_TYPE_URL;
    fn name(&self) -> String {
        self.identifier.clone()
    }
}

impl Resource for ServiceMapping {
    const TYPE_URL: &'static str = crate::pb::SERVICE_MAPPING_TYPE_URL;
    fn name(&self) -> String {
        self.interface.clone()
    }
}

impl Resource for ServiceMappingXdsResponse {
    const TYPE_URL: &'static str = crate::pb::UPSTREAM_MAPPING_TYPE_URL;
    fn name(&self) -> String {
        crate::push::mapping::upstream_name(&self.interface_name, &self.namespace)
    }
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint is not a valid URI.
    #[error("invalid endpoint {endpoint:?}")]
    Endpoint {
        /// What was given.
        endpoint: String,
    },
    /// The namespace cannot be sent as a header.
    #[error("invalid namespace {namespace:?}")]
    Namespace {
        /// What was given.
        namespace: String,
    },
    /// The bearer token cannot be sent as a header.
    #[error(
        "the bearer token is empty or holds characters a header cannot carry (visible ASCII only)"
    )]
    Token,
    /// The first connection failed.
    #[error("connecting to {endpoint}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The first connection did not complete in time.
    #[error("connecting to {endpoint} timed out")]
    ConnectTimeout {
        /// Where.
        endpoint: String,
    },
    /// The server refused the call.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

/// How a [`Client`] connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server, e.g. `http://127.0.0.1:15010`.
    pub endpoint: String,
    /// The namespace of every call and subscription; the server's default when `None`.
    pub namespace: Option<String>,
    /// The xDS node id (default `pixiu-metadata-client-<pid>`).
    pub node_id: String,
    /// The server's lease TTL (default 24 h, the server's default `--metadata-ttl`).
    pub lease_ttl: Duration,
    /// How often publishes are refreshed (default a third of `lease_ttl`, so two refreshes
    /// may fail before a lease expires).
    pub refresh_interval: Option<Duration>,
    /// Reconnection back-off of subscriptions.
    pub backoff: Backoff,
    /// The ADS variant tried first (default Delta).
    pub variant: Variant,
    /// Largest message accepted or sent, in bytes (default 8 MiB).
    pub max_message_bytes: usize,
    /// Updates buffered per subscription before the stream waits for its reader (default 64).
    pub update_buffer: usize,
    /// TLS (rustls): the server's CA, and a client certificate for mTLS; `None` speaks
    /// plaintext. Use an `https://` endpoint with it.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// The bearer token sent on every call and stream, for a server with `--token-file`.
    pub token: Option<BearerToken>,
}

impl ClientConfig {
    /// Defaults for `endpoint`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            namespace: None,
            node_id: format!("pixiu-metadata-client-{}", std::process::id()),
            lease_ttl: Duration::from_secs(24 * 60 * 60),
            refresh_interval: None,
            backoff: Backoff::default(),
            variant: Variant::Delta,
            max_message_bytes: 8 * 1024 * 1024,
            update_buffer: 64,
            tls: None,
            token: None,
        }
    }

    /// Sets the namespace.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Sets the node id.
    #[must_use]
    pub fn node_id(mut self, node_id: impl Into<String>) -> Self {
        self.node_id = node_id.into();
        self
    }

    /// Sets the lease TTL the refresh interval derives from.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Sets the refresh interval explicitly.
    #[must_use]
    pub fn refresh_every(mut self, interval: Duration) -> Self {
        self.refresh_interval = Some(interval);
        self
    }

    /// Sets the reconnection back-off.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the ADS variant tried first.
    #[must_use]
    pub fn variant(mut self, variant: Variant) -> Self {
        self.variant = variant;
        self
    }

    /// Connects over TLS with `tls` (the server's CA, and an identity for mTLS).
    #[must_use]
    pub fn tls(mut self, tls: tonic::transport::ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sends `token` as `authorization: Bearer <token>` on every call and stream.
    #[must_use]
    pub fn token(mut self, token: BearerToken) -> Self {
        self.token = Some(token);
        self
    }

    /// How often publishes are refreshed.
    pub fn refresh_interval(&self) -> Duration {
        self.refresh_interval
            .unwrap_or(self.lease_ttl / 3)
            .max(Duration::from_millis(10))
    }

    /// The xDS node of subscriptions.
    pub fn node(&self) -> Node {
        Node {
            id: self.node_id.clone(),
            user_agent_name: "pixiu-metadata-client".into(),
            metadata: self.namespace.as_ref().map(|namespace| Struct {
                fields: [(
                    crate::push::NODE_NAMESPACE_KEY.to_string(),
                    Value {
                        kind: Some(ValueKind::StringValue(namespace.clone())),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        }
    }
}

/// Something the client keeps alive.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Registration {
    Metadata {
        application: String,
        revision: String,
    },
    Definition {
        identifier: String,
    },
    Mapping {
        interface: String,
        application: String,
    },
}

/// A connection to a pixiu-metadata server. Cheap to clone; background refreshes and
/// subscriptions stop when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Transport,
    config: Arc<ClientConfig>,
    registrations: Arc<Mutex<BTreeMap<Registration, String>>>,
    shutdown: CancellationToken,
    _stop_on_drop: Arc<DropGuard>,
}

impl Client {
    /// Connects to `config.endpoint` and starts the lease refresher.
    pub async fn connect(config: ClientConfig) -> Result<Self, Error> {
        let channel = transport::connect_transport(&config).await?;
        let shutdown = CancellationToken::new();
        let client = Self {
            channel,
            config: Arc::new(config),
            registrations: Arc::default(),
            _stop_on_drop: Arc::new(shutdown.clone().drop_guard()),
            shutdown,
        };
        tokio::spawn(refresh(
            client.channel.clone(),
            client.config.clone(),
            client.registrations.clone(),
            client.shutdown.clone(),
        ));
        Ok(client)
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The underlying connection, for calls this client does not wrap; it adds the client's
    /// token and namespace to them too.
    pub fn channel(&self) -> Transport {
        self.channel.clone()
    }

    /// Publishes `(application, revision) -> metadata_info` and keeps its lease alive.
    pub async fn publish_metadata(
        &self,
        application: &str,
        revision: &str,
        metadata_info: &str,
    ) -> Result<(), Error> {
        let registration = Registration::Metadata {
            application: application.into(),
            revision: revision.into(),
        };
        send(&self.channel, &self.config, &registration, metadata_info).await?;
        self.registrations
            .lock()
            .insert(registration, metadata_info.to_string());
        Ok(())
    }

    /// Publishes a service definition and keeps its lease alive.
    pub async fn publish_definition(
        &self,
        identifier: &str,
        definition: &str,
    ) -> Result<(), Error> {
        let registration = Registration::Definition {
            identifier: identifier.into(),
        };
        send(&self.channel, &self.config, &registration, definition).await?;
        self.registrations
            .lock()
            .insert(registration, definition.to_string());
        Ok(())
    }

    /// Registers `application` as a provider of `interface` and keeps the registration alive.
    pub async fn register_mapping(&self, interface: &str, application: &str) -> Result<(), Error> {
        let registration = Registration::Mapping {
            interface: interface.into(),
            application: application.into(),
        };
        send(&self.channel, &self.config, &registration, "").await?;
        self.registrations
            .lock()
            .insert(registration, String::new());
        Ok(())
    }

    /// Stops refreshing everything this client published or registered (the records then
    /// expire with their leases).
    pub fn forget_all(&self) {
        self.registrations.lock().clear();
    }

    /// The raw metadata of `(application, revision)`.
    pub async fn get_metadata(&self, application: &str, revision: &str) -> Result<String, Error> {
        let request = Request::new(GetMetadataRequest {
            application_name: application.into(),
            revision: revision.into(),
        });
        Ok(metadata_client(&self.channel, &self.config)
            .get(request)
            .await?
            .into_inner()
            .metadata_info)
    }

    /// The raw definition `identifier`.
    pub async fn get_definition(&self, identifier: &str) -> Result<String, Error> {
        let request = Request::new(GetServiceDefinitionRequest {
            identifier: identifier.into(),
        });
        Ok(definition_client(&self.channel, &self.config)
            .get(request)
            .await?
            .into_inner()
            .service_definition)
    }

    /// The applications that provide `interface`.
    pub async fn get_mapping(&self, interface: &str) -> Result<Vec<String>, Error> {
        let request = Request::new(GetServiceMappingRequest {
            interface: interface.into(),
        });
        Ok(ServiceMappingServiceClient::new(self.channel.clone())
            .get(request)
            .await?
            .into_inner()
            .application_names)
    }

    /// Subscribes to resources of type `T` named `names` (every one when empty) over ADS.
    ///
    /// The stream yields an update for each change to what the subscription holds; a stream
    /// that fails is opened again with back-off. It ends only when the server refuses the
    /// subscription for a reason a retry does not fix (see [`Updates::refusal`]); dropping it
    /// ends the subscription.
    pub fn subscribe<T: Resource>(
        &self,
        names: impl IntoIterator<Item = impl Into<String>>,
    ) -> Updates<T> {
        let (tx, rx) = mpsc::channel(self.config.update_buffer.max(1));
        let refusal = Arc::new(std::sync::OnceLock::new());
        let driver = subscribe::Driver {
            channel: self.channel.clone(),
            subscription: Subscription::new(names.into_iter().map(Into::into), self.config.node()),
            variant: self.config.variant,
            backoff: self.config.backoff,
            max_message_bytes: self.config.max_message_bytes,
            updates: tx,
            refusal: refusal.clone(),
            shutdown: self.shutdown.child_token(),
        };
        tokio::spawn(driver.run());
        Updates {
            updates: ReceiverStream::new(rx),
            refusal,
        }
    }
}

/// The updates of one subscription ([`Client::subscribe`]), a stream.
#[derive(Debug)]
pub struct Updates<T> {
    updates: ReceiverStream<Update<T>>,
    refusal: Arc<std::sync::OnceLock<tonic::Status>>,
}

impl<T> Updates<T> {
    /// Why the stream ended, once it has: the server refused the subscription with
    /// `INVALID_ARGUMENT`, `UNAUTHENTICATED`, `PERMISSION_DENIED` or `FAILED_PRECONDITION`
    /// (a bad name or namespace, a missing or unknown token, another namespace's records),
    /// which no retry fixes.
    pub fn refusal(&self) -> Option<&tonic::Status> {
        self.refusal.get()
    }
}

impl<T> futures::Stream for Updates<T> {
    type Item = Update<T>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Update<T>>> {
        std::pin::Pin::new(&mut self.updates).poll_next(cx)
    }
}

fn metadata_client(channel: &Transport, config: &ClientConfig) -> MetadataServiceClient<Transport> {
    MetadataServiceClient::new(channel.clone())
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes)
}

fn definition_client(
    channel: &Transport,
    config: &ClientConfig,
) -> ServiceDefinitionServiceClient<Transport> {
    ServiceDefinitionServiceClient::new(channel.clone())
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes)
}

async fn send(
    channel: &Transport,
    config: &ClientConfig,
    registration: &Registration,
    value: &str,
) -> Result<(), Error> {
    match registration {
        Registration::Metadata {
            application,
            revision,
        } => {
            let request = Request::new(PublishMetadataRequest {
                application_name: application.clone(),
                revision: revision.clone(),
                metadata_info: value.to_string(),
            });
            metadata_client(channel, config).publish(request).await?;
        }
        Registration::Definition { identifier } => {
            let request = Request::new(PublishServiceDefinitionRequest {
                identifier: identifier.clone(),
                service_definition: value.to_string(),
            });
            definition_client(channel, config).publish(request).await?;
        }
        Registration::Mapping {
            interface,
            application,
        } => {
            let request = Request::new(RegisterServiceMappingRequest {
                interface: interface.clone(),
                application_name: application.clone(),
            });
            ServiceMappingServiceClient::new(channel.clone())
                .register(request)
                .await?;
        }
    }
    Ok(())
}

/// Re-publishes every registration each refresh interval until `shutdown`.
async fn refresh(
    channel: Transport,
    config: Arc<ClientConfig>,
    registrations: Arc<Mutex<BTreeMap<Registration, String>>>,
    shutdown: CancellationToken,
) {
    let interval = config.refresh_interval();
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
        let current: Vec<(Registration, String)> = registrations
            .lock()
            .iter()
            .map(|(r, v)| (r.clone(), v.clone()))
            .collect();
        for (registration, value) in current {
            if shutdown.is_cancelled() {
                return;
            }
            match send(&channel, &config, &registration, &value).await {
                Ok(()) => debug!(?registration, "lease refreshed"),
                Err(error) => {
                    warn!(?registration, %error, "lease refresh failed; retrying next interval")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_interval_is_a_fraction_of_the_ttl() {
        let config = ClientConfig::new("http://x").lease_ttl(Duration::from_secs(30));
        assert_eq!(config.refresh_interval(), Duration::from_secs(10));
        let config = config.refresh_every(Duration::from_secs(2));
        assert_eq!(config.refresh_interval(), Duration::from_secs(2));
        let node = ClientConfig::new("http://x").namespace("team-a").node();
        let namespace = &node.metadata.unwrap().fields["NAMESPACE"];
        assert_eq!(
            namespace.kind,
            Some(ValueKind::StringValue("team-a".into()))
        );
    }

    #[test]
    fn resource_names() {
        let m = Metadata {
            application_name: "a".into(),
            revision: "r".into(),
            ..Default::default()
        };
        assert_eq!(m.name(), "a/r");
        let u = ServiceMappingXdsResponse {
            namespace: "ns".into(),
            interface_name: "org.Api".into(),
            application_names: vec![],
        };
        assert_eq!(u.name(), "org.Api|ns");
    }
}
