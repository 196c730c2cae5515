//! Kubernetes-safe names and label values for records. Pure.
//!
//! Application names, revisions and identifiers are not DNS-1123 names: they hold upper-case
//! letters, `:`, `/`, `@`, non-ASCII text, and revisions are up to 128 characters. An object's
//! name is therefore an *encoding* of the record's name, and the original lives in the spec,
//! which is what the API returns.
//!
//! [`object_name`]: the record name lower-cased, every run of characters other than `a-z0-9`
//! replaced by one `-`, trimmed of `-` at both ends and cut to fit, then `-` and 16 hex
//! digits of a 64-bit hash (xxh3) of the original name. For example
//! `org.apache.dubbo.Greeter:1.0.0::provider:greeter` becomes
//! `org-apache-dubbo-greeter-1-0-0-provider-greeter-<hash>`. The result is a DNS-1123 label
//! sequence of at most [`MAX_OBJECT_NAME`] characters; two names that differ only in case or
//! punctuation differ in the hash. The store also refuses to overwrite an object whose spec
//! names another record, so even a hash collision never merges two records.
//!
//! [`label_value`]: the application as a label value (at most 63 characters of
//! `[A-Za-z0-9._-]`, alphanumeric at both ends). A value that already is one is kept as is, so
//! `kubectl get md -l metadata.networking.dubbo.io/application=greeter` works; others are
//! cleaned up and cut like object names, with a shorter hash.

/// Longest object name Kubernetes accepts (a DNS-1123 subdomain).
pub const MAX_OBJECT_NAME: usize = 253;

/// Longest label value Kubernetes accepts.
pub const MAX_LABEL_VALUE: usize = 63;

/// Hex digits of the hash in an object name.
const NAME_HASH_DIGITS: usize = 16;

/// Hex digits of the hash in an encoded label value.
const LABEL_HASH_DIGITS: usize = 10;

fn hash_hex(original: &str, digits: usize) -> String {
    let hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(original.as_bytes()));
    hash[..digits].to_string()
}

/// `original` reduced to `[a-z0-9]` runs joined by single `-`, at most `max` characters.
fn readable(original: &str, max: usize) -> String {
    let mut out = String::with_capacity(original.len().min(max));
    let mut dash = false;
    for c in original.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c);
        } else {
            dash = true;
        }
        if out.len() >= max {
            break;
        }
    }
    out.truncate(max);
    while out.ends_with('-') {
        out.pop();
    }
    out
}

fn with_hash(readable: String, hash: String) -> String {
    if readable.is_empty() {
        hash
    } else {
        format!("{readable}-{hash}")
    }
}

/// The object name of the record named `original` (see the module docs).
pub fn object_name(original: &str) -> String {
    let hash = hash_hex(original, NAME_HASH_DIGITS);
    with_hash(
        readable(original, MAX_OBJECT_NAME - NAME_HASH_DIGITS - 1),
        hash,
    )
}

/// Whether `value` is a valid label value as it is.
pub fn is_label_value(value: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    value.is_empty()
        || (value.len() <= MAX_LABEL_VALUE
            && value.starts_with(alnum)
            && value.ends_with(alnum)
            && value
                .chars()
                .all(|c| alnum(c) || matches!(c, '-' | '_' | '.')))
}

/// `original` as a label value: itself when valid, else an encoding with a hash.
pub fn label_value(original: &str) -> String {
    if is_label_value(original) {
        return original.to_string();
    }
    let hash = hash_hex(original, LABEL_HASH_DIGITS);
    with_hash(
        readable(original, MAX_LABEL_VALUE - LABEL_HASH_DIGITS - 1),
        hash,
    )
}

/// Whether `name` is a DNS-1123 subdomain (what Kubernetes requires of object names).
pub fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_OBJECT_NAME
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// Whether `name` is a DNS-1123 label (what Kubernetes requires of namespace names).
pub fn is_dns1123_label(name: &str) -> bool {
    name.len() <= 63 && !name.contains('.') && is_dns1123_subdomain(name)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn examples() {
        let name = object_name("org.apache.dubbo.Greeter:1.0.0::provider:greeter");
        assert!(
            name.starts_with("org-apache-dubbo-greeter-1-0-0-provider-greeter-"),
            "{name}"
        );
        assert_eq!(
            name.len(),
            "org-apache-dubbo-greeter-1-0-0-provider-greeter-".len() + 16
        );
        assert!(object_name("greeter/a1b2").starts_with("greeter-a1b2-"));
        // Case and punctuation differ, so the hash does.
        assert_ne!(object_name("App/1"), object_name("app/1"));
        assert_ne!(object_name("a.b"), object_name("a:b"));
        // Nothing readable: the hash alone.
        assert_eq!(object_name("应用/版本").len(), 16);
        assert!(is_dns1123_subdomain(&object_name("应用/版本")));
        let long = object_name(&format!("{}/{}", "A".repeat(253), "f".repeat(128)));
        assert_eq!(long.len(), MAX_OBJECT_NAME);

        assert_eq!(label_value("greeter"), "greeter");
        assert_eq!(label_value("Greeter_v2.1"), "Greeter_v2.1");
        let encoded = label_value("my app");
        assert!(
            encoded.starts_with("my-app-") && is_label_value(&encoded),
            "{encoded}"
        );
        assert_eq!(label_value(&"a".repeat(64)).len(), MAX_LABEL_VALUE);
        assert!(!is_label_value("-a") && !is_label_value("a/b") && is_label_value(""));

        assert!(
            is_dns1123_label("team-a") && !is_dns1123_label("Team") && !is_dns1123_label("a.b")
        );
        assert!(!is_dns1123_subdomain("a..b") && !is_dns1123_subdomain("-a"));
    }

    proptest! {
        /// Every name encodes to a valid object name, deterministically.
        #[test]
        fn object_names_are_valid(original in "\\PC{0,600}") {
            let name = object_name(&original);
            prop_assert!(is_dns1123_subdomain(&name), "{:?} -> {:?}", original, name);
            prop_assert_eq!(name, object_name(&original));
        }

        /// Names made of the characters real names use, including the ones that encode alike.
        #[test]
        fn distinct_names_get_distinct_object_names(
            a in "[a-zA-Z0-9./:_@-]{1,300}",
            b in "[a-zA-Z0-9./:_@-]{1,300}",
        ) {
            prop_assume!(a != b);
            prop_assert_ne!(object_name(&a), object_name(&b));
        }

        /// Names that differ only where the readable part cannot show it still differ.
        #[test]
        fn case_and_punctuation_variants_differ(base in "[a-z0-9]{1,40}", sep in "[./:_@ -]{1,3}") {
            let a = format!("{base}{sep}x");
            let b = format!("{}-x", base.to_uppercase());
            prop_assume!(a != b);
            prop_assert_ne!(object_name(&a), object_name(&b));
        }

        #[test]
        fn label_values_are_valid(original in "\\PC{0,200}") {
            let value = label_value(&original);
            prop_assert!(is_label_value(&value), "{:?} -> {:?}", original, value);
            if is_label_value(&original) {
                prop_assert_eq!(value, original);
            }
        }
    }
}
