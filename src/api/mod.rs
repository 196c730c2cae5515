//! The gRPC services of the metadata API: the seed's `MetadataService` and
//! `ServiceDefinitionService`, and upstream Pixiu's `ServiceMetadataService` ([`upstream`]).
//!
//! Handlers validate what arrives (every field is hostile until checked), resolve the
//! namespace, and call the [`Store`]. They never touch the xDS cache: pushes follow from the
//! store's watch (`push/`).

use std::{sync::Arc, time::SystemTime};

use tonic::{Request, Response, Status, metadata::MetadataMap};
use tracing::{debug, warn};

use crate::{
    metrics::Metrics,
    model::{self, Key, Kind},
    pb::metadata::{
        DeleteMetadataRequest, DeleteMetadataResponse, DeleteServiceDefinitionRequest,
        DeleteServiceDefinitionResponse, GetMetadataRequest, GetMetadataResponse,
        GetServiceDefinitionRequest, GetServiceDefinitionResponse, ListMetadataRequest,
        ListMetadataResponse, ListServiceDefinitionsRequest, ListServiceDefinitionsResponse,
        MetadataRecord, PublishMetadataRequest, PublishMetadataResponse,
        PublishServiceDefinitionRequest, PublishServiceDefinitionResponse, ServiceDefinitionRecord,
        metadata_service_server::{MetadataService, MetadataServiceServer},
        service_definition_service_server::{
            ServiceDefinitionService, ServiceDefinitionServiceServer,
        },
    },
    security::{Authorizer, Identity, Operation, rate::RateLimiter},
    store::{ListQuery, PutOutcome, Record, Store},
};

pub mod mapping;
pub mod upstream;
mod watch;

pub use crate::{
    model::NAMESPACE_HEADER,
    status::{Error, code},
};

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
    metrics: Metrics,
    watch: Option<crate::watches::WatchHub>,
    authorizer: Arc<Authorizer>,
    publish_rate: Arc<RateLimiter>,
}

/// Default and largest `page_size` of `List`.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

/// The most bytes of names and values one `List` page carries (at least one record): a page
/// of 1,000 values of 1 MiB would otherwise be a gigabyte in one message, held while it is
/// encoded and more than any client accepts. The same bound as a `Watch` message's.
const MAX_PAGE_BYTES: usize = crate::watches::MAX_MESSAGE_RESOURCE_BYTES;

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
    pub fn new(store: Arc<dyn Store>, config: ApiConfig, metrics: Metrics) -> Self {
        Self {
            store,
            authorizer: Arc::new(Authorizer::open(&config.default_namespace)),
            publish_rate: Arc::new(RateLimiter::new(None, 1)),
            config: Arc::new(config),
            metrics,
            watch: None,
        }
    }

    /// Serves the `Watch` methods from `hub`; without it they answer `UNIMPLEMENTED`.
    #[must_use]
    pub fn with_watch(mut self, hub: crate::watches::WatchHub) -> Self {
        self.watch = Some(hub);
        self
    }

    /// Decides namespaces with `authorizer` and limits each identity's publishes with
    /// `publish_rate` (by default: no authentication, no limit).
    #[must_use]
    pub fn with_security(
        mut self,
        authorizer: Arc<Authorizer>,
        publish_rate: Arc<RateLimiter>,
    ) -> Self {
        self.authorizer = authorizer;
        self.publish_rate = publish_rate;
        self
    }

    /// Counts a finished request and turns its error into a status.
    fn finish<T>(
        &self,
        kind: Kind,
        method: &'static str,
        result: Result<T, Error>,
    ) -> Result<Response<T>, Status> {
        let result = result.map(Response::new).map_err(Status::from);
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics.request(kind, method, code);
        result
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

    /// The namespace `request` may do `operation` in: the namespace header (or none),
    /// decided by the authorizer for the caller's identity. A publish also takes a token of
    /// the caller's rate limit.
    pub fn namespace<T>(
        &self,
        request: &Request<T>,
        operation: Operation,
    ) -> Result<String, Error> {
        let requested = requested_namespace(request.metadata())?;
        self.namespace_for(request, requested.as_deref(), operation)
    }

    /// The namespace `request` may do `operation` in when it names `requested` itself (in a
    /// message field, as upstream's API does) rather than in the header.
    pub fn namespace_for<T>(
        &self,
        request: &Request<T>,
        requested: Option<&str>,
        operation: Operation,
    ) -> Result<String, Error> {
        let decision = self.authorizer.authorize(
            request.extensions(),
            request.metadata(),
            requested,
            operation,
        )?;
        if operation == Operation::Publish
            && let Identity::Workload(workload) = &decision.identity
            && let Err(retry_after) = self
                .publish_rate
                .check(&workload.principal, tokio::time::Instant::now())
        {
            self.metrics.denial(operation.as_str(), "rate_limited");
            warn!(
                principal = workload.principal,
                "publish rate limit exceeded"
            );
            return Err(Error::RateLimited { retry_after });
        }
        Ok(decision.namespace)
    }
}

