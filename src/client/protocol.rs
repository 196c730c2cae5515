//! The client side of ADS for one resource type, as plain data: what to send when a stream
//! opens, what a response means, and what to answer. No IO; `subscribe.rs` drives it.
//!
//! Both variants keep what the client holds (name, version, decoded resource), so:
//! - a reconnect resumes: Delta sends `initial_resource_versions`, State of the World sends the
//!   last accepted `version_info`, and nothing the client already holds is reported twice;
//! - versions are the server's content-derived ones (a hash of the resource bytes, which SotW
//!   recomputes from the bytes it receives), so switching variants or servers keeps them;
//! - a response with a resource that does not decode (or has another type) is NACKed as a
//!   whole, with `error_detail`, and changes nothing, as the xDS protocol asks.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
    },
    google::{protobuf::Any, rpc::Status as RpcStatus},
};

use super::Resource;

/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = tonic::Code::InvalidArgument as i32;

/// One change to what the client holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Update<T> {
    /// A resource the client did not hold.
    Added {
        /// Its name.
        name: String,
        /// Its content-derived version.
        version: String,
        /// The decoded resource.
        resource: T,
    },
    /// A new version of a resource the client held.
    Updated {
        /// Its name.
        name: String,
        /// Its new version.
        version: String,
        /// The decoded resource.
        resource: T,
    },
    /// A resource the client held is gone.
    Removed {
        /// Its name.
        name: String,
    },
}

impl<T> Update<T> {
    /// The resource name.
    pub fn name(&self) -> &str {
        match self {
            Update::Added { name, .. }
            | Update::Updated { name, .. }
            | Update::Removed { name } => name,
        }
    }
}

/// What a response produced: the updates to report and the ACK or NACK to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply<R, T> {
    /// Changes to what the client holds, ordered by name.
    pub updates: Vec<Update<T>>,
    /// The ACK or NACK; `None` for a response of another type.
    pub request: Option<R>,
    /// Why the response was NACKed, if it was.
    pub rejected: Option<String>,
}

/// The client's state for one type: its subscription and what it holds.
#[derive(Debug, Clone)]
pub struct Subscription<T> {
    names: BTreeSet<String>,
    held: BTreeMap<String, (String, T)>,
    /// The last `version_info` accepted over State of the World.
    sotw_version: String,
    node: Node,
}

impl<T: Resource> Subscription<T> {
    /// A subscription to `names` (every resource of the type when empty) for `node`.
    pub fn new(names: impl IntoIterator<Item = String>, node: Node) -> Self {
        Self {
            names: names.into_iter().collect(),
            held: BTreeMap::new(),
            sotw_version: String::new(),
            node,
        }
    }

    /// What the client holds: name to (version, resource).
    pub fn held(&self) -> &BTreeMap<String, (String, T)> {
        &self.held
    }

