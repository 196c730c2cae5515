//! The closed-loop unary load generator: `concurrency` workers, each issuing one call after
//! another for a fixed time, over clients that the caller spread across connections.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use serde::Serialize;

use super::{procfs, stats::Latency};

/// One call: given the worker's index and its call counter, performs it.
pub type Op = Arc<dyn Fn(usize, u64) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// The shape of a unary run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Workers issuing calls at once.
    pub concurrency: usize,
    /// Calls before this are not counted.
    pub warmup: Duration,
    /// How long calls are counted.
    pub duration: Duration,
    /// Each worker's first call counter: runs of one case that must not repeat a call (new
    /// content) start apart.
    pub first_seq: u64,
}

/// What one unary run measured.
#[derive(Debug, Clone, Serialize)]
pub struct UnaryResult {
    /// Calls completed inside the measured window.
    pub ops: u64,
    /// Calls that failed (any time).
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Calls per second in the measured window.
    pub throughput: f64,
    /// Latency of the measured calls.
    pub latency: Latency,
    /// Server CPU microseconds per call in the measured window, when its pid was given.
    pub server_cpu_us_per_op: Option<f64>,
    /// This process's CPU microseconds per call in the same window: the generator's share of
    /// the cores it shares with the server.
    pub generator_cpu_us_per_op: Option<f64>,
}

/// How long a server's CPU time must stand still before a round starts.
pub const SETTLE_QUIET: Duration = Duration::from_millis(200);
/// The longest a round waits for the servers to settle.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(15);

/// Waits until the page cache's dirty pages are on disk and no server in `pids` is busy
/// (its CPU time moved by less than a clock tick over [`SETTLE_QUIET`]), for at most
/// [`SETTLE_LIMIT`]; returns how long it waited. Servers take turns on one disk and two
/// cores: what one leaves running after its round (etcd's snapshot every 100,000 writes,
/// our checkpoint of the last second) would otherwise fall into the next server's round.
pub async fn settle(pids: &[String]) -> Duration {
    let start = Instant::now();
    // Writes back every file system's dirty pages, both servers' and the previous round's.
    tokio::task::spawn_blocking(rustix::fs::sync).await.ok();
    let cpu = || -> Vec<f64> {
        pids.iter()
            .map(|pid| procfs::cpu_seconds(pid).unwrap_or(0.0))
            .collect()
    };
    let mut before = cpu();
    while start.elapsed() < SETTLE_LIMIT {
        tokio::time::sleep(SETTLE_QUIET).await;
        let after = cpu();
        if quiet(&before, &after) {
            break;
        }
        before = after;
    }
    start.elapsed()
}

/// Whether no process's CPU time moved by a clock tick (10 ms) or more.
fn quiet(before: &[f64], after: &[f64]) -> bool {
    before.iter().zip(after).all(|(b, a)| a - b < 0.01)
}

/// Runs `op` closed-loop with `shape`; `tick` is told the elapsed fraction now and then.
pub async fn run(
    shape: Shape,
    op: Op,
    server_pid: Option<String>,
    tick: impl Fn(f64) + Send + 'static,
) -> UnaryResult {
    let start = Instant::now();
    let measure_from = start + shape.warmup;
    let end = measure_from + shape.duration;
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(parking_lot::Mutex::new(None::<String>));
    let mut workers = Vec::with_capacity(shape.concurrency);
    for worker in 0..shape.concurrency {
        let op = op.clone();
        let errors = errors.clone();
        let first_error = first_error.clone();
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut seq = shape.first_seq;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let result = op(worker, seq).await;
                seq += 1;
                let done = Instant::now();
                match result {
                    Ok(()) if began >= measure_from && done <= end => {
                        samples.push(u64::try_from((done - began).as_micros()).unwrap_or(u64::MAX));
                    }
                    Ok(()) => {}
                    Err(error) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error
                            .lock()
                            .get_or_insert_with(|| format!("{error:#}"));
                        // Do not spin on a dead server.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            samples
        }));
    }
    let total = shape.warmup + shape.duration;
    let ticker = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            tick((start.elapsed().as_secs_f64() / total.as_secs_f64()).min(1.0));
        }
    });
    // Read the server's CPU and this process's at the edges of the measured window.
    let cpu = tokio::spawn(async move {
        let read = |pid: Option<&str>| pid.and_then(|pid| procfs::cpu_seconds(pid).ok());
        tokio::time::sleep_until(measure_from.into()).await;
        let before = (read(server_pid.as_deref()), read(Some("self")));
        tokio::time::sleep_until(end.into()).await;
        let after = (read(server_pid.as_deref()), read(Some("self")));
        let spent = |before: Option<f64>, after: Option<f64>| Some(after? - before?);
        (spent(before.0, after.0), spent(before.1, after.1))
    });
    let mut samples = Vec::new();
    for worker in workers {
        if let Ok(mut s) = worker.await {
            samples.append(&mut s);
        }
    }
    ticker.abort();
    let (server_cpu, generator_cpu) = cpu.await.unwrap_or_default();
    let ops = samples.len() as u64;
    let per_op = |cpu: Option<f64>| cpu.filter(|_| ops > 0).map(|s| s * 1e6 / ops as f64);
    let latency = Latency::of(&mut samples);
    UnaryResult {
        ops,
        errors: errors.load(Ordering::Relaxed),
        first_error: first_error.lock().clone(),
        throughput: ops as f64 / shape.duration.as_secs_f64(),
        latency,
        server_cpu_us_per_op: per_op(server_cpu),
        generator_cpu_us_per_op: per_op(generator_cpu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_means_less_than_a_tick_each() {
        assert!(quiet(&[1.0, 2.0], &[1.0, 2.0]));
        assert!(quiet(&[1.0], &[1.005]));
        assert!(!quiet(&[1.0, 2.0], &[1.0, 2.02]));
    }

    #[tokio::test]
    async fn an_idle_process_settles_at_once() {
        let mut sleeper = tokio::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = sleeper.id().unwrap().to_string();
        let waited = settle(&[pid]).await;
        sleeper.kill().await.unwrap();
        assert!(waited < SETTLE_LIMIT, "{waited:?}");
    }
}
