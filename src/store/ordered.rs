//! The names of a store's records in key order, by namespace and kind, so a page of `list`
//! reads the range around it instead of every record.
//!
//! Why names in sets of their own rather than whole keys in one ordered set: a B-tree
//! insert compares the new key with a few dozen stored ones, and each comparison of a
//! [`Key`] reads its namespace and its name from two other allocations (three with the key
//! behind a shared pointer). Here the namespace and kind pick a set with one hash lookup and
//! each comparison reads one name. A `publish-new` run spent about 8 µs more per new record
//! with one set of shared keys (`docs/benchmarks.md`). The size of a set is the namespace's
//! record count, which the store checks against its limit.

use std::{collections::BTreeSet, ops::Bound};

use super::{ByNamespace, Key, ListQuery};
use crate::model::Kind;

/// Per namespace, the names of each kind, in order.
#[derive(Debug, Default)]
pub struct OrderedNames {
    namespaces: ByNamespace<[BTreeSet<Box<str>>; Kind::ALL.len()]>,
}

impl OrderedNames {
    /// Adds `key`; false when it was there.
    pub fn insert(&mut self, key: &Key) -> bool {
        self.namespaces
            .entry_ref(key.namespace.as_str())
            .or_default()[key.kind as usize]
            .insert(key.name.as_str().into())
    }

    /// Removes `key`; false when it was not there.
    pub fn remove(&mut self, key: &Key) -> bool {
        let Some(sets) = self.namespaces.get_mut(key.namespace.as_str()) else {
            return false;
        };
        let removed = sets[key.kind as usize].remove(key.name.as_str());
        if sets.iter().all(BTreeSet::is_empty) {
            self.namespaces.remove(key.namespace.as_str());
        }
        removed
    }

    /// How many records of `kind` `namespace` holds.
    pub fn count(&self, kind: Kind, namespace: &str) -> usize {
        self.namespaces
            .get(namespace)
            .map_or(0, |sets| sets[kind as usize].len())
    }

    /// The keys `query` selects, in key order ([`ListQuery::scan`] from
    /// [`ListQuery::first_key`]).
    pub fn select(&self, query: &ListQuery) -> Vec<Key> {
        let first = query.first_key();
        let kind = query.kind;
        let mut namespaces: Vec<&str> = match &query.namespace {
            // The page starts in a later namespace: nothing of this one is left.
            Some(namespace) if *namespace != first.namespace => return Vec::new(),
            Some(namespace) => vec![namespace.as_str()],
            None => self
                .namespaces
                .keys()
                .map(String::as_str)
                .filter(|ns| *ns >= first.namespace.as_str())
                .collect(),
        };
        namespaces.sort_unstable();
        let ordered = namespaces
            .into_iter()
            .filter_map(|namespace| {
                let names = &self.namespaces.get(namespace)?[kind as usize];
                let from = if namespace == first.namespace {
                    Bound::Included(first.name.as_str())
                } else {
                    Bound::Unbounded
                };
                Some(
                    names
                        .range::<str, _>((from, Bound::Unbounded))
                        .map(move |name| Key {
                            kind,
                            namespace: namespace.to_string(),
                            name: name.to_string(),
                        }),
                )
            })
            .flatten();
        query.scan(ordered).collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::store::tests::{key, page_after_r7, query, walked_counts};

    proptest! {
        /// Under any inserts and removes it answers as one ordered set of whole keys: what
        /// it holds, the counts, and every query's selection.
        #[test]
        fn answers_as_one_ordered_set_of_keys(
            ops in proptest::collection::vec((any::<bool>(), key()), 0..80),
            queries in proptest::collection::vec(query(), 1..8),
        ) {
            let mut names = OrderedNames::default();
            let mut model = BTreeSet::new();
            for (insert, key) in ops {
                if insert {
                    prop_assert_eq!(names.insert(&key), model.insert(key));
                } else {
                    prop_assert_eq!(names.remove(&key), model.remove(&key));
                }
            }
            for (kind, namespace, walked) in walked_counts(model.iter()) {
                prop_assert_eq!(names.count(kind, namespace), walked);
            }
            for query in queries {
                let expected: Vec<Key> = model
                    .iter()
                    .filter(|k| query.matches(k))
                    .take(query.limit)
                    .cloned()
                    .collect();
                prop_assert_eq!(names.select(&query), expected, "{:?}", query);
            }
            prop_assert!(names.namespaces.values().all(|sets| sets.iter().any(|s| !s.is_empty())));
        }
    }

    #[test]
    fn a_page_starts_after_its_token_and_stops_at_the_end_of_the_prefix() {
        let mut names = OrderedNames::default();
        for i in 0..10 {
            names.insert(&Key::metadata("ns", "app", &format!("r{i}")));
        }
        names.insert(&Key::metadata("ns", "apq", "r0"));
        names.insert(&Key::metadata("nt", "app", "r0"));
        names.insert(&Key::definition("ns", "app/r9"));
        let query = page_after_r7();
        assert_eq!(
            names.select(&query),
            [
                Key::metadata("ns", "app", "r8"),
                Key::metadata("ns", "app", "r9")
            ]
        );
        assert_eq!(names.count(Kind::Metadata, "ns"), 11);
        assert_eq!(names.count(Kind::Definition, "ns"), 1);
        assert_eq!(names.count(Kind::Mapping, "ns"), 0);
        assert_eq!(names.count(Kind::Metadata, "nx"), 0);
    }
}
