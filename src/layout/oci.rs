//! The `oci` layout: one OCI Image Layout per repository, as builders write it and as zot
//! stores it on S3: `<repo>/oci-layout`, `<repo>/index.json`, `<repo>/blobs/<alg>/<hex>`.
//!
//! zot with dedupe on S3 stores a digest's content once and a 0-byte *placeholder* at every
//! other repository's `blobs/sha256/<hex>`; which copy is the content lives only in zot's own
//! database. So a 0-byte blob whose digest is not that of empty content is a placeholder, its
//! content may be in any repository, and a content copy is kept while any placeholder of its
//! digest exists (the copies are "linked" blobs of their repository).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    partition_all, unit, ContentCopy, Doomed, KeyKind, Layout, Order, Partition, Partitioner,
    Rejected, Removal, Repository, Roots, RootsError, RootsVersion, StoredTag, StoredUntagged,
    TagError, TagSet,
};
use crate::digest::Digest;
use crate::manifest;
use crate::store::{ObjectMeta, PutCondition, PutOutcome, Store, StoreError};

const MARKER: &str = "oci-layout";
const INDEX: &str = "index.json";
const BLOBS: &str = "blobs/";
/// The annotation that names an `index.json` entry's tag.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Attempts at a read-modify-write of `index.json` that a pusher keeps changing.
const INDEX_ATTEMPTS: usize = 5;
/// What ocigc writes as the marker of a repository it empties but must keep.
const MARKER_BODY: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// The index of a repository with no images.
const EMPTY_INDEX: &[u8] =
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;

/// Largest `index.json` ocigc reads (distribution caps manifests at 4 MiB; an index of a
/// repository with tens of thousands of tags is larger). A larger one fails its repository
/// closed.
pub const MAX_INDEX_SIZE: u64 = 16 * 1024 * 1024;

/// The digests of empty content: a 0-byte blob of one of these is real content, not a
/// placeholder.
const EMPTY_CONTENT: [&str; 2] = [
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce\
     47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
];

/// The digest of a blob key relative to its repository prefix (`blobs/<alg>/<hex>`).
fn blob_digest(rest: &str) -> Option<Digest> {
    let (alg, hex) = rest.strip_prefix(BLOBS)?.split_once('/')?;
    if hex.contains('/') {
        return None;
    }
    Digest::from_parts(alg, hex)
}

fn is_placeholder(object: &ObjectMeta, digest: &Digest) -> bool {
    // A defect (a FIFO, a symlink) lists as 0 bytes too, and is no placeholder.
    object.size == 0 && object.defect.is_none() && !EMPTY_CONTENT.contains(&&*digest.as_str())
}

/// The OCI Image Layout per repository.
#[derive(Clone, Copy, Debug, Default)]
pub struct OciLayout;

