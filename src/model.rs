//! The domain: namespaces, record keys and the rules a name or value must follow.
//!
//! Pure and IO-free, shared by `api/` (which validates what arrives from the network) and
//! `store/` (which stores only validated keys).

use std::fmt;

/// The request header that selects a namespace for the seed's RPCs and for xDS streams whose
/// node names none.
pub const NAMESPACE_HEADER: &str = "x-pixiu-namespace";

/// The xDS partition of resources every client sees, whatever its namespace.
pub const GLOBAL_PARTITION: &str = "";

/// Longest name accepted, in bytes (application, revision, identifier, namespace).
pub const MAX_NAME_BYTES: usize = 253;
/// Largest value accepted by default, in bytes (1 MiB).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// The namespace used when a request names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// What kind of record a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Application metadata, named `<application>/<revision>`.
    Metadata,
    /// A service definition, named by its identifier.
    Definition,
    /// One provider application of an interface (Dubbo's service-name mapping), named
    /// `<interface>/<application>`. Each application's registration has its own lease, so
    /// one application expires alone and no compare-and-set on a shared list is needed.
    Mapping,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 3] = [Kind::Metadata, Kind::Definition, Kind::Mapping];

    /// A short stable label: `metadata`, `definition` or `mapping` (used in keys, metrics,
    /// logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Metadata => "metadata",
            Kind::Definition => "definition",
            Kind::Mapping => "mapping",
        }
    }

    /// The kind with this label.
    pub fn from_label(label: &str) -> Option<Self> {
        Kind::ALL.into_iter().find(|k| k.as_str() == label)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key of one record: kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// What the record is.
    pub kind: Kind,
    /// Its namespace.
    pub namespace: String,
    /// `<application>/<revision>` for metadata, the identifier for a definition.
    pub name: String,
}

impl AsRef<Key> for Key {
    fn as_ref(&self) -> &Key {
        self
    }
}

impl Key {
    /// The key of application metadata.
    pub fn metadata(namespace: &str, application: &str, revision: &str) -> Self {
        Self {
            kind: Kind::Metadata,
            namespace: namespace.to_string(),
            name: format!("{application}/{revision}"),
        }
    }

    /// The key of a service definition.
    pub fn definition(namespace: &str, identifier: &str) -> Self {
        Self {
            kind: Kind::Definition,
            namespace: namespace.to_string(),
            name: identifier.to_string(),
        }
    }

    /// The key of one application's registration as a provider of `interface`.
    pub fn mapping(namespace: &str, interface: &str, application: &str) -> Self {
        Self {
            kind: Kind::Mapping,
            namespace: namespace.to_string(),
            name: mapping_name(interface, application),
        }
    }

    /// For metadata, `(application, revision)`; applications never contain `/`.
    pub fn application_revision(&self) -> Option<(&str, &str)> {
        match self.kind {
            Kind::Metadata => self.name.split_once('/'),
            Kind::Definition | Kind::Mapping => None,
        }
    }

    /// For a mapping, `(interface, application)`.
    pub fn interface_application(&self) -> Option<(&str, &str)> {
        match self.kind {
            Kind::Mapping => split_mapping_name(&self.name),
            Kind::Metadata | Kind::Definition => None,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.kind, self.namespace, self.name)
    }
}

