//! Pending candidates, persisted per repository under `_ocigc/pending/<repo>.json`.
//!
//! A blob is deleted only if it was a candidate (unreferenced, past the grace period) at an
//! observation at least `--delay` earlier and at every observation since. Each real run
//! rewrites the file with exactly the candidates it saw, keeping their first-seen times, so a
//! blob that was referenced at any persisted observation starts over.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::report::timestamp;
use crate::store::{PutCondition, PutOutcome, Store, StoreError};

/// Version of the referrer scan's "not a referrer" verdict; flags written under another
/// version are ignored, so a scan that learns to parse more kinds reads every blob again.
pub const SCAN_VERSION: u32 = 1;

/// The key of a unit's pending state, from [`crate::namespace`] (which owns it).
pub use crate::namespace::pending_key;

/// One pending candidate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEntry {
    /// When it was first seen as a candidate (bucket clock, RFC 3339).
    pub first_seen: String,
    /// Its size when last seen.
    pub size: u64,
    /// The referrer scan read it, its content hashes to its digest, and it is no manifest with a
    /// `subject`: content-addressed, so that never changes and later scans need not read it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_a_referrer: bool,
}

/// The file's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingFile {
    /// Format version (1).
    pub version: u32,
    /// The repository.
    pub repository: String,
    /// The run that wrote it.
    pub run_id: String,
    /// When it was written (bucket clock).
    pub observed_at: String,
    /// The [`SCAN_VERSION`] its `not_a_referrer` flags were written under (0: none).
    #[serde(default)]
    pub scan_version: u32,
    /// Candidates by digest.
    pub candidates: BTreeMap<String, PendingEntry>,
}

/// Pending state as read from the store.
#[derive(Clone, Debug, Default)]
pub struct Pending {
    /// First-seen time by digest.
    pub first_seen: HashMap<Digest, SystemTime>,
    /// Candidates the referrer scan need not read again (see [`PendingEntry::not_a_referrer`]).
    pub not_referrers: HashSet<Digest>,
    /// ETag of the stored file; `None` when there is none.
    pub etag: Option<String>,
}

/// Largest pending-state object read (about a million candidates): ocigc writes these itself,
/// the cap only bounds memory against a damaged or hostile object, which then fails its
/// repository closed.
pub const MAX_STATE_SIZE: u64 = 256 * 1024 * 1024;

/// Reads a repository's pending state. A missing file is empty state; an unreadable one is
/// reported and treated as empty, which can only postpone deletions.
pub async fn read_pending(
    store: &dyn Store,
    repo: &str,
    warnings: &mut Vec<String>,
) -> Result<Pending, StoreError> {
    let key = pending_key(repo);
    let object = match store.get_capped(&key, MAX_STATE_SIZE).await {
        Ok(o) => o,
        Err(StoreError::NotFound { .. }) => return Ok(Pending::default()),
        Err(e) => return Err(e),
    };
    let mut pending = Pending {
        etag: object.etag,
        ..Pending::default()
    };
    match serde_json::from_slice::<PendingFile>(&object.body) {
        Ok(file) => {
            let flags_valid = file.scan_version == SCAN_VERSION;
            for (digest, entry) in file.candidates {
                let parsed =
                    Digest::parse(&digest).zip(humantime::parse_rfc3339(&entry.first_seen).ok());
                if let Some((d, t)) = parsed {
                    if flags_valid && entry.not_a_referrer {
                        pending.not_referrers.insert(d.clone());
                    }
                    pending.first_seen.insert(d, t);
                }
            }
        }
        Err(e) => warnings.push(format!("{key} is unreadable, starting over: {e}")),
    }
    Ok(pending)
}

/// One candidate to persist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The blob.
    pub digest: Digest,
    /// When it was first seen as a candidate.
    pub first_seen: SystemTime,
    /// Its size.
    pub size: u64,
    /// See [`PendingEntry::not_a_referrer`].
    pub not_a_referrer: bool,
}

/// Replaces a repository's pending state with `candidates` (deletes the file when empty).
/// Conditional on the ETag read earlier, so two writers can never interleave unnoticed;
/// returns false when the file changed underneath (the caller's lease was lost). Where the
/// file is deleted, `along` (other keys of the run's own, no longer needed) goes in the same
/// request; whether one of those could not be deleted does not count.
pub async fn write_pending(
    store: &dyn Store,
    repo: &str,
    run_id: &str,
    now: SystemTime,
    previous: &Pending,
    candidates: &[Candidate],
    along: &[String],
) -> Result<bool, StoreError> {
    let key = pending_key(repo);
    if candidates.is_empty() {
        if previous.etag.is_some() {
            let mut keys = vec![key.clone()];
            keys.extend(along.iter().cloned());
            let failures = store.delete_batch(&keys).await?;
            for f in failures.iter().filter(|f| f.key != key) {
                tracing::warn!(key = %f.key, error = %f.message, "not deleted with the pending state");
            }
            return Ok(failures.iter().all(|f| f.key != key));
        }
        return Ok(true);
    }
    let file = PendingFile {
        version: 1,
        repository: repo.to_string(),
        run_id: run_id.to_string(),
        observed_at: timestamp(now),
        scan_version: SCAN_VERSION,
        candidates: candidates
            .iter()
            .map(|c| {
                (
                    c.digest.to_string(),
                    PendingEntry {
                        first_seen: timestamp(c.first_seen),
                        size: c.size,
                        not_a_referrer: c.not_a_referrer,
                    },
                )
            })
            .collect(),
    };
    let body = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Request {
        op: crate::store::Op::Put,
        key: key.clone(),
        message: format!("serialising pending state: {e}"),
    })?;
    let condition = match &previous.etag {
        Some(etag) => PutCondition::IfMatch(etag.clone()),
        None => PutCondition::IfNoneMatch,
    };
    Ok(matches!(
        store.put(&key, Bytes::from(body), condition).await?,
        PutOutcome::Written { .. }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DirStore;

    fn digest(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    #[tokio::test]
    async fn not_a_referrer_flags_round_trip_under_the_current_scan_version_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DirStore::open(dir.path()).expect("store");
        let now = SystemTime::now();
        let candidates = [
            Candidate {
                digest: digest(1),
                first_seen: now,
                size: 1,
                not_a_referrer: true,
            },
            Candidate {
                digest: digest(2),
                first_seen: now,
                size: 1,
                not_a_referrer: false,
            },
        ];
        let empty = Pending::default();
        assert!(
            write_pending(&store, "app", "run", now, &empty, &candidates, &[])
                .await
                .expect("write")
        );
        let mut warnings = Vec::new();
        let read = read_pending(&store, "app", &mut warnings)
            .await
            .expect("read");
        assert_eq!(read.first_seen.len(), 2);
        assert_eq!(read.not_referrers, HashSet::from([digest(1)]));
        assert!(warnings.is_empty(), "{warnings:?}");

        // Written by a scan of another version: the verdicts are not trusted.
        let key = pending_key("app");
        let mut file: PendingFile =
            serde_json::from_slice(&store.get(&key).await.expect("get").body).expect("json");
        file.scan_version = SCAN_VERSION + 1;
        let body = serde_json::to_vec(&file).expect("json");
        store
            .put(&key, Bytes::from(body), PutCondition::None)
            .await
            .expect("put");
        let read = read_pending(&store, "app", &mut warnings)
            .await
            .expect("read");
        assert_eq!(read.first_seen.len(), 2);
        assert!(read.not_referrers.is_empty());
    }
}
