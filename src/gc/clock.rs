//! The bucket clock: ages are measured on the store's time, never the host's.
//!
//! A run writes a probe object, reads back its `LastModified`, and from then on adds the
//! monotonic time elapsed since that read. The host's wall clock is never consulted, so a pod
//! whose clock is hours off deletes exactly what a correct one would. The estimate errs late:
//! `LastModified` is stamped when the store received the PUT (before the HEAD returned) and
//! S3 truncates it to whole seconds, so blobs look younger, never older, than they are.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::time::Instant;

use crate::layout::STATE_PREFIX;
use crate::store::{PutCondition, Store, StoreError};

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
    /// The probe could not be written or read.
    #[error("probing the bucket clock")]
    Store(#[from] StoreError),
    /// The probe vanished between write and read.
    #[error("probing the bucket clock: probe object {0} vanished")]
    Vanished(String),
}

impl BucketClock {
    /// Reads the store's time through a probe object under `_ocigc/clock/`, removed again.
    pub async fn probe(store: &dyn Store, run_id: &str) -> Result<BucketClock, ClockError> {
        let key = format!("{STATE_PREFIX}clock/{run_id}");
        store
            .put(&key, Bytes::from_static(b"{}"), PutCondition::None)
            .await?;
        let meta = store.head(&key).await?;
        let probed = Instant::now();
        // A probe left behind by a crash is harmless: nothing reads it, the next run ignores it.
        let _ = store.delete_batch(std::slice::from_ref(&key)).await;
        let meta = meta.ok_or(ClockError::Vanished(key))?;
        Ok(BucketClock {
            at_probe: meta.last_modified,
            probed,
            offset: Duration::ZERO,
        })
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
