//! Responses as the state machines build them, and their wire encoding.
//!
//! A response to one stream holds the cache's resources themselves (`Arc<Resource>`), and
//! each resource holds its `Any` already encoded ([`Resource::packed`]): pushing one change
//! to 10,000 streams encodes the resource once and copies its bytes into 10,000 frames,
//! where a `DiscoveryResponse` would clone the `Any` (two allocations) per stream and free
//! it after encoding. The encoding here is the one `prost` gives the generated messages
//! (fields in tag order, proto3 defaults left out), so a client decodes it as a
//! `DiscoveryResponse` / `DeltaDiscoveryResponse`; the tests check that byte for byte.

use std::sync::Arc;

use bytes::BufMut;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, Resource as WireResource,
};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::{
    cache::Resource,
    types::{Nonce, ResourceName, TypeUrl, Version},
};

/// A message the server writes to a stream: its length, then its bytes.
pub trait Encode {
    /// The length of [`encode`](Self::encode)'s output.
    fn encoded_len(&self) -> usize;
    /// Appends the message's protobuf encoding to `buf`, which has room for it.
    fn encode(&self, buf: &mut impl BufMut);

    /// The message's protobuf encoding, what a client receives.
    fn encode_to_vec(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        buf
    }
}

/// A State-of-the-World response: what a `DiscoveryResponse` carries, sharing the cache's
/// resources. (A resource's `Debug` shows its size, not its bytes.)
#[derive(Debug, Clone, PartialEq)]
pub struct SotwResponse {
    /// `version_info`: the version of the set of resources carried.
    pub version: Version,
    /// `resources`, each the cache's own.
    pub resources: Vec<Arc<Resource>>,
    /// `type_url`.
    pub type_url: TypeUrl,
    /// `nonce`.
    pub nonce: Nonce,
}

/// An Incremental response: what a `DeltaDiscoveryResponse` carries, sharing the cache's
/// resources.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaResponse {
    /// `system_version_info`: the version of everything the client holds after it.
    pub system_version: Version,
    /// `resources`: the ones added or changed, each the cache's own.
    pub resources: Vec<Arc<Resource>>,
    /// `type_url`.
    pub type_url: TypeUrl,
    /// `removed_resources`.
    pub removed: Vec<ResourceName>,
    /// `nonce`.
    pub nonce: Nonce,
}

impl SotwResponse {
    /// The same response as the generated message (copies every resource).
    pub fn to_message(&self) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: self.version.to_string(),
            resources: self.resources.iter().map(|r| r.body()).collect(),
            type_url: self.type_url.to_string(),
            nonce: self.nonce.to_string(),
            ..Default::default()
        }
    }
}

impl DeltaResponse {
    /// The same response as the generated message (copies every resource).
    pub fn to_message(&self) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: self.system_version.to_string(),
            resources: self
                .resources
                .iter()
                .map(|r| WireResource {
                    name: r.name.to_string(),
                    version: r.version.to_string(),
                    resource: Some(r.body()),
                    ..Default::default()
                })
                .collect(),
            type_url: self.type_url.to_string(),
            removed_resources: self.removed.iter().map(|n| n.to_string()).collect(),
            nonce: self.nonce.to_string(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
impl SotwResponse {
    /// What a client decodes from this response's bytes.
    pub(crate) fn decoded(&self) -> DiscoveryResponse {
        prost::Message::decode(&self.encode_to_vec()[..]).expect("a response decodes")
    }
}

#[cfg(test)]
impl DeltaResponse {
    /// What a client decodes from this response's bytes.
    pub(crate) fn decoded(&self) -> DeltaDiscoveryResponse {
        prost::Message::decode(&self.encode_to_vec()[..]).expect("a response decodes")
    }
}

// Field numbers, from envoy/service/discovery/v3/discovery.proto.
mod tag {
    pub(super) const SOTW_VERSION_INFO: u32 = 1;
    pub(super) const SOTW_RESOURCES: u32 = 2;
    pub(super) const SOTW_TYPE_URL: u32 = 4;
    pub(super) const SOTW_NONCE: u32 = 5;

    pub(super) const DELTA_SYSTEM_VERSION_INFO: u32 = 1;
    pub(super) const DELTA_RESOURCES: u32 = 2;
    pub(super) const DELTA_TYPE_URL: u32 = 4;
    pub(super) const DELTA_NONCE: u32 = 5;
    pub(super) const DELTA_REMOVED_RESOURCES: u32 = 6;

    pub(super) const RESOURCE_VERSION: u32 = 1;
    pub(super) const RESOURCE_RESOURCE: u32 = 2;
    pub(super) const RESOURCE_NAME: u32 = 3;
}

/// A length-delimited field's size: key, length, bytes.
fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// A string field's size; proto3 leaves out an empty one.
fn string_len(tag: u32, value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        field_len(tag, value.len())
    }
}

fn put_field(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.put_slice(bytes);
}

fn put_string(tag: u32, value: &str, buf: &mut impl BufMut) {
    if !value.is_empty() {
        put_field(tag, value.as_bytes(), buf);
    }
}

impl Encode for SotwResponse {
    fn encoded_len(&self) -> usize {
        string_len(tag::SOTW_VERSION_INFO, self.version.as_str())
            + self
                .resources
                .iter()
                .map(|r| field_len(tag::SOTW_RESOURCES, r.packed().len()))
                .sum::<usize>()
            + string_len(tag::SOTW_TYPE_URL, self.type_url.as_str())
            + string_len(tag::SOTW_NONCE, self.nonce.as_str())
    }

