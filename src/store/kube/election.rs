//! Leader election with a `coordination.k8s.io/v1` Lease, so one replica sweeps expired records.
//!
//! The rules are client-go's `leaderelection` package, as plain functions of what was read
//! and the local monotonic clock ([`Elector`]); [`run`] is the loop around them.
//!
//! - A replica that holds the lease renews it every `retry_period`. It counts as leader while
//!   its last successful renewal is younger than `renew_deadline` (shorter than the lease
//!   duration), so it stops sweeping before anyone else may take over.
//! - Another replica takes the lease over when it is free (no holder) or when the record has
//!   not changed for `lease_duration` **on the observer's own clock**: expiry never compares
//!   clocks of two machines (client-go's `observedTime`).
//! - Writes are a create or a replace with the resourceVersion that was read, so two
//!   candidates racing for a free lease cannot both win.
//! - On shutdown the holder releases the lease (no holder, 1 s duration), so a successor takes
//!   over at once instead of waiting out the lease.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How the election runs.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// The Lease object's name (default `pixiu-metadata-sweeper`).
    pub lease_name: String,
    /// This replica's identity, written as the holder (default: the pod name when configured,
    /// else a random one).
    pub identity: String,
    /// How long a lease stays valid without renewal (default 15 s, client-go's default).
    pub lease_duration: Duration,
    /// How long the holder keeps leading without a successful renewal (default 10 s).
    pub renew_deadline: Duration,
    /// Pause between attempts to acquire or renew (default 2 s).
    pub retry_period: Duration,
}

/// The default [`ElectionConfig::lease_name`].
pub const DEFAULT_LEASE_NAME: &str = "pixiu-metadata-sweeper";

impl ElectionConfig {
    /// The defaults, with `identity`.
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            lease_name: DEFAULT_LEASE_NAME.to_string(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Shorter periods (tests).
    #[must_use]
    pub fn with_periods(mut self, lease: Duration, renew: Duration, retry: Duration) -> Self {
        self.lease_duration = lease;
        self.renew_deadline = renew;
        self.retry_period = retry;
        self
    }
}

/// What a read of the Lease showed, reduced to what the rules need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The holder, if any.
    pub holder: Option<String>,
    /// The Lease's resourceVersion: it changes with every renewal.
    pub resource_version: String,
    /// The lease duration the holder announced.
    pub lease_duration: Duration,
    /// How many times the lease changed hands.
    pub transitions: i32,
}

/// What to do after a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Someone else holds a live lease: wait.
    Follow,
    /// Write the lease with us as holder: a renewal when `renew`, else a takeover.
    Claim {
        /// Whether we already hold it.
        renew: bool,
    },
}

/// The election's pure state.
#[derive(Debug)]
pub struct Elector {
    identity: String,
    renew_deadline: Duration,
    /// The last record seen and when (our clock) it was first seen in that state.
    observed: Option<(Observed, Instant)>,
    /// When our last write as holder succeeded.
    renewed_at: Option<Instant>,
}

impl Elector {
    /// A candidate named `identity`.
    pub fn new(identity: &str, renew_deadline: Duration) -> Self {
        Self {
            identity: identity.to_string(),
            renew_deadline,
            observed: None,
            renewed_at: None,
        }
    }

    /// Takes in a read of the Lease (`None`: it does not exist) at `now` and decides.
    pub fn observe(&mut self, lease: Option<Observed>, now: Instant) -> Step {
        let Some(lease) = lease else {
            self.observed = None;
            return Step::Claim { renew: false };
        };
        let since = match &self.observed {
            Some((seen, since)) if *seen == lease => *since,
            _ => now,
        };
        self.observed = Some((lease.clone(), since));
        match lease.holder.as_deref() {
            Some(holder) if holder == self.identity => Step::Claim { renew: true },
            None | Some("") => Step::Claim { renew: false },
            Some(_) if now.duration_since(since) >= lease.lease_duration => {
                Step::Claim { renew: false }
            }
            Some(_) => {
                // Someone else leads: whatever we held is gone.
                self.renewed_at = None;
                Step::Follow
            }
        }
    }

    /// Our write as holder succeeded at `now`.
    pub fn claimed(&mut self, now: Instant) {
        self.renewed_at = Some(now);
    }

    /// Whether we lead at `now`: our last successful write is younger than the renew deadline.
    pub fn is_leader(&self, now: Instant) -> bool {
        self.renewed_at
            .is_some_and(|at| now.duration_since(at) < self.renew_deadline)
    }

    /// We gave the lease up.
    pub fn released(&mut self) {
        self.renewed_at = None;
    }
}

fn observed(lease: &Lease) -> Observed {
    let spec = lease.spec.clone().unwrap_or_default();
    Observed {
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
        lease_duration: Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        ),
        transitions: spec.lease_transitions.unwrap_or(0),
    }
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// The Lease after a successful claim by `config.identity`.
fn claimed_lease(config: &ElectionConfig, current: Option<&Lease>, renew: bool) -> Lease {
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(config.lease_name.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    lease.metadata.managed_fields = None;
    let old = lease.spec.take().unwrap_or_default();
    let now = now_micro();
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(
            i32::try_from(config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX),
        ),
        acquire_time: if renew {
            old.acquire_time.or_else(|| Some(now.clone()))
        } else {
            Some(now.clone())
        },
        renew_time: Some(now),
        lease_transitions: Some(if renew || current.is_none() {
            old.lease_transitions.unwrap_or(0)
        } else {
            old.lease_transitions.unwrap_or(0) + 1
        }),
        ..old
    });
    lease
}