    /// The first request of a Delta stream: the subscription and what is already held.
    pub fn delta_request(&self) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: T::TYPE_URL.to_string(),
            resource_names_subscribe: self.names.iter().cloned().collect(),
            initial_resource_versions: self
                .held
                .iter()
                .map(|(name, (version, _))| (name.clone(), version.clone()))
                .collect(),
            ..Default::default()
        }
    }

    /// A Delta response: updates, then the ACK (or the NACK if a resource does not decode).
    pub fn on_delta(
        &mut self,
        response: &DeltaDiscoveryResponse,
    ) -> Reply<DeltaDiscoveryRequest, T> {
        if response.type_url != T::TYPE_URL {
            return Reply {
                updates: Vec::new(),
                request: None,
                rejected: None,
            };
        }
        let decoded: Result<Vec<(String, String, T)>, String> = response
            .resources
            .iter()
            .map(|r| {
                let any = r
                    .resource
                    .as_ref()
                    .ok_or_else(|| format!("resource {:?} has no body", r.name))?;
                let resource =
                    decode::<T>(any).map_err(|e| format!("resource {:?}: {e}", r.name))?;
                Ok((r.name.clone(), r.version.clone(), resource))
            })
            .collect();
        let ack = |error: Option<&String>| DeltaDiscoveryRequest {
            type_url: T::TYPE_URL.to_string(),
            response_nonce: response.nonce.clone(),
            error_detail: error.map(|message| RpcStatus {
                code: INVALID_ARGUMENT,
                message: message.clone(),
                details: Vec::new(),
            }),
            ..Default::default()
        };
        match decoded {
            Err(error) => Reply {
                updates: Vec::new(),
                request: Some(ack(Some(&error))),
                rejected: Some(error),
            },
            Ok(resources) => {
                let mut updates = Vec::new();
                for (name, version, resource) in resources {
                    updates.extend(self.hold(name, version, resource));
                }
                for name in &response.removed_resources {
                    if self.held.remove(name).is_some() {
                        updates.push(Update::Removed { name: name.clone() });
                    }
                }
                Reply {
                    updates,
                    request: Some(ack(None)),
                    rejected: None,
                }
            }
        }
    }

    /// The first request of a State-of-the-World stream; the last accepted version lets the
    /// server skip a response that would change nothing.
    pub fn sotw_request(&self) -> DiscoveryRequest {
        DiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: T::TYPE_URL.to_string(),
            resource_names: self.names.iter().cloned().collect(),
            version_info: self.sotw_version.clone(),
            ..Default::default()
        }
    }

    /// A State-of-the-World response: it holds every subscribed resource that exists, so a
    /// held resource it omits is removed.
    pub fn on_sotw(&mut self, response: &DiscoveryResponse) -> Reply<DiscoveryRequest, T> {
        if response.type_url != T::TYPE_URL {
            return Reply {
                updates: Vec::new(),
                request: None,
                rejected: None,
            };
        }
        let decoded: Result<Vec<(String, String, T)>, String> = response
            .resources
            .iter()
            .map(|any| {
                let resource = decode::<T>(any)?;
                let version = pixiu_xds::Version::of_bytes(&any.value).to_string();
                Ok((resource.name(), version, resource))
            })
            .collect();
        let names: Vec<String> = self.names.iter().cloned().collect();
        let reply = |version_info: &str, error: Option<&String>| DiscoveryRequest {
            type_url: T::TYPE_URL.to_string(),
            resource_names: names.clone(),
            version_info: version_info.to_string(),
            response_nonce: response.nonce.clone(),
            error_detail: error.map(|message| RpcStatus {
                code: INVALID_ARGUMENT,
                message: message.clone(),
                details: Vec::new(),
            }),
            ..Default::default()
        };
        match decoded {
            Err(error) => Reply {
                updates: Vec::new(),
                // A NACK carries the previously accepted version.
                request: Some(reply(&self.sotw_version, Some(&error))),
                rejected: Some(error),
            },
            Ok(resources) => {
                let present: BTreeSet<String> =
                    resources.iter().map(|(name, _, _)| name.clone()).collect();
                let mut updates: Vec<Update<T>> = self
                    .held
                    .keys()
                    .filter(|name| !present.contains(*name))
                    .map(|name| Update::Removed { name: name.clone() })
                    .collect();
                for update in &updates {
                    self.held.remove(update.name());
                }
                for (name, version, resource) in resources {
                    updates.extend(self.hold(name, version, resource));
                }
                updates.sort_by(|a, b| a.name().cmp(b.name()));
                self.sotw_version = response.version_info.clone();
                Reply {
                    updates,
                    request: Some(reply(&response.version_info, None)),
                    rejected: None,
                }
            }
        }
    }

    /// Holds a resource; the update it makes, none if it is the version already held.
    fn hold(&mut self, name: String, version: String, resource: T) -> Option<Update<T>> {
        match self.held.get(&name) {
            Some((held, _)) if *held == version => None,
            Some(_) => {
                self.held
                    .insert(name.clone(), (version.clone(), resource.clone()));
                Some(Update::Updated {
                    name,
                    version,
                    resource,
                })
            }
            None => {
                self.held
                    .insert(name.clone(), (version.clone(), resource.clone()));
                Some(Update::Added {
                    name,
                    version,
                    resource,
                })
            }
        }
    }
}