/// Why a name or value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A required field is empty.
    #[error("{field} must not be empty")]
    Empty {
        /// The field.
        field: &'static str,
    },
    /// A name is longer than [`MAX_NAME_BYTES`].
    #[error("{field} is {len} bytes, longer than the limit of {limit}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A name holds a control character (NUL included).
    #[error("{field} contains a control character at byte {at}")]
    ControlCharacter {
        /// The field.
        field: &'static str,
        /// The byte offset of the first one.
        at: usize,
    },
    /// A name holds a bidirectional formatting character (U+202A–U+202E, U+2066–U+2069,
    /// U+200E, U+200F, U+061C): it reorders how the names after it are shown in a terminal,
    /// the admin page or a log, so one name could pass for another.
    #[error("{field} contains a bidirectional formatting character at byte {at}")]
    BidiControl {
        /// The field.
        field: &'static str,
        /// The byte offset of the first one.
        at: usize,
    },
    /// A name holds a character it may not hold.
    #[error("{field} must not contain {what}")]
    Forbidden {
        /// The field.
        field: &'static str,
        /// What it held.
        what: &'static str,
    },
    /// A value is larger than the configured limit.
    #[error("{field} is {len} bytes, larger than the limit of {limit}")]
    ValueTooLarge {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A list holds more entries than a request may.
    #[error("{field} holds {len} entries, more than the limit of {limit}")]
    TooMany {
        /// The field.
        field: &'static str,
        /// How many it holds.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

/// Checks a name field: non-empty, at most [`MAX_NAME_BYTES`], no control characters.
pub fn check_name(field: &'static str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::Empty { field });
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(Invalid::TooLong {
            field,
            len: value.len(),
            limit: MAX_NAME_BYTES,
        });
    }
    if let Some((at, _)) = value.char_indices().find(|(_, c)| c.is_control()) {
        return Err(Invalid::ControlCharacter { field, at });
    }
    if let Some((at, _)) = value.char_indices().find(|(_, c)| is_bidi_control(*c)) {
        return Err(Invalid::BidiControl { field, at });
    }
    Ok(())
}

/// The characters that change the order in which text is shown (Unicode's explicit
/// directional formatting characters and marks).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// Checks an application name: a name without `/` (it separates application and revision in
/// resource names).
pub fn check_application(value: &str) -> Result<(), Invalid> {
    check_name("application_name", value)?;
    if value.contains('/') {
        return Err(Invalid::Forbidden {
            field: "application_name",
            what: "'/'",
        });
    }
    Ok(())
}

/// The record name of a mapping: `<interface>/<application>`.
pub fn mapping_name(interface: &str, application: &str) -> String {
    format!("{interface}/{application}")
}

/// Splits a mapping record name into `(interface, application)`. Applications never contain
/// `/`, so the last `/` separates them (an interface may contain one).
pub fn split_mapping_name(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once('/')
}

/// Checks an interface name (of a service-name mapping): a name like any other.
pub fn check_interface(value: &str) -> Result<(), Invalid> {
    check_name("interface", value)
}

/// Checks a namespace: a name without `/` (it separates the namespace from the name in
/// store keys) or `|` (upstream's mapping resources are named `<interface>|<namespace>`, so
/// the last `|` must separate them: an interface may hold one, a namespace may not).
pub fn check_namespace(value: &str) -> Result<(), Invalid> {
    check_name("namespace", value)?;
    for (separator, what) in [('/', "'/'"), ('|', "'|'")] {
        if value.contains(separator) {
            return Err(Invalid::Forbidden {
                field: "namespace",
                what,
            });
        }
    }
    Ok(())
}

/// Checks a value's size against `limit` bytes.
pub fn check_value(field: &'static str, value: &str, limit: usize) -> Result<(), Invalid> {
    if value.len() > limit {
        return Err(Invalid::ValueTooLarge {
            field,
            len: value.len(),
            limit,
        });
    }
    Ok(())
}

/// A 128-bit hash of a value, in hex, for logs (never the value itself).
pub fn content_hash(value: &str) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(value.as_bytes()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn names() {
        assert!(check_name("f", "").is_err());
        assert!(check_name("f", "a\0b").is_err());
        assert!(check_name("f", "a\nb").is_err());
        assert!(check_name("f", &"a".repeat(253)).is_ok());
        assert!(check_name("f", &"a".repeat(254)).is_err());
        assert!(check_name("f", "应用-1.0").is_ok());
        // Right-to-left text is a name; the characters that reorder its display are not.
        assert!(check_name("f", "تطبيق").is_ok());
        assert_eq!(
            check_name("f", "greeter\u{202E}1v"),
            Err(Invalid::BidiControl { field: "f", at: 7 })
        );
        assert!(check_name("f", "a\u{2066}b").is_err());
        assert!(check_name("f", "a\u{200F}").is_err());
        assert!(check_application("a/b").is_err());
        assert!(check_namespace("ns-1").is_ok());
        assert!(check_namespace("team-b/prod").is_err());
        assert!(check_namespace("team-b|prod").is_err());
        // A SHA-512 revision (128 hex characters) fits.
        assert!(check_name("revision", &"f".repeat(128)).is_ok());
    }

    #[test]
    fn key_round_trip() {
        let key = Key::metadata("ns", "app", "rev/with/slash");
        assert_eq!(key.application_revision(), Some(("app", "rev/with/slash")));
        assert_eq!(Kind::from_label("definition"), Some(Kind::Definition));
        assert_eq!(Kind::from_label("mapping"), Some(Kind::Mapping));
        let key = Key::mapping("ns", "group/org.example.Api", "app");
        assert_eq!(key.name, "group/org.example.Api/app");
        assert_eq!(
            key.interface_application(),
            Some(("group/org.example.Api", "app"))
        );
        assert_eq!(key.application_revision(), None);
    }

    proptest! {
        #[test]
        fn valid_names_have_no_control_characters(s in "\\PC{0,300}") {
            if check_name("f", &s).is_ok() {
                prop_assert!(!s.is_empty() && s.len() <= MAX_NAME_BYTES);
                prop_assert!(!s.chars().any(char::is_control));
                prop_assert!(!s.chars().any(is_bidi_control));
            }
        }
    }
}
