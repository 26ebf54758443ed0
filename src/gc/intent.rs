//! Push intents: a pusher's promise to reuse blobs, honoured as roots while unexpired.
//!
//! A pusher that is about to reuse blobs already in the bucket (skipping their upload because a
//! HEAD found them) first writes `_ocigc/intents/<repo>/<id>.json`:
//!
//! ```json
//! {"version": 1, "digests": ["sha256:…"], "ttl_seconds": 3600}
//! ```
//!
//! While `LastModified + ttl_seconds` (bucket clock) is in the future, every listed digest is a
//! root of the repository. The collector re-lists intents immediately before each delete batch,
//! so an intent written before the pusher's HEAD protects the blob. Expired intents are removed.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::manifest::Descriptor;
use crate::namespace::{self, Scope, StateKey};
use crate::store::{ObjectMeta, PutCondition, Store, StoreError};

/// Key builders of intents and announcements, from [`crate::namespace`] (which owns them).
pub use crate::namespace::{deleting_key, intents_prefix};

/// Longest lifetime honoured, whatever an intent asks for.
pub const MAX_INTENT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Largest intent read (tens of thousands of digests); a larger one fails its repository
/// closed, as an unreadable intent does.
pub const MAX_INTENT_SIZE: u64 = 1024 * 1024;

/// An intent as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Format version (1).
    pub version: u32,
    /// Digests the pusher will reference.
    pub digests: Vec<String>,
    /// Lifetime from the object's `LastModified`.
    pub ttl_seconds: u64,
}

/// Writes an intent for `repo` and returns its key. Remove it (or let it expire) once the
/// manifest that references the digests is written.
pub async fn write_intent(
    store: &dyn Store,
    repo: &str,
    digests: &[Digest],
    ttl: Duration,
) -> Result<String, StoreError> {
    let key = namespace::intent_key(repo, &uuid::Uuid::new_v4().to_string());
    let intent = Intent {
        version: 1,
        digests: digests.iter().map(Digest::to_string).collect(),
        ttl_seconds: ttl.as_secs().max(1),
    };
    let body = serde_json::to_vec(&intent).unwrap_or_default();
    store
        .put(&key, Bytes::from(body), PutCondition::IfNoneMatch)
        .await?;
    Ok(key)
}

/// Intents of one repository as read at one moment.
#[derive(Clone, Debug, Default)]
pub struct Intents {
    /// Roots contributed by unexpired intents.
    pub roots: Vec<Descriptor>,
    /// Keys of expired intents (to be removed).
    pub expired: Vec<String>,
}

/// Whether `key` is an intent `scope` honours: a repository's own (not a nested
/// repository's); every intent for the global blob space.
pub fn is_own_intent(scope: Scope<'_>, key: &str) -> bool {
    namespace::intent_scope_matches(scope, key)
}

/// Groups intent objects of a bucket listing by repository (other state keys are dropped).
pub fn by_repository(
    state: impl IntoIterator<Item = ObjectMeta>,
) -> std::collections::HashMap<String, Vec<ObjectMeta>> {
    let mut out: std::collections::HashMap<String, Vec<ObjectMeta>> = Default::default();
    for o in state {
        let repo = match namespace::classify(&o.key) {
            StateKey::Intent { repository, .. } if !repository.is_empty() => repository,
            _ => continue,
        };
        out.entry(repo.to_string()).or_default().push(o);
    }
    out
}

