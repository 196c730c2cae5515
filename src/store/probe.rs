//! Readiness of a remote backend (etcd, the Kubernetes API server) from the answers to its
//! requests, kept current by a probe.
//!
//! A backend that hangs keeps its watch connection open until a keep-alive expires, so the
//! watch alone notices late; a replica with no traffic makes no request that could fail. So
//! every request's outcome is recorded in [`Failing`], and [`run`] asks the backend something
//! cheap every [`PROBE_INTERVAL`] whatever the traffic. `ready()` reads [`Failing`] and never
//! waits on the backend.

use parking_lot::Mutex;
use tokio::time::{Duration, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{Error, Result};

/// How often the probe asks the backend.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Since when and why something about the backend fails: its requests fail with
/// [`Error::Unavailable`] (what [`record`](Failing::record) follows), or a watch is not
/// following it; empty once it works again.
#[derive(Debug, Default)]
pub(crate) struct Failing(Mutex<Option<(Instant, String)>>);

impl Failing {
    /// Records a request's outcome: unavailable marks the backend failing (keeping since
    /// when), a success clears it, and other errors (an answer refusing the request) leave it.
    pub(crate) fn record<T>(&self, result: &Result<T>) {
        match result {
            Ok(_) => {
                self.clear();
            }
            Err(Error::Unavailable(reason)) => {
                self.fail(reason.clone());
            }
            Err(_) => {}
        }
    }

    /// Marks it failing for `reason`, keeping since when it already was; true when it was not.
    pub(crate) fn fail(&self, reason: String) -> bool {
        let mut failing = self.0.lock();
        let (since, newly) = match failing.as_ref() {
            Some((since, _)) => (*since, false),
            None => (Instant::now(), true),
        };
        *failing = Some((since, reason));
        newly
    }

    /// Marks it working; how long it had failed, when it had.
    pub(crate) fn clear(&self) -> Option<Duration> {
        self.0.lock().take().map(|(since, _)| since.elapsed())
    }

    /// How long it has failed, and the last reason; `None` while it works.
    pub(crate) fn failing(&self) -> Option<(Duration, String)> {
        let failing = self.0.lock();
        let (since, reason) = failing.as_ref()?;
        Some((since.elapsed(), reason.clone()))
    }

    /// Fails with [`Error::Unavailable`] naming `backend` while requests fail.
    pub(crate) fn check(&self, backend: &str) -> Result<()> {
        match self.failing() {
            None => Ok(()),
            Some((failed_for, reason)) => Err(Error::Unavailable(format!(
                "requests to {backend} failing for {failed_for:.1?}: {reason}"
            ))),
        }
    }
}

/// Calls `ask` every [`PROBE_INTERVAL`] until `stop`, recording each outcome in `failing`. A
/// call is bounded by the backend's own request timeout, inside `ask`. Any error of the probe
/// counts as failing: a refused probe (credentials revoked, permission taken away) means the
/// store's own requests are refused too.
pub(crate) async fn run<F, Fut>(failing: &Failing, stop: CancellationToken, mut ask: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut every = tokio::time::interval(PROBE_INTERVAL);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            answer = ask() => answer,
        };
        failing.record(&answer.map_err(|e| match e {
            Error::Unavailable(_) => e,
            other => Error::Unavailable(other.to_string()),
        }));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    fn unavailable(reason: &str) -> Result<()> {
        Err(Error::Unavailable(reason.into()))
    }

    #[test]
    fn failing_keeps_the_first_failure_time_and_the_last_reason() {
        let failing = Failing::default();
        failing.check("etcd").unwrap();
        failing.record(&unavailable("timed out"));
        let first = failing.0.lock().as_ref().unwrap().0;
        failing.record(&unavailable("connection refused"));
        let (since, reason) = failing.0.lock().clone().unwrap();
        assert_eq!(since, first);
        assert_eq!(reason, "connection refused");
        let Err(Error::Unavailable(message)) = failing.check("etcd") else {
            panic!("ready while failing");
        };
        assert!(
            message.starts_with("requests to etcd failing for "),
            "{message}"
        );
        assert!(message.ends_with(": connection refused"), "{message}");
    }

    #[test]
    fn fail_says_when_it_starts_and_clear_how_long_it_lasted() {
        let failing = Failing::default();
        assert_eq!(failing.clear(), None);
        assert!(failing.fail("watch lost".into()));
        assert!(!failing.fail("still lost".into()));
        assert_eq!(failing.failing().unwrap().1, "still lost");
        assert!(failing.clear().is_some());
        assert_eq!(failing.failing(), None);
        failing.check("etcd").unwrap();
    }

    #[test]
    fn a_refusal_is_an_answer_and_changes_nothing_a_success_clears() {
        let failing = Failing::default();
        failing.record::<()>(&Err(Error::Rejected("no such namespace".into())));
        failing.check("etcd").unwrap();
        failing.record(&unavailable("timed out"));
        failing.record::<()>(&Err(Error::Storage("bad".into())));
        assert!(failing.check("etcd").is_err());
        failing.record(&Ok(()));
        failing.check("etcd").unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_asks_every_interval_records_and_stops() {
        let failing = Arc::new(Failing::default());
        let asked = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (failing, asked, stop) = (failing.clone(), asked.clone(), stop.clone());
            async move {
                run(&failing, stop, || {
                    let n = asked.fetch_add(1, Ordering::SeqCst);
                    async move {
                        match n {
                            0 | 1 => unavailable("hung"),
                            2 => Err(Error::Storage("permission denied".into())),
                            _ => Ok(()),
                        }
                    }
                })
                .await;
            }
        });
        // The first tick is at once; then one per interval.
        tokio::time::sleep(PROBE_INTERVAL * 2 + PROBE_INTERVAL / 2).await;
        assert_eq!(asked.load(Ordering::SeqCst), 3);
        let Err(Error::Unavailable(reason)) = failing.check("etcd") else {
            panic!("ready after a refused probe");
        };
        assert!(reason.ends_with("permission denied"), "{reason}");
        tokio::time::sleep(PROBE_INTERVAL).await;
        assert_eq!(asked.load(Ordering::SeqCst), 4);
        failing.check("etcd").unwrap();
        stop.cancel();
        task.await.unwrap();
        tokio::time::sleep(PROBE_INTERVAL * 3).await;
        assert_eq!(asked.load(Ordering::SeqCst), 4);
    }
}
