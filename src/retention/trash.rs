//! The trash: every root retention removes is kept in `_ocigc/trash/<repo>.json` (tag,
//! digest, when, which rule) for `--trash-ttl`. While an entry lasts its manifest is a root of
//! the repository, so nothing it needs is collected and `ocigc restore` can put it back; after
//! that the ordinary GC collects what only it used (grace and two observations as usual).
//!
//! Every change is a read-modify-write with `If-Match` (or `If-None-Match: *`), retried on a
//! conflict, so concurrent writers (two runs, a run and a restore) never lose an entry. An
//! unreadable trash fails its repository closed: its roots are unknown.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::namespace::trash_key;
use crate::report::timestamp;
use crate::store::{PutCondition, PutOutcome, Store, StoreError};

/// Largest trash file read (ocigc writes these itself; the cap bounds memory).
const MAX_TRASH_SIZE: u64 = 64 * 1024 * 1024;
/// Attempts at a read-modify-write that other writers keep changing.
const ATTEMPTS: usize = 8;

/// One removed root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrashEntry {
    /// The tag; absent for an untagged root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The manifest it pointed at.
    pub digest: Digest,
    /// When it was removed (bucket clock, RFC 3339).
    pub removed_at: String,
    /// When the entry expires and its manifest stops being a root (RFC 3339).
    pub expires_at: String,
    /// The clause that removed it (`retention[0]`, `subject_removed`).
    pub rule: String,
    /// What the layout needs besides the digest to put it back (the `index.json` entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<serde_json::Value>,
}

impl TrashEntry {
    /// Whether the entry still holds its manifest as a root at `now`. An expiry that does
    /// not parse never expires: keeping too long is safe, collecting too early is not.
    pub fn live(&self, now: SystemTime) -> bool {
        humantime::parse_rfc3339(&self.expires_at).map_or(true, |t| now < t)
    }

    /// A new entry for a root removed at `now` under `rule`, kept for `ttl`.
    pub fn new(
        tag: Option<String>,
        digest: Digest,
        rule: String,
        entry: Option<serde_json::Value>,
        now: SystemTime,
        ttl: Duration,
    ) -> TrashEntry {
        TrashEntry {
            tag,
            digest,
            removed_at: timestamp(now),
            expires_at: timestamp(now + ttl),
            rule,
            entry,
        }
    }
}

/// The content of a trash file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrashFile {
    /// Format version (1).
    pub version: u32,
    /// Entries, oldest first.
    pub entries: Vec<TrashEntry>,
}

/// Why the trash could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TrashError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The file does not parse: its roots are unknown.
    #[error("{key} is unreadable: {reason}")]
    Invalid { key: String, reason: String },
    /// Other writers kept changing it.
    #[error("{0} kept changing underneath; try again")]
    Contended(String),
}

/// A repository's trash as read, with the ETag it was read at (`None`: no file).
#[derive(Clone, Debug, Default)]
pub struct Trash {
    /// The file (empty if there is none).
    pub file: TrashFile,
    /// Its ETag.
    pub etag: Option<String>,
    /// Its size in bytes as read.
    pub size: u64,
}

impl Trash {
    /// When the next live entry expires (its manifest stops being a root), if any does.
    pub fn next_expiry(&self, now: SystemTime) -> Option<SystemTime> {
        (self.file.entries.iter())
            .filter(|e| e.live(now))
            .filter_map(|e| humantime::parse_rfc3339(&e.expires_at).ok())
            .min()
    }