    fn encode(&self, buf: &mut impl BufMut) {
        put_string(tag::SOTW_VERSION_INFO, self.version.as_str(), buf);
        for resource in &self.resources {
            put_field(tag::SOTW_RESOURCES, resource.packed(), buf);
        }
        put_string(tag::SOTW_TYPE_URL, self.type_url.as_str(), buf);
        put_string(tag::SOTW_NONCE, self.nonce.as_str(), buf);
    }
}

/// A delta `Resource` message's size: version, the `Any`, name.
fn delta_resource_len(resource: &Resource) -> usize {
    string_len(tag::RESOURCE_VERSION, resource.version.as_str())
        + field_len(tag::RESOURCE_RESOURCE, resource.packed().len())
        + string_len(tag::RESOURCE_NAME, resource.name.as_str())
}

impl Encode for DeltaResponse {
    fn encoded_len(&self) -> usize {
        string_len(tag::DELTA_SYSTEM_VERSION_INFO, self.system_version.as_str())
            + self
                .resources
                .iter()
                .map(|r| field_len(tag::DELTA_RESOURCES, delta_resource_len(r)))
                .sum::<usize>()
            + string_len(tag::DELTA_TYPE_URL, self.type_url.as_str())
            + string_len(tag::DELTA_NONCE, self.nonce.as_str())
            + self
                .removed
                .iter()
                .map(|name| field_len(tag::DELTA_REMOVED_RESOURCES, name.as_str().len()))
                .sum::<usize>()
    }

    fn encode(&self, buf: &mut impl BufMut) {
        put_string(
            tag::DELTA_SYSTEM_VERSION_INFO,
            self.system_version.as_str(),
            buf,
        );
        for resource in &self.resources {
            encode_key(tag::DELTA_RESOURCES, WireType::LengthDelimited, buf);
            encode_varint(delta_resource_len(resource) as u64, buf);
            put_string(tag::RESOURCE_VERSION, resource.version.as_str(), buf);
            put_field(tag::RESOURCE_RESOURCE, resource.packed(), buf);
            put_string(tag::RESOURCE_NAME, resource.name.as_str(), buf);
        }
        put_string(tag::DELTA_TYPE_URL, self.type_url.as_str(), buf);
        put_string(tag::DELTA_NONCE, self.nonce.as_str(), buf);
        // Repeated strings are written even when empty: an empty name is still an entry.
        for name in &self.removed {
            put_field(tag::DELTA_REMOVED_RESOURCES, name.as_str().as_bytes(), buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::Any;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    fn resource(name: &str, type_url: &str, value: &[u8]) -> Arc<Resource> {
        Arc::new(Resource::new(
            ResourceName::new(name),
            Any {
                type_url: type_url.to_owned(),
                value: value.to_vec(),
            },
        ))
    }

    fn encoded(message: &impl Encode) -> Vec<u8> {
        let buf = message.encode_to_vec();
        assert_eq!(buf.len(), message.encoded_len(), "encoded_len is exact");
        buf
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z/]{1,12}", ".{0,200}"]
    }

    fn resources_strategy() -> impl Strategy<Value = Vec<Arc<Resource>>> {
        prop::collection::vec(
            (
                name_strategy(),
                prop_oneof![Just(String::new()), "type\\.test/[A-Z]{1,4}"],
                prop::collection::vec(any::<u8>(), 0..300),
            ),
            0..5,
        )
        .prop_map(|resources| {
            resources
                .iter()
                .map(|(name, type_url, value)| resource(name, type_url, value))
                .collect()
        })
    }

    proptest! {
        /// Our bytes are prost's bytes for the same message, so clients see no difference.
        #[test]
        fn sotw_encodes_as_the_generated_message(
            version in name_strategy(),
            resources in resources_strategy(),
            type_url in name_strategy(),
            nonce in name_strategy(),
        ) {
            let response = SotwResponse {
                version: Version::new(version),
                resources,
                type_url: TypeUrl::new(type_url),
                nonce: Nonce::new(nonce),
            };
            let message = response.to_message();
            prop_assert_eq!(encoded(&response), message.encode_to_vec());
            prop_assert_eq!(DiscoveryResponse::decode(&encoded(&response)[..]).unwrap(), message);
        }

        #[test]
        fn delta_encodes_as_the_generated_message(
            version in name_strategy(),
            resources in resources_strategy(),
            type_url in name_strategy(),
            removed in prop::collection::vec(name_strategy(), 0..4),
            nonce in name_strategy(),
        ) {
            let response = DeltaResponse {
                system_version: Version::new(version),
                resources,
                type_url: TypeUrl::new(type_url),
                removed: removed.into_iter().map(ResourceName::from).collect(),
                nonce: Nonce::new(nonce),
            };
            let message = response.to_message();
            prop_assert_eq!(encoded(&response), message.encode_to_vec());
            prop_assert_eq!(
                DeltaDiscoveryResponse::decode(&encoded(&response)[..]).unwrap(),
                message
            );
        }
    }

    #[test]
    fn a_resource_keeps_its_body() {
        let r = resource("a", "type.test/A", b"hello");
        assert_eq!(r.value(), b"hello");
        assert_eq!(r.type_url(), "type.test/A");
        assert_eq!(
            r.body(),
            Any {
                type_url: "type.test/A".to_owned(),
                value: b"hello".to_vec()
            }
        );
        let empty = resource("b", "", b"");
        assert_eq!(empty.value(), b"");
        assert_eq!(empty.type_url(), "");
        assert!(empty.packed().is_empty());
    }
}
