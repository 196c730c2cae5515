//! Service-name mapping: our `ServiceMappingService` and upstream's
//! `dubbo.networking.v1alpha1.ServiceNameMappingService`, over the same records.
//!
//! One record per `(namespace, interface, application)` ([`Kind::Mapping`]), with an empty
//! value: registering again only refreshes that application's lease.

use tonic::{Request, Response, Status};

use super::{Api, Error};
use crate::security::Operation;
use crate::{
    model::{self, Key, Kind},
    pb::{
        dubbo_networking::{
            ServiceMappingRequest, ServiceMappingResponse,
            service_name_mapping_service_server::{
                ServiceNameMappingService, ServiceNameMappingServiceServer,
            },
        },
        metadata::{
            GetServiceMappingRequest, GetServiceMappingResponse, ListServiceMappingsRequest,
            ListServiceMappingsResponse, RegisterServiceMappingRequest,
            RegisterServiceMappingResponse, ServiceMappingRecord, UnregisterServiceMappingRequest,
            UnregisterServiceMappingResponse, WatchServiceMappingRequest,
            WatchServiceMappingResponse,
            service_mapping_service_server::{ServiceMappingService, ServiceMappingServiceServer},
        },
    },
    store::ListQuery,
};

/// The value of every mapping record: the key says everything.
const MAPPING_VALUE: &str = "";

/// Most interfaces one upstream `registerServiceAppMapping` may name.
pub const MAX_INTERFACES_PER_REQUEST: usize = 1000;

impl Api {
    /// The `ServiceMappingService` server.
    pub fn mapping_service(&self) -> ServiceMappingServiceServer<Self> {
        ServiceMappingServiceServer::new(self.clone())
    }

    /// Upstream's `ServiceNameMappingService` server.
    pub fn upstream_mapping_service(&self) -> ServiceNameMappingServiceServer<Self> {
        ServiceNameMappingServiceServer::new(self.clone())
            .max_decoding_message_size(self.max_message_bytes())
    }

    /// The applications registered for `interface` in `namespace`, sorted.
    pub async fn applications_of(
        &self,
        namespace: &str,
        interface: &str,
    ) -> Result<Vec<String>, Error> {
        let query = ListQuery {
            namespace: Some(namespace.to_string()),
            name_prefix: format!("{interface}/"),
            ..ListQuery::all(Kind::Mapping)
        };
        let mut applications: Vec<String> = self
            .store
            .list(&query)
            .await?
            .iter()
            .filter_map(|r| {
                let (i, application) = r.key.interface_application()?;
                (i == interface).then(|| application.to_string())
            })
            .collect();
        applications.sort();
        applications.dedup();
        Ok(applications)
    }
}

#[tonic::async_trait]
impl ServiceMappingService for Api {
    type WatchStream = crate::watches::WatchStream<WatchServiceMappingResponse>;

    async fn register(
        &self,
        request: Request<RegisterServiceMappingRequest>,
    ) -> Result<Response<RegisterServiceMappingResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::Publish)?;
            let request = request.get_ref();
            model::check_interface(&request.interface)?;
            model::check_application(&request.application_name)?;
            let key = Key::mapping(&namespace, &request.interface, &request.application_name);
            Api::publish(self, key, MAPPING_VALUE).await?;
            Ok(RegisterServiceMappingResponse {})
        }
        .await;
        self.finish(Kind::Mapping, "register", result)
    }

    async fn get(
        &self,
        request: Request<GetServiceMappingRequest>,
    ) -> Result<Response<GetServiceMappingResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::Get)?;
            let request = request.get_ref();
            model::check_interface(&request.interface)?;
            let application_names = self.applications_of(&namespace, &request.interface).await?;
            if application_names.is_empty() {
                return Err(Error::NotFound {
                    what: format!(
                        "mapping of interface {:?} in namespace {:?}",
                        request.interface, namespace
                    ),
                });
            }
            Ok(GetServiceMappingResponse { application_names })
        }
        .await;
        self.finish(Kind::Mapping, "get", result)
    }

    async fn list(
        &self,
        request: Request<ListServiceMappingsRequest>,
    ) -> Result<Response<ListServiceMappingsResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::List)?;
            let request = request.into_inner();
            if !request.interface_prefix.is_empty() {
                model::check_name("interface_prefix", &request.interface_prefix)?;
            }
            let (records, next_page_token) = Api::list(
                self,
                Kind::Mapping,
                namespace,
                request.interface_prefix,
                request.page_size,
                request.page_token,
                true,
            )
            .await?;
            let records = records
                .iter()
                .filter_map(|record| {
                    let (interface, application) = record.key.interface_application()?;
                    Some(ServiceMappingRecord {
                        interface: interface.to_string(),
                        application_name: application.to_string(),
                        refreshed_at_ms: super::refreshed_at_ms(record),
                        namespace: record.key.namespace.clone(),
                    })
                })
                .collect();
            Ok(ListServiceMappingsResponse {
                records,
                next_page_token,
            })
        }
        .await;
        self.finish(Kind::Mapping, "list", result)
    }

    async fn unregister(
        &self,
        request: Request<UnregisterServiceMappingRequest>,
    ) -> Result<Response<UnregisterServiceMappingResponse>, Status> {
        let result = async {
            let namespace = self.namespace(&request, Operation::Delete)?;
            let request = request.get_ref();
            model::check_interface(&request.interface)?;
            model::check_application(&request.application_name)?;
            let key = Key::mapping(&namespace, &request.interface, &request.application_name);
            Api::delete(self, &key, || {
                format!(
                    "mapping of interface {:?} to application {:?} in namespace {:?}",
                    request.interface, request.application_name, namespace
                )
            })
            .await?;
            Ok(UnregisterServiceMappingResponse {})
        }
        .await;
        self.finish(Kind::Mapping, "unregister", result)
    }

    async fn watch(
        &self,
        request: Request<WatchServiceMappingRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let result = super::watch::mapping(self, request);
        self.finish(Kind::Mapping, "watch", result)
    }
}

#[tonic::async_trait]
impl ServiceNameMappingService for Api {
    async fn register_service_app_mapping(
        &self,
        request: Request<ServiceMappingRequest>,
    ) -> Result<Response<ServiceMappingResponse>, Status> {
        let result = async {
            let namespace = if request.get_ref().namespace.is_empty() {
                self.namespace(&request, Operation::Publish)?
            } else {
                model::check_namespace(&request.get_ref().namespace)?;
                let requested = request.get_ref().namespace.clone();
                self.namespace_for(&request, Some(&requested), Operation::Publish)?
            };
            let request = request.get_ref();
            model::check_application(&request.application_name)?;
            if request.interface_names.len() > MAX_INTERFACES_PER_REQUEST {
                return Err(Error::Invalid(model::Invalid::TooMany {
                    field: "interfaceNames",
                    len: request.interface_names.len(),
                    limit: MAX_INTERFACES_PER_REQUEST,
                }));
            }
            // Validate all first, so a bad name writes nothing.
            for interface in &request.interface_names {
                model::check_interface(interface)?;
            }
            for interface in &request.interface_names {
                let key = Key::mapping(&namespace, interface, &request.application_name);
                Api::publish(self, key, MAPPING_VALUE).await?;
            }
            Ok(ServiceMappingResponse {})
        }
        .await;
        self.finish(Kind::Mapping, "register_service_app_mapping", result)
    }
}
