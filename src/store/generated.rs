//! A synthesized `oci` bucket, for benchmarks only: `generated:?repos=N&tags=T&layers=L&garbage=G&dirty=K&seed=S`.
//!
//! Every repository `bench/app-<i>` holds an OCI Image Layout with `T` tagged images and `G`
//! garbage images (uploaded, never in `index.json`), each image a manifest, a config and `L`
//! layers of its own. Nothing is stored: keys are synthesized one repository at a time, in
//! lexicographic order, so memory can be measured over millions of keys without writing them.
//! Content is real (a manifest's sha256 is its digest, a config and the layers it names exist).
//! Writes to keys the generator does not own (ocigc's `_ocigc/` state) are kept in a small
//! in-memory map; deletes of generated keys are counted and applied to nothing, so a run over
//! this store never changes what it synthesizes. Never point a real collection at it.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use sha2::Digest as _;

use super::{
    DeleteFailure, Level, Metadata, Object, ObjectMeta, Op, PutCondition, PutOutcome, Store,
    StoreError, StoreResult,
};

/// The URL scheme of a generated bucket.
pub const GENERATED_SCHEME: &str = "generated:";

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MARKER_BODY: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// The directory holding every repository, and the start of each repository's name.
const REPO_DIR: &str = "bench/";
const REPO_PREFIX: &str = "bench/app-";
/// Keys in one listing page, as S3 returns them.
const PAGE: usize = 1000;
/// Repositories whose synthesized keys are kept for GETs: more than a run collects at once.
const CACHED_REPOS: usize = 64;
/// The generator's fixed clock (2027-01-15T08:00:00Z); objects are 30 days older.
const EPOCH_SECS: u64 = 1_800_000_000;
const OBJECT_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// What to synthesize, parsed from `generated:?repos=…&tags=…&layers=…&garbage=…&seed=…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedSpec {
    /// Repositories.
    pub repos: u64,
    /// Tagged images per repository.
    pub tags: u64,
    /// Layers per image.
    pub layers: u64,
    /// Garbage images (never tagged) per repository that has garbage.
    pub garbage: u64,
    /// Every `dirty`-th repository (index 0, K, 2K, …) has the garbage images; 1 = all.
    pub dirty: u64,
    /// Varies every content byte, hence every digest.
    pub seed: u64,
}

impl Default for GeneratedSpec {
    fn default() -> Self {
        GeneratedSpec {
            repos: 100,
            tags: 10,
            layers: 4,
            garbage: 2,
            dirty: 1,
            seed: 1,
        }
    }
}

/// Why a `generated:` URL was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid generated bucket {url:?}: {reason}")]
pub struct GeneratedSpecError {
    url: String,
    reason: String,
}

impl GeneratedSpec {
    /// Whether repository `index` has garbage images.
    pub fn is_dirty(&self, index: u64) -> bool {
        index.is_multiple_of(self.dirty)
    }

    /// Repositories with garbage images.
    pub fn dirty_repos(&self) -> u64 {
        self.repos.div_ceil(self.dirty)
    }

    /// Objects of repository `index`: the marker, `index.json`, and per image a manifest, a
    /// config and its layers.
    pub fn keys_of_repo(&self, index: u64) -> u64 {
        2 + (self.tags + self.garbage_images(index)) * (2 + self.layers)
    }

    fn garbage_images(&self, index: u64) -> u64 {
        if self.is_dirty(index) {
            self.garbage
        } else {
            0
        }
    }

    /// Objects in the whole bucket (state objects written later not included).
    pub fn total_keys(&self) -> u64 {
        self.repos * (2 + self.tags * (2 + self.layers)) + self.garbage_keys()
    }

    /// Objects no tag reaches: every key of every garbage image.
    pub fn garbage_keys(&self) -> u64 {
        self.dirty_repos() * self.garbage * (2 + self.layers)
    }

    /// Manifests a collector reads: one per tagged image.
    pub fn tagged_manifests(&self) -> u64 {
        self.repos * self.tags
    }

    /// The repository names, in the listing's order.
    pub fn repo_name(&self, index: u64) -> String {
        format!("{REPO_PREFIX}{index:0width$}", width = self.width())
    }

    fn width(&self) -> usize {
        self.repos.saturating_sub(1).max(1).to_string().len().max(6)
    }
}

