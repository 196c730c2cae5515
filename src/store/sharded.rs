//! A hash map split into shards that grow one at a time.
//!
//! A hash table that outgrows its capacity moves every entry into a new table at once: at
//! 458,752 records of the store's index that took 141 ms, and twice that at the next
//! doubling, under the lock every read and write of the store waits for. [`ShardedMap`]
//! keeps [`SHARDS`] tables and picks one by the key's hash, so a table that doubles holds a
//! sixty-fourth of the entries and the pause shrinks with it. Lookups cost one hash, as in a
//! single table: the shard and the bucket come from the same hash, the tables being
//! `hashbrown`'s `HashTable`s, which take a hash computed outside. An ordered map avoids the
//! pause too, but each lookup in it compares keys down a tree of nodes, and a random `get`
//! measured slower.

use std::{
    borrow::Borrow,
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hash},
};

use hashbrown::{HashTable, hash_table::Entry};

/// How many tables a [`ShardedMap`] keeps.
pub const SHARDS: usize = 64;

/// A hash map whose growth never rehashes more than one shard at a time.
#[derive(Debug, Clone)]
pub struct ShardedMap<K, V> {
    hasher: RandomState,
    shards: Box<[HashTable<(K, V)>]>,
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| HashTable::new()).collect(),
        }
    }
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    /// The key's one hash, and the shard it picks. The shard comes from bits 40 to 45, which
    /// a table reads neither for its bucket (the low bits) nor for its control byte (the top
    /// seven): within a shard the hashes stay as spread as in one table.
    fn locate<Q: Hash + ?Sized>(&self, key: &Q) -> (u64, usize) {
        let hash = self.hasher.hash_one(key);
        (hash, ((hash >> 40) % SHARDS as u64) as usize)
    }

    /// The value under `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (hash, shard) = self.locate(key);
        self.shards[shard]
            .find(hash, |(k, _)| k.borrow() == key)
            .map(|(_, v)| v)
    }

    /// The value under `key`, to change.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (hash, shard) = self.locate(key);
        self.shards[shard]
            .find_mut(hash, |(k, _)| k.borrow() == key)
            .map(|(_, v)| v)
    }

    /// Puts `value` under `key`, returning the value it replaced (the stored key stays, as
    /// `HashMap::insert` keeps it).
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let (hash, shard) = self.locate(&key);
        let hasher = &self.hasher;
        match self.shards[shard].entry(hash, |(k, _)| *k == key, |(k, _)| hasher.hash_one(k)) {
            Entry::Occupied(mut entry) => Some(std::mem::replace(&mut entry.get_mut().1, value)),
            Entry::Vacant(entry) => {
                entry.insert((key, value));
                None
            }
        }
    }

    /// Takes the value under `key` out.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (hash, shard) = self.locate(key);
        let entry = self.shards[shard].find_entry(hash, |(k, _)| k.borrow() == key);
        entry.ok().map(|entry| entry.remove().0.1)
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashTable::len).sum()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashTable::is_empty)
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards
            .iter()
            .flat_map(|shard| shard.iter().map(|(k, v)| (k, v)))
    }

    /// Removes every entry; the shards keep their capacity.
    pub fn clear(&mut self) {
        self.shards.iter_mut().for_each(HashTable::clear);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u32),
        Remove(u16),
        GetMut(u16, u32),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u16>(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k % 512, v)),
            3 => any::<u16>().prop_map(|k| Op::Remove(k % 512)),
            2 => (any::<u16>(), any::<u32>()).prop_map(|(k, v)| Op::GetMut(k % 512, v)),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// Whatever the operations, it answers as one `HashMap` given the same ones.
        #[test]
        fn behaves_as_one_hash_map(ops in proptest::collection::vec(op(), 0..400)) {
            let mut sharded = ShardedMap::default();
            let mut model = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(sharded.insert(k, v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(sharded.remove(&k), model.remove(&k)),
                    Op::GetMut(k, v) => {
                        let (a, b) = (sharded.get_mut(&k), model.get_mut(&k));
                        prop_assert_eq!(a.is_some(), b.is_some());
                        if let (Some(a), Some(b)) = (a, b) {
                            *a = v;
                            *b = v;
                        }
                    }
                    Op::Clear => {
                        sharded.clear();
                        model.clear();
                    }
                }
                prop_assert_eq!(sharded.len(), model.len());
                prop_assert_eq!(sharded.is_empty(), model.is_empty());
            }
            let mut entries: Vec<_> = sharded.iter().map(|(k, v)| (*k, *v)).collect();
            entries.sort_unstable();
            let mut expected: Vec<_> = model.into_iter().collect();
            expected.sort_unstable();
            prop_assert_eq!(entries, expected);
        }
    }

    #[test]
    fn entries_spread_over_every_shard() {
        let mut map = ShardedMap::default();
        for k in 0..10_000u32 {
            map.insert(k, ());
        }
        assert!(map.shards.iter().all(|shard| !shard.is_empty()));
        assert!(
            map.shards.iter().map(HashTable::len).max().unwrap() < 2 * 10_000 / SHARDS,
            "no shard holds twice its share"
        );
        assert_eq!(map.get(&77), Some(&()));
    }
}
