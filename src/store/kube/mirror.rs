//! The in-memory mirror of the watched objects, and the store events their changes make. Pure.
//!
//! Objects are the truth: each is known by `(kind, namespace, object name)`. A record is what
//! an object's spec names, so an object made with kubectl under any name is a record too. When
//! several objects name the same record (an operator copied one), the record shows the one
//! whose name is the [canonical encoding](super::names::object_name) of the record's name, else
//! the one with the smallest object name; deleting it uncovers the next.
//!
//! Every change returns the [`Event`]s it makes for watchers, by comparing what each touched
//! record showed before and after.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kube::core::ObjectMeta;

use super::names;
use crate::store::{Event, Key, Kind, MapKey, Record, counts::NamespaceCounts, map_key};

/// An object's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ObjectRef {
    pub(crate) kind: Kind,
    pub(crate) namespace: String,
    pub(crate) name: String,
}

/// One watched object, as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Object {
    /// Its identity.
    pub(crate) at: ObjectRef,
    /// The record it holds; `revision` is the object's resourceVersion.
    pub(crate) record: Record,
    /// Its metadata without managed fields, for replacing it without losing what others set.
    pub(crate) meta: ObjectMeta,
}

/// The objects and, per record, which objects name it.
#[derive(Debug, Default)]
pub(crate) struct Mirror {
    objects: HashMap<ObjectRef, Object>,
    by_key: BTreeMap<MapKey, BTreeSet<String>>,
    /// How many records (keys of `by_key`) each namespace holds.
    counts: NamespaceCounts,
    /// The highest resourceVersion seen on each kind's watch.
    revisions: BTreeMap<Kind, u64>,
}

impl Mirror {
    /// The object a record shows, if any.
    pub(crate) fn visible(&self, key: &Key) -> Option<&Object> {
        let names = self.by_key.get(&map_key(key))?;
        let canonical = names::object_name(&key.name);
        let name = if names.contains(&canonical) {
            &canonical
        } else {
            names.first()?
        };
        self.objects.get(&ObjectRef {
            kind: key.kind,
            namespace: key.namespace.clone(),
            name: name.clone(),
        })
    }

    /// The record under `key`.
    pub(crate) fn get(&self, key: &Key) -> Option<Record> {
        self.visible(key).map(|o| o.record.clone())
    }

    /// The object at `at`.
    pub(crate) fn object(&self, at: &ObjectRef) -> Option<&Object> {
        self.objects.get(at)
    }

    /// Every record from `start` on, in key order.
    pub(crate) fn range(&self, start: MapKey) -> impl Iterator<Item = Record> + '_ {
        self.by_key
            .range(start..)
            .filter_map(|((kind, namespace, name), _)| {
                self.get(&Key {
                    kind: *kind,
                    namespace: namespace.clone(),
                    name: name.clone(),
                })
            })
    }

    /// How many records of `kind` `namespace` holds.
    pub(crate) fn count(&self, kind: Kind, namespace: &str) -> usize {
        self.counts.get(kind, namespace)
    }

    /// Every record.
    pub(crate) fn records(&self) -> Vec<Record> {
        // The least key: the first kind's, with an empty namespace and name.
        self.range((Kind::ALL[0], String::new(), String::new()))
            .collect()
    }

    /// The highest resourceVersion seen for `kind`.
    pub(crate) fn revision(&self, kind: Kind) -> u64 {
        self.revisions.get(&kind).copied().unwrap_or(0)
    }

    /// The highest resourceVersion seen on any kind.
    pub(crate) fn max_revision(&self) -> u64 {
        self.revisions.values().copied().max().unwrap_or(0)
    }

    fn bump(&mut self, kind: Kind, revision: u64) {
        let r = self.revisions.entry(kind).or_default();
        *r = (*r).max(revision);
    }

    fn insert(&mut self, object: Object) {
        let names = self.by_key.entry(map_key(&object.record.key)).or_default();
        if names.is_empty() {
            self.counts.add(&object.record.key);
        }
        names.insert(object.at.name.clone());
        self.objects.insert(object.at.clone(), object);
    }

    fn remove(&mut self, at: &ObjectRef) -> Option<Object> {
        let object = self.objects.remove(at)?;
        let map_key = map_key(&object.record.key);
        if let Some(names) = self.by_key.get_mut(&map_key) {
            names.remove(&at.name);
            if names.is_empty() {
                self.by_key.remove(&map_key);
                self.counts.remove(&object.record.key);
            }
        }
        Some(object)
    }

    /// An object was created or changed (`object`), or its spec stopped naming a record
    /// (`None` for `at`, with the revision of that change).
    pub(crate) fn apply(
        &mut self,
        at: &ObjectRef,
        object: Option<Object>,
        revision: u64,
    ) -> Vec<Event> {
        self.bump(at.kind, revision);
        let mut touched: Vec<Key> = Vec::with_capacity(2);
        if let Some(old) = self.objects.get(at) {
            touched.push(old.record.key.clone());
        }
        if let Some(new) = &object
            && !touched.contains(&new.record.key)
        {
            touched.push(new.record.key.clone());
        }
        let before: Vec<Option<Record>> = touched.iter().map(|k| self.get(k)).collect();
        self.remove(at);
        if let Some(object) = object {
            self.insert(object);
        }
        touched
            .into_iter()
            .zip(before)
            .filter_map(|(key, before)| {
                let after = self.get(&key);
                change(key, before, after, revision)
            })
            .collect()
    }

    /// Replaces every object of `kind` with a fresh list; returns the reset watchers get.
    pub(crate) fn replace_kind(&mut self, kind: Kind, objects: Vec<Object>) -> Event {
        let stale: Vec<ObjectRef> = self
            .objects
            .keys()
            .filter(|at| at.kind == kind)
            .cloned()
            .collect();
        for at in &stale {
            self.remove(at);
        }
        for object in objects {
            self.bump(kind, object.record.revision);
            self.insert(object);
        }
        self.reset()
    }

    /// The whole state as a reset.
    pub(crate) fn reset(&self) -> Event {
        Event::Reset {
            records: self.records(),
            revision: self.max_revision(),
        }
    }
}