fn decode<T: Resource>(any: &Any) -> Result<T, String> {
    if any.type_url != T::TYPE_URL {
        return Err(format!(
            "type {:?} where {:?} was expected",
            any.type_url,
            T::TYPE_URL
        ));
    }
    T::decode(any.value.as_slice()).map_err(|e| format!("does not decode: {e}"))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::Resource as DeltaResource;
    use prost::Message;

    use super::*;
    use crate::pb::{self, metadata::Metadata};

    fn metadata(revision: &str, info: &str) -> Metadata {
        Metadata {
            application_name: "app".into(),
            revision: revision.into(),
            metadata_info: info.into(),
            namespace: "ns".into(),
        }
    }

    fn any(m: &Metadata) -> Any {
        Any {
            type_url: pb::METADATA_TYPE_URL.into(),
            value: m.encode_to_vec(),
        }
    }

    fn delta(nonce: &str, resources: &[&Metadata], removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: pb::METADATA_TYPE_URL.into(),
            nonce: nonce.into(),
            resources: resources
                .iter()
                .map(|m| {
                    let body = any(m);
                    DeltaResource {
                        name: m.name(),
                        version: pixiu_xds::Version::of_bytes(&body.value).to_string(),
                        resource: Some(body),
                        ..Default::default()
                    }
                })
                .collect(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn kinds<T>(updates: &[Update<T>]) -> Vec<String> {
        updates
            .iter()
            .map(|u| match u {
                Update::Added { name, .. } => format!("+{name}"),
                Update::Updated { name, .. } => format!("~{name}"),
                Update::Removed { name } => format!("-{name}"),
            })
            .collect()
    }

    fn subscription() -> Subscription<Metadata> {
        Subscription::new(
            ["app/r1".to_string(), "app/r2".to_string()],
            Node::default(),
        )
    }

    #[test]
    fn delta_acks_dedupes_and_resumes() {
        let mut sub = subscription();
        let first = sub.delta_request();
        assert_eq!(first.resource_names_subscribe, ["app/r1", "app/r2"]);
        assert!(first.initial_resource_versions.is_empty());

        let r1 = metadata("r1", "one");
        let reply = sub.on_delta(&delta("n1", &[&r1], &[]));
        assert_eq!(kinds(&reply.updates), ["+app/r1"]);
        let ack = reply.request.unwrap();
        assert_eq!(ack.response_nonce, "n1");
        assert!(ack.error_detail.is_none());

        // The same version again (e.g. after a reconnect) is no update.
        let reply = sub.on_delta(&delta("n2", &[&r1], &[]));
        assert!(reply.updates.is_empty());
        let r1b = metadata("r1", "uno");
        let reply = sub.on_delta(&delta("n3", &[&r1b, &metadata("r2", "two")], &[]));
        assert_eq!(kinds(&reply.updates), ["~app/r1", "+app/r2"]);

        // Reconnecting names what is held.
        let resume = sub.delta_request();
        assert_eq!(resume.initial_resource_versions.len(), 2);
        let reply = sub.on_delta(&delta("n4", &[], &["app/r1", "app/never-held"]));
        assert_eq!(kinds(&reply.updates), ["-app/r1"]);
        assert_eq!(sub.held().len(), 1);
    }

    #[test]
    fn delta_nacks_what_does_not_decode_and_changes_nothing() {
        let mut sub = subscription();
        let mut response = delta("n1", &[&metadata("r1", "one")], &["app/r2"]);
        response.resources.push(DeltaResource {
            name: "app/r2".into(),
            version: "v".into(),
            resource: Some(Any {
                type_url: pb::METADATA_TYPE_URL.into(),
                value: vec![0xff, 0xff, 0xff],
            }),
            ..Default::default()
        });
        let reply = sub.on_delta(&response);
        assert!(reply.updates.is_empty());
        let nack = reply.request.unwrap();
        assert_eq!(nack.response_nonce, "n1");
        assert_eq!(nack.error_detail.unwrap().code, INVALID_ARGUMENT);
        assert!(reply.rejected.unwrap().contains("app/r2"));
        assert!(sub.held().is_empty());

        // A resource of another type inside the response is rejected too.
        let mut wrong = delta("n2", &[&metadata("r1", "one")], &[]);
        wrong.resources[0].resource.as_mut().unwrap().type_url = "other".into();
        assert!(sub.on_delta(&wrong).rejected.is_some());
        // A response for another type is not ours to answer.
        let mut other = delta("n3", &[], &[]);
        other.type_url = "other".into();
        assert_eq!(sub.on_delta(&other).request, None);
    }

    #[test]
    fn sotw_removes_by_omission_and_nacks_with_the_previous_version() {
        let mut sub = subscription();
        let response = |version: &str, nonce: &str, resources: &[&Metadata]| DiscoveryResponse {
            type_url: pb::METADATA_TYPE_URL.into(),
            version_info: version.into(),
            nonce: nonce.into(),
            resources: resources.iter().map(|m| any(m)).collect(),
            ..Default::default()
        };
        let reply = sub.on_sotw(&response(
            "v1",
            "n1",
            &[&metadata("r1", "one"), &metadata("r2", "two")],
        ));
        assert_eq!(kinds(&reply.updates), ["+app/r1", "+app/r2"]);
        let ack = reply.request.unwrap();
        assert_eq!(
            (ack.version_info.as_str(), ack.response_nonce.as_str()),
            ("v1", "n1")
        );

        let reply = sub.on_sotw(&response("v2", "n2", &[&metadata("r2", "two")]));
        assert_eq!(kinds(&reply.updates), ["-app/r1"]);

        let mut bad = response("v3", "n3", &[]);
        bad.resources.push(Any {
            type_url: pb::METADATA_TYPE_URL.into(),
            value: vec![0xff],
        });
        let reply = sub.on_sotw(&bad);
        let nack = reply.request.unwrap();
        assert_eq!(
            nack.version_info, "v2",
            "a NACK names the last accepted version"
        );
        assert_eq!(nack.response_nonce, "n3");
        assert!(nack.error_detail.is_some());
        assert_eq!(sub.held().len(), 1);
        assert_eq!(sub.sotw_request().version_info, "v2");

        // Versions agree with Delta's: a resource held from SotW is not re-added by Delta.
        let reply = sub.on_delta(&delta("d1", &[&metadata("r2", "two")], &[]));
        assert!(reply.updates.is_empty());
    }

    mod properties {
        use std::collections::BTreeMap;

        use proptest::prelude::*;

        use super::*;

        #[derive(Debug, Clone)]
        enum Op {
            /// The server's content of revision `n` becomes `value`.
            Put(u8, u8),
            /// Revision `n` is deleted.
            Delete(u8),
            /// The stream breaks; the client reconnects and resumes.
            Reconnect,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0u8..4, 0u8..3).prop_map(|(n, v)| Op::Put(n, v)),
                (0u8..4).prop_map(Op::Delete),
                Just(Op::Reconnect),
            ]
        }

        fn body(n: u8, value: u8) -> Metadata {
            metadata(&format!("r{n}"), &format!("v{value}"))
        }

        proptest! {
            /// Whatever the interleaving of changes and reconnects, the client ends up holding
            /// exactly what the server has, and never reports a version it already held.
            #[test]
            fn delta_converges_without_duplicates(ops in proptest::collection::vec(op(), 0..40)) {
                let names: Vec<String> = (0..4).map(|n| format!("app/r{n}")).collect();
                let mut sub = Subscription::<Metadata>::new(names, Node::default());
                let mut server: BTreeMap<String, Metadata> = BTreeMap::new();
                let mut nonce = 0;
                for op in ops {
                    nonce += 1;
                    let response = match op {
                        Op::Put(n, v) => {
                            let m = body(n, v);
                            server.insert(m.name(), m.clone());
                            delta(&nonce.to_string(), &[&m], &[])
                        }
                        Op::Delete(n) => {
                            let name = format!("app/r{n}");
                            let existed = server.remove(&name).is_some();
                            let removed: Vec<&str> = if existed { vec![name.as_str()] } else { vec![] };
                            delta(&nonce.to_string(), &[], &removed)
                        }
                        Op::Reconnect => {
                            // The server answers initial_resource_versions: what differs or is gone.
                            let request = sub.delta_request();
                            let changed: Vec<&Metadata> = server
                                .iter()
                                .filter(|(name, m)| {
                                    let version = pixiu_xds::Version::of_bytes(&m.encode_to_vec()).to_string();
                                    request.initial_resource_versions.get(*name) != Some(&version)
                                })
                                .map(|(_, m)| m)
                                .collect();
                            let gone: Vec<&str> = request
                                .initial_resource_versions
                                .keys()
                                .filter(|name| !server.contains_key(*name))
                                .map(String::as_str)
                                .collect();
                            delta(&nonce.to_string(), &changed, &gone)
                        }
                    };
                    let before = sub.held().clone();
                    let reply = sub.on_delta(&response);
                    prop_assert_eq!(reply.request.unwrap().response_nonce, nonce.to_string());
                    for update in &reply.updates {
                        match update {
                            Update::Added { name, .. } => prop_assert!(!before.contains_key(name)),
                            Update::Updated { name, version, .. } => {
                                prop_assert!(before.get(name).is_some_and(|(held, _)| held != version));
                            }
                            Update::Removed { name } => prop_assert!(before.contains_key(name)),
                        }
                    }
                    let held: BTreeMap<String, Metadata> = sub
                        .held()
                        .iter()
                        .map(|(name, (_, m))| (name.clone(), m.clone()))
                        .collect();
                    prop_assert_eq!(&held, &server);
                }
            }
        }
    }
}
