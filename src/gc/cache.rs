//! The persistent incremental cache: one object per collection unit under
//! `_ocigc/cache/v1/<unit>/<entry>`.
//!
//! The entry (the key's last segment) carries everything needed to decide from the listing
//! alone that a unit is unchanged: a fingerprint of what the listing showed, when its pending
//! candidates mature, and the numbers of its report. So an unchanged unit costs no request at
//! all. The object's body is read only when the unit changed: what each manifest references
//! (content-addressed, verified against its digest before it was cached, so valid forever;
//! with the listed version of the object it was read from, so that a rewritten key is read
//! again), the scan's "not a referrer" verdicts and the unit's cross-repository links.
//!
//! The cache is an optimisation only: a missing, malformed, corrupt or other-version entry
//! (another cache version's prefix, or an object another release of ocigc wrote) is ignored
//! and costs requests, never safety.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sha2::Digest as _;

use crate::digest::Digest;
use crate::gc::mark::{CachedDocument, ListedVersion, Marker};
use crate::manifest::{Descriptor, References};
use crate::store::{
    ListingSum, ObjectMeta, Op, PutCondition, Store, StoreError, StoreResult, MAX_DELETE_BATCH,
};

/// Where every version of the cache lives; versions other than [`CACHE_PREFIX`]'s are ignored.
pub const CACHE_ROOT: &str = "_ocigc/cache/";

/// Where this version's entries live.
pub const CACHE_PREFIX: &str = "_ocigc/cache/v1/";

/// Longest key written (the S3 limit); a unit whose entry would be longer gets no cache.
pub const MAX_KEY_LEN: usize = 1024;

/// Largest cache object read or written; a bigger one is ignored (it only costs requests).
pub const MAX_CACHE_SIZE: u64 = 64 * 1024 * 1024;

/// Format version of the object's body (2: it names the release that wrote it).
const FORMAT_VERSION: u16 = 2;

/// The release whose parser found the cached references. Another release's objects are
/// ignored: a document it read may reference what it did not see (the bug a release fixed),
/// and a changed unit primed with its findings would lose those blobs.
const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// Leading bytes of every body.
const MAGIC: &[u8; 8] = b"OCIGCCHE";

/// Flag bit of the entry: the unit holds cross-repository links.
const FLAG_LINKS: u8 = 1;

/// Entry field for "no wake-up needed".
const NEVER: &str = "n";

/// sha256 of what a unit's listing showed, plus the run's decision context.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Lower-case hex, as in the entry key.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 64 lower-case hex digits.
    pub fn from_hex(s: &str) -> Option<Fingerprint> {
        crate::digest::unhex::<32>(s).map(Fingerprint)
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The fingerprint of a unit's listed objects and `context`: sha256 over the objects sorted by
/// key (key, size, ETag, last-modified nanoseconds, defect) and the context string. Anything
/// that changes what a run would decide must be in one or the other; the caller puts grace,
/// delay, layout and options in `context` (pending candidates are covered by the entry's wake
/// time, not by the fingerprint).
pub fn fingerprint<'a>(
    objects: impl Iterator<Item = &'a ObjectMeta>,
    context: &str,
) -> Fingerprint {
    let mut sorted: Vec<&ObjectMeta> = objects.collect();
    sorted.sort_unstable_by(|a, b| {
        a.key
            .cmp(&b.key)
            .then(a.size.cmp(&b.size))
            .then(a.etag.cmp(&b.etag))
            .then(a.last_modified.cmp(&b.last_modified))
    });
    let mut h = sha2::Sha256::new();
    field(&mut h, b"ocigc-cache-fingerprint-v1");
    field(&mut h, context.as_bytes());
    h.update((sorted.len() as u64).to_be_bytes());
    for o in sorted {
        hash_object(&mut h, o);
    }
    Fingerprint(h.finalize().into())
}