/// The event that turns `before` into `after` for `key`.
fn change(key: Key, before: Option<Record>, after: Option<Record>, revision: u64) -> Option<Event> {
    match (before, after) {
        (None, None) => None,
        (Some(_), None) => Some(Event::Delete { key, revision }),
        (None, Some(after)) => Some(Event::Put(after)),
        (Some(before), Some(after)) if before == after => None,
        (Some(before), Some(after)) if before.value == after.value => Some(Event::Refreshed {
            key,
            revision: after.revision,
            refreshed_at_ms: after.refreshed_at_ms,
        }),
        (Some(_), Some(after)) => Some(Event::Put(after)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn object(name: &str, key: &Key, value: &str, revision: u64) -> Object {
        Object {
            at: ObjectRef {
                kind: key.kind,
                namespace: key.namespace.clone(),
                name: name.to_string(),
            },
            record: Record {
                key: key.clone(),
                value: Arc::from(value),
                revision,
                refreshed_at_ms: revision * 10,
            },
            meta: ObjectMeta::default(),
        }
    }

    proptest::proptest! {
        /// Under any creations, edits (which may rename the record) and deletions of
        /// objects, the namespace counts are those of walking the records the objects show:
        /// two objects naming one record count once.
        #[test]
        fn counts_follow_the_records(
            ops in proptest::collection::vec(
                (crate::store::tests::key(), "o[0-2]", proptest::prelude::any::<bool>()),
                0..60,
            ),
        ) {
            let mut mirror = Mirror::default();
            for (revision, (key, name, present)) in (1..).zip(ops) {
                let at = ObjectRef {
                    kind: key.kind,
                    namespace: key.namespace.clone(),
                    name: name.clone(),
                };
                let object = present.then(|| object(&name, &key, "v", revision));
                mirror.apply(&at, object, revision);
            }
            let records = mirror.records();
            let keys = records.iter().map(|r| &r.key);
            for (kind, namespace, walked) in crate::store::tests::walked_counts(keys) {
                proptest::prop_assert_eq!(mirror.count(kind, namespace), walked);
            }
        }
    }

    #[test]
    fn put_refresh_update_delete() {
        let mut mirror = Mirror::default();
        let key = Key::metadata("ns", "App", "1");
        let canonical = names::object_name(&key.name);
        let o = object(&canonical, &key, "v1", 5);
        let events = mirror.apply(&o.at.clone(), Some(o.clone()), 5);
        assert!(matches!(&events[..], [Event::Put(r)] if r.revision == 5));
        let refreshed = object(&canonical, &key, "v1", 6);
        let events = mirror.apply(&o.at, Some(refreshed), 6);
        assert_eq!(
            events,
            vec![Event::Refreshed {
                key: key.clone(),
                revision: 6,
                refreshed_at_ms: 60
            }]
        );
        let events = mirror.apply(&o.at, Some(object(&canonical, &key, "v2", 7)), 7);
        assert!(matches!(&events[..], [Event::Put(r)] if &*r.value == "v2"));
        assert_eq!(
            mirror.apply(&o.at, None, 8),
            vec![Event::Delete {
                key: key.clone(),
                revision: 8
            }]
        );
        assert_eq!(mirror.get(&key), None);
        assert_eq!(
            mirror.apply(&o.at, None, 9),
            vec![],
            "deleting twice is quiet"
        );
        assert_eq!(mirror.revision(Kind::Metadata), 9);
    }

    #[test]
    fn two_objects_one_record_prefers_the_canonical_name() {
        let mut mirror = Mirror::default();
        let key = Key::definition("ns", "org.example.Svc");
        let copy = object("a-copy", &key, "copy", 1);
        mirror.apply(&copy.at.clone(), Some(copy.clone()), 1);
        assert_eq!(&*mirror.get(&key).unwrap().value, "copy");
        let ours = object(&names::object_name(&key.name), &key, "ours", 2);
        let events = mirror.apply(&ours.at.clone(), Some(ours.clone()), 2);
        assert!(matches!(&events[..], [Event::Put(r)] if &*r.value == "ours"));
        // A change to the hidden copy shows nowhere.
        assert_eq!(
            mirror.apply(&copy.at, Some(object("a-copy", &key, "copy2", 3)), 3),
            vec![]
        );
        // Deleting ours uncovers the copy.
        let events = mirror.apply(&ours.at, None, 4);
        assert!(matches!(&events[..], [Event::Put(r)] if &*r.value == "copy2"));
        assert_eq!(mirror.records().len(), 1);
    }

    #[test]
    fn an_edit_that_renames_the_record_moves_it() {
        let mut mirror = Mirror::default();
        let a = Key::metadata("ns", "app", "1");
        let b = Key::metadata("ns", "app", "2");
        let o = object("hand-made", &a, "v", 1);
        mirror.apply(&o.at.clone(), Some(o.clone()), 1);
        let events = mirror.apply(&o.at, Some(object("hand-made", &b, "v", 2)), 2);
        assert_eq!(events.len(), 2);
        assert!(matches!(&events[0], Event::Delete { key, .. } if *key == a));
        assert!(matches!(&events[1], Event::Put(r) if r.key == b));
        // And a spec that no longer names a record removes it.
        let events = mirror.apply(&o.at, None, 3);
        assert!(matches!(&events[..], [Event::Delete { key, .. }] if *key == b));
    }

    #[test]
    fn replace_kind_keeps_other_kinds_and_orders_records() {
        let mut mirror = Mirror::default();
        let def = Key::definition("ns", "svc");
        let d = object("d", &def, "v", 1);
        mirror.apply(&d.at.clone(), Some(d), 1);
        let stale = Key::metadata("ns", "gone", "1");
        let s = object("s", &stale, "v", 2);
        mirror.apply(&s.at.clone(), Some(s), 2);
        let keys = [Key::metadata("b", "x", "1"), Key::metadata("a", "y", "1")];
        let fresh = keys
            .iter()
            .enumerate()
            .map(|(i, k)| object(&format!("o{i}"), k, "v", 10 + i as u64))
            .collect();
        let Event::Reset { records, revision } = mirror.replace_kind(Kind::Metadata, fresh) else {
            panic!("a reset");
        };
        assert_eq!(revision, 11);
        let got: Vec<_> = records.iter().map(|r| r.key.clone()).collect();
        assert_eq!(got, vec![keys[1].clone(), keys[0].clone(), def.clone()]);
        assert_eq!(mirror.count(Kind::Metadata, "a"), 1);
        assert_eq!(mirror.count(Kind::Metadata, ""), 0);
        let from_a: Vec<_> = mirror
            .range((Kind::Metadata, "a".into(), String::new()))
            .map(|r| r.key)
            .collect();
        assert_eq!(from_a, vec![keys[1].clone(), keys[0].clone(), def]);
    }
}
