//! Jittered exponential back-off between reconnection attempts. Pure: the caller supplies the
//! random number, so the schedule is tested without a clock or a random source.

use std::time::Duration;

/// A back-off schedule: `initial * multiplier^attempt`, capped at `max`, with "full jitter"
/// over its upper `jitter` fraction (AWS's "Exponential Backoff And Jitter"), so clients that
/// lost the same server do not reconnect in lock-step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first delay (default 100 ms).
    pub initial: Duration,
    /// The longest delay (default 30 s).
    pub max: Duration,
    /// Growth per attempt (default 2).
    pub multiplier: f64,
    /// The fraction of each delay that is random, in `[0, 1]` (default 0.5: a delay of `d`
    /// becomes a uniform value in `[d/2, d]`).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0 for the first retry), given `random` uniform in
    /// `[0, 1)`.
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let exponent = i32::try_from(attempt.min(64)).unwrap_or(64);
        let ceiling = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let ceiling = ceiling.min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let random = random.clamp(0.0, 1.0);
        let seconds = ceiling * (1.0 - jitter * random);
        Duration::try_from_secs_f64(seconds).unwrap_or(self.max)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let backoff = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        assert_eq!(backoff.delay(0, 0.7), Duration::from_millis(100));
        assert_eq!(backoff.delay(1, 0.7), Duration::from_millis(200));
        assert_eq!(backoff.delay(3, 0.7), Duration::from_millis(800));
        assert_eq!(backoff.delay(30, 0.7), Duration::from_secs(30));
        assert_eq!(backoff.delay(u32::MAX, 0.7), Duration::from_secs(30));
    }

    #[test]
    fn jitter_spreads_below_the_ceiling() {
        let backoff = Backoff::default();
        assert_eq!(backoff.delay(2, 0.0), Duration::from_millis(400));
        assert_eq!(backoff.delay(2, 1.0), Duration::from_millis(200));
    }

    proptest! {
        #[test]
        fn always_within_bounds(attempt in 0u32..200, random in 0.0f64..1.0, jitter in 0.0f64..1.0) {
            let backoff = Backoff { jitter, ..Backoff::default() };
            let delay = backoff.delay(attempt, random);
            prop_assert!(delay <= backoff.max);
            prop_assert!(delay >= backoff.initial.mul_f64(1.0 - jitter) - Duration::from_micros(1));
        }
    }
}
