//! Leases: records that are not re-published within the TTL expire.
//!
//! [`LeaseIndex`] is the pure part: it follows store events and knows, ordered by deadline,
//! which records expire when. [`run`] is the IO around it: it sleeps until the next deadline
//! and deletes each expired record *conditionally* on the revision it saw, so a re-publish
//! that races the sweep wins (its refresh bumped the revision, the delete does nothing).
//!
//! Deadlines are `refreshed_at + ttl`, from the lease stamp the store keeps with every
//! publish. A restart never expires a live record: on start the index is rebuilt from the
//! store and whatever expired meanwhile goes at once. (The embedded store keeps refreshes in
//! memory between checkpoints and recovers stamps up to half a TTL late, see
//! `store::checkpoint`, so there a dead record may outlive a restart by that much.)
//! With a shared backend every replica sweeps; the conditional delete makes that harmless
//! (one delete wins, the others find a newer revision or nothing). A backend that elects one
//! sweeper ([`Store::leadership`], the Kubernetes store) is swept only while this replica
//! leads; the index follows events either way, so a new leader sweeps at once.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    model::{Key, Kind},
    store::{Event, Store, epoch_ms, sharded::ShardedMap, take_waiting},
};

/// Longest the sweeper sleeps before looking at the clock again, so a wall-clock jump is
/// noticed within this bound.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Deadlines of every record, ordered.
#[derive(Debug, Default)]
pub struct LeaseIndex {
    ttl_ms: u64,
    by_deadline: BTreeSet<(u64, Key)>,
    /// Sharded as the store's index is: no rehash of every lease at once.
    by_key: ShardedMap<Key, (u64, u64)>,
}

/// A record whose lease ran out, with the revision its deadline was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The record.
    pub key: Key,
    /// Delete only if still at this revision.
    pub revision: u64,
}

impl LeaseIndex {
    /// An empty index for leases of `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            ..Self::default()
        }
    }

    /// Applies one store event.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Reset { records, .. } => {
                self.by_deadline.clear();
                self.by_key.clear();
                for record in records {
                    self.set(&record.key, record.refreshed_at_ms, record.revision);
                }
            }
            Event::Put(record) => self.set(&record.key, record.refreshed_at_ms, record.revision),
            Event::Refreshed {
                key,
                revision,
                refreshed_at_ms,
            } => self.refresh(key, *refreshed_at_ms, *revision),
            Event::Delete { key, .. } => self.remove(key),
        }
    }

    /// A refresh only moves a known record's deadline forward. A refresh the embedded store
    /// answered from memory keeps the record's revision, so one of a record no longer known,
    /// or older than the revision known, is late news and changes nothing.
    fn refresh(&mut self, key: &Key, refreshed_at_ms: u64, revision: u64) {
        let Some(known) = self.by_key.get_mut(key) else {
            return;
        };
        let (deadline, known_revision) = *known;
        if revision < known_revision {
            return;
        }
        let refreshed = refreshed_at_ms.saturating_add(self.ttl_ms);
        *known = (refreshed.max(deadline), revision);
        if refreshed > deadline {
            // The entry's own key moves to the new deadline: one copy of the key to find it,
            // none to insert it again.
            let probe = (deadline, key.clone());
            let (_, key) = self.by_deadline.take(&probe).unwrap_or(probe);
            self.by_deadline.insert((refreshed, key));
        }
    }

    fn set(&mut self, key: &Key, refreshed_at_ms: u64, revision: u64) {
        self.remove(key);
        let deadline = refreshed_at_ms.saturating_add(self.ttl_ms);
        self.by_deadline.insert((deadline, key.clone()));
        self.by_key.insert(key.clone(), (deadline, revision));
    }

    fn remove(&mut self, key: &Key) {
        if let Some((deadline, _)) = self.by_key.remove(key) {
            self.by_deadline.remove(&(deadline, key.clone()));
        }
    }

    /// The earliest deadline, in milliseconds since the epoch.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.by_deadline.first().map(|(deadline, _)| *deadline)
    }

    /// Records whose deadline is at or before `now_ms`, earliest first. They stay in the index
    /// until the store reports their deletion (or refresh).
    pub fn expired(&self, now_ms: u64) -> Vec<Expired> {
        self.by_deadline
            .iter()
            .take_while(|(deadline, _)| *deadline <= now_ms)
            .map(|(_, key)| Expired {
                key: key.clone(),
                revision: self
                    .by_key
                    .get(key)
                    .expect("every deadline has its lease")
                    .1,
            })
            .collect()
    }

    /// Number of records tracked.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no record is tracked.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Called for every record the sweeper deleted.
