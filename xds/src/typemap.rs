//! A small map keyed by type URL, for per-stream state.
//!
//! A stream reads one to a few types, so a sorted vector serves better than a hash map: one
//! allocation of exactly what is held (a hash map starts at four buckets), no hashing, and
//! iteration in type order without collecting and sorting the keys on every snapshot.

use crate::types::TypeUrl;

/// Values by type URL, in type order.
#[derive(Debug, Clone)]
pub(crate) struct TypeMap<V> {
    entries: Vec<(TypeUrl, V)>,
}

impl<V> Default for TypeMap<V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<V> TypeMap<V> {
    fn position(&self, type_url: &str) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|(t, _)| t.as_str().cmp(type_url))
    }

    /// The stored key equal to `type_url`: a clone of it costs no allocation.
    pub(crate) fn key(&self, type_url: &str) -> Option<&TypeUrl> {
        self.position(type_url).ok().map(|i| &self.entries[i].0)
    }

    pub(crate) fn contains_key(&self, type_url: &str) -> bool {
        self.position(type_url).is_ok()
    }

    pub(crate) fn get(&self, type_url: &str) -> Option<&V> {
        self.position(type_url).ok().map(|i| &self.entries[i].1)
    }

    /// The stored key and value of `type_url`.
    pub(crate) fn entry_mut(&mut self, type_url: &str) -> Option<(&TypeUrl, &mut V)> {
        let i = self.position(type_url).ok()?;
        let (key, value) = &mut self.entries[i];
        Some((key, value))
    }

    /// The value of `type_url`, inserted as `V::default()` when missing.
    pub(crate) fn get_or_default(&mut self, type_url: &TypeUrl) -> &mut V
    where
        V: Default,
    {
        let i = match self.position(type_url.as_str()) {
            Ok(i) => i,
            Err(i) => {
                self.entries.reserve_exact(1);
                self.entries.insert(i, (type_url.clone(), V::default()));
                i
            }
        };
        &mut self.entries[i].1
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&TypeUrl, &V)> {
        self.entries.iter().map(|(t, v)| (t, v))
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&TypeUrl, &mut V)> {
        self.entries.iter_mut().map(|(t, v)| (&*t, v))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Behaves as an ordered map.
        #[test]
        fn matches_a_btree_map(ops in proptest::collection::vec((0u8..6, any::<u8>()), 0..40)) {
            let mut ours = TypeMap::<u32>::default();
            let mut model = std::collections::BTreeMap::<TypeUrl, u32>::new();
            for (key, add) in ops {
                let key = TypeUrl::from(format!("type.googleapis.com/t{key}"));
                prop_assert_eq!(ours.contains_key(key.as_str()), model.contains_key(&key));
                *ours.get_or_default(&key) += u32::from(add);
                *model.entry(key.clone()).or_default() += u32::from(add);
                prop_assert_eq!(ours.get(key.as_str()), model.get(&key));
                prop_assert_eq!(ours.key(key.as_str()), Some(&key));
            }
            let ours: Vec<_> = ours.iter().map(|(k, v)| (k.clone(), *v)).collect();
            let model: Vec<_> = model.into_iter().collect();
            prop_assert_eq!(ours, model);
        }
    }
}
