//! Upstream Pixiu's `dubbo.networking.v1alpha1.ServiceMetadataService`, beside the seed's
//! `MetadataService`, over the same store, keys and rules: what one API publishes the other
//! reads.
//!
//! Differences from upstream's server (dubbo-go-pixiu `pilot/pkg/networking/dubbo/v1alpha1`),
//! all in the client's favour: a missing record is `NOT_FOUND` (upstream says `ABORTED`);
//! Publish answers once the record is stored (upstream queues it and answers at once); and
//! bad names are `INVALID_ARGUMENT` rather than a failed write later.
//!
//! The namespace is the request's `namespace` field; when empty, the seed API's rule applies
//! (the `x-pixiu-namespace` header, else the server's default namespace).

use tonic::{Request, Response, Status};

use super::{Api, Error};
use crate::security::Operation;
use crate::{
    model::{self, Kind},
    pb::dubbo_networking::{
        GetServiceMetadataRequest, GetServiceMetadataResponse, PublishServiceMetadataRequest,
        PublishServiceMetadataResponse,
        service_metadata_service_server::{ServiceMetadataService, ServiceMetadataServiceServer},
    },
};

impl Api {
    /// Upstream Pixiu's `ServiceMetadataService` server, with the same message size limit
    /// as the seed's services.
    pub fn upstream_metadata_service(&self) -> ServiceMetadataServiceServer<Self> {
        ServiceMetadataServiceServer::new(self.clone())
            .max_decoding_message_size(self.max_message_bytes())
    }

    /// The namespace of an upstream request: its field, else the header, decided by the
    /// authorizer as for the seed API.
    fn upstream_namespace<T>(
        &self,
        request: &Request<T>,
        field: &str,
        operation: Operation,
    ) -> Result<String, Error> {
        if field.is_empty() {
            return self.namespace(request, operation);
        }
        // The request's own field, not the header: reported as a field.
        model::check_namespace(field)?;
        self.namespace_for(request, Some(field), operation)
    }
}

#[tonic::async_trait]
impl ServiceMetadataService for Api {
    async fn publish(
        &self,
        request: Request<PublishServiceMetadataRequest>,
    ) -> Result<Response<PublishServiceMetadataResponse>, Status> {
        let result = async {
            let namespace = self.upstream_namespace(
                &request,
                &request.get_ref().namespace,
                Operation::Publish,
            )?;
            let request = request.get_ref();
            self.publish_metadata(
                &namespace,
                &request.application_name,
                &request.revision,
                &request.metadata_info,
            )
            .await?;
            Ok(PublishServiceMetadataResponse {})
        }
        .await;
        self.finish(Kind::Metadata, "publish", result)
    }

    async fn get(
        &self,
        request: Request<GetServiceMetadataRequest>,
    ) -> Result<Response<GetServiceMetadataResponse>, Status> {
        let result = async {
            let namespace =
                self.upstream_namespace(&request, &request.get_ref().namespace, Operation::Get)?;
            let request = request.get_ref();
            let value = self
                .get_metadata(&namespace, &request.application_name, &request.revision)
                .await?;
            Ok(GetServiceMetadataResponse {
                metadata_info: value.to_string(),
            })
        }
        .await;
        self.finish(Kind::Metadata, "get", result)
    }
}
