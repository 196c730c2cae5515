#![allow(dead_code)]
//! What the SotW and Delta targets share: a tiny cache of two partitions, three types and
//! four names, driven by arbitrary writes.

use arbitrary::Arbitrary;
use envoy_types::pb::google::protobuf::Any;
use pixiu_xds::{
    CacheWriter, Limits, Partition, ResourceName, TypeUrl, Update, View, response::Encode,
};
use prost::Message;

pub const TYPES: [&str; 3] = [
    "type.googleapis.com/test.One",
    "type.googleapis.com/test.Two",
    "type.googleapis.com/test.Three",
];
pub const NAMES: [&str; 5] = ["a", "b", "c", "d", "*"];
pub const PARTITIONS: [&str; 2] = ["mine", "theirs"];

/// Small limits, so the fuzzer reaches them.
pub fn limits() -> Limits {
    Limits {
        max_subscribed_names: 6,
        max_types: 2,
    }
}

/// The stream reads only `mine`.
pub fn view() -> View {
    View::new([Partition::new(PARTITIONS[0])])
}

pub fn type_url(index: u8) -> &'static str {
    TYPES[usize::from(index) % TYPES.len()]
}

pub fn name(index: u8) -> &'static str {
    NAMES[usize::from(index) % NAMES.len()]
}

/// A cache write.
#[derive(Debug, Arbitrary)]
pub struct Write {
    pub partition: bool,
    pub type_idx: u8,
    pub name_idx: u8,
    /// `None` deletes.
    pub value: Option<u8>,
}

impl Write {
    pub fn apply(&self, writer: &CacheWriter) {
        let partition = Partition::new(PARTITIONS[usize::from(self.partition)]);
        let type_url = type_url(self.type_idx);
        // "*" is not a resource name; writes use a, b, c, d.
        let name = ResourceName::new(NAMES[usize::from(self.name_idx) % 4]);
        let update = match self.value {
            Some(value) => Update::Put {
                partition,
                type_url: TypeUrl::new(type_url),
                name,
                body: Any {
                    type_url: type_url.to_string(),
                    // The high bit marks the other partition's content, so a leak shows.
                    value: vec![if self.partition {
                        value | 0x80
                    } else {
                        value & 0x7f
                    }],
                },
            },
            None => Update::Delete {
                partition,
                type_url: TypeUrl::new(type_url),
                name,
            },
        };
        writer.apply([update]);
    }
}

/// Which nonce a request carries.
#[derive(Debug, Arbitrary)]
pub enum NonceChoice {
    Empty,
    /// The last one received for the type.
    Last,
    /// An earlier one, by index.
    Earlier(u8),
    /// Bytes never sent.
    Other(Vec<u8>),
}

impl NonceChoice {
    pub fn pick(&self, last: Option<&String>, sent: &[String]) -> String {
        match self {
            NonceChoice::Empty => String::new(),
            NonceChoice::Last => last.cloned().unwrap_or_default(),
            NonceChoice::Earlier(i) if !sent.is_empty() => {
                sent[usize::from(*i) % sent.len()].clone()
            }
            NonceChoice::Earlier(_) => String::new(),
            NonceChoice::Other(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        }
    }
}

/// The bodies of type `type_url` the stream's view holds in `snapshot`.
pub fn visible_bodies(snapshot: &pixiu_xds::Snapshot, type_url: &str) -> Vec<Vec<u8>> {
    let type_url = pixiu_xds::TypeUrl::new(type_url);
    NAMES[..4]
        .iter()
        .filter_map(|n| snapshot.get(&view(), &type_url, n))
        .map(|r| r.value().to_vec())
        .collect()
}

/// What a client decodes from a response's bytes.
pub fn decoded<M: Message + Default>(response: &impl Encode) -> M {
    M::decode(&response.encode_to_vec()[..]).expect("a response decodes")
}

/// Whether a body came from the other partition.
pub fn is_theirs(body: &[u8]) -> bool {
    body.first().is_some_and(|b| b & 0x80 != 0)
}
