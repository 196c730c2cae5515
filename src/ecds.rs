//! The Extension Config Discovery Service (`envoy.service.extension.v3`), serving Pixiu's
//! listeners and clusters (`push::pixiu`) to Pixiu data planes.
//!
//! Only a tonic adapter: streams are `pixiu_xds` streams (the same Delta and SotW state
//! machines, cache, registry, limits and stream permits as ADS) over the view
//! `[PIXIU_PARTITION]`, with the client's [`quirks`](crate::clients::quirks).
//! `FetchExtensionConfigs` (the REST-style unary fetch) is not served: no Pixiu release
//! calls it.

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::{
        discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
        extension::v3::extension_config_discovery_service_server::{
            ExtensionConfigDiscoveryService, ExtensionConfigDiscoveryServiceServer,
        },
    },
};
use pixiu_xds::{AdsServer, Partition, Quirks, ResponseStream, StreamContext, View, ViewResolver};
use tonic::{Request, Response, Status, Streaming};

use crate::push::pixiu::PIXIU_PARTITION;

/// Every ECDS stream reads the Pixiu partition, whatever its node.
#[derive(Debug, Default, Clone, Copy)]
pub struct PixiuResolver;

impl ViewResolver for PixiuResolver {
    fn view(&self, _node: Option<&Node>, _context: &StreamContext) -> Result<View, Status> {
        Ok(View::new([Partition::new(PIXIU_PARTITION)]))
    }

    fn quirks(&self, node: Option<&Node>) -> Quirks {
        crate::clients::quirks(node)
    }
}

/// The ECDS service.
#[derive(Debug, Clone)]
pub struct EcdsService {
    streams: AdsServer,
}

impl EcdsService {
    /// ECDS over the streams of `ads` (same cache, registry and limits), reading the Pixiu
    /// partition.
    pub fn new(ads: &AdsServer) -> Self {
        Self {
            streams: ads.with_resolver(std::sync::Arc::new(PixiuResolver)),
        }
    }

    /// The tonic service to add to a router.
    pub fn into_service(self) -> ExtensionConfigDiscoveryServiceServer<Self> {
        ExtensionConfigDiscoveryServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for EcdsService {
    type StreamExtensionConfigsStream = ResponseStream<DiscoveryResponse>;
    type DeltaExtensionConfigsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamExtensionConfigsStream>, Status> {
        self.streams.serve_sotw(request)
    }

    async fn delta_extension_configs(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        self.streams.serve_delta(request)
    }

    async fn fetch_extension_configs(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "FetchExtensionConfigs is not served; use DeltaExtensionConfigs or StreamExtensionConfigs",
        ))
    }
}