/// The namespace the header names, if any, checked to be well-formed.
pub fn requested_namespace(metadata: &MetadataMap) -> Result<Option<String>, Error> {
    {
        let Some(value) = metadata.get(NAMESPACE_HEADER) else {
            return Ok(None);
        };
        let value = value.to_str().map_err(|_| {
            Error::Namespace(model::Invalid::Forbidden {
                field: "namespace",
                what: "non-ASCII characters",
            })
        })?;
        model::check_namespace(value).map_err(Error::Namespace)?;
        Ok(Some(value.to_string()))
    }
}

impl Api {
    async fn publish(&self, key: Key, value: &str) -> Result<PutOutcome, Error> {
        let outcome = self.store.put(&key, value, SystemTime::now()).await?;
        match &outcome {
            PutOutcome::Updated { .. } => {
                self.metrics
                    .revision_conflicts
                    .get_or_create(&Metrics::kind(key.kind))
                    .inc();
            }
            PutOutcome::Refreshed { .. } => {
                self.metrics
                    .lease_refreshes
                    .get_or_create(&Metrics::kind(key.kind))
                    .inc();
            }
            PutOutcome::Created { .. } => {}
        }
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

    /// Checks and publishes one application's metadata: the seed's `Publish` and upstream's.
    async fn publish_metadata(
        &self,
        namespace: &str,
        application: &str,
        revision: &str,
        metadata_info: &str,
    ) -> Result<(), Error> {
        model::check_application(application)?;
        model::check_name("revision", revision)?;
        model::check_value("metadata_info", metadata_info, self.config.max_value_bytes)?;
        let key = Key::metadata(namespace, application, revision);
        Api::publish(self, key, metadata_info).await?;
        Ok(())
    }

    /// Checks and reads one application's metadata: the seed's `Get` and upstream's.
    async fn get_metadata(
        &self,
        namespace: &str,
        application: &str,
        revision: &str,
    ) -> Result<Arc<str>, Error> {
        model::check_application(application)?;
        model::check_name("revision", revision)?;
        let key = Key::metadata(namespace, application, revision);
        Api::get(self, &key, || {
            format!(
                "metadata of application {application:?} revision {revision:?} in namespace {namespace:?}"
            )
        })
        .await
    }

    async fn get(&self, key: &Key, what: impl FnOnce() -> String) -> Result<Arc<str>, Error> {
        match self.store.get(key).await? {
            Some(record) => Ok(record.value),
            None => Err(Error::NotFound { what: what() }),
        }
    }

    async fn delete(&self, key: &Key, what: impl FnOnce() -> String) -> Result<(), Error> {
        if self.store.delete(key, None).await? {
            tracing::info!(kind = %key.kind, namespace = key.namespace, resource.name = key.name, "deleted");
            Ok(())
        } else {
            Err(Error::NotFound { what: what() })
        }
    }

    /// One page of records of `kind` in `namespace` whose names start with `prefix`: at most
    /// `page_size` records and [`MAX_PAGE_BYTES`] of names and values (of names alone when
    /// `names_only`).
    async fn list(
        &self,
        kind: Kind,
        namespace: String,
        prefix: String,
        page_size: u32,
        page_token: String,
        names_only: bool,
    ) -> Result<(Vec<Record>, String), Error> {
        let page_size = match usize::try_from(page_size).unwrap_or(usize::MAX) {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        if !page_token.is_empty() {
            model::check_name("page_token", &page_token)?;
        }
        let query = ListQuery {
            kind,
            namespace: Some(namespace.clone()),
            name_prefix: prefix,
            start_after: (!page_token.is_empty()).then_some((namespace, page_token)),
            limit: page_size + 1,
        };
        let mut records = self.store.list(&query).await?;
        let fits = page_length(&records, page_size, |record| {
            record.key.name.len() + if names_only { 0 } else { record.value.len() }
        });
        let next_page_token = if records.len() > fits {
            records.truncate(fits);
            records
                .last()
                .map(|r| r.key.name.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((records, next_page_token))
    }
}

/// How many of `records` go into a page: at most `page_size`, and no more than fit
/// [`MAX_PAGE_BYTES`] by `size` (at least one).
fn page_length<T>(records: &[T], page_size: usize, size: impl Fn(&T) -> usize) -> usize {
    let mut bytes = 0;
    records
        .iter()
        .take(page_size)
        .take_while(|record| {
            bytes += size(record);
            bytes <= MAX_PAGE_BYTES
        })
        .count()
        .max(1)
        .min(records.len())
}

fn refreshed_at_ms(record: &Record) -> i64 {
    i64::try_from(record.refreshed_at_ms).unwrap_or(i64::MAX)
}

#[tonic::async_trait]
impl MetadataService for Api {
    type WatchStream = crate::watches::WatchStream<crate::pb::metadata::WatchMetadataResponse>;

    async fn watch(
        &self,
        request: Request<crate::pb::metadata::WatchMetadataRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let result = watch::metadata(self, request);
        self.finish(Kind::Metadata, "watch", result)
    }

    async fn publish(
        &self,
        request: Request<PublishMetadataRequest>,
    ) -> Result<Response<PublishMetadataResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::Publish)?;
            let request = request.get_ref();
            self.publish_metadata(
                &namespace,
                &request.application_name,
                &request.revision,
                &request.metadata_info,
            )
            .await?;
            Ok(PublishMetadataResponse {})
        }
        .await;
        self.finish(Kind::Metadata, "publish", result)
    }

    async fn get(
        &self,
        request: Request<GetMetadataRequest>,
    ) -> Result<Response<GetMetadataResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::Get)?;
            let request = request.get_ref();
            let value = self
                .get_metadata(&namespace, &request.application_name, &request.revision)
                .await?;
            Ok(GetMetadataResponse {
                metadata_info: value.to_string(),
            })
        }
        .await;
        self.finish(Kind::Metadata, "get", result)
    }

    async fn list(
        &self,
        request: Request<ListMetadataRequest>,
    ) -> Result<Response<ListMetadataResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::List)?;
            let request = request.into_inner();
            let prefix = if request.application_name.is_empty() {
                String::new()
            } else {
                model::check_application(&request.application_name)?;
                format!("{}/", request.application_name)
            };
            let (records, next_page_token) = Api::list(
                self,
                Kind::Metadata,
                namespace,
                prefix,
                request.page_size,
                request.page_token,
                request.names_only,
            )
            .await?;
            let records = records
                .iter()
                .filter_map(|record| {
                    let (application, revision) = record.key.application_revision()?;
                    Some(MetadataRecord {
                        application_name: application.to_string(),
                        revision: revision.to_string(),
                        metadata_info: if request.names_only {
                            String::new()
                        } else {
                            record.value.to_string()
                        },
                        refreshed_at_ms: refreshed_at_ms(record),
                        namespace: record.key.namespace.clone(),
                        value_bytes: record.value.len() as u64,
                    })
                })
                .collect();
            Ok(ListMetadataResponse {
                records,
                next_page_token,
            })
        }
        .await;
        self.finish(Kind::Metadata, "list", result)
    }

    async fn delete(
        &self,
        request: Request<DeleteMetadataRequest>,
    ) -> Result<Response<DeleteMetadataResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::Delete)?;
            let request = request.get_ref();
            model::check_application(&request.application_name)?;
            model::check_name("revision", &request.revision)?;
            let key = Key::metadata(&namespace, &request.application_name, &request.revision);
            Api::delete(self, &key, || {
                format!(
                    "metadata of application {:?} revision {:?} in namespace {:?}",
                    request.application_name, request.revision, namespace
                )
            })
            .await?;
            Ok(DeleteMetadataResponse {})
        }
        .await;
        self.finish(Kind::Metadata, "delete", result)
    }
}