/// Every variable-length field is length-prefixed, so no two inputs hash the same bytes.
fn field(h: &mut sha2::Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// One listed object's part of a fingerprint: key, size, ETag, last-modified nanoseconds and
/// defect.
fn hash_object(h: &mut sha2::Sha256, o: &ObjectMeta) {
    field(h, o.key.as_bytes());
    h.update(o.size.to_be_bytes());
    match &o.etag {
        Some(e) => {
            h.update([1]);
            field(h, e.as_bytes());
        }
        None => h.update([0]),
    }
    let nanos: i128 = match o.last_modified.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    h.update(nanos.to_be_bytes());
    match &o.defect {
        Some(d) => {
            h.update([1]);
            field(h, d.as_bytes());
        }
        None => h.update([0]),
    }
}

/// A fingerprint built from a listing that arrives in any order and is never held whole (a
/// streamed unit): the sum, lane by lane, of every object's own sha256, so adding objects in
/// any order, or taking deleted ones out again, gives the same value. Only a unit that is
/// always streamed uses it, so its values never meet those of [`fingerprint`].
#[derive(Clone, Debug, Default)]
pub struct StreamedFingerprint(ListingSum);

impl StreamedFingerprint {
    fn hash_of(o: &ObjectMeta) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        hash_object(&mut h, o);
        h.finalize().into()
    }

    /// Counts one listed object in.
    pub fn add(&mut self, o: &ObjectMeta) {
        self.0.add(Self::hash_of(o));
    }

    /// Takes one counted object out again (one this run deleted).
    pub fn remove(&mut self, o: &ObjectMeta) {
        self.0.remove(Self::hash_of(o));
    }

    /// The fingerprint of what was counted in, under `context`.
    pub fn finish(&self, context: &str) -> Fingerprint {
        let mut h = sha2::Sha256::new();
        field(&mut h, b"ocigc-cache-fingerprint-streamed-v1");
        field(&mut h, context.as_bytes());
        h.update(self.0.to_bytes());
        Fingerprint(h.finalize().into())
    }
}

/// The numbers of a unit's report, kept in the entry so that an unchanged unit is reported
/// without reading anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Reachable blobs.
    pub reachable_blobs: u64,
    /// Their bytes.
    pub reachable_bytes: u64,
    /// Pending blobs (within grace or awaiting a second observation).
    pub pending_blobs: u64,
    /// Their bytes.
    pub pending_bytes: u64,
    /// Keys that are not blobs.
    pub other_keys: u64,
}

/// One unit's cache entry, as parsed from its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// The object's key.
    pub key: String,
    /// The collection unit (a repository name, or the global unit's).
    pub unit: String,
    /// What the unit's listing showed when the entry was written.
    pub fingerprint: Fingerprint,
    /// When pending candidates mature (to the second, rounded up); `None`: nothing pending.
    pub wake_at: Option<SystemTime>,
    /// The unit holds cross-repository links.
    pub has_links: bool,
    /// The unit's report numbers.
    pub summary: Summary,
}

/// The key of a unit's entry, `None` when the unit is empty or the key would exceed
/// [`MAX_KEY_LEN`] (the unit then goes without a cache).
pub fn entry_key(
    unit: &str,
    fingerprint: &Fingerprint,
    wake_at: Option<SystemTime>,
    has_links: bool,
    summary: &Summary,
) -> Option<String> {
    if unit.is_empty() {
        return None;
    }
    let wake = match wake_at {
        // Rounded up: waking a second late only postpones a deletion, waking early would
        // find nothing matured and write the same entry again.
        Some(t) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            secs.to_string()
        }
        None => NEVER.to_string(),
    };
    let flags = if has_links { FLAG_LINKS } else { 0 };
    let key = format!(
        "{CACHE_PREFIX}{unit}/{fp}.{wake}.{flags}.{}.{}.{}.{}.{}",
        summary.reachable_blobs,
        summary.reachable_bytes,
        summary.pending_blobs,
        summary.pending_bytes,
        summary.other_keys,
        fp = fingerprint.to_hex(),
    );
    (key.len() <= MAX_KEY_LEN).then_some(key)
}