    /// The manifests the trash holds as roots at `now`.
    pub fn roots(&self, now: SystemTime) -> Vec<Digest> {
        let mut out: Vec<Digest> = (self.file.entries.iter())
            .filter(|e| e.live(now))
            .map(|e| e.digest.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

impl Trash {
    /// The manifests the trash holds at `now`, with the content entries keep inline: what
    /// [`crate::layout::Layout::read_untagged`] needs.
    pub fn held(&self, now: SystemTime) -> crate::layout::Held {
        let mut manifests: Vec<(Digest, Option<bytes::Bytes>)> = Vec::new();
        let mut at: std::collections::HashMap<&Digest, usize> = Default::default();
        for e in self.file.entries.iter().filter(|e| e.live(now)) {
            let inline = || crate::layout::inline_manifest(e.entry.as_ref(), &e.digest);
            match at.get(&e.digest) {
                Some(&i) => {
                    if manifests[i].1.is_none() {
                        manifests[i].1 = inline();
                    }
                }
                None => {
                    at.insert(&e.digest, manifests.len());
                    manifests.push((e.digest.clone(), inline()));
                }
            }
        }
        crate::layout::Held { manifests }
    }

    /// The content of trashed manifests that entries keep inline (their manifest was deleted
    /// with the root), live at `now`: marking reads them from here.
    pub fn documents(&self, now: SystemTime) -> Vec<(Digest, bytes::Bytes)> {
        self.held(now)
            .manifests
            .into_iter()
            .filter_map(|(d, body)| Some((d, body?)))
            .collect()
    }
}

/// Reads the trash of repository `name`.
pub async fn read(store: &dyn Store, name: &str) -> Result<Trash, TrashError> {
    let key = trash_key(name);
    let object = match store.get_capped(&key, MAX_TRASH_SIZE).await {
        Ok(o) => o,
        Err(StoreError::NotFound { .. }) => return Ok(Trash::default()),
        Err(e) => return Err(e.into()),
    };
    let file = serde_json::from_slice(&object.body).map_err(|e| TrashError::Invalid {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Trash {
        file,
        etag: object.etag,
        size: object.body.len() as u64,
    })
}

/// The manifests every repository's trash holds as roots at `now`, each with its repository,
/// and when the first of them expires: the roots of a sweep of blobs shared by every
/// repository (`distribution`'s global unit, where an untagged root's revision link is gone
/// while it is in the trash). An unreadable trash is an error: the roots are unknown.
pub async fn read_all(
    store: &dyn Store,
    now: SystemTime,
) -> Result<(Vec<(String, Digest)>, Option<SystemTime>), TrashError> {
    use futures::TryStreamExt;
    let pages: Vec<Vec<crate::store::ObjectMeta>> = store
        .list(crate::namespace::trash_prefix())
        .try_collect()
        .await?;
    let mut roots = Vec::new();
    let mut expiry: Option<SystemTime> = None;
    for o in pages.into_iter().flatten() {
        let crate::namespace::StateKey::Trash(name) = crate::namespace::classify(&o.key) else {
            continue;
        };
        let trash = read(store, name).await?;
        roots.extend(trash.roots(now).into_iter().map(|d| (name.to_string(), d)));
        expiry = match (expiry, trash.next_expiry(now)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    roots.sort();
    roots.dedup();
    Ok((roots, expiry))
}

/// Applies `change` to the trash of `name` (dropping entries expired at `now`) and writes
/// it back conditionally, retrying on a conflict; returns what `change` returned last.
pub async fn update<T>(
    store: &dyn Store,
    name: &str,
    now: SystemTime,
    mut change: impl FnMut(&mut Vec<TrashEntry>) -> T,
) -> Result<T, TrashError> {
    let key = trash_key(name);
    for _ in 0..ATTEMPTS {
        let trash = read(store, name).await?;
        let mut entries = trash.file.entries;
        entries.retain(|e| e.live(now));
        let out = change(&mut entries);
        let condition = match trash.etag {
            Some(etag) => PutCondition::IfMatch(etag),
            None => PutCondition::IfNoneMatch,
        };
        if entries.is_empty() && condition == PutCondition::IfNoneMatch {
            return Ok(out);
        }
        let body = serde_json::to_vec_pretty(&TrashFile {
            version: 1,
            entries,
        })
        .map_err(|e| TrashError::Invalid {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        match store.put(&key, body.into(), condition).await? {
            PutOutcome::Written { .. } => return Ok(out),
            PutOutcome::PreconditionFailed => continue,
        }
    }
    Err(TrashError::Contended(key))
}
