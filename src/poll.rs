//! Polling on a fixed interval, for the files the server follows (TLS material, token,
//! policy and admin token files, the Pixiu and Envoy configuration directories).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runs `f` every `interval`, the first time at once, until `shutdown`. A tick missed while
/// `f` ran (or the process was stopped) is not made up: the next one comes `interval` later.
pub async fn every(interval: Duration, shutdown: &CancellationToken, mut f: impl FnMut()) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => f(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn runs_at_once_then_every_interval_until_shutdown() {
        let shutdown = CancellationToken::new();
        let mut runs = Vec::new();
        let started = tokio::time::Instant::now();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            stop.cancel();
        });
        every(Duration::from_millis(100), &shutdown, || {
            runs.push(started.elapsed().as_millis())
        })
        .await;
        assert_eq!(runs, [0, 100, 200]);
    }
}
