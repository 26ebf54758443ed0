//! Leases: one collector per repository at a time.
//!
//! A lease is an object `_ocigc/leases/<repo>.json` naming its owner and expiry (bucket clock).
//! It is created with `If-None-Match: *`, renewed and taken over only with `If-Match` on the
//! ETag last seen, so of two collectors racing for it exactly one wins. The holder renews it
//! before a delete batch once half its time is used; a renewal that fails means another
//! collector took it over, and work on the repository stops before the next batch.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::clock::BucketClock;
use crate::report::timestamp;
use crate::store::{PutCondition, PutOutcome, Store, StoreError};

/// The key of a unit's lease, from [`crate::namespace`] (which owns it).
pub use crate::namespace::lease_key;

#[derive(Debug, Serialize, Deserialize)]
struct LeaseFile {
    owner: String,
    repository: String,
    acquired_at: String,
    expires_at: String,
}

/// A lease this run holds.
#[derive(Debug)]
pub struct Lease {
    key: String,
    repo: String,
    etag: String,
    acquired_at: SystemTime,
    expires_at: SystemTime,
    lost: bool,
    /// The owner of the expired lease this one replaced: a collector that died holding it.
    pub taken_over_from: Option<String>,
}

impl Lease {
    /// True once a renewal found the lease taken over.
    pub fn is_lost(&self) -> bool {
        self.lost
    }
}

/// Outcome of trying to take a lease.
#[derive(Debug)]
pub enum Acquired {
    /// The lease is ours.
    Ours(Lease),
    /// Another collector holds it.
    Held {
        /// Its owner, as written in the lease.
        owner: String,
        /// When it expires (RFC 3339), as written.
        expires_at: String,
    },
}

/// The lease was lost: another collector took it over.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Taken over by someone else.
    #[error("lease {0} was taken over by another collector")]
    Lost(String),
    /// The store failed while renewing.
    #[error("renewing lease: {0}")]
    Store(#[from] StoreError),
}

/// Takes, renews and releases leases for one run.
pub struct Leases<'a> {
    /// The store.
    pub store: &'a dyn Store,
    /// The bucket clock.
    pub clock: BucketClock,
    /// This run's id, written as the owner.
    pub owner: String,
    /// How long a lease lasts without renewal.
    pub ttl: Duration,
}

impl Leases<'_> {
    fn body(&self, repo: &str, acquired_at: SystemTime, expires_at: SystemTime) -> Bytes {
        let file = LeaseFile {
            owner: self.owner.clone(),
            repository: repo.to_string(),
            acquired_at: timestamp(acquired_at),
            expires_at: timestamp(expires_at),
        };
        Bytes::from(serde_json::to_vec(&file).unwrap_or_default())
    }

    /// Tries to take the lease of `repo`: create it, or take over an expired one.
    pub async fn acquire(&self, repo: &str) -> Result<Acquired, StoreError> {
        let key = lease_key(repo);
        let now = self.clock.now();
        let expires_at = now + self.ttl;
        let body = self.body(repo, now, expires_at);
        // The common case costs one request: nobody holds the lease.
        if let PutOutcome::Written { etag } = self
            .store
            .put(&key, body.clone(), PutCondition::IfNoneMatch)
            .await?
        {
            return Ok(Acquired::Ours(
                self.lease(&key, repo, etag, now, expires_at),
            ));
        }
        let current = match self.store.get(&key).await {
            Ok(c) => c,
            // Released between our two requests: the next run will find it free.
            Err(StoreError::NotFound { .. }) => return Ok(raced()),
            Err(e) => return Err(e),
        };
        let parsed = serde_json::from_slice::<LeaseFile>(&current.body).ok();
        let live = parsed.as_ref().and_then(|f| {
            let until = humantime::parse_rfc3339(&f.expires_at).ok()?;
            (until > now && f.owner != self.owner).then_some(f)
        });
        if let Some(f) = live {
            return Ok(Acquired::Held {
                owner: f.owner.clone(),
                expires_at: f.expires_at.clone(),
            });
        }
        // Expired, unreadable or our own: take it over, but only if nobody else does first.
        let etag = current.etag.ok_or_else(|| no_etag(&key))?;
        match self
            .store
            .put(&key, body, PutCondition::IfMatch(etag))
            .await?
        {
            PutOutcome::Written { etag } => {
                let mut lease = self.lease(&key, repo, etag, now, expires_at);
                lease.taken_over_from =
                    parsed.map(|f| f.owner).filter(|owner| *owner != self.owner);
                Ok(Acquired::Ours(lease))
            }
            PutOutcome::PreconditionFailed => Ok(raced()),
        }
    }

    fn lease(
        &self,
        key: &str,
        repo: &str,
        etag: String,
        acquired_at: SystemTime,
        expires_at: SystemTime,
    ) -> Lease {
        Lease {
            key: key.to_string(),
            repo: repo.to_string(),
            etag,
            acquired_at,
            expires_at,
            lost: false,
            taken_over_from: None,
        }
    }

    /// Renews `lease` if half of its time is used; fails if it was taken over.
    pub async fn keep(&self, lease: &mut Lease) -> Result<(), LeaseError> {
        let now = self.clock.now();
        if now + self.ttl / 2 < lease.expires_at {
            return Ok(());
        }
        let expires_at = now + self.ttl;
        let body = self.body(&lease.repo, lease.acquired_at, expires_at);
        match self
            .store
            .put(&lease.key, body, PutCondition::IfMatch(lease.etag.clone()))
            .await?
        {
            PutOutcome::Written { etag } => {
                lease.etag = etag;
                lease.expires_at = expires_at;
                Ok(())
            }
            PutOutcome::PreconditionFailed => {
                lease.lost = true;
                Err(LeaseError::Lost(lease.key.clone()))
            }
        }
    }

    /// Releases `lease` (best effort: an unreleased lease simply expires). A lost lease is left
    /// to its new holder. While clearly unexpired nobody else can hold it, so it is deleted;
    /// near or past its expiry it is only marked expired, conditionally on its ETag.
    pub async fn release(&self, lease: Lease) {
        if lease.lost {
            return;
        }
        let now = self.clock.now();
        let margin = (self.ttl / 4).min(Duration::from_secs(30));
        let result = if now + margin < lease.expires_at {
            self.store
                .delete_batch(std::slice::from_ref(&lease.key))
                .await
                .map(|_| ())
        } else {
            let body = self.body(&lease.repo, lease.acquired_at, now);
            self.store
                .put(&lease.key, body, PutCondition::IfMatch(lease.etag.clone()))
                .await
                .map(|_| ())
        };
        if let Err(e) = result {
            tracing::warn!(lease = %lease.key, error = %e, "could not release lease; it will expire");
        }
    }
}

fn raced() -> Acquired {
    Acquired::Held {
        owner: "another collector (lost the race for it)".into(),
        expires_at: "unknown".into(),
    }
}

fn no_etag(key: &str) -> StoreError {
    StoreError::Request {
        op: crate::store::Op::Get,
        key: key.to_string(),
        message: "the store returned no ETag; leases need conditional writes".into(),
    }
}
