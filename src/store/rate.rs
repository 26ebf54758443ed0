//! The request-rate limit (`--max-requests-per-second`) and the back-off after throttling
//! answers, both applied by [`super::Instrumented`] to every request.
//!
//! The limiter is `governor`'s GCRA on tokio's clock, so that waiting for it is an ordinary
//! tokio sleep (cancelled with its request, and virtual under a paused test clock).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Tokio's clock as a `governor` clock: time since the limiter was made.
#[derive(Clone, Copy, Debug)]
struct TokioClock {
    start: tokio::time::Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.start)
    }
}

/// At most N requests per second, with a burst of at most one second's worth: one limiter
/// is shared by every request of a run, or of every run and job of the daemon.
pub struct RateLimit {
    limiter: RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>,
    clock: TokioClock,
    per_second: NonZeroU32,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RateLimit({}/s)", self.per_second)
    }
}

impl RateLimit {
    /// `per_second` requests per second at most.
    pub fn per_second(per_second: NonZeroU32) -> RateLimit {
        let clock = TokioClock {
            start: tokio::time::Instant::now(),
        };
        RateLimit {
            limiter: RateLimiter::direct_with_clock(Quota::per_second(per_second), clock),
            clock,
            per_second,
        }
    }

    /// The configured rate.
    pub fn rate(&self) -> NonZeroU32 {
        self.per_second
    }

    /// Waits until one more request may be sent.
    pub async fn acquire(&self) {
        while let Err(not_until) = self.limiter.check() {
            tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
        }
    }
}

/// The first back-off after a throttling answer; each further one doubles, up to
/// [`BACKOFF_CAP`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// The longest back-off between two attempts of one request.
pub const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// The wait before attempt `retry` (1 for the first retry) of a throttled request:
/// "full jitter", uniform in `[0, min(cap, base * 2^(retry-1))]`, so that many requests
/// throttled at once do not come back at once.
pub fn backoff(retry: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_limiter_bounds_the_rate_on_a_virtual_clock() {
        let limit = RateLimit::per_second(NonZeroU32::new(10).expect("non-zero"));
        let start = tokio::time::Instant::now();
        // One second's burst goes at once, then one request every 100 ms.
        for _ in 0..10 {
            limit.acquire().await;
        }
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the burst waits for nothing"
        );
        for _ in 0..30 {
            limit.acquire().await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_millis(3100),
            "40 requests at 10/s with a burst of 10 take 3 s, took {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_limit() {
        let limit =
            std::sync::Arc::new(RateLimit::per_second(NonZeroU32::new(5).expect("non-zero")));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (limit, done) = (limit.clone(), done.clone());
                tokio::spawn(async move {
                    for _ in 0..10 {
                        limit.acquire().await;
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                })
            })
            .collect();
        // At 2 s of virtual time, at most the burst (5) and 2 s of rate (10) have gone out.
        tokio::time::sleep(Duration::from_millis(2050)).await;
        let by_two_seconds = done.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            (14..=15).contains(&by_two_seconds),
            "{by_two_seconds} requests by 2 s at 5/s (burst 5)"
        );
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 40);
    }

    #[test]
    fn backoff_is_jittered_below_a_doubling_ceiling() {
        for retry in 1..20 {
            let ceiling = (BACKOFF_BASE * 2u32.pow((retry - 1).min(16))).min(BACKOFF_CAP);
            for _ in 0..50 {
                assert!(backoff(retry) <= ceiling);
            }
        }
        // Not a constant: 200 draws below 10 s are not all equal.
        let draws: std::collections::HashSet<Duration> = (0..200).map(|_| backoff(10)).collect();
        assert!(draws.len() > 1);
    }
}