/// Lists the intents `scope` honours (one listing).
pub async fn list_intents(
    store: &dyn Store,
    scope: Scope<'_>,
) -> Result<Vec<ObjectMeta>, StoreError> {
    let prefix = namespace::intents_listing_prefix(scope);
    let pages: Vec<Vec<ObjectMeta>> = store.list(&prefix).try_collect().await?;
    Ok(pages
        .into_iter()
        .flatten()
        .filter(|o| is_own_intent(scope, &o.key))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_belong_to_their_own_repository() {
        let meta = |key: &str| ObjectMeta::new(key, 1, SystemTime::UNIX_EPOCH, None);
        let grouped = by_repository(
            [
                "_ocigc/intents/team/app/1.json",
                "_ocigc/intents/team/app/tools/2.json",
                "_ocigc/intents/team/app/3.txt",
                "_ocigc/pending/team/app.json",
            ]
            .map(meta),
        );
        assert_eq!(grouped["team/app"].len(), 1);
        assert_eq!(grouped["team/app/tools"].len(), 1);
        assert_eq!(grouped.len(), 2);
        let app = Scope::Repository("team/app");
        assert!(is_own_intent(app, "_ocigc/intents/team/app/1.json"));
        assert!(!is_own_intent(app, "_ocigc/intents/team/app/tools/2.json"));
        assert!(is_own_intent(
            Scope::Global,
            "_ocigc/intents/team/app/tools/2.json"
        ));
    }
}

/// Reads listed intents. An unreadable intent that is not yet past [`MAX_INTENT_TTL`] fails
/// the repository closed: it may protect anything.
pub async fn read_intents(
    store: &dyn Store,
    listed: &[ObjectMeta],
    now: SystemTime,
) -> Result<Intents, String> {
    let mut out = Intents::default();
    for meta in listed {
        let age = now
            .duration_since(meta.last_modified)
            .unwrap_or(Duration::ZERO);
        if age >= MAX_INTENT_TTL {
            out.expired.push(meta.key.clone());
            continue;
        }
        let body = match store.get_capped(&meta.key, MAX_INTENT_SIZE).await {
            Ok(o) => o.body,
            // Removed by its pusher since the listing: done with.
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(format!("cannot read intent {}: {e}", meta.key)),
        };
        let intent: Intent = serde_json::from_slice(&body)
            .map_err(|e| format!("intent {} is unreadable: {e}", meta.key))?;
        let ttl = Duration::from_secs(intent.ttl_seconds).min(MAX_INTENT_TTL);
        if age >= ttl {
            out.expired.push(meta.key.clone());
            continue;
        }
        for raw in &intent.digests {
            let digest = Digest::parse(raw)
                .ok_or_else(|| format!("intent {} names an invalid digest {raw:?}", meta.key))?;
            out.roots.push(Descriptor {
                media_type: None,
                digest,
                size: None,
            });
        }
    }
    Ok(out)
}

/// A deletion announcement: the digests of the batch in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleting {
    /// The collecting run.
    pub run_id: String,
    /// Digests that may be deleted until the announcement is removed.
    pub digests: Vec<String>,
    /// After this (bucket clock, RFC 3339) the announcement is stale: its writer died.
    pub expires_at: String,
}

/// Announces a batch (written before the collector's last intent check, removed after the
/// delete returns; after a sweep's last batch, together with the pending state where that
/// is removed too). Together with [`begin_reuse`] this is a two-sided handshake: of a pusher
/// and a collector acting at the same moment, at least one sees the other's object.
pub async fn announce_deletion(
    store: &dyn Store,
    repo: &str,
    run_id: &str,
    digests: &[&Digest],
    expires_at: SystemTime,
) -> Result<(), StoreError> {
    let body = Deleting {
        run_id: run_id.to_string(),
        digests: digests.iter().map(|d| d.to_string()).collect(),
        expires_at: crate::report::timestamp(expires_at),
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    store
        .put(&deleting_key(repo), Bytes::from(body), PutCondition::None)
        .await
        .map(|_| ())
}

/// Removes a batch announcement.
pub async fn clear_deletion(store: &dyn Store, repo: &str) -> Result<(), StoreError> {
    store.delete_batch(&[deleting_key(repo)]).await.map(|_| ())
}

/// Why [`begin_reuse`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum ReuseError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A collector kept deleting some of the digests for longer than the wait allowed.
    #[error("a collector is deleting {0} in {1}; gave up waiting (intent {2} left to expire)")]
    Busy(String, String, String),
}

/// The pusher's side of the protocol, to call before relying on blobs already in the bucket:
/// writes an intent for `digests`, then waits (at most `wait`) while a collector's batch in
/// flight names any of them. When it returns `Ok(key)`, HEAD the blobs: those present stay
/// until the intent expires or is removed (delete `key` once the manifest is written); upload
/// those that are missing. Name every digest the new manifest relies on, including the config
/// and layers under a reused manifest: the wait covers named digests only.
pub async fn begin_reuse(
    store: &dyn Store,
    repo: &str,
    digests: &[Digest],
    ttl: Duration,
    wait: Duration,
) -> Result<String, ReuseError> {
    let key = write_intent(store, repo, digests, ttl).await?;
    // The intent's LastModified is "now" on the bucket clock, to judge stale announcements.
    let written = store.head(&key).await?.map(|m| m.last_modified);
    let wanted: std::collections::HashSet<String> = digests.iter().map(Digest::to_string).collect();
    let started = tokio::time::Instant::now();
    loop {
        // Shared blobs (the distribution layout) are deleted under the global announcement.
        let mut conflict = None;
        for announcement in [deleting_key(repo), deleting_key(Scope::Global.name())] {
            let announced = match store.get(&announcement).await {
                Ok(o) => serde_json::from_slice::<Deleting>(&o.body).ok(),
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            conflict = conflict.or(announced.and_then(|a| {
                let expires = humantime::parse_rfc3339(&a.expires_at).ok();
                let stale =
                    matches!((written, expires), (Some(w), Some(e)) if w + started.elapsed() > e);
                let hit = a.digests.into_iter().find(|d| wanted.contains(d));
                if stale {
                    None
                } else {
                    hit
                }
            }));
        }
        let Some(digest) = conflict else {
            return Ok(key);
        };
        if started.elapsed() >= wait {
            return Err(ReuseError::Busy(digest, repo.to_string(), key));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
