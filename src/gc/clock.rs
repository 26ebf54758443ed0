//! The bucket clock: ages are measured on the store's time, never the host's.
//!
//! A run reads the store's time from a response (the `Date` header of its first LIST's answer
//! where the store keeps it, else of a HEAD that writes nothing, so a dry run works with
//! read-only credentials) and from then on adds the monotonic time elapsed since that answer
//! arrived. The host's wall clock is never consulted, so a pod
//! whose clock is hours off deletes exactly what a correct one would. The estimate errs late:
//! the store stamps `Date` before the answer arrives and truncates it to whole seconds, so
//! blobs look younger, never older, than they are.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::store::{Store, StoreError};

/// The store's current time.
#[derive(Clone, Copy, Debug)]
pub struct BucketClock {
    at_probe: SystemTime,
    probed: Instant,
    offset: Duration,
}

/// Why the store's time could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// The store's time could not be read.
    #[error("reading the bucket clock")]
    Store(#[from] StoreError),
}

impl BucketClock {
    /// Reads the store's time with one read request ([`Store::server_time`]).
    pub async fn probe(store: &dyn Store) -> Result<BucketClock, ClockError> {
        let at_probe = store.server_time().await?;
        Ok(BucketClock {
            at_probe,
            probed: Instant::now(),
            offset: Duration::ZERO,
        })
    }

    /// The clock an answer already received gives: the store said `date` in the answer that
    /// arrived at `arrived` ([`crate::store::Store::answered_time`]).
    pub fn answered_at(date: SystemTime, arrived: Instant) -> BucketClock {
        BucketClock {
            at_probe: date,
            probed: arrived,
            offset: Duration::ZERO,
        }
    }

    /// A clock that reads `t` now (for planning tests).
    pub fn fixed_at(t: SystemTime) -> BucketClock {
        BucketClock {
            at_probe: t,
            probed: Instant::now(),
            offset: Duration::ZERO,
        }
    }

    /// The same clock, `offset` ahead: used to simulate the passage of time in tests and drills.
    pub fn ahead_by(self, offset: Duration) -> BucketClock {
        BucketClock {
            offset: self.offset + offset,
            ..self
        }
    }

    /// The store's time now.
    pub fn now(&self) -> SystemTime {
        self.at_probe + self.probed.elapsed() + self.offset
    }
}