#[async_trait]
impl Layout for OciLayout {
    fn name(&self) -> &'static str {
        "oci"
    }

    fn removes_untagged(&self) -> bool {
        true
    }

    fn partition(&self, objects: Vec<ObjectMeta>) -> Partition {
        let mut partition = partition_all(Box::new(OciPartitioner::new()), objects);
        // With every repository in hand, the content copy of a placeholder is the first in
        // name order, whether it was listed before or after the placeholder.
        partition.placeholders = placeholders(&partition.repositories);
        partition
    }

    fn streaming_partitioner(&self) -> Option<Box<dyn Partitioner + '_>> {
        Some(Box::new(OciPartitioner::new()))
    }

    fn may_split(&self, prefix: &str, objects: &[ObjectMeta], _prefixes: &[String]) -> bool {
        // A layout owns every key below it that no nested layout owns (a layout at the
        // bucket root too), so a prefix with a marker is one part; below a prefix without
        // one, every layout (nested, or inside a `blobs/`) lies in one sub-prefix.
        !objects
            .iter()
            .any(|o| o.key.strip_prefix(prefix) == Some(MARKER))
    }

    fn placeholders_in(&self, repo: &Repository) -> Vec<Digest> {
        blobs_of(repo)
            .filter(|(o, d)| is_placeholder(o, d))
            .map(|(_, d)| d)
            .collect()
    }

    fn content_copies(
        &self,
        repo: &Repository,
        wanted: &dyn Fn(&Digest) -> bool,
    ) -> Vec<(Digest, ContentCopy)> {
        blobs_of(repo)
            .filter(|(o, d)| !is_placeholder(o, d) && wanted(d))
            .map(|(o, d)| {
                let copy = ContentCopy {
                    key: o.key.clone(),
                    size: o.size,
                };
                (d, copy)
            })
            .collect()
    }

    fn kept_from_elsewhere(&self) -> &'static str {
        "a placeholder in another repository (its content copy)"
    }

    fn is_placeholder(&self, object: &ObjectMeta, digest: &Digest) -> bool {
        is_placeholder(object, digest)
    }

    async fn linked_blobs(
        &self,
        _store: &dyn Store,
        partition: &Partition,
        _concurrency: usize,
    ) -> Result<HashMap<String, Vec<Digest>>, StoreError> {
        let mut linked: HashMap<String, Vec<Digest>> = HashMap::new();
        if partition.placeholders.is_empty() {
            return Ok(linked);
        }
        for repo in &partition.repositories {
            for (o, d) in blobs_of(repo) {
                if !is_placeholder(o, &d) && partition.placeholders.contains_key(&d) {
                    linked.entry(repo.name.clone()).or_default().push(d);
                }
            }
        }
        Ok(linked)
    }

    fn empty_repository(&self, repo: &Repository) -> Vec<(String, Bytes)> {
        vec![
            (
                format!("{}{INDEX}", repo.prefix),
                Bytes::from_static(EMPTY_INDEX),
            ),
            (
                format!("{}{MARKER}", repo.prefix),
                Bytes::from_static(MARKER_BODY),
            ),
        ]
    }

    fn repository_prefix(&self, name: &str) -> String {
        format!("{name}/")
    }

    fn classify(&self, repo: &Repository, key: &str) -> KeyKind {
        key.strip_prefix(repo.prefix.as_str())
            .and_then(blob_digest)
            .map_or(KeyKind::Other, KeyKind::Blob)
    }

    fn content_key(
        &self,
        repo: &Repository,
        digest: &Digest,
        _listed: Option<&ObjectMeta>,
    ) -> String {
        format!(
            "{}blobs/{}/{}",
            repo.prefix,
            digest.algorithm(),
            digest.hex()
        )
    }

    async fn read_roots(&self, store: &dyn Store, repo: &Repository) -> Result<Roots, RootsError> {
        let key = format!("{}{INDEX}", repo.prefix);
        let invalid = |reason: String| RootsError::Invalid {
            key: key.clone(),
            reason,
        };
        let object = match store.get_capped(&key, MAX_INDEX_SIZE).await {
            Ok(o) => o,
            Err(StoreError::NotFound { .. }) => return Err(RootsError::Missing(key)),
            Err(e @ StoreError::TooLarge { .. }) => return Err(invalid(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        let refs = manifest::references(&object.body).map_err(|e| invalid(e.to_string()))?;
        // umoci writes `"manifests": null` for a layout without images, and Go reads that as
        // an empty list; a document without the field is no index at all.
        if !refs.has_manifests {
            return Err(invalid("no \"manifests\" list".into()));
        }
        Ok(Roots {
            descriptors: refs.children,
            version: object.etag.map(RootsVersion::Etag),
            ..Roots::default()
        })
    }

    async fn roots_version(
        &self,
        store: &dyn Store,
        repo: &Repository,
    ) -> Result<Option<RootsVersion>, RootsError> {
        let key = format!("{}{INDEX}", repo.prefix);
        match store.head(&key).await? {
            Some(meta) => Ok(meta.etag.map(RootsVersion::Etag)),
            None => Err(RootsError::Missing(key)),
        }
    }

    async fn read_tags(&self, store: &dyn Store, repo: &Repository) -> Result<TagSet, TagError> {
        let (doc, version, modified) = read_index(store, &repo.prefix, Some(repo)).await?;
        let pushed: HashMap<&str, std::time::SystemTime> = repo
            .objects
            .iter()
            .map(|o| (o.key.as_str(), o.last_modified))
            .collect();
        let mut set = TagSet {
            version,
            shared_document: true,
            ..TagSet::default()
        };
        for entry in entries(&doc) {
            let digest = entry_digest(entry).ok_or_else(|| {
                TagError::Roots(RootsError::Invalid {
                    key: format!("{}{INDEX}", repo.prefix),
                    reason: "an entry without a valid digest".into(),
                })
            })?;
            // A manifest pushed since the listing was pushed no earlier than the index moved.
            let pushed_at = pushed
                .get(self.content_key(repo, &digest, None).as_str())
                .copied()
                .unwrap_or(modified);
            match entry_tag(entry) {
                Some(name) => set.tags.push(StoredTag {
                    name: name.to_string(),
                    digest,
                    moved_by: modified,
                    pushed_at,
                    entry: Some(entry.clone()),
                }),
                None => set.untagged.push(StoredUntagged {
                    digest,
                    moved_by: modified,
                    entry: Some(entry.clone()),
                    size: None,
                    subject: None,
                }),
            }
        }
        Ok(set)
    }

    async fn remove_tags(
        &self,
        store: &dyn Store,
        repo: &Repository,
        set: &TagSet,
        doomed: &[Doomed],
    ) -> Result<Vec<Removal>, TagError> {
        let key = format!("{}{INDEX}", repo.prefix);
        let Some(version) = set.version.clone() else {
            return Err(TagError::Unsupported(format!(
                "{key} has no ETag: it cannot be rewritten safely"
            )));
        };
        // The decision was made on `version`: the document is read again only to keep what
        // ocigc does not know (other fields); a change since shows as a failed If-Match.
        let (mut doc, now, _) = read_index(store, &repo.prefix, None).await?;
        if now.as_deref() != Some(version.as_str()) {
            return Err(TagError::Conflict);
        }
        let doomed_set: HashSet<(Option<&str>, &Digest)> = doomed
            .iter()
            .map(|d| (d.tag.as_deref(), &d.digest))
            .collect();
        if let Some(list) = doc.get_mut("manifests").and_then(|m| m.as_array_mut()) {
            list.retain(|e| {
                !entry_digest(e).is_some_and(|d| doomed_set.contains(&(entry_tag(e), &d)))
            });
        }
        let body = serde_json::to_vec(&doc)
            .map_err(|e| TagError::Unsupported(format!("{key} cannot be written back: {e}")))?;
        match store
            .put(&key, body.into(), PutCondition::IfMatch(version))
            .await?
        {
            PutOutcome::Written { .. } => Ok(vec![Removal::Removed; doomed.len()]),
            PutOutcome::PreconditionFailed => Err(TagError::Conflict),
        }
    }

    async fn restore_tag(
        &self,
        store: &dyn Store,
        name: &str,
        tag: Option<&str>,
        digest: &Digest,
        entry: Option<&serde_json::Value>,
    ) -> Result<(), TagError> {
        let prefix = self.repository_prefix(name);
        let key = format!("{prefix}{INDEX}");
        let entry = entry.cloned().unwrap_or_else(|| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest.to_string(),
            })
        });
        if entry_digest(&entry).as_ref() != Some(digest) || entry_tag(&entry) != tag {
            return Err(TagError::Unsupported(format!(
                "the trashed entry of {} does not name it",
                tag.map_or_else(|| digest.to_string(), str::to_string)
            )));
        }
        for _ in 0..INDEX_ATTEMPTS {
            let (mut doc, version, _) = read_index(store, &prefix, None).await?;
            let Some(version) = version else {
                return Err(TagError::Unsupported(format!(
                    "{key} has no ETag: it cannot be rewritten safely"
                )));
            };
            let exists = entries(&doc).any(|e| match tag {
                Some(t) => entry_tag(e) == Some(t),
                None => entry_tag(e).is_none() && entry_digest(e).as_ref() == Some(digest),
            });
            if exists {
                return Err(TagError::Exists(
                    tag.map_or_else(|| digest.to_string(), str::to_string),
                ));
            }
            let Some(list) = doc.get_mut("manifests").and_then(|m| m.as_array_mut()) else {
                return Err(TagError::Roots(RootsError::Invalid {
                    key: key.clone(),
                    reason: "no \"manifests\" list".into(),
                }));
            };
            list.push(entry.clone());
            let body = serde_json::to_vec(&doc)
                .map_err(|e| TagError::Unsupported(format!("{key} cannot be written back: {e}")))?;
            match store
                .put(&key, body.into(), PutCondition::IfMatch(version))
                .await?
            {
                PutOutcome::Written { .. } => return Ok(()),
                // A pusher wrote meanwhile: read again, look again.
                PutOutcome::PreconditionFailed => continue,
            }
        }
        Err(TagError::Conflict)
    }

    fn deletion_phases(&self, repo: &Repository) -> Vec<Vec<ObjectMeta>> {
        let index = format!("{}{INDEX}", repo.prefix);
        let marker = format!("{}{MARKER}", repo.prefix);
        let (mut first, mut middle, mut last) = (Vec::new(), Vec::new(), Vec::new());
        for o in &repo.objects {
            if o.key == index {
                first.push(o.clone());
            } else if o.key == marker {
                // The marker goes last: while any key remains, a resumed deletion still finds
                // the repository (and its keys cannot fall to a parent repository).
                last.push(o.clone());
            } else {
                middle.push(o.clone());
            }
        }
        vec![first, middle, last]
    }
}

