//! Service-name mapping records into xDS resources.
//!
//! The store keeps one record per `(namespace, interface, application)`; subscribers want one
//! resource per interface listing every application. [`MappingIndex`] holds the applications
//! of each interface (pure, no IO) and turns each store event into the cache updates of the
//! interfaces it touched, in two shapes:
//!
//! - ours, `type.googleapis.com/pixiu.pkg.metadata.ServiceMapping`, named by interface, in the
//!   namespace's partition;
//! - upstream's, `dubbo.networking.v1alpha1.v1.servicenamemapping`, named
//!   `<interface>|<namespace>` in the global partition (upstream's clients name the
//!   namespace in the resource name and may read any), and also named `<interface>` in the
//!   namespace's partition (upstream's older generator named resources by interface alone,
//!   in the client's own namespace).
//!
//! An interface whose last application leaves has its resources removed.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::google::protobuf::Any;
use pixiu_xds::{Partition, ResourceName, TypeUrl, Update};
use prost::Message;

use super::GLOBAL_PARTITION;
use crate::{
    model::{Key, Kind},
    pb::{self, dubbo_networking, metadata as proto},
    store::Record,
};

/// The name of upstream's resource for `interface` in `namespace`.
pub fn upstream_name(interface: &str, namespace: &str) -> String {
    format!("{interface}|{namespace}")
}

/// Our resource for the applications of one interface.
pub fn resource(namespace: &str, interface: &str, applications: &BTreeSet<String>) -> Any {
    Any {
        type_url: pb::SERVICE_MAPPING_TYPE_URL.to_string(),
        value: proto::ServiceMapping {
            interface: interface.to_string(),
            application_names: applications.iter().cloned().collect(),
            namespace: namespace.to_string(),
        }
        .encode_to_vec(),
    }
}

/// Upstream's resource for the applications of one interface.
pub fn upstream_resource(namespace: &str, interface: &str, applications: &BTreeSet<String>) -> Any {
    Any {
        type_url: pb::UPSTREAM_MAPPING_TYPE_URL.to_string(),
        value: dubbo_networking::ServiceMappingXdsResponse {
            namespace: namespace.to_string(),
            interface_name: interface.to_string(),
            application_names: applications.iter().cloned().collect(),
        }
        .encode_to_vec(),
    }
}

/// The applications of every interface, as the store's mapping records say.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MappingIndex {
    /// `(namespace, interface)` to its applications; never an empty set.
    interfaces: BTreeMap<(String, String), BTreeSet<String>>,
}

impl MappingIndex {
    /// The applications of `interface` in `namespace`.
    pub fn applications(&self, namespace: &str, interface: &str) -> Option<&BTreeSet<String>> {
        self.interfaces
            .get(&(namespace.to_string(), interface.to_string()))
    }

    /// A mapping record was created (or changed): the updates of its interface.
    pub fn put(&mut self, key: &Key) -> Vec<Update> {
        let Some((namespace, interface, application)) = split(key) else {
            return Vec::new();
        };
        let applications = self
            .interfaces
            .entry((namespace.to_string(), interface.to_string()))
            .or_default();
        if !applications.insert(application.to_string()) {
            return Vec::new();
        }
        self.updates_of(namespace, interface)
    }

    /// A mapping record was deleted: the updates of its interface.
    pub fn delete(&mut self, key: &Key) -> Vec<Update> {
        let Some((namespace, interface, application)) = split(key) else {
            return Vec::new();
        };
        let entry_key = (namespace.to_string(), interface.to_string());
        let Some(applications) = self.interfaces.get_mut(&entry_key) else {
            return Vec::new();
        };
        if !applications.remove(application) {
            return Vec::new();
        }
        if applications.is_empty() {
            self.interfaces.remove(&entry_key);
        }
        self.updates_of(namespace, interface)
    }

