//! When each tag→digest pair was first seen, for layouts whose tags are entries of one
//! document (`oci`: `index.json`), in `_ocigc/tags/<repo>.json`.
//!
//! A tag's age runs from when it last moved, never from an earlier time. Where the tag has no
//! object of its own, the latest it can have moved is the LastModified of the document that
//! holds it; ocigc records that time the first time it sees a pair and keeps it while the pair
//! stays, so later rewrites of the document (other tags pushed) do not make it younger. A
//! lost or unreadable record only makes tags younger (safe): their ages restart from the
//! document's LastModified.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::layout::TagSet;
use crate::namespace::tags_seen_key;
use crate::report::timestamp;
use crate::store::{PutCondition, PutOutcome, Store, StoreError};

/// Largest record read.
const MAX_SEEN_SIZE: u64 = 64 * 1024 * 1024;

/// A tag's recorded pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenTag {
    /// The manifest the tag pointed at.
    pub digest: Digest,
    /// The latest time it can have moved there (RFC 3339).
    pub since: String,
}

/// The record of one repository.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenFile {
    /// Format version (1).
    pub version: u32,
    /// Tags by name.
    pub tags: BTreeMap<String, SeenTag>,
    /// Untagged roots by digest: when each was first seen.
    pub untagged: BTreeMap<String, String>,
}

/// The record as read, with its ETag (`None`: no record).
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// The record.
    pub file: SeenFile,
    /// Its ETag.
    pub etag: Option<String>,
}

/// Reads the record of `name`; an unreadable one is reported in `warnings` and read as
/// empty (ages restart, which only keeps tags longer).
pub async fn read(
    store: &dyn Store,
    name: &str,
    warnings: &mut Vec<String>,
) -> Result<Seen, StoreError> {
    let key = tags_seen_key(name);
    let object = match store.get_capped(&key, MAX_SEEN_SIZE).await {
        Ok(o) => o,
        Err(StoreError::NotFound { .. }) => return Ok(Seen::default()),
        Err(e) => return Err(e),
    };
    match serde_json::from_slice(&object.body) {
        Ok(file) => Ok(Seen {
            file,
            etag: object.etag,
        }),
        Err(e) => {
            warnings.push(format!("{key} is unreadable ({e}); tag ages restart"));
            Ok(Seen {
                file: SeenFile::default(),
                etag: object.etag,
            })
        }
    }
}

/// `t` rounded up to the second (records keep whole seconds): never earlier than `t`.
fn rounded_up(t: SystemTime) -> SystemTime {
    let nanos = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    if nanos == 0 {
        t
    } else {
        t + std::time::Duration::from_nanos(u64::from(1_000_000_000 - nanos))
    }
}

fn parse(t: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(t).ok()
}

impl Seen {
    /// When tag `name` (now at `digest`, whose document was last modified at `moved_by`)
    /// last moved, at the latest.
    pub fn tag_since(&self, name: &str, digest: &Digest, moved_by: SystemTime) -> SystemTime {
        (self.file.tags.get(name))
            .filter(|s| s.digest == *digest)
            .and_then(|s| parse(&s.since))
            .map_or(moved_by, |t| t.min(moved_by))
    }

    /// When the untagged root `digest` was added, at the latest.
    pub fn untagged_since(&self, digest: &Digest, moved_by: SystemTime) -> SystemTime {
        (self.file.untagged.get(&*digest.as_str()))
            .and_then(|s| parse(s))
            .map_or(moved_by, |t| t.min(moved_by))
    }

    /// The record for `set` once the roots `gone` (tag or untagged digest) are removed.
    pub fn next(&self, set: &TagSet, gone: &dyn Fn(Option<&str>, &Digest) -> bool) -> SeenFile {
        let mut file = SeenFile {
            version: 1,
            ..SeenFile::default()
        };
        for t in set.tags.iter().filter(|t| !gone(Some(&t.name), &t.digest)) {
            let since = self.tag_since(&t.name, &t.digest, t.moved_by);
            file.tags.insert(
                t.name.clone(),
                SeenTag {
                    digest: t.digest.clone(),
                    since: timestamp(rounded_up(since)),
                },
            );
        }
        for u in set.untagged.iter().filter(|u| !gone(None, &u.digest)) {
            let since = self.untagged_since(&u.digest, u.moved_by);
            file.untagged
                .insert(u.digest.as_str().to_string(), timestamp(rounded_up(since)));
        }
        file
    }

    /// Writes `file` if it differs from the record read; a conflict (another run wrote
    /// meanwhile) leaves theirs, which is as good.
    pub async fn write(
        &self,
        store: &dyn Store,
        name: &str,
        file: &SeenFile,
    ) -> Result<(), StoreError> {
        if *file == self.file && self.etag.is_some() {
            return Ok(());
        }
        let body = serde_json::to_vec(file).map_err(|e| StoreError::Request {
            op: crate::store::Op::Put,
            key: tags_seen_key(name),
            message: e.to_string(),
        })?;
        let condition = match &self.etag {
            Some(e) => PutCondition::IfMatch(e.clone()),
            None => PutCondition::IfNoneMatch,
        };
        match store
            .put(&tags_seen_key(name), body.into(), condition)
            .await?
        {
            PutOutcome::Written { .. } | PutOutcome::PreconditionFailed => Ok(()),
        }
    }
}