impl FromStr for GeneratedSpec {
    type Err = GeneratedSpecError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| GeneratedSpecError {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .strip_prefix(GENERATED_SCHEME)
            .ok_or_else(|| err(format!("expected {GENERATED_SCHEME}?repos=N&...")))?;
        let query = rest.strip_prefix('?').unwrap_or(rest);
        let mut spec = GeneratedSpec::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| err(format!("{pair:?} is not name=value")))?;
            let value: u64 = value
                .parse()
                .map_err(|_| err(format!("{name}: {value:?} is not a whole number")))?;
            let (slot, max) = match name {
                "repos" => (&mut spec.repos, 100_000_000),
                "tags" => (&mut spec.tags, 100_000),
                "layers" => (&mut spec.layers, 1000),
                "garbage" => (&mut spec.garbage, 100_000),
                "dirty" => (&mut spec.dirty, u64::MAX),
                "seed" => (&mut spec.seed, u64::MAX),
                _ => return Err(err(format!("unknown parameter {name:?}"))),
            };
            if value > max {
                return Err(err(format!("{name}: at most {max}")));
            }
            *slot = value;
        }
        if spec.repos == 0 || spec.dirty == 0 {
            return Err(err("repos and dirty: at least 1".into()));
        }
        Ok(spec)
    }
}

/// What a synthesized object is; its content follows from this and the spec alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Marker,
    Index,
    Manifest { image: u32 },
    Config { image: u32 },
    Layer { image: u32, layer: u32 },
}

/// One synthesized object: no key string is held, it follows from the kind and the digest.
#[derive(Clone, Copy, Debug)]
struct Entry {
    sha256: [u8; 32],
    size: u32,
    kind: Kind,
}

impl Entry {
    fn suffix(&self) -> String {
        match self.kind {
            Kind::Marker => "oci-layout".into(),
            Kind::Index => "index.json".into(),
            _ => format!("blobs/sha256/{}", hex(&self.sha256)),
        }
    }

    fn etag(&self) -> String {
        format!("\"{}\"", hex(&self.sha256[..16]))
    }
}

/// One repository's objects, sorted by key.
struct Repo {
    entries: Vec<Entry>,
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

/// A state object written by a run.
#[derive(Clone, Debug)]
struct Stored {
    body: Bytes,
    etag: String,
    modified: SystemTime,
    metadata: Metadata,
}

/// The benchmark-only generated bucket (see the module documentation).
pub struct GeneratedStore {
    spec: GeneratedSpec,
    started: Instant,
    cache: Mutex<VecDeque<(u64, Arc<Repo>)>>,
    state: Mutex<BTreeMap<String, Stored>>,
    writes: AtomicU64,
    deleted_generated: AtomicU64,
}

impl GeneratedStore {
    /// A store synthesizing `spec`; nothing is generated until asked for.
    pub fn new(spec: GeneratedSpec) -> GeneratedStore {
        GeneratedStore {
            spec,
            started: Instant::now(),
            cache: Mutex::new(VecDeque::new()),
            state: Mutex::new(BTreeMap::new()),
            writes: AtomicU64::new(0),
            deleted_generated: AtomicU64::new(0),
        }
    }

    /// What this store synthesizes.
    pub fn spec(&self) -> &GeneratedSpec {
        &self.spec
    }

    /// Generated keys a delete named (they stay: deletes are applied to nothing).
    pub fn deleted_generated(&self) -> u64 {
        self.deleted_generated.load(Ordering::Relaxed)
    }

    fn epoch(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH_SECS)
    }

    fn now(&self) -> SystemTime {
        self.epoch() + self.started.elapsed()
    }

    fn layer_body(&self, repo: u64, image: u32, layer: u32) -> Vec<u8> {
        let mut s = format!("layer:{}:{repo}:{image}:{layer}:", self.spec.seed);
        while s.len() < 96 {
            s.push('.');
        }
        s.into_bytes()
    }