/// Parses an entry key written by [`entry_key`]; `None` for anything else (strict: every
/// number canonical, no unknown flag).
pub fn parse_entry_key(key: &str) -> Option<IndexEntry> {
    if key.len() > MAX_KEY_LEN {
        return None;
    }
    let rest = key.strip_prefix(CACHE_PREFIX)?;
    let (unit, entry) = rest.rsplit_once('/')?;
    if unit.is_empty() {
        return None;
    }
    let mut parts = entry.split('.');
    let fingerprint = Fingerprint::from_hex(parts.next()?)?;
    let wake_at = match parts.next()? {
        NEVER => None,
        s => Some(UNIX_EPOCH.checked_add(Duration::from_secs(number(s)?))?),
    };
    let flags = number(parts.next()?)?;
    if flags & !u64::from(FLAG_LINKS) != 0 {
        return None;
    }
    let mut next = || parts.next().and_then(number);
    let summary = Summary {
        reachable_blobs: next()?,
        reachable_bytes: next()?,
        pending_blobs: next()?,
        pending_bytes: next()?,
        other_keys: next()?,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(IndexEntry {
        key: key.to_string(),
        unit: unit.to_string(),
        fingerprint,
        wake_at,
        has_links: flags & u64::from(FLAG_LINKS) != 0,
        summary,
    })
}

/// A canonical decimal number (no sign, no leading zero).
fn number(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

/// The cache entries found in a listing of the state namespace: one per unit.
#[derive(Debug, Default)]
pub struct CacheIndex {
    /// The newest entry of each unit, with its last-modified time.
    entries: HashMap<String, (IndexEntry, SystemTime)>,
    /// Older duplicates and malformed keys of this version.
    stale: Vec<String>,
}

impl CacheIndex {
    /// Builds the index from listed state objects (anything outside [`CACHE_PREFIX`] is
    /// ignored). Of several entries of one unit the newest wins; the others are stale.
    pub fn from_listing(state: &[ObjectMeta]) -> CacheIndex {
        let mut index = CacheIndex::default();
        for o in state {
            if !o.key.starts_with(CACHE_PREFIX) {
                continue;
            }
            // Whatever the store cannot serve as an object is not ocigc's to delete.
            if o.defect.is_some() {
                continue;
            }
            let Some(entry) = parse_entry_key(&o.key) else {
                index.stale.push(o.key.clone());
                continue;
            };
            let stamp = o.last_modified;
            match index.entries.get_mut(&entry.unit) {
                None => {
                    index.entries.insert(entry.unit.clone(), (entry, stamp));
                }
                Some(current) => {
                    // Ties broken by key, so every run picks the same one.
                    let newer = (stamp, &entry.key) > (current.1, &current.0.key);
                    let loser = if newer {
                        std::mem::replace(current, (entry, stamp)).0.key
                    } else {
                        entry.key
                    };
                    index.stale.push(loser);
                }
            }
        }
        index.stale.sort();
        index
    }

    /// The entry of `unit`, if any.
    pub fn entry(&self, unit: &str) -> Option<&IndexEntry> {
        self.entries.get(unit).map(|(e, _)| e)
    }

    /// Keys the units with an entry held when it was written (blobs kept or pending and
    /// other keys): about what listing them again will find; `None` without entries.
    pub fn listed_keys(&self) -> Option<u64> {
        (!self.entries.is_empty()).then(|| {
            self.entries
                .values()
                .map(|(e, _)| {
                    let s = &e.summary;
                    s.reachable_blobs + s.pending_blobs + s.other_keys
                })
                .sum()
        })
    }

    /// Units with an entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no unit has an entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keys to delete: older duplicates of a unit's entry and malformed keys of this version.
    pub fn stale_keys(&self) -> Vec<String> {
        self.stale.clone()
    }
}

/// What a unit's cache object holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    /// What each manifest or index references, and how its object was listed; only
    /// documents whose content hashed to their digest.
    pub documents: Vec<CachedDocument>,
    /// Blobs the referrer scan read and found to be no referrer.
    pub not_referrers: Vec<Digest>,
    /// Cross-repository links the unit holds (key, digest).
    pub links: Vec<(String, Digest)>,
}

impl Contents {
    /// What `marker` learnt that can outlive the run, plus the unit's `links`, in a stable
    /// order.
    pub fn learned(marker: &Marker<'_>, links: Vec<(String, Digest)>) -> Contents {
        Contents {
            documents: marker.learned_documents(),
            not_referrers: marker.learned_not_referrers(),
            links,
        }
    }
}

/// Reads the contents of `entry`; `None` (with a warning) when it is missing, too large,
/// corrupt, of another version, or written for another unit or fingerprint.
pub async fn read(store: &dyn Store, entry: &IndexEntry) -> Option<Contents> {
    let body = match store.get_capped(&entry.key, MAX_CACHE_SIZE).await {
        Ok(o) => o.body,
        Err(e) => {
            tracing::warn!(key = %entry.key, error = %e, "cache entry unreadable; ignored");
            return None;
        }
    };
    match decode(&body) {
        Ok((unit, fp, contents)) if unit == entry.unit && fp == entry.fingerprint => Some(contents),
        Ok(_) => {
            tracing::warn!(key = %entry.key, "cache entry written for another key; ignored");
            None
        }
        Err(reason) => {
            tracing::warn!(key = %entry.key, reason, "cache entry invalid; ignored");
            None
        }
    }
}

/// Writes a unit's entry (create-only), then deletes `previous` if it had another key.
/// Writes nothing when the key is `previous`'s. Returns the entry's key; an error only
/// means the unit has no (new) cache entry.
#[allow(clippy::too_many_arguments)]
pub async fn write(
    store: &dyn Store,
    unit: &str,
    fingerprint: &Fingerprint,
    wake_at: Option<SystemTime>,
    has_links: bool,
    summary: &Summary,
    contents: &Contents,
    previous: Option<&IndexEntry>,
) -> StoreResult<String> {
    let key = entry_key(unit, fingerprint, wake_at, has_links, summary).ok_or_else(|| {
        StoreError::InvalidKey {
            key: format!("{CACHE_PREFIX}{unit}/"),
            reason: "cache entry key would be empty or longer than 1024 bytes",
        }
    })?;
    if previous.is_some_and(|p| p.key == key) {
        return Ok(key);
    }
    let body = encode(unit, fingerprint, contents);
    if body.len() as u64 > MAX_CACHE_SIZE {
        return Err(StoreError::TooLarge {
            op: Op::Put,
            key,
            limit: MAX_CACHE_SIZE,
        });
    }
    // An object already at this key was written for exactly this state (the key says so):
    // either one is as good.
    store
        .put(&key, Bytes::from(body), PutCondition::IfNoneMatch)
        .await?;
    Ok(key)
}

/// Whether `previous`, the unit's entry before `written` was written, is now superseded and
/// to be deleted: only ever a cache key of this same unit (a cache bug must not delete
/// anything else). The run deletes superseded entries together at its end, with the stale
/// ones ([`delete_stale`]); one left by a run that died is stale to the next run's index.
pub fn superseded(previous: &IndexEntry, unit: &str, written: &str) -> bool {
    previous.key != written && parse_entry_key(&previous.key).is_some_and(|e| e.unit == unit)
}

/// Deletes `index`'s stale keys and the entries this run superseded (never anything outside
/// [`CACHE_PREFIX`]), a thousand to a request; returns how many were deleted.
pub async fn delete_stale(
    store: &dyn Store,
    index: &CacheIndex,
    superseded: &[String],
) -> StoreResult<usize> {
    let mut keys: Vec<String> = (index.stale.iter().chain(superseded))
        .filter(|k| k.starts_with(CACHE_PREFIX))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    let mut deleted = 0;
    for batch in keys.chunks(MAX_DELETE_BATCH) {
        let failures = store.delete_batch(batch).await?;
        deleted += batch.len() - failures.len();
    }
    Ok(deleted)
}

// ---- body format ----
//
// MAGIC, version (u16), then: the release of ocigc that wrote it (str), unit (str),
// fingerprint (32 bytes), media-type table (u32 count, str each), documents (u32 count;
// digest, listed version, references each), not-referrers (u32 count, digests), links (u32
// count; str, digest each), and last the sha256 of everything before it.
// Integers are big-endian; a str is a u32 length and UTF-8; a digest is an algorithm tag
// (1 sha256, 2 sha512) and the raw hash; a listed version is 0, or 1, the size (u64), the
// last-modified time (u64 seconds and u32 nanoseconds after the epoch) and an ETag (0, or 1
// and a str); a descriptor is a digest, a media-type index (0 for
// none, else 1 + table position) and an optional size (0, or 1 and a u64); references are
// children and subjects (u32 count, descriptors), unsupported and ambiguous (u32 count, strs)
// and has_manifests (0 or 1).

const TAG_SHA256: u8 = 1;
const TAG_SHA512: u8 = 2;

/// Serialises a cache object's body.
pub fn encode(unit: &str, fingerprint: &Fingerprint, contents: &Contents) -> Vec<u8> {
    encode_as(RELEASE, unit, fingerprint, contents)
}

/// [`encode`] as release `release` of ocigc writes it: what a cache left by another release
/// holds (for tests of upgrades).
pub fn encode_as(
    release: &str,
    unit: &str,
    fingerprint: &Fingerprint,
    contents: &Contents,
) -> Vec<u8> {
    let mut media: Vec<&str> = Vec::new();
    let mut media_index: HashMap<&str, u32> = HashMap::new();
    for doc in &contents.documents {
        let refs = &doc.references;
        for d in refs.children.iter().chain(&refs.subjects) {
            if let Some(mt) = d.media_type.as_deref() {
                media_index.entry(mt).or_insert_with(|| {
                    media.push(mt);
                    media.len() as u32
                });
            }
        }
    }
    let mut w = Writer(Vec::new());
    w.0.extend_from_slice(MAGIC);
    w.0.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    w.str(release);
    w.str(unit);
    w.0.extend_from_slice(&fingerprint.0);
    w.u32(media.len() as u32);
    for mt in &media {
        w.str(mt);
    }
    w.u32(contents.documents.len() as u32);
    for doc in &contents.documents {
        let refs = &doc.references;
        w.digest(&doc.digest);
        match &doc.listed {
            Some(v) => {
                w.0.push(1);
                w.0.extend_from_slice(&v.size.to_be_bytes());
                // Before the epoch cannot be stored: written as the epoch, it only fails to
                // match next time, and the document is read again.
                let t = v
                    .last_modified
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                w.0.extend_from_slice(&t.as_secs().to_be_bytes());
                w.0.extend_from_slice(&t.subsec_nanos().to_be_bytes());
                match &v.etag {
                    Some(e) => {
                        w.0.push(1);
                        w.str(e);
                    }
                    None => w.0.push(0),
                }
            }
            None => w.0.push(0),
        }
        for list in [&refs.children, &refs.subjects] {
            w.u32(list.len() as u32);
            for d in list.iter() {
                w.digest(&d.digest);
                let idx = d
                    .media_type
                    .as_deref()
                    .and_then(|mt| media_index.get(mt).copied())
                    .unwrap_or(0);
                w.u32(idx);
                match d.size {
                    Some(s) => {
                        w.0.push(1);
                        w.0.extend_from_slice(&s.to_be_bytes());
                    }
                    None => w.0.push(0),
                }
            }
        }
        for list in [&refs.unsupported, &refs.ambiguous] {
            w.u32(list.len() as u32);
            for s in list.iter() {
                w.str(s);
            }
        }
        w.0.push(u8::from(refs.has_manifests));
    }
    w.u32(contents.not_referrers.len() as u32);
    for d in &contents.not_referrers {
        w.digest(d);
    }
    w.u32(contents.links.len() as u32);
    for (key, d) in &contents.links {
        w.str(key);
        w.digest(d);
    }
    let sum = sha2::Sha256::digest(&w.0);
    w.0.extend_from_slice(&sum);
    w.0
}

/// Parses a body written by [`encode`]: (unit, fingerprint, contents), or why not.
pub fn decode(body: &[u8]) -> Result<(String, Fingerprint, Contents), &'static str> {
    if body.len() < MAGIC.len() + 2 || &body[..MAGIC.len()] != MAGIC {
        return Err("not a cache object");
    }
    let version = u16::from_be_bytes([body[MAGIC.len()], body[MAGIC.len() + 1]]);
    if version != FORMAT_VERSION {
        return Err("unknown format version");
    }
    let Some(split) = body.len().checked_sub(32) else {
        return Err("truncated");
    };
    let (content, sum) = body.split_at(split);
    if content.len() < MAGIC.len() + 2 || sha2::Sha256::digest(content).as_slice() != sum {
        return Err("checksum mismatch");
    }
    let mut r = Reader(&content[MAGIC.len() + 2..]);
    if r.str()? != RELEASE {
        return Err("written by another release of ocigc");
    }
    let unit = r.str()?;
    let fingerprint = Fingerprint(r.take(32)?.try_into().map_err(|_| "truncated")?);
    let n = r.count(4)?;
    let mut media = Vec::with_capacity(n);
    for _ in 0..n {
        media.push(crate::manifest::media_type(&r.str()?));
    }
    // The smallest document: a digest, no listed version, four empty lists and a flag.
    let n = r.count(33 + 1 + 17)?;
    let mut documents = Vec::with_capacity(n);
    for _ in 0..n {
        let digest = r.digest()?;
        let listed = match r.u8()? {
            0 => None,
            1 => {
                let size = r.u64()?;
                let secs = r.u64()?;
                let nanos = r.u32()?;
                if nanos >= 1_000_000_000 {
                    return Err("bad time");
                }
                let last_modified = UNIX_EPOCH
                    .checked_add(Duration::new(secs, nanos))
                    .ok_or("bad time")?;
                let etag = match r.u8()? {
                    0 => None,
                    1 => Some(r.str()?),
                    _ => return Err("bad flag"),
                };
                Some(ListedVersion {
                    size,
                    last_modified,
                    etag,
                })
            }
            _ => return Err("bad flag"),
        };
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let n = r.count(34 + 5)?;
            list.reserve(n);
            for _ in 0..n {
                let digest = r.digest()?;
                let media_type = match r.u32()? {
                    0 => None,
                    i => Some(
                        media
                            .get(i as usize - 1)
                            .ok_or("media type index out of range")?
                            .clone(),
                    ),
                };
                let size = match r.u8()? {
                    0 => None,
                    1 => Some(r.u64()?),
                    _ => return Err("bad size flag"),
                };
                list.push(Descriptor {
                    media_type,
                    digest,
                    size,
                });
            }
        }
        let mut strs = [Vec::new(), Vec::new()];
        for list in &mut strs {
            let n = r.count(4)?;
            list.reserve(n);
            for _ in 0..n {
                list.push(r.str()?);
            }
        }
        let has_manifests = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err("bad flag"),
        };
        let [children, subjects] = lists;
        let [unsupported, ambiguous] = strs;
        documents.push(CachedDocument {
            digest,
            references: References {
                children,
                subjects,
                unsupported,
                ambiguous,
                has_manifests,
            },
            listed,
        });
    }
    let n = r.count(33)?;
    let mut not_referrers = Vec::with_capacity(n);
    for _ in 0..n {
        not_referrers.push(r.digest()?);
    }
    let n = r.count(4 + 33)?;
    let mut links = Vec::with_capacity(n);
    for _ in 0..n {
        let key = r.str()?;
        links.push((key, r.digest()?));
    }
    if !r.0.is_empty() {
        return Err("trailing bytes");
    }
    Ok((
        unit,
        fingerprint,
        Contents {
            documents,
            not_referrers,
            links,
        },
    ))
}

struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, n: u32) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn digest(&mut self, d: &Digest) {
        let tag = if d.algorithm() == "sha512" {
            TAG_SHA512
        } else {
            TAG_SHA256
        };
        self.0.push(tag);
        // A Digest is always valid lower-case hex of its algorithm's length.
        self.0.extend_from_slice(d.bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        let b: [u8; 8] = self.take(8)?.try_into().map_err(|_| "truncated")?;
        Ok(u64::from_be_bytes(b))
    }
    /// A count of elements of at least `min_size` bytes each, refused if the rest of the
    /// body cannot hold them (so a bad count cannot reserve memory).
    fn count(&mut self, min_size: usize) -> Result<usize, &'static str> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.0.len() {
            return Err("count exceeds the body");
        }
        Ok(n)
    }
    fn str(&mut self) -> Result<String, &'static str> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| "string not UTF-8")
    }
    fn digest(&mut self) -> Result<Digest, &'static str> {
        let (alg, len) = match self.u8()? {
            TAG_SHA256 => ("sha256", 32),
            TAG_SHA512 => ("sha512", 64),
            _ => return Err("unknown digest algorithm"),
        };
        let raw = self.take(len)?;
        Digest::from_bytes(alg, raw).ok_or("bad digest")
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::STATE_PREFIX;

    fn digest(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    fn sha512() -> Digest {
        let raw = sha2::Sha512::digest(b"x");
        Digest::from_parts("sha512", &hex(&raw)).expect("sha512")
    }

    fn desc(n: u8, media_type: Option<&str>, size: Option<u64>) -> Descriptor {
        Descriptor {
            media_type: media_type.map(crate::manifest::media_type),
            digest: digest(n),
            size,
        }
    }

    fn sample() -> Contents {
        let manifest = "application/vnd.oci.image.manifest.v1+json";
        Contents {
            documents: vec![
                CachedDocument {
                    digest: digest(1),
                    listed: Some(ListedVersion {
                        size: 900,
                        last_modified: UNIX_EPOCH + Duration::new(1_700_000_000, 123),
                        etag: Some("\"abc\"".into()),
                    }),
                    references: References {
                        children: vec![
                            desc(2, Some(manifest), Some(7)),
                            desc(3, None, None),
                            Descriptor {
                                media_type: Some(manifest.into()),
                                digest: sha512(),
                                size: Some(u64::MAX),
                            },
                        ],
                        subjects: vec![desc(4, Some("application/x"), Some(0))],
                        unsupported: vec!["bad descriptor".into()],
                        ambiguous: vec!["SHA256:AB".into()],
                        has_manifests: true,
                    },
                },
                CachedDocument {
                    digest: sha512(),
                    references: References::default(),
                    listed: None,
                },
                CachedDocument {
                    digest: digest(9),
                    references: References::default(),
                    listed: Some(ListedVersion {
                        size: 0,
                        last_modified: UNIX_EPOCH,
                        etag: None,
                    }),
                },
            ],
            not_referrers: vec![digest(5), sha512()],
            links: vec![("other/repo/_layers/x".into(), digest(6))],
        }
    }

    fn small() -> Contents {
        Contents {
            documents: vec![CachedDocument {
                digest: digest(1),
                references: References {
                    children: vec![desc(2, Some("a"), Some(1))],
                    ..References::default()
                },
                listed: Some(ListedVersion {
                    size: 5,
                    last_modified: UNIX_EPOCH + Duration::new(1, 2),
                    etag: Some("e".into()),
                }),
            }],
            not_referrers: vec![digest(3)],
            links: vec![("k".into(), digest(4))],
        }
    }

    #[test]
    fn body_round_trips() {
        let fp = Fingerprint([7; 32]);
        for contents in [sample(), small(), Contents::default()] {
            let body = encode("team/app", &fp, &contents);
            let (unit, got_fp, got) = decode(&body).expect("decode");
            assert_eq!(unit, "team/app");
            assert_eq!(got_fp, fp);
            assert_eq!(got, contents);
        }
    }

    #[test]
    fn every_single_byte_corruption_or_truncation_is_rejected() {
        let body = encode("app", &Fingerprint([1; 32]), &small());
        assert!(decode(&body).is_ok());
        for i in 0..body.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = body.clone();
                bad[i] ^= flip;
                assert!(decode(&bad).is_err(), "byte {i} ^ {flip:#x} accepted");
            }
        }
        for len in 0..body.len() {
            assert!(decode(&body[..len]).is_err(), "truncated to {len} accepted");
        }
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode(&longer).is_err(), "trailing byte accepted");
    }

    #[test]
    fn another_format_version_is_ignored_even_with_a_valid_checksum() {
        let mut body = encode("app", &Fingerprint([1; 32]), &small());
        body.truncate(body.len() - 32);
        body[MAGIC.len()..MAGIC.len() + 2].copy_from_slice(&(FORMAT_VERSION + 1).to_be_bytes());
        let sum = sha2::Sha256::digest(&body);
        body.extend_from_slice(&sum);
        assert_eq!(decode(&body).err(), Some("unknown format version"));
    }

    #[test]
    fn another_release_is_ignored() {
        let fp = Fingerprint([1; 32]);
        let body = encode_as("0.0.0-another", "app", &fp, &small());
        assert_eq!(
            decode(&body).err(),
            Some("written by another release of ocigc")
        );
        let ours = encode_as(RELEASE, "app", &fp, &small());
        assert_eq!(ours, encode("app", &fp, &small()));
        assert_eq!(decode(&ours).map(|(_, _, c)| c), Ok(small()));
    }

    #[test]
    fn a_count_larger_than_the_body_is_refused_without_allocating() {
        // A media table claiming u32::MAX entries, with a valid checksum.
        let mut body = Vec::new();
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        body.extend_from_slice(&(RELEASE.len() as u32).to_be_bytes());
        body.extend_from_slice(RELEASE.as_bytes());
        body.extend_from_slice(&3u32.to_be_bytes());
        body.extend_from_slice(b"app");
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&u32::MAX.to_be_bytes());
        let sum = sha2::Sha256::digest(&body);
        body.extend_from_slice(&sum);
        assert_eq!(decode(&body).err(), Some("count exceeds the body"));
    }

    #[test]
    fn entry_keys_round_trip() {
        let fp = Fingerprint([0xab; 32]);
        let summary = Summary {
            reachable_blobs: 3,
            reachable_bytes: u64::MAX,
            pending_blobs: 0,
            pending_bytes: 10,
            other_keys: 1,
        };
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for unit in ["app", "team/app/tools", "_global", "a.b/c-d_e"] {
            for wake_at in [None, Some(at), Some(UNIX_EPOCH)] {
                for has_links in [false, true] {
                    let key = entry_key(unit, &fp, wake_at, has_links, &summary).expect("key");
                    assert!(key.starts_with(CACHE_PREFIX));
                    let e = parse_entry_key(&key).expect("parses");
                    assert_eq!(e.key, key);
                    assert_eq!(e.unit, unit);
                    assert_eq!(e.fingerprint, fp);
                    assert_eq!(e.wake_at, wake_at);
                    assert_eq!(e.has_links, has_links);
                    assert_eq!(e.summary, summary);
                }
            }
        }
        // Sub-second wake-ups round up, never down.
        let key = entry_key(
            "app",
            &fp,
            Some(at + Duration::from_millis(1)),
            false,
            &summary,
        )
        .expect("key");
        let e = parse_entry_key(&key).expect("parses");
        assert_eq!(e.wake_at, Some(at + Duration::from_secs(1)));
        assert!(CACHE_PREFIX.starts_with(STATE_PREFIX) && CACHE_PREFIX.starts_with(CACHE_ROOT));
    }

    #[test]
    fn entry_keys_stop_at_the_length_limit() {
        let fp = Fingerprint([0; 32]);
        let summary = Summary::default();
        let base = entry_key("x", &fp, None, false, &summary)
            .expect("key")
            .len();
        let longest = "a/".repeat(MAX_KEY_LEN)[..MAX_KEY_LEN - base + 1].to_string();
        let key = entry_key(&longest, &fp, None, false, &summary).expect("at the limit");
        assert_eq!(key.len(), MAX_KEY_LEN);
        assert_eq!(parse_entry_key(&key).expect("parses").unit, longest);
        assert_eq!(
            entry_key(&format!("{longest}b"), &fp, None, false, &summary),
            None
        );
        assert_eq!(entry_key("", &fp, None, false, &summary), None);
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        let fp = "ab".repeat(32);
        let good = format!("{CACHE_PREFIX}app/{fp}.n.0.1.2.3.4.5");
        assert!(parse_entry_key(&good).is_some());
        let bad = [
            format!("{CACHE_ROOT}v2/app/{fp}.n.0.1.2.3.4.5"),
            format!("{CACHE_PREFIX}{fp}.n.0.1.2.3.4.5"),
            format!("{CACHE_PREFIX}/{fp}.n.0.1.2.3.4.5"),
            format!("{CACHE_PREFIX}app/{}.n.0.1.2.3.4.5", fp.to_uppercase()),
            format!("{CACHE_PREFIX}app/{}.n.0.1.2.3.4.5", &fp[1..]),
            format!("{CACHE_PREFIX}app/{fp}.n.0.1.2.3.4"),
            format!("{CACHE_PREFIX}app/{fp}.n.0.1.2.3.4.5.6"),
            format!("{CACHE_PREFIX}app/{fp}.never.0.1.2.3.4.5"),
            format!("{CACHE_PREFIX}app/{fp}.n.2.1.2.3.4.5"),
            format!("{CACHE_PREFIX}app/{fp}.n.0.01.2.3.4.5"),
            format!("{CACHE_PREFIX}app/{fp}.n.0.+1.2.3.4.5"),
            format!("{CACHE_PREFIX}app/{fp}.n.0.1.2.3.4.18446744073709551616"),
            format!("{CACHE_PREFIX}app/{fp}..0.1.2.3.4.5"),
            format!("{CACHE_PREFIX}app/{fp}.-1.0.1.2.3.4.5"),
            format!("{CACHE_PREFIX}app/"),
            format!("_ocigc/pending/app/{fp}.n.0.1.2.3.4.5"),
        ];
        for key in bad {
            assert_eq!(parse_entry_key(&key), None, "{key}");
        }
    }

    fn object(key: &str, secs: u64) -> ObjectMeta {
        ObjectMeta::new(key, 1, UNIX_EPOCH + Duration::from_secs(secs), None)
    }

    #[test]
    fn index_keeps_the_newest_entry_per_unit_and_lists_the_rest_as_stale() {
        let s = Summary::default();
        let key = |unit: &str, n: u8| {
            entry_key(unit, &Fingerprint([n; 32]), None, false, &s).expect("key")
        };
        let malformed = format!("{CACHE_PREFIX}app/garbage");
        let listing = vec![
            object(&key("app", 1), 10),
            object(&key("app", 2), 30),
            object(&key("app", 3), 20),
            object(&key("team/app", 4), 5),
            object(&malformed, 1),
            object(&format!("{CACHE_ROOT}v2/app/whatever"), 1),
            object("_ocigc/pending/app.json", 1),
        ];
        let index = CacheIndex::from_listing(&listing);
        assert_eq!(index.len(), 2);
        assert_eq!(
            index.entry("app").map(|e| e.fingerprint),
            Some(Fingerprint([2; 32]))
        );
        assert_eq!(
            index.entry("team/app").map(|e| e.fingerprint),
            Some(Fingerprint([4; 32]))
        );
        assert_eq!(index.entry("team"), None);
        let mut stale = vec![key("app", 1), key("app", 3), malformed];
        stale.sort();
        assert_eq!(index.stale_keys(), stale);
    }

    #[test]
    fn fingerprint_covers_every_listed_field_and_the_context_but_not_the_order() {
        let t = UNIX_EPOCH + Duration::from_secs(100);
        let a = ObjectMeta::new("r/a", 1, t, Some("e1".into()));
        let b = ObjectMeta::new("r/b", 2, t, None);
        let base = fingerprint([&a, &b].into_iter(), "ctx");
        assert_eq!(base, fingerprint([&b, &a].into_iter(), "ctx"));
        assert_ne!(base, fingerprint([&a, &b].into_iter(), "ctx2"));
        assert_ne!(base, fingerprint([&a].into_iter(), "ctx"));
        let variants = [
            ObjectMeta::new("r/c", 1, t, Some("e1".into())),
            ObjectMeta::new("r/a", 3, t, Some("e1".into())),
            ObjectMeta::new("r/a", 1, t, Some("e2".into())),
            ObjectMeta::new("r/a", 1, t, None),
            ObjectMeta::new("r/a", 1, t + Duration::from_nanos(1), Some("e1".into())),
            ObjectMeta {
                defect: Some("unreadable".into()),
                ..a.clone()
            },
        ];
        for v in &variants {
            assert_ne!(base, fingerprint([v, &b].into_iter(), "ctx"), "{v:?}");
        }
    }

    #[test]
    fn a_streamed_fingerprint_ignores_order_and_takes_deletions_out() {
        let objs: Vec<ObjectMeta> = (0..5).map(|i| object(&format!("k{i}"), i)).collect();
        let sum = |it: &mut dyn Iterator<Item = &ObjectMeta>| {
            let mut f = StreamedFingerprint::default();
            it.for_each(|o| f.add(o));
            f
        };
        let forward = sum(&mut objs.iter()).finish("ctx");
        assert_eq!(forward, sum(&mut objs.iter().rev()).finish("ctx"));
        assert_ne!(forward, sum(&mut objs.iter()).finish("other"));
        // Taking one out is listing without it.
        let mut less = sum(&mut objs.iter());
        less.remove(&objs[2]);
        let without: Vec<&ObjectMeta> = objs.iter().filter(|o| o.key != "k2").collect();
        assert_eq!(
            less.finish("ctx"),
            sum(&mut without.into_iter()).finish("ctx")
        );
        assert_ne!(less.finish("ctx"), forward);
        // Any field of any object changes it, and so does an object listed twice.
        let mut touched = objs.clone();
        touched[4].etag = Some("\"e\"".into());
        assert_ne!(forward, sum(&mut touched.iter()).finish("ctx"));
        let mut twice = sum(&mut objs.iter());
        twice.add(&objs[0]);
        assert_ne!(forward, twice.finish("ctx"));
        // Never equal to the sorted fingerprint of the same listing.
        assert_ne!(forward, fingerprint(objs.iter(), "ctx"));
    }
}
