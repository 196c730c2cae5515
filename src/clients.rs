//! Clients known to break on parts of the xDS protocol, recognised by `node.user_agent_name`,
//! and the [`Quirks`] their streams get. Every other client gets the protocol as written.
//!
//! - Pixiu's own xDS client (`api_type: GRPC`, agent [`PIXIU_GRPC_AGENT`], dubbo-go-pixiu
//!   `pixiu/pkg/config/xds/apiclient/grpc.go`) applies every Delta response as its complete
//!   set of listeners or clusters: a response with no resource (removals only, or nothing)
//!   would wipe them all. Its streams withhold such responses.
//! - Pixiu's `ISTIO` mode (agent [`PIXIU_ISTIO_AGENT`], `grpc_envoy.go`) applies every EDS
//!   response as a cluster and panics on a load assignment it did not ask for; when no
//!   cluster of its routes exists it opens an EDS stream naming nothing, which the protocol
//!   reads as a wildcard. Its streams treat an empty EDS list as "nothing" and withhold empty
//!   responses.

use envoy_types::pb::envoy::config::core::v3::Node;
use pixiu_xds::{Quirks, StreamContext, TypeUrl, View, ViewResolver};
use tonic::Status;

use crate::push::envoy::ENDPOINT_TYPE_URL;

/// `node.user_agent_name` of Pixiu's ECDS client (both the released one and the reworked
/// one of dubbo-go-pixiu PR #1042).
pub const PIXIU_GRPC_AGENT: &str = "dubbo-go-pixiu";
/// `node.user_agent_name` of Pixiu's `ISTIO` mode client.
pub const PIXIU_ISTIO_AGENT: &str = "pixiu";

/// The quirks of the client that sent `node`.
pub fn quirks(node: Option<&Node>) -> Quirks {
    match node.map(|n| n.user_agent_name.as_str()) {
        Some(PIXIU_GRPC_AGENT) => Quirks {
            withhold_resourceless: true,
            ..Quirks::default()
        },
        Some(PIXIU_ISTIO_AGENT) => Quirks {
            withhold_resourceless: true,
            no_legacy_wildcard: [TypeUrl::new(ENDPOINT_TYPE_URL)].into(),
        },
        _ => Quirks::default(),
    }
}

/// A resolver that adds [`quirks`] to another's views.
#[derive(Debug)]
pub struct WithQuirks<R>(pub R);

impl<R: ViewResolver> ViewResolver for WithQuirks<R> {
    fn view(&self, node: Option<&Node>, context: &StreamContext) -> Result<View, Status> {
        self.0.view(node, context)
    }

    fn quirks(&self, node: Option<&Node>) -> Quirks {
        quirks(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(agent: &str) -> Node {
        Node {
            user_agent_name: agent.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn only_pixiu_agents_get_quirks() {
        assert_eq!(quirks(None), Quirks::default());
        assert_eq!(quirks(Some(&node("envoy"))), Quirks::default());
        assert_eq!(quirks(Some(&node("grpc-python"))), Quirks::default());
        assert!(quirks(Some(&node(PIXIU_GRPC_AGENT))).withhold_resourceless);
        let istio = quirks(Some(&node(PIXIU_ISTIO_AGENT)));
        assert!(!istio.legacy_wildcard(&TypeUrl::new(ENDPOINT_TYPE_URL)));
        assert!(istio.legacy_wildcard(&TypeUrl::new(crate::push::envoy::CLUSTER_TYPE_URL)));
    }
}
