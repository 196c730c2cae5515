//! Name and value rules (`src/model.rs`) on arbitrary strings: no panic, and every name the
//! rules accept round-trips through a record key without colliding with another.
#![no_main]

use libfuzzer_sys::fuzz_target;

// model.rs is pure (std and xxhash only); including it keeps this crate from building the
// whole service.
#[allow(dead_code, missing_docs, unreachable_pub)]
#[path = "../../src/model.rs"]
mod model;

#[derive(Debug, arbitrary::Arbitrary)]
struct Input {
    namespace: String,
    application: String,
    revision: String,
    value: String,
    limit: u16,
}

fuzz_target!(|input: Input| {
    let namespace_ok = model::check_namespace(&input.namespace).is_ok();
    let application_ok = model::check_application(&input.application).is_ok();
    let revision_ok = model::check_name("revision", &input.revision).is_ok();
    let value_ok = model::check_value("value", &input.value, usize::from(input.limit)).is_ok();
    assert_eq!(value_ok, input.value.len() <= usize::from(input.limit));
    for (ok, name) in [
        (namespace_ok, &input.namespace),
        (application_ok, &input.application),
        (revision_ok, &input.revision),
    ] {
        if ok {
            assert!(!name.is_empty() && name.len() <= model::MAX_NAME_BYTES);
            assert!(!name.chars().any(char::is_control));
        }
    }
    if namespace_ok {
        assert!(!input.namespace.contains('/'));
    }
    if namespace_ok && application_ok && revision_ok {
        let key = model::Key::metadata(&input.namespace, &input.application, &input.revision);
        assert_eq!(
            key.application_revision(),
            Some((input.application.as_str(), input.revision.as_str()))
        );
        // Two different valid (application, revision) pairs never share a key.
        if model::check_application(&input.revision).is_ok() {
            let swapped =
                model::Key::metadata(&input.namespace, &input.revision, &input.application);
            if swapped == key {
                assert_eq!(input.application, input.revision);
            }
        }
    }
    let _ = model::content_hash(&input.value);
});