pub type OnExpired = Arc<dyn Fn(Kind) + Send + Sync>;

/// Sweeps expired records from `store` until `shutdown`.
pub async fn run(
    store: Arc<dyn Store>,
    ttl: Duration,
    on_expired: OnExpired,
    shutdown: CancellationToken,
) {
    let mut index = LeaseIndex::new(ttl);
    let mut events = store.watch();
    // Records whose delete failed or is not yet reflected: not retried before this time.
    let mut retry_after_ms: HashMap<Key, u64> = HashMap::new();
    let mut leadership = store.leadership();
    let mut election_over = false;
    loop {
        let now_ms = epoch_ms(SystemTime::now());
        let leading = !election_over && leadership.as_ref().is_none_or(|l| *l.borrow());
        for expired in index.expired(now_ms).into_iter().filter(|_| leading) {
            if retry_after_ms
                .get(&expired.key)
                .is_some_and(|t| *t > now_ms)
            {
                continue;
            }
            match store.delete(&expired.key, Some(expired.revision)).await {
                Ok(true) => {
                    info!(kind = %expired.key.kind, namespace = expired.key.namespace, resource.name = expired.key.name, "lease expired; record deleted");
                    on_expired(expired.key.kind);
                }
                Ok(false) => debug!(
                    resource.name = expired.key.name,
                    "expired record was refreshed or deleted meanwhile"
                ),
                Err(error) => {
                    warn!(%error, resource.name = expired.key.name, "deleting an expired record failed; will retry")
                }
            }
            // The store's watch will remove or refresh the entry; until it does, wait a
            // little before trying the same record again.
            retry_after_ms.insert(expired.key, now_ms + 1_000);
        }
        let sleep = index
            .next_deadline_ms()
            .map(|deadline| {
                let wait = deadline.saturating_sub(epoch_ms(SystemTime::now()));
                Duration::from_millis(wait.max(1)).min(MAX_SLEEP)
            })
            .unwrap_or(MAX_SLEEP);
        let leadership_changed = async {
            match leadership.as_mut() {
                Some(l) if !election_over => l.changed().await.is_ok(),
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(sleep) => {}
            changed = leadership_changed => if !changed {
                // The election ended with its store: nobody sweeps here any more.
                election_over = true;
            },
            event = events.next() => match event {
                Some(event) => {
                    follow(&mut index, &mut retry_after_ms, &event);
                    // Events already waiting (a committed batch, a burst of refreshes) are
                    // taken in the same turn: one look at the clock and one timer per
                    // batch, not per event.
                    let open = take_waiting(&mut events, MAX_EVENTS_PER_TURN - 1, |event| {
                        follow(&mut index, &mut retry_after_ms, &event);
                    });
                    if !open {
                        return;
                    }
                }
                None => return,
            },
        }
    }
}

/// Most store events the sweeper takes in one turn before it looks at the clock again.
const MAX_EVENTS_PER_TURN: usize = 1024;

/// Brings the index (and the delete retries) in line with one store event.
fn follow(index: &mut LeaseIndex, retry_after_ms: &mut HashMap<Key, u64>, event: &Event) {
    if !retry_after_ms.is_empty() {
        match event {
            Event::Delete { key, .. } | Event::Refreshed { key, .. } => {
                retry_after_ms.remove(key);
            }
            Event::Put(record) => {
                retry_after_ms.remove(&record.key);
            }
            Event::Reset { .. } => retry_after_ms.clear(),
        }
    }
    index.apply(event);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::store::Record;

    fn record(name: &str, refreshed_at_ms: u64, revision: u64) -> Record {
        Record {
            key: Key::metadata("ns", name, "r"),
            value: Arc::from("v"),
            revision,
            refreshed_at_ms,
        }
    }

    #[test]
    fn deadlines_follow_refreshes_and_deletes() {
        let mut index = LeaseIndex::new(Duration::from_millis(100));
        index.apply(&Event::Reset {
            records: vec![record("a", 0, 1), record("b", 50, 2)],
            revision: 2,
        });
        assert_eq!(index.next_deadline_ms(), Some(100));
        assert!(index.expired(99).is_empty());
        assert_eq!(
            index.expired(100),
            vec![Expired {
                key: Key::metadata("ns", "a", "r"),
                revision: 1
            }]
        );
        index.apply(&Event::Refreshed {
            key: Key::metadata("ns", "a", "r"),
            revision: 3,
            refreshed_at_ms: 90,
        });
        assert_eq!(index.next_deadline_ms(), Some(150), "b is now first");
        assert_eq!(index.expired(200).len(), 2);
        assert_eq!(index.expired(200)[1].revision, 3, "a's refreshed revision");
        index.apply(&Event::Delete {
            key: Key::metadata("ns", "b", "r"),
            revision: 4,
        });
        assert_eq!(index.len(), 1);
        // Late news: a refresh of a deleted record, one older than the revision known, one
        // that would move the deadline back.
        index.apply(&Event::Refreshed {
            key: Key::metadata("ns", "b", "r"),
            revision: 5,
            refreshed_at_ms: 1_000,
        });
        assert_eq!(index.len(), 1, "b stays deleted");
        index.apply(&Event::Refreshed {
            key: Key::metadata("ns", "a", "r"),
            revision: 2,
            refreshed_at_ms: 1_000,
        });
        assert_eq!(index.next_deadline_ms(), Some(190));
        index.apply(&Event::Refreshed {
            key: Key::metadata("ns", "a", "r"),
            revision: 3,
            refreshed_at_ms: 10,
        });
        assert_eq!(index.next_deadline_ms(), Some(190));
        // The same revision moves it forward (a refresh kept in memory).
        index.apply(&Event::Refreshed {
            key: Key::metadata("ns", "a", "r"),
            revision: 3,
            refreshed_at_ms: 120,
        });
        assert_eq!(index.next_deadline_ms(), Some(220));
        assert_eq!(index.expired(220)[0].revision, 3);
        index.apply(&Event::Reset {
            records: vec![],
            revision: 5,
        });
        assert!(index.is_empty());
        assert_eq!(index.next_deadline_ms(), None);
    }

    proptest! {
        /// The index always agrees with a naive model: expired(now) is exactly the records
        /// whose last stamp + ttl <= now, in deadline order.
        #[test]
        fn matches_naive_model(ops in proptest::collection::vec((0u8..4, 0usize..6, 0u64..1000), 1..60), now in 0u64..2000) {
            let ttl = 500;
            let mut index = LeaseIndex::new(Duration::from_millis(ttl));
            let mut model: HashMap<Key, (u64, u64)> = HashMap::new();
            for (revision, (op, name_idx, at)) in ops.into_iter().enumerate() {
                let revision = revision as u64 + 1;
                let name = format!("app{name_idx}");
                let key = Key::metadata("ns", &name, "r");
                let event = match op {
                    0 | 1 => Event::Put(record(&name, at, revision)),
                    2 => Event::Refreshed { key: key.clone(), revision, refreshed_at_ms: at },
                    _ => Event::Delete { key: key.clone(), revision },
                };
                match &event {
                    Event::Delete { .. } => { model.remove(&key); }
                    Event::Refreshed { .. } => {
                        if let Some((deadline, rev)) = model.get_mut(&key) {
                            *deadline = (*deadline).max(at + ttl);
                            *rev = revision;
                        }
                    }
                    _ => { model.insert(key, (at + ttl, revision)); }
                }
                index.apply(&event);
            }
            let mut expected: Vec<(u64, Key, u64)> = model
                .into_iter()
                .filter(|(_, (deadline, _))| *deadline <= now)
                .map(|(k, (d, r))| (d, k, r))
                .collect();
            expected.sort();
            let got: Vec<(Key, u64)> = index.expired(now).into_iter().map(|e| (e.key, e.revision)).collect();
            let expected: Vec<(Key, u64)> = expected.into_iter().map(|(_, k, r)| (k, r)).collect();
            prop_assert_eq!(got, expected);
        }
    }
}