    fn config_body(&self, repo: u64, image: u32) -> Vec<u8> {
        format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{{"Labels":{{"bench":"{}:{repo}:{image}"}}}}}}"#,
            self.spec.seed
        )
        .into_bytes()
    }

    fn manifest_body(&self, repo: u64, image: u32) -> Vec<u8> {
        let config = self.config_body(repo, image);
        let mut m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{MANIFEST_TYPE}","config":{{"mediaType":"{CONFIG_TYPE}","digest":"sha256:{}","size":{}}},"layers":["#,
            hex(&sha256(&config)),
            config.len()
        );
        for layer in 0..self.spec.layers as u32 {
            let body = self.layer_body(repo, image, layer);
            if layer > 0 {
                m.push(',');
            }
            let _ = write!(
                m,
                r#"{{"mediaType":"{LAYER_TYPE}","digest":"sha256:{}","size":{}}}"#,
                hex(&sha256(&body)),
                body.len()
            );
        }
        m.push_str("]}");
        m.into_bytes()
    }

    fn index_body(&self, manifests: &[(u32, [u8; 32], u32)]) -> Vec<u8> {
        let mut s = format!(r#"{{"schemaVersion":2,"mediaType":"{INDEX_TYPE}","manifests":["#);
        for (n, (image, digest, size)) in manifests.iter().enumerate() {
            if n > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                r#"{{"mediaType":"{MANIFEST_TYPE}","digest":"sha256:{}","size":{size},"annotations":{{"org.opencontainers.image.ref.name":"v{image}"}}}}"#,
                hex(digest)
            );
        }
        s.push_str("]}");
        s.into_bytes()
    }

    /// The content of one object (regenerated on every read).
    fn body(&self, repo: u64, kind: Kind) -> Vec<u8> {
        match kind {
            Kind::Marker => MARKER_BODY.to_vec(),
            Kind::Index => {
                let tagged: Vec<(u32, [u8; 32], u32)> = (0..self.spec.tags as u32)
                    .map(|image| {
                        let m = self.manifest_body(repo, image);
                        (image, sha256(&m), m.len() as u32)
                    })
                    .collect();
                self.index_body(&tagged)
            }
            Kind::Manifest { image } => self.manifest_body(repo, image),
            Kind::Config { image } => self.config_body(repo, image),
            Kind::Layer { image, layer } => self.layer_body(repo, image, layer),
        }
    }

    fn generate(&self, repo: u64) -> Repo {
        let images = (self.spec.tags + self.spec.garbage_images(repo)) as u32;
        let mut entries = Vec::with_capacity(self.spec.keys_of_repo(repo) as usize);
        let mut tagged = Vec::with_capacity(self.spec.tags as usize);
        let push = |entries: &mut Vec<Entry>, kind: Kind, body: &[u8]| {
            let e = Entry {
                sha256: sha256(body),
                size: body.len() as u32,
                kind,
            };
            entries.push(e);
            e
        };
        for image in 0..images {
            for layer in 0..self.spec.layers as u32 {
                let body = self.layer_body(repo, image, layer);
                push(&mut entries, Kind::Layer { image, layer }, &body);
            }
            push(
                &mut entries,
                Kind::Config { image },
                &self.config_body(repo, image),
            );
            let m = push(
                &mut entries,
                Kind::Manifest { image },
                &self.manifest_body(repo, image),
            );
            if u64::from(image) < self.spec.tags {
                tagged.push((image, m.sha256, m.size));
            }
        }
        // Distinct content has distinct digests; sorting by digest is sorting by key.
        entries.sort_by_key(|e| e.sha256);
        entries.dedup_by(|a, b| a.sha256 == b.sha256);
        push(&mut entries, Kind::Index, &self.index_body(&tagged));
        push(&mut entries, Kind::Marker, MARKER_BODY);
        Repo { entries }
    }

    fn repo(&self, index: u64) -> Arc<Repo> {
        let hit = |cache: &mut VecDeque<(u64, Arc<Repo>)>| {
            let at = cache.iter().position(|(i, _)| *i == index)?;
            let found = cache.remove(at)?;
            let repo = Arc::clone(&found.1);
            cache.push_front(found);
            Some(repo)
        };
        if let Some(r) = hit(&mut self.cache.lock().unwrap_or_else(|e| e.into_inner())) {
            return r;
        }
        let repo = Arc::new(self.generate(index));
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.push_front((index, Arc::clone(&repo)));
        cache.truncate(CACHED_REPOS);
        repo
    }

    /// The repository index and the rest of a generated key, if it is one.
    fn parse_key<'k>(&self, key: &'k str) -> Option<(u64, &'k str)> {
        let rest = key.strip_prefix(REPO_PREFIX)?;
        let width = self.spec.width();
        let (digits, suffix) = (rest.get(..width)?, rest.get(width..)?.strip_prefix('/')?);
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let index: u64 = digits.parse().ok()?;
        (index < self.spec.repos).then_some((index, suffix))
    }

    fn lookup(&self, key: &str) -> Option<(u64, Entry)> {
        let (index, suffix) = self.parse_key(key)?;
        let repo = self.repo(index);
        let entry = match suffix {
            "oci-layout" => repo.entries.iter().find(|e| e.kind == Kind::Marker),
            "index.json" => repo.entries.iter().find(|e| e.kind == Kind::Index),
            _ => {
                let hex_part = suffix.strip_prefix("blobs/sha256/")?;
                let blobs = &repo.entries[..repo.entries.len().saturating_sub(2)];
                blobs
                    .binary_search_by(|e| hex(&e.sha256).as_str().cmp(hex_part))
                    .ok()
                    .map(|i| &blobs[i])
            }
        };
        entry.map(|e| (index, *e))
    }

    fn meta(&self, key: String, entry: &Entry) -> ObjectMeta {
        ObjectMeta::new(
            key,
            u64::from(entry.size),
            self.epoch() - OBJECT_AGE,
            Some(entry.etag()),
        )
    }

    /// The first repository that may hold a key under `prefix` greater than `after`. Each
    /// repository's keys share the prefix `<name>/` and the names sort like their indexes, so
    /// the repositories whose `<name>/` sorts before a bound without being a prefix of it hold
    /// only keys below that bound: they are a run at the start, found by bisection.
    fn first_repo(&self, prefix: &str, after: Option<&str>) -> u64 {
        let below = |index: u64, bound: &str| {
            let rp = format!("{}/", self.spec.repo_name(index));
            rp.as_str() < bound && !bound.starts_with(&rp)
        };
        let (mut lo, mut hi) = (0, self.spec.repos);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if below(mid, prefix) || after.is_some_and(|a| below(mid, a)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    fn repo_overlaps(&self, index: u64, prefix: &str) -> bool {
        let rp = format!("{}/", self.spec.repo_name(index));
        rp.starts_with(prefix) || prefix.starts_with(&rp)
    }

    /// Generated keys of repository `index` under `prefix` and after `after`, sorted.
    fn repo_keys(&self, index: u64, prefix: &str, after: Option<&str>) -> VecDeque<ObjectMeta> {
        let name = self.spec.repo_name(index);
        self.repo(index)
            .entries
            .iter()
            .map(|e| (format!("{name}/{}", e.suffix()), e))
            .filter(|(k, _)| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a))
            .map(|(k, e)| self.meta(k, e))
            .collect()
    }

    /// The state objects under `prefix` after `after`, as a listing shows them.
    fn state_keys(&self, prefix: &str, after: Option<&str>) -> VecDeque<ObjectMeta> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a))
            .map(|(k, s)| {
                ObjectMeta::new(
                    k.clone(),
                    s.body.len() as u64,
                    s.modified,
                    Some(s.etag.clone()),
                )
            })
            .collect()
    }

    /// The whole level below `prefix` (delimiter `/`), sorted: what S3 returns over its pages.
    fn level(&self, prefix: &str) -> Level {
        let mut level = Level::default();
        let above = prefix.len() < REPO_DIR.len() && REPO_DIR.starts_with(prefix);
        if above {
            // Above the repositories: every generated key falls under one sub-prefix.
            level.prefixes.push(REPO_DIR.to_string());
        }
        let mut add = |meta: ObjectMeta| match meta.key[prefix.len()..].find('/') {
            Some(at) => level
                .prefixes
                .push(meta.key[..prefix.len() + at + 1].to_string()),
            None => level.objects.push(meta),
        };
        let mut index = if above {
            self.spec.repos
        } else {
            self.first_repo(prefix, None)
        };
        while index < self.spec.repos && self.repo_overlaps(index, prefix) {
            let rp = format!("{}/", self.spec.repo_name(index));
            if prefix.len() < rp.len() {
                // Names hold no `/`: the level's entry for this repository is `<name>/`.
                add(ObjectMeta::new(rp, 0, self.epoch(), None));
            } else {
                self.repo_keys(index, prefix, None)
                    .into_iter()
                    .for_each(&mut add);
            }
            index += 1;
        }
        self.state_keys(prefix, None).into_iter().for_each(add);
        level.normalize();
        level
    }
}

