//! Pending candidates, persisted per repository under `_ocigc/pending/<repo>.json`.
//!
//! A blob is deleted only if it was a candidate (unreferenced, past the grace period) at an
//! observation at least `--delay` earlier and at every observation since. Each real run
//! rewrites the file with exactly the candidates it saw, keeping their first-seen times, so a
//! blob that was referenced at any persisted observation starts over.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::layout::STATE_PREFIX;
use crate::report::timestamp;
use crate::store::{PutCondition, PutOutcome, Store, StoreError};

/// Where pending state lives.
pub const PENDING_PREFIX: &str = "_ocigc/pending/";

/// The key of a repository's pending state.
pub fn pending_key(repo: &str) -> String {
    format!("{PENDING_PREFIX}{repo}.json")
}

/// One pending candidate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEntry {
    /// When it was first seen as a candidate (bucket clock, RFC 3339).
    pub first_seen: String,
    /// Its size when last seen.
    pub size: u64,
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
    /// Candidates by digest.
    pub candidates: BTreeMap<String, PendingEntry>,
}

/// Pending state as read from the store.
#[derive(Clone, Debug, Default)]
pub struct Pending {
    /// First-seen time by digest.
    pub first_seen: HashMap<Digest, SystemTime>,
    /// ETag of the stored file; `None` when there is none.
    pub etag: Option<String>,
}

/// Reads a repository's pending state. A missing file is empty state; an unreadable one is
/// reported and treated as empty, which can only postpone deletions.
pub async fn read_pending(
    store: &dyn Store,
    repo: &str,
    warnings: &mut Vec<String>,
) -> Result<Pending, StoreError> {
    let key = pending_key(repo);
    let object = match store.get(&key).await {
        Ok(o) => o,
        Err(StoreError::NotFound { .. }) => return Ok(Pending::default()),
        Err(e) => return Err(e),
    };
    let mut pending = Pending {
        first_seen: HashMap::new(),
        etag: object.etag,
    };
    match serde_json::from_slice::<PendingFile>(&object.body) {
        Ok(file) => {
            for (digest, entry) in file.candidates {
                let parsed =
                    Digest::parse(&digest).zip(humantime::parse_rfc3339(&entry.first_seen).ok());
                if let Some((d, t)) = parsed {
                    pending.first_seen.insert(d, t);
                }
            }
        }
        Err(e) => warnings.push(format!("{key} is unreadable, starting over: {e}")),
    }
    Ok(pending)
}

/// Replaces a repository's pending state with `candidates` (deletes the file when empty).
/// Conditional on the ETag read earlier, so two writers can never interleave unnoticed;
/// returns false when the file changed underneath (the caller's lease was lost).
pub async fn write_pending(
    store: &dyn Store,
    repo: &str,
    run_id: &str,
    now: SystemTime,
    previous: &Pending,
    candidates: &[(Digest, SystemTime, u64)],
) -> Result<bool, StoreError> {
    let key = pending_key(repo);
    debug_assert!(key.starts_with(STATE_PREFIX));
    if candidates.is_empty() {
        if previous.etag.is_some() {
            let failures = store.delete_batch(std::slice::from_ref(&key)).await?;
            return Ok(failures.is_empty());
        }
        return Ok(true);
    }
    let file = PendingFile {
        version: 1,
        repository: repo.to_string(),
        run_id: run_id.to_string(),
        observed_at: timestamp(now),
        candidates: candidates
            .iter()
            .map(|(d, t, size)| {
                (
                    d.to_string(),
                    PendingEntry {
                        first_seen: timestamp(*t),
                        size: *size,
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