    /// The store's full state: rebuilds the index and replaces every mapping resource,
    /// emptying the namespaces in `known_namespaces` that no longer hold any.
    pub fn reset<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a Record>,
        known_namespaces: impl IntoIterator<Item = String>,
    ) -> Vec<Update> {
        self.interfaces.clear();
        for record in records {
            if let Some((namespace, interface, application)) = split(&record.key) {
                self.interfaces
                    .entry((namespace.to_string(), interface.to_string()))
                    .or_default()
                    .insert(application.to_string());
            }
        }
        let mut ours: BTreeMap<String, Vec<(ResourceName, Any)>> = known_namespaces
            .into_iter()
            .map(|namespace| (namespace, Vec::new()))
            .collect();
        let mut upstream_local = ours.clone();
        let mut upstream = Vec::new();
        for ((namespace, interface), applications) in &self.interfaces {
            ours.entry(namespace.clone()).or_default().push((
                ResourceName::new(interface),
                resource(namespace, interface, applications),
            ));
            upstream_local.entry(namespace.clone()).or_default().push((
                ResourceName::new(interface),
                upstream_resource(namespace, interface, applications),
            ));
            upstream.push((
                ResourceName::new(upstream_name(interface, namespace)),
                upstream_resource(namespace, interface, applications),
            ));
        }
        let mut updates: Vec<Update> = ours
            .into_iter()
            .map(|(namespace, resources)| Update::ReplaceType {
                partition: Partition::new(namespace),
                type_url: TypeUrl::new(pb::SERVICE_MAPPING_TYPE_URL),
                resources,
            })
            .collect();
        updates.extend(upstream_local.into_iter().map(|(namespace, resources)| {
            Update::ReplaceType {
                partition: Partition::new(namespace),
                type_url: TypeUrl::new(pb::UPSTREAM_MAPPING_TYPE_URL),
                resources,
            }
        }));
        updates.push(Update::ReplaceType {
            partition: Partition::new(GLOBAL_PARTITION),
            type_url: TypeUrl::new(pb::UPSTREAM_MAPPING_TYPE_URL),
            resources: upstream,
        });
        updates
    }

    fn updates_of(&self, namespace: &str, interface: &str) -> Vec<Update> {
        let ours = (
            Partition::new(namespace),
            TypeUrl::new(pb::SERVICE_MAPPING_TYPE_URL),
            ResourceName::new(interface),
        );
        let upstream = [
            (
                Partition::new(GLOBAL_PARTITION),
                ResourceName::new(upstream_name(interface, namespace)),
            ),
            (Partition::new(namespace), ResourceName::new(interface)),
        ];
        let upstream_url = TypeUrl::new(pb::UPSTREAM_MAPPING_TYPE_URL);
        match self.applications(namespace, interface) {
            Some(applications) => {
                let mut updates = vec![Update::Put {
                    partition: ours.0,
                    type_url: ours.1,
                    name: ours.2,
                    body: resource(namespace, interface, applications),
                }];
                let body = upstream_resource(namespace, interface, applications);
                updates.extend(upstream.into_iter().map(|(partition, name)| Update::Put {
                    partition,
                    type_url: upstream_url.clone(),
                    name,
                    body: body.clone(),
                }));
                updates
            }
            None => {
                let mut updates = vec![Update::Delete {
                    partition: ours.0,
                    type_url: ours.1,
                    name: ours.2,
                }];
                updates.extend(
                    upstream
                        .into_iter()
                        .map(|(partition, name)| Update::Delete {
                            partition,
                            type_url: upstream_url.clone(),
                            name,
                        }),
                );
                updates
            }
        }
    }
}

fn split(key: &Key) -> Option<(&str, &str, &str)> {
    if key.kind != Kind::Mapping {
        return None;
    }
    let (interface, application) = key.interface_application()?;
    Some((key.namespace.as_str(), interface, application))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn names(updates: &[Update]) -> Vec<String> {
        updates
            .iter()
            .map(|u| match u {
                Update::Put { name, body, .. } => {
                    let apps = match body.type_url.as_str() {
                        pb::SERVICE_MAPPING_TYPE_URL => {
                            proto::ServiceMapping::decode(body.value.as_slice())
                                .unwrap()
                                .application_names
                        }
                        _ => {
                            dubbo_networking::ServiceMappingXdsResponse::decode(
                                body.value.as_slice(),
                            )
                            .unwrap()
                            .application_names
                        }
                    };
                    format!("put {name} {}", apps.join(","))
                }
                Update::Delete { name, .. } => format!("delete {name}"),
                Update::ReplaceType {
                    partition,
                    resources,
                    ..
                } => format!(
                    "replace [{partition}] {}",
                    resources
                        .iter()
                        .map(|(n, _)| n.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            })
            .collect()
    }

    #[test]
    fn aggregates_applications_per_interface() {
        let mut index = MappingIndex::default();
        let a = Key::mapping("ns", "org.Api", "app-a");
        let b = Key::mapping("ns", "org.Api", "app-b");
        assert_eq!(
            names(&index.put(&b)),
            [
                "put org.Api app-b",
                "put org.Api|ns app-b",
                "put org.Api app-b"
            ]
        );
        assert_eq!(
            names(&index.put(&a)),
            [
                "put org.Api app-a,app-b",
                "put org.Api|ns app-a,app-b",
                "put org.Api app-a,app-b"
            ]
        );
        // A refresh or a repeated put changes nothing.
        assert!(index.put(&a).is_empty());
        assert_eq!(
            names(&index.delete(&b)),
            [
                "put org.Api app-a",
                "put org.Api|ns app-a",
                "put org.Api app-a"
            ]
        );
        assert_eq!(
            names(&index.delete(&a)),
            ["delete org.Api", "delete org.Api|ns", "delete org.Api"]
        );
        assert!(index.delete(&a).is_empty());
        assert_eq!(index, MappingIndex::default());
        // Other kinds are ignored.
        assert!(index.put(&Key::metadata("ns", "app", "r")).is_empty());
    }

    #[test]
    fn reset_replaces_everything_and_empties_known_namespaces() {
        let mut index = MappingIndex::default();
        index.put(&Key::mapping("old", "org.Gone", "app"));
        let record = |key: Key| Record {
            key,
            value: Arc::from(""),
            revision: 1,
            refreshed_at_ms: 0,
        };
        let records = [
            record(Key::mapping("ns", "org.Api", "b")),
            record(Key::mapping("ns", "org.Api", "a")),
            record(Key::metadata("ns", "app", "r")),
        ];
        let updates = index.reset(&records, ["old".to_string()]);
        assert_eq!(
            names(&updates),
            [
                "replace [ns] org.Api",
                "replace [old] ",
                "replace [ns] org.Api",
                "replace [old] ",
                "replace [] org.Api|ns"
            ]
        );
        assert_eq!(
            index
                .applications("ns", "org.Api")
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(index.applications("old", "org.Gone").is_none());
    }
}
