//! Per-identity publish rate limits: a token bucket per principal.
//!
//! [`TokenBucket`] is pure (the caller passes the time); [`RateLimiter`] keeps one per
//! principal, bounded in number so a stream of new identities cannot grow it without limit.

use std::{collections::HashMap, time::Duration};

use parking_lot::Mutex;
use tokio::time::Instant;

/// Publish rate of one identity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second (sustained publishes per second).
    pub per_second: f64,
    /// Bucket size: publishes allowed in a burst.
    pub burst: u32,
}

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            tokens: f64::from(rate.burst),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * self.rate.per_second).min(f64::from(self.rate.burst));
        self.updated = now;
    }

    /// Takes one token at `now`, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.rate.per_second <= 0.0 {
            Err(Duration::MAX)
        } else {
            let wait = (1.0 - self.tokens) / self.rate.per_second;
            Err(Duration::from_secs_f64(wait.min(86_400.0)).max(Duration::from_millis(1)))
        }
    }

    /// Whether the bucket is full at `now` (so forgetting it changes nothing).
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= f64::from(self.rate.burst)
    }
}

/// Token buckets by principal.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Option<Rate>,
    max_principals: usize,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl RateLimiter {
    /// A limiter at `rate` per principal (`None`: unlimited), tracking at most
    /// `max_principals` principals at once.
    pub fn new(rate: Option<Rate>, max_principals: usize) -> Self {
        Self {
            rate,
            max_principals: max_principals.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of `principal`'s bucket, or says how long to wait.
    pub fn check(&self, principal: &str, now: Instant) -> Result<(), Duration> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let mut buckets = self.buckets.lock();
        if !buckets.contains_key(principal) && buckets.len() >= self.max_principals {
            // Full buckets hold no information: forget them first.
            buckets.retain(|_, bucket| !bucket.is_full(now));
            if buckets.len() >= self.max_principals {
                // Still full: every tracked principal is publishing. A newcomer shares the
                // fate of the busiest rather than growing the map.
                return Err(Duration::from_secs(1));
            }
        }
        buckets
            .entry(principal.to_string())
            .or_insert_with(|| TokenBucket::new(rate, now))
            .try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_refills_at_its_rate() {
        let rate = Rate {
            per_second: 2.0,
            burst: 3,
        };
        let mut bucket = TokenBucket::new(rate, Instant::now());
        for _ in 0..3 {
            bucket.try_take(Instant::now()).unwrap();
        }
        let wait = bucket.try_take(Instant::now()).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(bucket.try_take(Instant::now()).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        bucket.try_take(Instant::now()).unwrap();
        // A long pause refills only up to the burst.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            bucket.try_take(Instant::now()).unwrap();
        }
        assert!(bucket.try_take(Instant::now()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_is_per_principal_and_bounded() {
        let limiter = RateLimiter::new(
            Some(Rate {
                per_second: 1.0,
                burst: 1,
            }),
            2,
        );
        let now = Instant::now();
        limiter.check("a", now).unwrap();
        assert!(limiter.check("a", now).is_err());
        limiter.check("b", now).unwrap();
        // Both tracked buckets are empty: a third principal is refused, not tracked.
        assert!(limiter.check("c", now).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        // Now a and b are full again and are forgotten to make room.
        limiter.check("c", Instant::now()).unwrap();
        assert!(RateLimiter::new(None, 1).check("x", now).is_ok());
    }
}
