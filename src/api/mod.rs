//! The gRPC services of the metadata API: the seed's `MetadataService` and
//! `ServiceDefinitionService`.
//!
//! Handlers validate what arrives (every field is hostile until checked), resolve the
//! namespace, and call the [`Store`]. They never touch the xDS cache: pushes follow from the
//! store's watch (`push/`).

use std::{sync::Arc, time::SystemTime};

use tonic::{Request, Response, Status, metadata::MetadataMap};
use tracing::{debug, warn};

use crate::{
    model::{self, Key},
    pb::metadata::{
        GetMetadataRequest, GetMetadataResponse, GetServiceDefinitionRequest,
        GetServiceDefinitionResponse, PublishMetadataRequest, PublishMetadataResponse,
        PublishServiceDefinitionRequest, PublishServiceDefinitionResponse,
        metadata_service_server::{MetadataService, MetadataServiceServer},
        service_definition_service_server::{
            ServiceDefinitionService, ServiceDefinitionServiceServer,
        },
    },
    store::{PutOutcome, Store},
};

pub mod status;

pub use status::Error;

/// The request header that selects a namespace for the seed's RPCs.
pub const NAMESPACE_HEADER: &str = "x-pixiu-namespace";

/// Limits and defaults of the metadata API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Namespace of requests without the namespace header (default `default`).
    pub default_namespace: String,
    /// Largest `metadata_info` or definition accepted, in bytes (default 1 MiB, the order of
    /// what etcd and ZooKeeper accept per value).
    pub max_value_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            default_namespace: model::DEFAULT_NAMESPACE.to_string(),
            max_value_bytes: model::DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

/// The shared state of the metadata services. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    store: Arc<dyn Store>,
    config: Arc<ApiConfig>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("store", &self.store.backend())
            .field("config", &self.config)
            .finish()
    }
}

impl Api {
    /// The API over `store`.
    pub fn new(store: Arc<dyn Store>, config: ApiConfig) -> Self {
        Self {
            store,
            config: Arc::new(config),
        }
    }

    /// The `MetadataService` server, with its message size limit set from the config.
    pub fn metadata_service(&self) -> MetadataServiceServer<Self> {
        MetadataServiceServer::new(self.clone()).max_decoding_message_size(self.max_message_bytes())
    }

    /// The `ServiceDefinitionService` server, with its message size limit set from the
    /// config.
    pub fn definition_service(&self) -> ServiceDefinitionServiceServer<Self> {
        ServiceDefinitionServiceServer::new(self.clone())
            .max_decoding_message_size(self.max_message_bytes())
    }

    /// Room for the value plus names and framing, so an oversized value is refused with a
    /// clear `RESOURCE_EXHAUSTED` by our own check, and a huge message by tonic's.
    fn max_message_bytes(&self) -> usize {
        self.config.max_value_bytes.saturating_add(4 * 1024)
    }

    /// The namespace of a request: the header, else the default.
    pub fn namespace(&self, metadata: &MetadataMap) -> Result<String, Error> {
        let Some(value) = metadata.get(NAMESPACE_HEADER) else {
            return Ok(self.config.default_namespace.clone());
        };
        let value = value.to_str().map_err(|_| {
            Error::Namespace(model::Invalid::Forbidden {
                field: "namespace",
                what: "non-ASCII characters",
            })
        })?;
        model::check_namespace(value).map_err(Error::Namespace)?;
        Ok(value.to_string())
    }

    async fn publish(&self, key: Key, value: &str) -> Result<PutOutcome, Error> {
        let outcome = self.store.put(&key, value, SystemTime::now()).await?;
        match &outcome {
            PutOutcome::Updated { previous, revision } => warn!(
                kind = %key.kind,
                namespace = key.namespace,
                resource.name = key.name,
                previous_hash = model::content_hash(previous),
                new_hash = model::content_hash(value),
                revision,
                "revision conflict: same key published with different content; overwritten",
            ),
            PutOutcome::Created { revision } | PutOutcome::Refreshed { revision } => debug!(
                kind = %key.kind,
                namespace = key.namespace,
                resource.name = key.name,
                revision,
                outcome = if matches!(outcome, PutOutcome::Created { .. }) { "created" } else { "refreshed" },
                "published",
            ),
        }
        Ok(outcome)
    }

    async fn get(&self, key: &Key, what: impl FnOnce() -> String) -> Result<Arc<str>, Error> {
        match self.store.get(key).await? {
            Some(record) => Ok(record.value),
            None => Err(Error::NotFound { what: what() }),
        }
    }
}

#[tonic::async_trait]
impl MetadataService for Api {
    async fn publish(
        &self,
        request: Request<PublishMetadataRequest>,
    ) -> Result<Response<PublishMetadataResponse>, Status> {
        let namespace = self.namespace(request.metadata())?;
        let request = request.into_inner();
        model::check_application(&request.application_name).map_err(Error::from)?;
        model::check_name("revision", &request.revision).map_err(Error::from)?;
        model::check_value(
            "metadata_info",
            &request.metadata_info,
            self.config.max_value_bytes,
        )
        .map_err(Error::from)?;
        let key = Key::metadata(&namespace, &request.application_name, &request.revision);
        Api::publish(self, key, &request.metadata_info).await?;
        Ok(Response::new(PublishMetadataResponse {}))
    }

    async fn get(
        &self,
        request: Request<GetMetadataRequest>,
    ) -> Result<Response<GetMetadataResponse>, Status> {
        let namespace = self.namespace(request.metadata())?;
        let request = request.into_inner();
        model::check_application(&request.application_name).map_err(Error::from)?;
        model::check_name("revision", &request.revision).map_err(Error::from)?;
        let key = Key::metadata(&namespace, &request.application_name, &request.revision);
        let value = Api::get(self, &key, || {
            format!(
                "metadata of application {:?} revision {:?} in namespace {:?}",
                request.application_name, request.revision, namespace
            )
        })
        .await?;
        Ok(Response::new(GetMetadataResponse {
            metadata_info: value.to_string(),
        }))
    }
}

#[tonic::async_trait]
impl ServiceDefinitionService for Api {
    async fn publish(
        &self,
        request: Request<PublishServiceDefinitionRequest>,
    ) -> Result<Response<PublishServiceDefinitionResponse>, Status> {
        let namespace = self.namespace(request.metadata())?;
        let request = request.into_inner();
        model::check_name("identifier", &request.identifier).map_err(Error::from)?;
        model::check_value(
            "service_definition",
            &request.service_definition,
            self.config.max_value_bytes,
        )
        .map_err(Error::from)?;
        let key = Key::definition(&namespace, &request.identifier);
        Api::publish(self, key, &request.service_definition).await?;
        Ok(Response::new(PublishServiceDefinitionResponse {}))
    }

    async fn get(
        &self,
        request: Request<GetServiceDefinitionRequest>,
    ) -> Result<Response<GetServiceDefinitionResponse>, Status> {
        let namespace = self.namespace(request.metadata())?;
        let request = request.into_inner();
        model::check_name("identifier", &request.identifier).map_err(Error::from)?;
        let key = Key::definition(&namespace, &request.identifier);
        let value = Api::get(self, &key, || {
            format!(
                "service definition {:?} in namespace {:?}",
                request.identifier, namespace
            )
        })
        .await?;
        Ok(Response::new(GetServiceDefinitionResponse {
            service_definition: value.to_string(),
        }))
    }
}
