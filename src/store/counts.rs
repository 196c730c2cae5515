//! How many records each namespace holds, by kind, kept as records come and go, so a put
//! that creates a record checks its namespace's limit in one lookup instead of walking the
//! namespace's keys under the store's lock. Pure.

use super::{ByNamespace, Key};
use crate::model::Kind;

/// Per namespace, the number of records of each kind. A namespace with none is not held.
#[derive(Debug, Default)]
pub(crate) struct NamespaceCounts {
    namespaces: ByNamespace<[usize; Kind::ALL.len()]>,
}

impl NamespaceCounts {
    /// How many records of `kind` `namespace` holds.
    pub(crate) fn get(&self, kind: Kind, namespace: &str) -> usize {
        self.namespaces
            .get(namespace)
            .map_or(0, |counts| counts[kind as usize])
    }

    /// `key` became a record.
    pub(crate) fn add(&mut self, key: &Key) {
        self.namespaces
            .entry_ref(key.namespace.as_str())
            .or_default()[key.kind as usize] += 1;
    }

    /// `key` stopped being a record. It must have been added: a count never goes below zero.
    pub(crate) fn remove(&mut self, key: &Key) {
        let Some(counts) = self.namespaces.get_mut(key.namespace.as_str()) else {
            debug_assert!(false, "{key:?} removed but never added");
            return;
        };
        let count = &mut counts[key.kind as usize];
        debug_assert!(*count > 0, "{key:?} removed more often than added");
        *count = count.saturating_sub(1);
        if counts.iter().all(|c| *c == 0) {
            self.namespaces.remove(key.namespace.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::store::tests::{key, walked_counts};

    proptest! {
        /// Under any inserts and removes of keys the counts are those of walking a set of
        /// the same keys, and a namespace left with no record is forgotten.
        #[test]
        fn counts_as_walking_the_keys(
            ops in proptest::collection::vec((any::<bool>(), key()), 0..80),
        ) {
            let mut counts = NamespaceCounts::default();
            let mut model = BTreeSet::new();
            for (insert, key) in ops {
                if insert {
                    if model.insert(key.clone()) {
                        counts.add(&key);
                    }
                } else if model.remove(&key) {
                    counts.remove(&key);
                }
            }
            for (kind, namespace, walked) in walked_counts(model.iter()) {
                prop_assert_eq!(counts.get(kind, namespace), walked);
            }
            let namespaces: BTreeSet<&str> = model.iter().map(|k| k.namespace.as_str()).collect();
            prop_assert_eq!(counts.namespaces.len(), namespaces.len());
        }
    }

    #[test]
    fn kinds_and_namespaces_count_apart() {
        let mut counts = NamespaceCounts::default();
        counts.add(&Key::metadata("ns", "app", "r1"));
        counts.add(&Key::metadata("ns", "app", "r2"));
        counts.add(&Key::definition("ns", "svc"));
        counts.add(&Key::metadata("nt", "app", "r1"));
        assert_eq!(counts.get(Kind::Metadata, "ns"), 2);
        assert_eq!(counts.get(Kind::Definition, "ns"), 1);
        assert_eq!(counts.get(Kind::Metadata, "nt"), 1);
        assert_eq!(counts.get(Kind::Definition, "nt"), 0);
        counts.remove(&Key::metadata("nt", "app", "r1"));
        assert_eq!(counts.get(Kind::Metadata, "nt"), 0);
        assert!(!counts.namespaces.contains_key("nt"));
    }
}
