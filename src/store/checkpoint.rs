//! Lease checkpoints: when a refresh of an unchanged record has to reach the disk.
//!
//! A refresh only moves a record's lease forward. Writing each one durably costs a commit
//! (an fsync shared with whatever else is queued), although nothing but the deadline
//! changed. The embedded store therefore keeps refreshes in memory and writes the lease
//! stamp (a *checkpoint*) only when the stamp on disk is half a TTL old. Recovery then
//! takes each stored stamp as if it were half a TTL later (but never later than the moment
//! the store opens), so:
//!
//! - no acknowledged refresh loses its promise across a crash: a refresh at `t` was kept in
//!   memory only if `t < stored + ttl / 2`, and `t` was before the store reopened, so the
//!   recovered stamp is at or after `t`;
//! - a record nobody refreshes any more outlives its lease by at most half a TTL after a
//!   crash or restart (etcd extends every lease by its whole TTL when a leader takes over);
//! - each record costs at most one durable write per half TTL, however often it is
//!   refreshed.
//!
//! The rules are plain arithmetic on milliseconds since the epoch, kept here apart from the
//! store's IO.

use std::time::Duration;

/// The checkpoint rules for leases of one TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoints {
    ttl_ms: u64,
}

impl Checkpoints {
    /// The rules for leases of `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Whether a refresh at `now_ms` may stay in memory, the stamp on disk being
    /// `stored_ms`: only while that stamp is less than half a TTL old.
    pub fn in_memory(&self, stored_ms: u64, now_ms: u64) -> bool {
        now_ms < stored_ms.saturating_add(self.ttl_ms / 2)
    }

    /// The stamp to give a record on opening the store at `open_ms` when its stamp on disk
    /// is `stored_ms`: the latest moment a refresh may have been kept in memory only.
    pub fn recovered(&self, stored_ms: u64, open_ms: u64) -> u64 {
        stored_ms
            .saturating_add(self.ttl_ms / 2)
            .min(open_ms.max(stored_ms))
    }

    /// Whether a lease stamped `refreshed_at_ms` still runs at `now_ms`.
    pub fn live(&self, refreshed_at_ms: u64, now_ms: u64) -> bool {
        refreshed_at_ms.saturating_add(self.ttl_ms) > now_ms
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn half_a_ttl_in_memory_then_a_checkpoint() {
        let rules = Checkpoints::new(Duration::from_secs(10));
        assert!(rules.in_memory(1_000, 1_000));
        assert!(rules.in_memory(1_000, 5_999));
        assert!(!rules.in_memory(1_000, 6_000));
        // A clock that went back still refreshes in memory (the stamp never moves back).
        assert!(rules.in_memory(1_000, 0));
    }

    #[test]
    fn recovery_moves_a_stamp_at_most_half_a_ttl_and_never_past_the_open() {
        let rules = Checkpoints::new(Duration::from_secs(10));
        assert_eq!(rules.recovered(1_000, 60_000), 6_000);
        assert_eq!(rules.recovered(1_000, 3_000), 3_000);
        // A stamp from a clock ahead of the opening one stays as it is.
        assert_eq!(rules.recovered(9_000, 3_000), 9_000);
        assert!(rules.live(6_000, 15_999));
        assert!(!rules.live(6_000, 16_000));
        assert_eq!(rules.recovered(u64::MAX - 1, u64::MAX), u64::MAX);
    }

    proptest! {
        /// Refreshes at random times, each kept in memory or checkpointed by the rules, then
        /// a crash and a reopen: the recovered stamp is never before the last acknowledged
        /// refresh (no promise lost) and never more than half a TTL after it (a dead record
        /// is kept at most that much longer).
        #[test]
        fn no_refresh_loses_its_promise(
            ttl_ms in 2u64..100_000,
            gaps in proptest::collection::vec(0u64..60_000, 1..50),
            open_gap in 0u64..200_000,
        ) {
            let rules = Checkpoints::new(Duration::from_millis(ttl_ms));
            let mut now = 1_000_000u64;
            let mut stored = now;
            let mut last = now;
            for gap in gaps {
                now += gap;
                if !rules.in_memory(stored, now) {
                    stored = now;
                }
                last = now;
            }
            let recovered = rules.recovered(stored, now + open_gap);
            prop_assert!(recovered >= last, "recovered {recovered} before the refresh at {last}");
            prop_assert!(recovered <= last + ttl_ms / 2);
            prop_assert!(recovered <= now + open_gap);
        }
    }
}
