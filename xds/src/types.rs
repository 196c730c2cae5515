//! Newtypes for the strings the xDS protocol passes around.
//!
//! Each is a cheap-to-clone `Arc<str>`: a type URL or resource name is copied into every
//! stream's state, so cloning must not allocate.

use std::{borrow::Borrow, fmt, sync::Arc};

use smallvec::SmallVec;

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Eq)]
        pub struct $name(Arc<str>);

        // Compared by content, with a shortcut for two clones of one string: the names in a
        // stream's state are clones of the snapshot's, so most comparisons end there.
        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
            }
        }

        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                if Arc::ptr_eq(&self.0, &other.0) {
                    std::cmp::Ordering::Equal
                } else {
                    self.0.cmp(&other.0)
                }
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.0.hash(state);
            }
        }

        impl $name {
            /// Wraps a string.
            pub fn new(value: impl AsRef<str>) -> Self {
                Self(Arc::from(value.as_ref()))
            }

            /// The string itself.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Whether the string is empty.
            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self::new(value)
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                Self(Arc::from(value))
            }
        }

        impl From<&String> for $name {
            fn from(value: &String) -> Self {
                Self::new(value)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// A resource type URL, e.g. `type.googleapis.com/envoy.config.cluster.v3.Cluster`.
    ///
    /// The library treats it as an opaque key: it knows no particular type.
    TypeUrl
);
string_newtype!(
    /// The name of one resource within a type.
    ResourceName
);
string_newtype!(
    /// A version label: of one resource (derived from its bytes), or of a whole
    /// State-of-the-World response (derived from the names and versions it carries).
    Version
);
string_newtype!(
    /// A response nonce, unique within one stream.
    Nonce
);
string_newtype!(
    /// The `node.id` a client announced in its first request.
    NodeId
);
string_newtype!(
    /// A partition of the cache. A stream reads the partitions of its [`View`](crate::View);
    /// what a partition means (a tenant, a namespace, a shared set) is up to the caller.
    Partition
);

/// The wildcard resource name of the xDS protocol.
pub const WILDCARD: &str = "*";

impl Version {
    /// The version of some bytes: a 128-bit xxh3 hash in hex.
    ///
    /// Derived from content, so it survives restarts and agrees across replicas that hold the
    /// same bytes (re-encoding a message is not deterministic when it has maps, so callers
    /// hash the bytes they store, never a re-encoding).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self::of_hash(xxhash_rust::xxh3::xxh3_128(bytes))
    }

    /// The version of a set of `(name, version)` pairs, in the order given.
    ///
    /// Used for State-of-the-World `version_info`: the same resources give the same label on
    /// every replica.
    pub fn of_set<'a>(items: impl IntoIterator<Item = (&'a ResourceName, &'a Version)>) -> Self {
        // The hash of the names and versions, each followed by a zero byte. A set that fits
        // the stack buffer (every stream subscribed to a few resources) is hashed in one call:
        // a streaming hasher copies its secret and clears its buffer first, per stream and
        // push. A larger one streams, from what the buffer holds on. Both give the same hash.
        const INLINE: usize = 512;
        let mut buffer = SmallVec::<[u8; INLINE]>::new();
        let mut hasher: Option<xxhash_rust::xxh3::Xxh3> = None;
        for (name, version) in items {
            for part in [name.as_str().as_bytes(), version.as_str().as_bytes()] {
                match &mut hasher {
                    Some(hasher) => {
                        hasher.update(part);
                        hasher.update(&[0]);
                    }
                    None if buffer.len() + part.len() < INLINE => {
                        buffer.extend_from_slice(part);
                        buffer.push(0);
                    }
                    None => {
                        let mut streaming = xxhash_rust::xxh3::Xxh3::new();
                        streaming.update(&buffer);
                        streaming.update(part);
                        streaming.update(&[0]);
                        hasher = Some(streaming);
                    }
                }
            }
        }
        let hash = match hasher {
            Some(hasher) => hasher.digest128(),
            None => xxhash_rust::xxh3::xxh3_128(&buffer),
        };
        Self::of_hash(hash)
    }

    /// A hash as 32 lowercase hex digits, most significant first (as `{:032x}` writes it).
    fn of_hash(hash: u128) -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 32];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(hash.to_be_bytes()) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0xf)];
        }
        Self(Arc::from(
            std::str::from_utf8(&hex).expect("hex digits are ASCII"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_of_bytes_is_stable_and_content_derived() {
        assert_eq!(Version::of_bytes(b"abc"), Version::of_bytes(b"abc"));
        assert_ne!(Version::of_bytes(b"abc"), Version::of_bytes(b"abd"));
        assert_eq!(Version::of_bytes(b"abc").as_str().len(), 32);
    }

    /// Versions derive from content and must not change between releases: replicas agree on
    /// them, and a client that reconnects names the version it holds.
    #[test]
    fn versions_are_the_ones_earlier_releases_computed() {
        assert_eq!(
            Version::of_bytes(b"abc").as_str(),
            "06b05ab6733a618578af5f94892f3950"
        );
        assert_eq!(
            Version::of_set(std::iter::empty()).as_str(),
            "99aa06d3014798d86001c324468d497f"
        );
        let a = (ResourceName::new("greeter/5f3a9c"), Version::new("00ff"));
        let b = (ResourceName::new("b"), Version::new("v2"));
        assert_eq!(
            Version::of_set([(&a.0, &a.1), (&b.0, &b.1)]).as_str(),
            "153c2c5bcb62b45994e49288de83671d"
        );
        let long: Vec<(ResourceName, Version)> = (0..40)
            .map(|i| {
                let name = ResourceName::new(format!("app-{i}/{}", "r".repeat(i)));
                (name, Version::of_bytes(&[i as u8]))
            })
            .collect();
        assert_eq!(
            Version::of_set(long.iter().map(|(n, v)| (n, v))).as_str(),
            "39461be2f13a31bdebf4c9932673ace6"
        );
    }

    proptest::proptest! {
        /// A set's version is its hash as `{:032x}` writes it, whatever the set's size.
        #[test]
        fn a_sets_version_is_its_hash_in_hex(
            items in proptest::collection::vec(("[a-z/]{0,300}", "[0-9a-f]{0,40}"), 0..6),
        ) {
            let items: Vec<(ResourceName, Version)> = items
                .into_iter()
                .map(|(n, v)| (ResourceName::new(n), Version::new(v)))
                .collect();
            let mut hasher = xxhash_rust::xxh3::Xxh3::new();
            for (name, version) in &items {
                hasher.update(name.as_str().as_bytes());
                hasher.update(&[0]);
                hasher.update(version.as_str().as_bytes());
                hasher.update(&[0]);
            }
            let expected = format!("{:032x}", hasher.digest128());
            let version = Version::of_set(items.iter().map(|(n, v)| (n, v)));
            proptest::prop_assert_eq!(version.as_str(), expected.as_str());
        }
    }

    #[test]
    fn version_of_set_separates_fields() {
        let a = (ResourceName::new("ab"), Version::new("c"));
        let b = (ResourceName::new("a"), Version::new("bc"));
        assert_ne!(
            Version::of_set([(&a.0, &a.1)]),
            Version::of_set([(&b.0, &b.1)])
        );
    }
}