/// `index.json` under `prefix` as a JSON document, its ETag and its LastModified (that of
/// the listing of `repo` when the ETags agree, else of a HEAD made after the read: no
/// earlier than the version read, so an age taken from it is never too old).
async fn read_index(
    store: &dyn Store,
    prefix: &str,
    repo: Option<&Repository>,
) -> Result<(serde_json::Value, Option<String>, std::time::SystemTime), TagError> {
    let key = format!("{prefix}{INDEX}");
    let invalid = |reason: String| {
        TagError::Roots(RootsError::Invalid {
            key: key.clone(),
            reason,
        })
    };
    let object = match store.get_capped(&key, MAX_INDEX_SIZE).await {
        Ok(o) => o,
        Err(StoreError::NotFound { .. }) => return Err(RootsError::Missing(key).into()),
        Err(e @ StoreError::TooLarge { .. }) => return Err(invalid(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    let doc: serde_json::Value =
        serde_json::from_slice(&object.body).map_err(|e| invalid(e.to_string()))?;
    if !doc
        .get("manifests")
        .is_some_and(|m| m.is_array() || m.is_null())
    {
        return Err(invalid("no \"manifests\" list".into()));
    }
    let listed = repo
        .and_then(|r| r.objects.iter().find(|o| o.key == key))
        .filter(|o| o.etag.is_some() && o.etag == object.etag);
    let modified = match listed {
        Some(o) => o.last_modified,
        None => match store.head(&key).await? {
            Some(meta) => meta.last_modified,
            None => return Err(RootsError::Missing(key).into()),
        },
    };
    // `"manifests": null` is an empty list (umoci writes it so).
    let mut doc = doc;
    if doc.get("manifests").is_some_and(serde_json::Value::is_null) {
        doc["manifests"] = serde_json::Value::Array(Vec::new());
    }
    Ok((doc, object.etag, modified))
}

/// The entries of an index document.
fn entries(doc: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    doc.get("manifests")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
}

/// The tag an `index.json` entry carries, if any.
fn entry_tag(entry: &serde_json::Value) -> Option<&str> {
    entry.get("annotations")?.get(REF_NAME)?.as_str()
}

/// The digest an `index.json` entry names.
fn entry_digest(entry: &serde_json::Value) -> Option<Digest> {
    Digest::parse(entry.get("digest")?.as_str()?)
}

/// The blobs of a repository with their digests.
fn blobs_of(repo: &Repository) -> impl Iterator<Item = (&ObjectMeta, Digest)> {
    repo.objects.iter().filter_map(|o| {
        let rest = o.key.strip_prefix(repo.prefix.as_str())?;
        blob_digest(rest).map(|d| (o, d))
    })
}

/// Every digest with a placeholder somewhere, and a content copy of it if there is one: two
/// passes, so that only digests with placeholders are ever held (not every blob's).
fn placeholders(repositories: &[Repository]) -> HashMap<Digest, Option<ContentCopy>> {
    let wanted: HashSet<Digest> = repositories
        .iter()
        .flat_map(blobs_of)
        .filter(|(o, d)| is_placeholder(o, d))
        .map(|(_, d)| d)
        .collect();
    let mut out: HashMap<Digest, Option<ContentCopy>> = HashMap::with_capacity(wanted.len());
    if wanted.is_empty() {
        return out;
    }
    for (o, d) in repositories.iter().flat_map(blobs_of) {
        if wanted.contains(&d) && !is_placeholder(o, &d) {
            out.entry(d).or_insert_with(|| {
                Some(ContentCopy {
                    key: o.key.clone(),
                    size: o.size,
                })
            });
        }
    }
    for d in wanted {
        out.entry(d).or_insert(None);
    }
    out
}

/// Keys below an open directory whose owner is not known yet.
///
/// The owner of a key is the longest directory above it with an `oci-layout` marker that is
/// not inside another layout's `blobs/` (such a layout is *reserved*: its keys are content of
/// the layout whose `blobs/` holds it). A directory's marker sorts after its `blobs/`,
/// `index.json` and most nested directories, so keys wait in the pool of the deepest open
/// directory until that directory closes (or its marker is known), then move up or go to it.
#[derive(Debug, Default)]
struct Pool {
    /// Keys that are this directory's if it is a layout.
    own: Vec<ObjectMeta>,
    /// Keys of `own` held only by number: no directory that could still own them is one
    /// that can be collected (the bucket root, invalid names, known non-layouts).
    own_counted: u64,
    /// Keys of a reserved layout below (counted there), on their way to the nearest layout
    /// that owns them.
    adopted: Vec<ObjectMeta>,
    /// Keys of `adopted` held only by number.
    adopted_counted: u64,
    /// Layouts below whose reservation depends on markers not known yet.
    deferred: Vec<Deferred>,
}

impl Pool {
    fn held(&self) -> usize {
        self.own.len()
            + self.adopted.len()
            + self.deferred.iter().map(|d| d.pool.held()).sum::<usize>()
    }

    fn absorb(&mut self, other: Pool) {
        self.own.extend(other.own);
        self.own_counted += other.own_counted;
        self.adopted.extend(other.adopted);
        self.adopted_counted += other.adopted_counted;
        self.deferred.extend(other.deferred);
    }

    /// Drops the keys themselves, keeping their number.
    fn count_only(&mut self) {
        self.own_counted += std::mem::take(&mut self.own).len() as u64;
        self.adopted_counted += std::mem::take(&mut self.adopted).len() as u64;
    }

    /// Records that directory `dir` is (or is not) a layout in every deferred layout that
    /// waits for it.
    fn set_status(&mut self, dir: &str, present: bool) {
        for d in &mut self.deferred {
            for (holder, status) in &mut d.holders {
                if holder == dir {
                    *status = Some(present);
                }
            }
            d.pool.set_status(dir, present);
        }
    }
}

/// A layout inside the `blobs/` of directories whose markers are not known yet.
#[derive(Debug)]
struct Deferred {
    dir: String,
    /// Directories whose `blobs/` holds `dir`, shallowest first, and whether each is a layout.
    holders: Vec<(String, Option<bool>)>,
    pool: Pool,
}

impl Deferred {
    fn ready(&self) -> bool {
        self.holders.iter().all(|(_, s)| s.is_some())
    }
}

/// A directory the listing is inside of.
#[derive(Debug)]
struct Frame {
    dir: String,
    /// Whether `dir` has a marker; `None` until the listing reaches where it would sort.
    marker: Option<bool>,
    /// No directory from the root down to this one can be a collected repository, so keys
    /// that reach this pool are kept by number only.
    counts_only: bool,
    pool: Pool,
}

impl Frame {
    fn new(dir: String, parent_counts_only: bool) -> Frame {
        let counts_only = parent_counts_only && !may_collect(&dir, None);
        Frame {
            dir,
            marker: None,
            counts_only,
            pool: Pool::default(),
        }
    }
}

/// Whether the layout at `dir`, with marker status `marker`, may be a collected repository.
fn may_collect(dir: &str, marker: Option<bool>) -> bool {
    marker != Some(false) && super::validate_repository_name(dir.trim_end_matches('/')).is_ok()
}

/// Where resolved layouts go.
#[derive(Debug, Default)]
struct Sink {
    done: Vec<Repository>,
    rejected: Vec<Rejected>,
    /// Placeholder digests of the repositories handed out, with the first content copy (by
    /// repository name, then key) in a repository handed out no earlier.
    placeholders: HashMap<Digest, Option<(String, ContentCopy)>>,
}

impl Sink {
    /// Resolves every deferred layout of `pool` whose holders are all known, into `pool`.
    fn resolve_ready(&mut self, pool: &mut Pool) {
        if pool.deferred.iter().any(Deferred::ready) {
            let (ready, waiting): (Vec<Deferred>, Vec<Deferred>) =
                std::mem::take(&mut pool.deferred)
                    .into_iter()
                    .partition(Deferred::ready);
            pool.deferred = waiting;
            for d in ready {
                self.resolve(d, pool);
            }
        }
    }

    /// Decides a layout whose holders are known: a repository (or rejected name) of its
    /// own, or content of the layout that reserves it, whose keys go on up through `out`.
    fn resolve(&mut self, item: Deferred, out: &mut Pool) {
        let Deferred {
            dir,
            holders,
            mut pool,
        } = item;
        for mut nested in std::mem::take(&mut pool.deferred) {
            // Holders above `dir` are `dir`'s own; `dir` is a layout; any other is known
            // by now, and one that is not counts as a layout (its keys stay unswept).
            for (h, status) in &mut nested.holders {
                if status.is_none() {
                    let inherited = holders.iter().find(|(x, _)| x == h).and_then(|(_, s)| *s);
                    *status = Some(*h == dir || inherited != Some(false));
                }
            }
            self.resolve(nested, &mut pool);
        }
        match holders.iter().find(|(_, s)| *s != Some(false)) {
            Some((holder, _)) => {
                let holder = holder.trim_end_matches('/');
                self.rejected.push(Rejected {
                    prefix: dir,
                    reason: format!(
                        "inside the blobs/ of repository {holder:?}: content of that repository, \
                         not a repository"
                    ),
                    objects: pool.own.len() as u64 + pool.own_counted,
                });
                out.adopted.extend(pool.own);
                out.adopted.extend(pool.adopted);
                out.adopted_counted += pool.own_counted + pool.adopted_counted;
            }
            None => {
                let mut objects = pool.own;
                if !pool.adopted.is_empty() {
                    // In listing order, as every other repository's.
                    objects.extend(pool.adopted);
                    objects.sort_unstable_by(|a, b| a.key.cmp(&b.key));
                }
                let counted = pool.own_counted + pool.adopted_counted;
                let name = dir.trim_end_matches('/').to_string();
                match unit(name, dir, objects, counted) {
                    Ok(repo) => self.done.push(repo),
                    Err(rejected) => self.rejected.push(rejected),
                }
            }
        }
    }

    /// Notes the placeholders of the repositories handed out by one call, then their
    /// content copies: a copy counts if it is handed out by the same call as the first
    /// placeholder of its digest or later (one listed before is missed, see
    /// [`OciPartitioner`]).
    fn note_placeholders(&mut self) {
        for repo in &self.done {
            for d in OciLayout.placeholders_in(repo) {
                self.placeholders.entry(d).or_insert(None);
            }
        }
        if self.placeholders.is_empty() {
            return;
        }
        for repo in &self.done {
            let wanted = |d: &Digest| self.placeholders.contains_key(d);
            for (d, copy) in OciLayout.content_copies(repo, &wanted) {
                if let Some(slot) = self.placeholders.get_mut(&d) {
                    let better = slot.as_ref().is_none_or(|(name, c)| {
                        (repo.name.as_str(), copy.key.as_str()) < (name.as_str(), c.key.as_str())
                    });
                    if better {
                        *slot = Some((repo.name.clone(), copy));
                    }
                }
            }
        }
    }
}

/// The streaming partitioner of the `oci` layout: a stack of the directories the listing is
/// inside of, each holding the keys whose owner its marker decides.
///
/// [`Partition::placeholders`] from [`Partitioner::finish`] holds every placeholder digest of
/// the repositories handed out (O(placeholders) memory), but a content copy only if it was
/// handed out no earlier than the first placeholder of its digest: remembering every blob
/// for the other case would cost O(blobs). Batch [`Layout::partition`] sees every
/// repository and finds every copy.
#[derive(Debug)]
pub(super) struct OciPartitioner {
    /// `stack[0]` is the bucket root; each next frame a directory inside the one before.
    stack: Vec<Frame>,
    order: Order,
    sink: Sink,
    unowned: u64,
}

impl OciPartitioner {
    pub(super) fn new() -> OciPartitioner {
        OciPartitioner {
            stack: vec![Frame::new(String::new(), true)],
            order: Order::default(),
            sink: Sink::default(),
            unowned: 0,
        }
    }

    fn push_one(&mut self, o: ObjectMeta) {
        if !self.order.accept(&o.key) {
            self.unowned += 1;
            return;
        }
        while self.stack.len() > 1
            && !self
                .stack
                .last()
                .is_some_and(|f| o.key.starts_with(f.dir.as_str()))
        {
            if let Some(frame) = self.stack.pop() {
                self.close(frame);
            }
        }
        let known = self.stack.last().map_or(0, |f| f.dir.len());
        for (i, _) in o.key.match_indices('/').filter(|(i, _)| *i >= known) {
            let parent = self.stack.last().is_none_or(|f| f.counts_only);
            self.stack.push(Frame::new(o.key[..=i].to_string(), parent));
        }
        for idx in 0..self.stack.len() {
            let frame = &self.stack[idx];
            if frame.marker.is_none() {
                let rest = &o.key[frame.dir.len()..];
                if rest >= MARKER {
                    self.marker_known(idx, rest == MARKER);
                }
            }
        }
        if let Some(frame) = self.stack.last_mut() {
            if frame.counts_only {
                frame.pool.own_counted += 1;
            } else {
                frame.pool.own.push(o);
            }
        }
    }

    /// The listing has reached where the marker of `stack[idx]` sorts.
    fn marker_known(&mut self, idx: usize, present: bool) {
        let frame = &mut self.stack[idx];
        frame.marker = Some(present);
        let dir = frame.dir.clone();
        frame.pool.set_status(&dir, present);
        self.sink.resolve_ready(&mut frame.pool);
        // A directory known to be no layout may make the keys below it countable.
        let mut counts_only = idx == 0 || self.stack[idx - 1].counts_only;
        for frame in &mut self.stack[idx..] {
            counts_only = counts_only && !may_collect(&frame.dir, frame.marker);
            if counts_only {
                frame.pool.count_only();
            }
            frame.counts_only = counts_only;
        }
    }

    /// The listing has passed everything under `frame`: its keys go to it or up.
    fn close(&mut self, mut frame: Frame) {
        if frame.marker.is_none() {
            frame.marker = Some(false);
            frame.pool.set_status(&frame.dir, false);
            self.sink.resolve_ready(&mut frame.pool);
        }
        if frame.marker == Some(true) {
            let holders: Vec<(String, Option<bool>)> = self
                .stack
                .iter()
                .filter(|a| {
                    frame
                        .dir
                        .strip_prefix(a.dir.as_str())
                        .is_some_and(|rest| rest.starts_with(BLOBS))
                })
                .map(|a| (a.dir.clone(), a.marker))
                .collect();
            let item = Deferred {
                dir: frame.dir,
                holders,
                pool: frame.pool,
            };
            let Some(parent) = self.stack.last_mut() else {
                return;
            };
            if item.ready() {
                self.sink.resolve(item, &mut parent.pool);
            } else {
                parent.pool.deferred.push(item);
            }
            if parent.counts_only {
                parent.pool.count_only();
            }
        } else if let Some(parent) = self.stack.last_mut() {
            parent.pool.absorb(frame.pool);
            if parent.counts_only {
                parent.pool.count_only();
            }
        }
    }
}

impl Partitioner for OciPartitioner {
    fn push(&mut self, page: Vec<ObjectMeta>) -> Vec<Repository> {
        for o in page {
            self.push_one(o);
        }
        self.sink.note_placeholders();
        std::mem::take(&mut self.sink.done)
    }

    fn finish(mut self: Box<Self>) -> Partition {
        while self.stack.len() > 1 {
            if let Some(frame) = self.stack.pop() {
                self.close(frame);
            }
        }
        let mut root = self
            .stack
            .pop()
            .unwrap_or_else(|| Frame::new(String::new(), true));
        if root.marker.is_none() {
            root.marker = Some(false);
            root.pool.set_status("", false);
        }
        self.sink.resolve_ready(&mut root.pool);
        // Every holder is known by now; a deferred layout left is resolved as reserved by
        // any holder not known (it cannot be), which keeps its keys unswept.
        for mut d in std::mem::take(&mut root.pool.deferred) {
            for (_, s) in &mut d.holders {
                s.get_or_insert(true);
            }
            self.sink.resolve(d, &mut root.pool);
        }
        let pool = root.pool;
        if root.marker == Some(true) {
            self.sink.resolve(
                Deferred {
                    dir: String::new(),
                    holders: Vec::new(),
                    pool,
                },
                &mut Pool::default(),
            );
        } else {
            self.unowned += (pool.own.len() + pool.adopted.len()) as u64
                + pool.own_counted
                + pool.adopted_counted;
        }
        let mut sink = self.sink;
        sink.note_placeholders();
        sink.done.sort_by(|a, b| a.name.cmp(&b.name));
        sink.rejected.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        Partition {
            repositories: sink.done,
            rejected: sink.rejected,
            unowned: self.unowned,
            global: None,
            global_roots: None,
            placeholders: sink
                .placeholders
                .into_iter()
                .map(|(d, c)| (d, c.map(|(_, c)| c)))
                .collect(),
        }
    }

    fn held_objects(&self) -> usize {
        self.stack.iter().map(|f| f.pool.held()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_object as obj;
    use super::*;

    fn keys(r: &Repository) -> Vec<&str> {
        let mut k: Vec<_> = r.objects.iter().map(|o| o.key.as_str()).collect();
        k.sort();
        k
    }

    #[test]
    fn nested_and_colliding_prefixes() {
        let p = OciLayout.partition(
            [
                "team/app/oci-layout",
                "team/app/blobs/sha256/aa",
                "team/app/tools/oci-layout",
                "team/app/tools/blobs/sha256/bb",
                "team/app-edge/oci-layout",
                "team/app-edge/index.json",
                "team/README",
                "Bad/oci-layout",
                "Bad/blobs/sha256/cc",
            ]
            .map(obj)
            .to_vec(),
        );
        let names: Vec<_> = p.repositories.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["team/app", "team/app-edge", "team/app/tools"]);
        assert_eq!(
            keys(&p.repositories[0]),
            ["team/app/blobs/sha256/aa", "team/app/oci-layout"]
        );
        assert_eq!(
            keys(&p.repositories[2]),
            [
                "team/app/tools/blobs/sha256/bb",
                "team/app/tools/oci-layout"
            ]
        );
        assert_eq!(p.unowned, 1);
        assert_eq!(p.rejected.len(), 1);
        assert_eq!(p.rejected[0].prefix, "Bad/");
        assert_eq!(p.rejected[0].objects, 2);
    }

    #[test]
    fn placeholders_are_empty_objects_of_non_empty_digests() {
        let empty = |key: &str| ObjectMeta::new(key, 0, std::time::SystemTime::UNIX_EPOCH, None);
        let hex = "ab".repeat(32);
        let p = OciLayout.partition(vec![
            obj("a/oci-layout"),
            obj(&format!("a/blobs/sha256/{hex}")),
            obj("b/oci-layout"),
            empty(&format!("b/blobs/sha256/{hex}")),
            empty(&format!(
                "b/blobs/{}",
                EMPTY_CONTENT[0].replacen(':', "/", 1)
            )),
            empty(&format!(
                "b/blobs/{}",
                EMPTY_CONTENT[1].replacen(':', "/", 1)
            )),
            empty(&format!("b/blobs/sha256/{}", "cd".repeat(32))),
        ]);
        let with_copy = Digest::from_parts("sha256", &hex).expect("digest");
        let without = Digest::from_parts("sha256", &"cd".repeat(32)).expect("digest");
        assert_eq!(p.placeholders.len(), 2, "{:?}", p.placeholders);
        assert_eq!(
            p.placeholders[&with_copy].as_ref().map(|c| c.key.as_str()),
            Some(format!("a/blobs/sha256/{hex}").as_str())
        );
        assert_eq!(p.placeholders[&without], None);
        for d in EMPTY_CONTENT {
            assert!(Digest::parse(d).is_some(), "{d}");
        }
    }

    #[test]
    fn classify_blobs_only() {
        let repo = Repository {
            kind: Default::default(),
            name: "r".into(),
            prefix: "r/".into(),
            objects: vec![],
        };
        let hex = "ab".repeat(32);
        assert!(matches!(
            OciLayout.classify(&repo, &format!("r/blobs/sha256/{hex}")),
            KeyKind::Blob(_)
        ));
        for other in [
            "r/index.json".to_string(),
            "r/blobs/sha256/xyz".into(),
            format!("r/blobs/md5/{hex}"),
            format!("r/blobs/sha256/{hex}/extra"),
            format!("r/sub/blobs/sha256/{hex}"),
        ] {
            assert_eq!(OciLayout.classify(&repo, &other), KeyKind::Other, "{other}");
        }
    }
}
