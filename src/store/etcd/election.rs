//! The sweeper election of the etcd backend: one replica at a time sweeps expired records.
//!
//! Built on etcd's own election API (`v3election`): each replica grants a lease of
//! [`LEASE_TTL`], keeps it alive every third of it, and campaigns under
//! `<prefix>.sweeper-election` (beside the records, not under them) with that lease. etcd
//! makes the oldest live campaign the leader; when the leader's lease ends (the replica
//! stopped, crashed or lost etcd for a whole TTL) the next one takes over. A stopping replica revokes its lease, so the hand-over is
//! immediate.
//!
//! Correctness does not rest on the election: sweeper deletes compare `mod_revision`, so two
//! replicas that both believe they lead for a moment (one partitioned from etcd until its
//! lease times out) delete nothing twice and never delete a refreshed record. The election
//! only keeps N replicas from doing the same deletes N times.

use std::time::Duration;

use etcd_client::{Client, ElectionClient, LeaseClient};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long a replica's campaign outlives its last keep-alive.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// Pause before campaigning again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// Campaigns until `stop`, telling `leading` whether this replica is the sweeper.
pub(super) async fn run(
    client: Client,
    name: String,
    identity: String,
    leading: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let mut election = client.election_client();
    let mut leases = client.lease_client();
    loop {
        if stop.is_cancelled() {
            return;
        }
        // Not raced against `stop`: a stopping term still revokes its lease.
        let outcome = term(
            &mut election,
            &mut leases,
            &name,
            &identity,
            &leading,
            &stop,
        )
        .await;
        leading.send_replace(false);
        match outcome {
            Ok(()) => return,
            Err(reason) => {
                warn!(error = %reason, "sweeper election: campaign lost; campaigning again");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// One lease: campaign, lead while the lease lives. `Ok` when stopped, `Err` when the lease
/// or the campaign failed.
async fn term(
    election: &mut ElectionClient,
    leases: &mut LeaseClient,
    name: &str,
    identity: &str,
    leading: &watch::Sender<bool>,
    stop: &CancellationToken,
) -> Result<(), String> {
    let ttl = i64::try_from(LEASE_TTL.as_secs()).unwrap_or(10);
    let granted = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        granted = tokio::time::timeout(LEASE_TTL, leases.grant(ttl, None)) => granted,
    };
    let lease = granted
        .map_err(|_| "etcd did not grant a lease in time".to_string())?
        .map_err(|e| format!("granting a lease: {e}"))?
        .id();
    let result = lead(election, leases, lease, name, identity, leading, stop).await;
    // Stopping or failing: give the lease up so another replica takes over at once (best
    // effort; etcd expires it anyway).
    let _ = tokio::time::timeout(Duration::from_secs(2), leases.revoke(lease)).await;
    result
}

async fn lead(
    election: &mut ElectionClient,
    leases: &mut LeaseClient,
    lease: i64,
    name: &str,
    identity: &str,
    leading: &watch::Sender<bool>,
    stop: &CancellationToken,
) -> Result<(), String> {
    let (mut keeper, mut acks) = leases
        .keep_alive(lease)
        .await
        .map_err(|e| format!("keeping the lease alive: {e}"))?;
    let mut campaign_election = election.clone();
    let campaign = campaign_election.campaign(name, identity, lease);
    tokio::pin!(campaign);
    let mut campaigning = true;
    let mut tick = tokio::time::interval(LEASE_TTL / 3);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            won = &mut campaign, if campaigning => {
                campaigning = false;
                won.map_err(|e| format!("campaigning: {e}"))?;
                info!(lease, "sweeper election: this replica sweeps expired records");
                leading.send_replace(true);
            }
            _ = tick.tick() => {
                tokio::time::timeout(LEASE_TTL / 3, keeper.keep_alive())
                    .await
                    .map_err(|_| "etcd did not take a keep-alive".to_string())?
                    .map_err(|e| format!("keeping the lease alive: {e}"))?;
                match tokio::time::timeout(LEASE_TTL / 3, acks.message()).await {
                    Ok(Ok(Some(ack))) if ack.ttl() > 0 => debug!(lease, ttl = ack.ttl(), "sweeper lease kept"),
                    Ok(Ok(Some(_))) => return Err("the lease expired".into()),
                    Ok(Ok(None)) => return Err("the keep-alive stream ended".into()),
                    Ok(Err(e)) => return Err(format!("keeping the lease alive: {e}")),
                    Err(_) => return Err("etcd did not answer a keep-alive".into()),
                }
            }
        }
    }
}