#[tonic::async_trait]
impl ServiceDefinitionService for Api {
    type WatchStream =
        crate::watches::WatchStream<crate::pb::metadata::WatchServiceDefinitionResponse>;

    async fn watch(
        &self,
        request: Request<crate::pb::metadata::WatchServiceDefinitionRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let result = watch::definition(self, request);
        self.finish(Kind::Definition, "watch", result)
    }

    async fn publish(
        &self,
        request: Request<PublishServiceDefinitionRequest>,
    ) -> Result<Response<PublishServiceDefinitionResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::Publish)?;
            let request = request.get_ref();
            model::check_name("identifier", &request.identifier)?;
            model::check_value(
                "service_definition",
                &request.service_definition,
                self.config.max_value_bytes,
            )?;
            let key = Key::definition(&namespace, &request.identifier);
            Api::publish(self, key, &request.service_definition).await?;
            Ok(PublishServiceDefinitionResponse {})
        }
        .await;
        self.finish(Kind::Definition, "publish", result)
    }

    async fn get(
        &self,
        request: Request<GetServiceDefinitionRequest>,
    ) -> Result<Response<GetServiceDefinitionResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::Get)?;
            let request = request.get_ref();
            model::check_name("identifier", &request.identifier)?;
            let key = Key::definition(&namespace, &request.identifier);
            let value = Api::get(self, &key, || {
                format!(
                    "service definition {:?} in namespace {:?}",
                    request.identifier, namespace
                )
            })
            .await?;
            Ok(GetServiceDefinitionResponse {
                service_definition: value.to_string(),
            })
        }
        .await;
        self.finish(Kind::Definition, "get", result)
    }

    async fn list(
        &self,
        request: Request<ListServiceDefinitionsRequest>,
    ) -> Result<Response<ListServiceDefinitionsResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::List)?;
            let request = request.into_inner();
            if !request.identifier_prefix.is_empty() {
                model::check_name("identifier_prefix", &request.identifier_prefix)?;
            }
            let (records, next_page_token) = Api::list(
                self,
                Kind::Definition,
                namespace,
                request.identifier_prefix,
                request.page_size,
                request.page_token,
                request.names_only,
            )
            .await?;
            let records = records
                .iter()
                .map(|record| ServiceDefinitionRecord {
                    identifier: record.key.name.clone(),
                    service_definition: if request.names_only {
                        String::new()
                    } else {
                        record.value.to_string()
                    },
                    refreshed_at_ms: refreshed_at_ms(record),
                    namespace: record.key.namespace.clone(),
                    value_bytes: record.value.len() as u64,
                })
                .collect();
            Ok(ListServiceDefinitionsResponse {
                records,
                next_page_token,
            })
        }
        .await;
        self.finish(Kind::Definition, "list", result)
    }

    async fn delete(
        &self,
        request: Request<DeleteServiceDefinitionRequest>,
    ) -> Result<Response<DeleteServiceDefinitionResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::Delete)?;
            let request = request.get_ref();
            model::check_name("identifier", &request.identifier)?;
            let key = Key::definition(&namespace, &request.identifier);
            Api::delete(self, &key, || {
                format!(
                    "service definition {:?} in namespace {:?}",
                    request.identifier, namespace
                )
            })
            .await?;
            Ok(DeleteServiceDefinitionResponse {})
        }
        .await;
        self.finish(Kind::Definition, "delete", result)
    }
}