/// Runs the election on `api` until `stop`, publishing whether this replica leads on `leader`.
/// Releases the lease when stopped while leading.
pub async fn run(
    api: Api<Lease>,
    config: ElectionConfig,
    leader: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let mut elector = Elector::new(&config.identity, config.renew_deadline);
    let mut last: Option<Lease> = None;
    loop {
        let attempt = async {
            let current = api.get_opt(&config.lease_name).await?;
            let step = elector.observe(current.as_ref().map(observed), Instant::now());
            if let Step::Claim { renew } = step {
                let lease = claimed_lease(&config, current.as_ref(), renew);
                let written = match &current {
                    None => api.create(&PostParams::default(), &lease).await,
                    Some(_) => {
                        api.replace(&config.lease_name, &PostParams::default(), &lease)
                            .await
                    }
                };
                match written {
                    Ok(lease) => {
                        elector.claimed(Instant::now());
                        return Ok::<_, kube::Error>(Some(lease));
                    }
                    // Someone else wrote first: read again next round.
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        debug!("lost a race for the sweeper lease");
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(current)
        };
        match tokio::time::timeout(config.retry_period.max(Duration::from_secs(1)), attempt).await {
            Ok(Ok(lease)) => last = lease,
            Ok(Err(error)) => debug!(%error, "reading or writing the sweeper lease failed"),
            Err(_) => debug!("the sweeper lease request timed out"),
        }
        let leading = elector.is_leader(Instant::now());
        if leader.send_if_modified(|was| std::mem::replace(was, leading) != leading) {
            if leading {
                info!(
                    identity = config.identity,
                    lease = config.lease_name,
                    "leading: this replica sweeps expired records"
                );
            } else {
                warn!(
                    identity = config.identity,
                    lease = config.lease_name,
                    "not leading: another replica sweeps expired records"
                );
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(config.retry_period) => {}
        }
    }
    if elector.is_leader(Instant::now())
        && let Some(mut lease) = last
    {
        leader.send_replace(false);
        elector.released();
        lease.metadata.managed_fields = None;
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
        }
        let params = PostParams::default();
        let release = api.replace(&config.lease_name, &params, &lease);
        match tokio::time::timeout(Duration::from_secs(2), release).await {
            Ok(Ok(_)) => info!(identity = config.identity, "released the sweeper lease"),
            Ok(Err(error)) => debug!(%error, "releasing the sweeper lease failed"),
            Err(_) => debug!("releasing the sweeper lease timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, rv: &str) -> Observed {
        Observed {
            holder: holder.map(str::to_string),
            resource_version: rv.to_string(),
            lease_duration: Duration::from_secs(15),
            transitions: 0,
        }
    }

    #[test]
    fn free_or_missing_leases_are_claimed_and_renewed() {
        let t0 = Instant::now();
        let mut me = Elector::new("me", Duration::from_secs(10));
        assert_eq!(me.observe(None, t0), Step::Claim { renew: false });
        assert!(!me.is_leader(t0), "not before the write succeeded");
        me.claimed(t0);
        assert!(me.is_leader(t0));
        assert_eq!(
            me.observe(Some(lease(Some("me"), "2")), t0),
            Step::Claim { renew: true }
        );
        assert_eq!(
            me.observe(Some(lease(None, "3")), t0),
            Step::Claim { renew: false }
        );
        // Renewals failing: leadership ends at the renew deadline.
        assert!(me.is_leader(t0 + Duration::from_millis(9_999)));
        assert!(!me.is_leader(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn a_live_lease_is_followed_until_it_stops_changing_for_its_duration() {
        let t0 = Instant::now();
        let mut me = Elector::new("me", Duration::from_secs(10));
        assert_eq!(
            me.observe(Some(lease(Some("other"), "1")), t0),
            Step::Follow
        );
        // Renewed (new resourceVersion): the clock starts again.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            me.observe(Some(lease(Some("other"), "2")), t1),
            Step::Follow
        );
        assert_eq!(
            me.observe(
                Some(lease(Some("other"), "2")),
                t1 + Duration::from_secs(14)
            ),
            Step::Follow
        );
        assert_eq!(
            me.observe(
                Some(lease(Some("other"), "2")),
                t1 + Duration::from_secs(15)
            ),
            Step::Claim { renew: false },
            "unchanged for a whole lease duration on our clock"
        );
    }

    #[test]
    fn losing_the_lease_to_another_ends_leadership_at_once() {
        let t0 = Instant::now();
        let mut me = Elector::new("me", Duration::from_secs(10));
        me.observe(None, t0);
        me.claimed(t0);
        assert_eq!(
            me.observe(Some(lease(Some("other"), "5")), t0),
            Step::Follow
        );
        assert!(!me.is_leader(t0));
    }

    #[test]
    fn claims_count_transitions() {
        let config = ElectionConfig::new("me");
        let fresh = claimed_lease(&config, None, false);
        let spec = fresh.spec.clone().unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        let mut theirs = fresh.clone();
        theirs.spec.as_mut().unwrap().holder_identity = Some("other".into());
        let taken = claimed_lease(&config, Some(&theirs), false);
        assert_eq!(taken.spec.unwrap().lease_transitions, Some(1));
        let renewed = claimed_lease(&config, Some(&fresh), true);
        assert_eq!(renewed.spec.as_ref().unwrap().lease_transitions, Some(0));
        assert_eq!(renewed.spec.unwrap().acquire_time, spec.acquire_time);
    }
}