/// Where a listing is: the next repository to synthesize, the rest of the current one, and the
/// state objects (a snapshot taken when the listing started) not yet merged in.
struct Cursor {
    next_repo: u64,
    current: VecDeque<ObjectMeta>,
    state: VecDeque<ObjectMeta>,
    done: bool,
}

#[async_trait]
impl Store for GeneratedStore {
    fn describe(&self) -> String {
        let s = &self.spec;
        format!(
            "{GENERATED_SCHEME}?repos={}&tags={}&layers={}&garbage={}&dirty={}&seed={}",
            s.repos, s.tags, s.layers, s.garbage, s.dirty, s.seed
        )
    }

    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
    ) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        let cursor = Cursor {
            next_repo: self.first_repo(prefix, after),
            current: VecDeque::new(),
            state: self.state_keys(prefix, after),
            done: false,
        };
        stream::unfold(cursor, move |mut c| async move {
            if c.done {
                return None;
            }
            let mut page = Vec::with_capacity(PAGE);
            while page.len() < PAGE {
                if c.current.is_empty()
                    && c.next_repo < self.spec.repos
                    && self.repo_overlaps(c.next_repo, prefix)
                {
                    c.current = self.repo_keys(c.next_repo, prefix, after);
                    c.next_repo += 1;
                    continue;
                }
                let take_state = match (c.current.front(), c.state.front()) {
                    (Some(g), Some(s)) => s.key < g.key,
                    (None, Some(_)) => true,
                    (Some(_), None) => false,
                    (None, None) => break,
                };
                let next = if take_state {
                    c.state.pop_front()
                } else {
                    c.current.pop_front()
                };
                page.extend(next);
            }
            // Like S3, an empty listing is one empty page; a full last page is not followed by
            // an empty one.
            let more = !c.current.is_empty()
                || !c.state.is_empty()
                || (c.next_repo < self.spec.repos && self.repo_overlaps(c.next_repo, prefix));
            c.done = !more;
            Some((Ok(page), c))
        })
        .boxed()
    }

    fn list_level_pages<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Level>> {
        stream::iter(self.level(prefix).into_pages(PAGE).into_iter().map(Ok)).boxed()
    }

    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object> {
        if let Some(s) = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            if s.body.len() as u64 > limit {
                return Err(StoreError::TooLarge {
                    op: Op::Get,
                    key: key.to_string(),
                    limit,
                });
            }
            return Ok(Object {
                body: s.body.clone(),
                etag: Some(s.etag.clone()),
            });
        }
        let (repo, entry) = self.lookup(key).ok_or_else(|| StoreError::NotFound {
            op: Op::Get,
            key: key.to_string(),
        })?;
        if u64::from(entry.size) > limit {
            return Err(StoreError::TooLarge {
                op: Op::Get,
                key: key.to_string(),
                limit,
            });
        }
        Ok(Object {
            body: Bytes::from(self.body(repo, entry.kind)),
            etag: Some(entry.etag()),
        })
    }

    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>> {
        if let Some(s) = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            let meta = ObjectMeta::new(key, s.body.len() as u64, s.modified, Some(s.etag.clone()));
            return Ok(Some((meta, s.metadata.clone())));
        }
        Ok(self
            .lookup(key)
            .map(|(_, e)| (self.meta(key.to_string(), &e), Metadata::new())))
    }

    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        condition: PutCondition,
        metadata: Metadata,
    ) -> StoreResult<PutOutcome> {
        if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
            return Err(StoreError::InvalidKey {
                key: key.to_string(),
                reason: "empty, absolute or a directory",
            });
        }
        let generated = self.lookup(key).map(|(_, e)| e.etag());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let current = state.get(key).map(|s| s.etag.clone()).or(generated.clone());
        let holds = match &condition {
            PutCondition::None => true,
            PutCondition::IfNoneMatch => current.is_none(),
            PutCondition::IfMatch(etag) => current.as_deref() == Some(etag.as_str()),
        };
        if !holds {
            return Ok(PutOutcome::PreconditionFailed);
        }
        if generated.is_some() {
            // The generator's content is fixed: a registry's own write is not what this store
            // measures.
            return Err(StoreError::Request {
                op: Op::Put,
                key: key.to_string(),
                message: "the generated bucket's own keys are read-only".into(),
            });
        }
        let n = self.writes.fetch_add(1, Ordering::Relaxed);
        let etag = format!("\"{}-{n}\"", hex(&sha256(&body)[..12]));
        state.insert(
            key.to_string(),
            Stored {
                body,
                etag: etag.clone(),
                modified: self.now(),
                metadata,
            },
        );
        Ok(PutOutcome::Written { etag })
    }

    async fn server_time(&self) -> StoreResult<SystemTime> {
        Ok(self.now())
    }

    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            if state.remove(key).is_none() && self.parse_key(key).is_some() {
                self.deleted_generated.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use futures::TryStreamExt;

    use super::*;
    use crate::digest::Digest;
    use crate::gc::{run_gc, GcOptions};
    use crate::layout::{self, LayoutOptions};

    fn spec(repos: u64, tags: u64, layers: u64, garbage: u64) -> GeneratedSpec {
        GeneratedSpec {
            repos,
            tags,
            layers,
            garbage,
            dirty: 1,
            seed: 7,
        }
    }

    async fn keys(store: &GeneratedStore, prefix: &str) -> Vec<ObjectMeta> {
        let pages: Vec<Vec<ObjectMeta>> = store.list(prefix).try_collect().await.expect("list");
        assert!(
            pages.iter().all(|p| p.len() <= PAGE),
            "pages of at most 1000"
        );
        pages.into_iter().flatten().collect()
    }

    #[test]
    fn parses_urls() {
        let s: GeneratedSpec = "generated:?repos=10000&tags=90&layers=4&garbage=10&seed=3"
            .parse()
            .expect("valid");
        assert_eq!(s, spec(10000, 90, 4, 10).with_seed(3));
        assert_eq!(s.total_keys(), 10000 * (2 + 100 * 6));
        let sparse: GeneratedSpec = "generated:?repos=10&dirty=4&garbage=1&tags=1&layers=0"
            .parse()
            .expect("valid");
        assert_eq!((sparse.dirty_repos(), sparse.garbage_keys()), (3, 6));
        assert_eq!(sparse.total_keys(), 10 * 4 + 6);
        assert!(sparse.is_dirty(8) && !sparse.is_dirty(9));
        assert_eq!("generated:".parse(), Ok(GeneratedSpec::default()));
        for bad in [
            "generated:?repos=0",
            "generated:?dirty=0",
            "generated:?repos=x",
            "generated:?colour=red",
            "generated:?repos",
            "s3://b",
        ] {
            assert!(bad.parse::<GeneratedSpec>().is_err(), "{bad}");
        }
    }

    impl GeneratedSpec {
        fn with_seed(mut self, seed: u64) -> Self {
            self.seed = seed;
            self
        }
    }

    #[tokio::test]
    async fn listing_is_sorted_complete_and_paged() {
        let s = spec(23, 5, 3, 2);
        let store = GeneratedStore::new(s.clone());
        let all = keys(&store, "").await;
        assert_eq!(all.len() as u64, s.total_keys());
        assert!(all.windows(2).all(|w| w[0].key < w[1].key), "sorted");
        // A prefix inside one repository, one spanning several, and one matching nothing.
        let one = format!("{}/blobs/", s.repo_name(4));
        let under: Vec<_> = all.iter().filter(|o| o.key.starts_with(&one)).collect();
        assert_eq!(keys(&store, &one).await.iter().collect::<Vec<_>>(), under);
        assert_eq!(
            keys(&store, "bench/app-00001").await.len() as u64,
            (10..20).map(|r| s.keys_of_repo(r)).sum::<u64>()
        );
        assert!(keys(&store, "nothing/").await.is_empty());
        // State objects merge into the order.
        store
            .put(
                "_ocigc/pending/x.json",
                Bytes::from_static(b"{}"),
                PutCondition::None,
            )
            .await
            .expect("put");
        store
            .put(
                "bench/app-000003/zz",
                Bytes::from_static(b"1"),
                PutCondition::None,
            )
            .await
            .expect("put");
        let all = keys(&store, "").await;
        assert_eq!(all.len() as u64, s.total_keys() + 2);
        assert!(all.windows(2).all(|w| w[0].key < w[1].key), "sorted");
        assert_eq!(all[0].key, "_ocigc/pending/x.json");
    }

    /// Listings after a key and level listings agree with the full listing, whatever the key
    /// or prefix: inside a repository, between two, above all of them, in the state objects.
    #[tokio::test]
    async fn ranges_and_levels_agree_with_the_full_listing() {
        let s = GeneratedSpec {
            dirty: 2,
            ..spec(12, 3, 2, 1)
        };
        let store = GeneratedStore::new(s.clone());
        for key in ["_ocigc/cache/x", "_ocigc/leases/y", "zz/top"] {
            store
                .put(key, Bytes::from_static(b"{}"), PutCondition::None)
                .await
                .expect("put");
        }
        let all: Vec<String> = keys(&store, "").await.into_iter().map(|o| o.key).collect();
        let mut afters: Vec<String> = ["", "_", "_ocigc/", "bench/", "bench/app-", "zz", "~"]
            .map(String::from)
            .into();
        afters.extend(all.iter().step_by(7).cloned());
        afters.push(format!("{}/", s.repo_name(5)));
        afters.push(format!("{}/blobs/sha256/8", s.repo_name(5)));
        for prefix in ["", "bench/", &format!("{}/", s.repo_name(5)), "_ocigc/"] {
            for after in &afters {
                let pages: Vec<Vec<ObjectMeta>> = store
                    .list_after(prefix, Some(after))
                    .try_collect()
                    .await
                    .expect("list");
                let got: Vec<String> = pages.into_iter().flatten().map(|o| o.key).collect();
                let want: Vec<String> = all
                    .iter()
                    .filter(|k| k.starts_with(prefix) && k.as_str() > after.as_str())
                    .cloned()
                    .collect();
                assert_eq!(got, want, "prefix {prefix:?} after {after:?}");
            }
        }
        let repo = s.repo_name(4);
        for prefix in [
            "".to_string(),
            "b".into(),
            "bench/".into(),
            "bench/app-00001".into(),
            format!("{repo}/"),
            format!("{repo}/blobs/"),
            format!("{repo}/blobs/sha256/"),
            "_ocigc/".into(),
            "nothing/".into(),
        ] {
            let pages: Vec<Level> = store
                .list_level_pages(&prefix)
                .try_collect()
                .await
                .expect("level");
            assert!(!pages.is_empty(), "{prefix:?}: at least one page");
            let mut level = store.list_level(&prefix).await.expect("level");
            let (mut objects, mut prefixes) = (Vec::new(), Vec::new());
            for k in all.iter().filter(|k| k.starts_with(&prefix)) {
                match k[prefix.len()..].find('/') {
                    Some(at) => prefixes.push(k[..prefix.len() + at + 1].to_string()),
                    None => objects.push(k.clone()),
                }
            }
            prefixes.dedup();
            let got: Vec<String> = level.objects.drain(..).map(|o| o.key).collect();
            assert_eq!((got, level.prefixes), (objects, prefixes), "{prefix:?}");
        }
        // A level wider than a page comes in pages of at most PAGE entries, in order.
        let wide = GeneratedStore::new(spec(2500, 1, 1, 0));
        let pages: Vec<Level> = wide
            .list_level_pages("bench/")
            .try_collect()
            .await
            .expect("level");
        assert_eq!(
            pages.iter().map(|p| p.prefixes.len()).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
        let names: Vec<&String> = pages.iter().flat_map(|p| &p.prefixes).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]));
    }

    #[tokio::test]
    async fn every_listed_object_reads_back_with_its_digest() {
        let s = spec(3, 4, 2, 3);
        let store = GeneratedStore::new(s.clone());
        let mut manifests = 0;
        for o in keys(&store, "").await {
            let got = store.get(&o.key).await.expect("get");
            assert_eq!(got.body.len() as u64, o.size, "{}", o.key);
            assert_eq!(got.etag, o.etag);
            let head = store.head(&o.key).await.expect("head").expect("exists");
            assert_eq!(head, o);
            if let Some((_, hex)) = o.key.split_once("/blobs/sha256/") {
                assert_eq!(&*Digest::sha256_of(&got.body).hex(), hex, "{}", o.key);
                if got.body.starts_with(
                    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest"#,
                ) {
                    manifests += 1;
                    let doc: serde_json::Value = serde_json::from_slice(&got.body).expect("json");
                    let repo = o.key.split("/blobs/").next().expect("repo");
                    for d in doc["layers"]
                        .as_array()
                        .expect("layers")
                        .iter()
                        .chain([&doc["config"]])
                    {
                        let digest = d["digest"].as_str().expect("digest");
                        let key = format!("{repo}/blobs/sha256/{}", &digest[7..]);
                        assert!(store.head(&key).await.expect("head").is_some(), "{key}");
                    }
                }
            }
        }
        assert_eq!(manifests, 3 * (4 + 3));
        let index = store
            .get(&format!("{}/index.json", s.repo_name(1)))
            .await
            .expect("index");
        let doc: serde_json::Value = serde_json::from_slice(&index.body).expect("json");
        assert_eq!(doc["manifests"].as_array().map(Vec::len), Some(4));
        let missing = format!("{}/blobs/sha256/{}", s.repo_name(1), "0".repeat(64));
        assert!(store.get(&missing).await.is_err_and(|e| e.is_not_found()));
        assert!(store
            .head("bench/app-000009/index.json")
            .await
            .expect("head")
            .is_none());
    }

    #[tokio::test]
    async fn writes_state_and_counts_deletes() {
        let store = GeneratedStore::new(spec(2, 1, 1, 1));
        let key = "_ocigc/leases/a.json";
        let Ok(PutOutcome::Written { etag }) = store
            .put(key, Bytes::from_static(b"one"), PutCondition::IfNoneMatch)
            .await
        else {
            panic!("first create must succeed");
        };
        assert_eq!(
            store
                .put(key, Bytes::from_static(b"two"), PutCondition::IfNoneMatch)
                .await
                .expect("put"),
            PutOutcome::PreconditionFailed
        );
        assert!(matches!(
            store
                .put(key, Bytes::from_static(b"two"), PutCondition::IfMatch(etag))
                .await,
            Ok(PutOutcome::Written { .. })
        ));
        assert_eq!(store.get(key).await.expect("get").body, &b"two"[..]);
        let generated = format!("{}/oci-layout", store.spec().repo_name(0));
        assert!(store
            .put(&generated, Bytes::new(), PutCondition::None)
            .await
            .is_err());
        let failed = store
            .delete_batch(&[key.to_string(), generated.clone()])
            .await
            .expect("delete");
        assert!(failed.is_empty());
        assert!(store.head(key).await.expect("head").is_none());
        assert!(store.head(&generated).await.expect("head").is_some());
        assert_eq!(store.deleted_generated(), 1);
        let t0 = store.server_time().await.expect("time");
        assert!(t0 >= SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH_SECS));
    }

    #[tokio::test]
    async fn a_dry_run_finds_exactly_the_garbage() {
        let s = GeneratedSpec {
            dirty: 3,
            ..spec(12, 6, 3, 2)
        };
        let store = Arc::new(GeneratedStore::new(s.clone()));
        let opts = GcOptions {
            grace: Duration::ZERO,
            delay: Duration::ZERO,
            dry_run: true,
            ..GcOptions::default()
        };
        let layout = layout::by_name("oci", LayoutOptions::default()).expect("oci layout");
        let report = run_gc(store.clone(), layout, &opts).await.expect("gc");
        let json = serde_json::to_value(&report).expect("report");
        let repos = json["repositories"].as_array().expect("repositories");
        assert_eq!(repos.len() as u64, s.repos);
        let planned: HashSet<String> = repos
            .iter()
            .flat_map(|r| r["deleted"].as_array().into_iter().flatten())
            .filter_map(|d| d["key"].as_str().map(str::to_string))
            .collect();
        assert_eq!(planned.len() as u64, s.garbage_keys());
        assert_eq!(
            s.garbage_keys(),
            4 * 2 * 5,
            "garbage in repositories 0, 3, 6 and 9"
        );
        // Everything planned belongs to a garbage image: no tagged manifest, config or layer.
        let mut reachable = HashSet::new();
        for r in 0..s.repos {
            let name = s.repo_name(r);
            let index = store
                .get(&format!("{name}/index.json"))
                .await
                .expect("index");
            let doc: serde_json::Value = serde_json::from_slice(&index.body).expect("json");
            for m in doc["manifests"].as_array().expect("manifests") {
                let digest = m["digest"].as_str().expect("digest");
                let key = format!("{name}/blobs/sha256/{}", &digest[7..]);
                let body = store.get(&key).await.expect("manifest").body;
                let doc: serde_json::Value = serde_json::from_slice(&body).expect("json");
                reachable.insert(key);
                for d in doc["layers"]
                    .as_array()
                    .expect("layers")
                    .iter()
                    .chain([&doc["config"]])
                {
                    let digest = d["digest"].as_str().expect("digest");
                    reachable.insert(format!("{name}/blobs/sha256/{}", &digest[7..]));
                }
            }
        }
        assert_eq!(
            reachable.len() as u64,
            s.repos * s.tags * (2 + s.layers),
            "every tagged image's blobs"
        );
        assert!(planned.is_disjoint(&reachable));
        assert_eq!(store.deleted_generated(), 0, "a dry run deletes nothing");
    }
}
