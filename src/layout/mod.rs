//! Bucket layouts: how a listing turns into repositories, roots and blob keys.
//!
//! The GC engine knows nothing about a particular layout; it asks the layout to partition the
//! listing, to classify keys, to read roots and to name the key a digest lives at.

pub mod distribution;
mod name;
pub mod oci;
mod serverless_protocol;
pub mod serverless_registry;

use std::collections::HashMap;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::digest::Digest;
use crate::manifest::{Descriptor, References};
use crate::store::{ListingSum, ObjectMeta, Store, StoreError};

pub use name::validate_repository_name;

/// Prefix of ocigc's own state, never part of a repository; [`crate::namespace`] owns it.
pub use crate::namespace::STATE_PREFIX;

/// Name of the pseudo-repository that holds a layout's global blobs (`distribution`). The
/// repository grammar forbids a leading `_`, so it never collides with a real repository.
pub const GLOBAL_REPOSITORY: &str = "_global";

/// What a unit of collection is: the engine collects repositories as the listing completes
/// them, and a layout's global blob space last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnitKind {
    /// A repository: its own roots, its own blobs.
    #[default]
    Repository,
    /// A layout's global blob space (distribution's `blobs/`, serverless-registry's stale
    /// upload parts): collected after every repository, with every repository's manifests as
    /// roots and every repository's intents as protection.
    Global,
}

/// One repository (or a layout's global blob space, see [`UnitKind`]) and the objects it owns.
#[derive(Clone, Debug)]
pub struct Repository {
    /// What this unit is.
    pub kind: UnitKind,
    /// Repository name, e.g. `team/app` ([`GLOBAL_REPOSITORY`] for the global unit).
    pub name: String,
    /// Key prefix of the repository, ending in `/` (empty for a layout at the bucket root).
    pub prefix: String,
    /// Objects owned by this repository (not by a nested one).
    pub objects: Vec<ObjectMeta>,
}

/// A repository-like prefix that will not be collected, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    /// The prefix as found in the bucket.
    pub prefix: String,
    /// Why it is left alone.
    pub reason: String,
    /// Objects it owns (left untouched).
    pub objects: u64,
}

/// The result of partitioning a bucket listing.
#[derive(Debug, Default)]
pub struct Partition {
    /// Repositories to collect, sorted by name.
    pub repositories: Vec<Repository>,
    /// Prefixes that look like repositories but are not collected (e.g. invalid names).
    pub rejected: Vec<Rejected>,
    /// Objects that belong to no repository (left untouched).
    pub unowned: u64,
    /// Blobs shared by every repository ([`GLOBAL_REPOSITORY`]), for layouts that store them
    /// globally; collected after the repositories, with every repository's manifests as roots.
    pub global: Option<Repository>,
    /// The roots of [`Partition::global`] as the listing shows them, where the layout can
    /// read them there (one LIST pass instead of two); given whenever the listing held keys
    /// of such a layout, with or without global blobs (the engine may list those apart).
    pub global_roots: Option<Roots>,
    /// Every digest stored as a placeholder somewhere in the bucket (de-duplicating
    /// registries), with a content copy to read it from, if the bucket holds one.
    pub placeholders: HashMap<Digest, Option<ContentCopy>>,
}

/// Where the content of a digest stored elsewhere as a placeholder can be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentCopy {
    /// The key of the copy (in some repository of the bucket).
    pub key: String,
    /// Its size as listed.
    pub size: u64,
}

/// The repository found at `prefix` with `objects` (and `counted` more objects known only by
/// number), or, if its name does not parse, a rejected prefix.
pub(crate) fn unit(
    name: String,
    prefix: String,
    objects: Vec<ObjectMeta>,
    counted: u64,
) -> Result<Repository, Rejected> {
    match validate_repository_name(&name) {
        Ok(()) if counted == 0 => Ok(Repository {
            kind: UnitKind::Repository,
            name,
            prefix,
            objects,
        }),
        // A partitioner counts keys instead of holding them only where no repository it
        // collects can own them; should that ever be wrong, the repository is left alone
        // rather than collected without some of its keys.
        Ok(()) => Err(Rejected {
            prefix,
            reason: format!("{counted} of its keys were not kept by the partition"),
            objects: objects.len() as u64 + counted,
        }),
        Err(reason) => Err(Rejected {
            prefix,
            reason,
            objects: objects.len() as u64 + counted,
        }),
    }
}

/// Where a layout's keys live, so that the engine lists (and splits) only that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpace {
    /// The prefix every repository's keys live under (`""`: the whole bucket).
    pub repositories: String,
    /// The prefix of a global blob space that the engine lists on its own, after every
    /// repository; `None` where the layout has none (or its keys come in the main listing).
    pub global: Option<String>,
}

/// Compares keys in the order a store that walks a tree lists them (SeaweedFS): `/` before
/// every other character, so a directory's keys come before those of a sibling whose name
/// merely starts with the directory's (`a/x` before `a-b/x`; byte order has `a-b/x` first).
/// Both orders keep every directory's keys together, which is what the partitioners rely
/// on; where they must compare a key with a prefix not seen yet, they require both orders to
/// agree, so that a store listing in either is never taken to have passed a prefix early.
fn tree_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let rank = |c: u8| if c == b'/' { 0u16 } else { u16::from(c) + 1 };
    a.bytes().map(rank).cmp(b.bytes().map(rank))
}

/// Whether the listing, now at `key`, has gone past every key under `prefix`, whichever of
/// the two listing orders (see [`tree_cmp`]) the store uses.
pub(crate) fn passed(prefix: &str, key: &str) -> bool {
    !key.starts_with(prefix) && key > prefix && tree_cmp(key, prefix) == std::cmp::Ordering::Greater
}

/// Guards a partitioner against a listing out of order: a key not greater than the one
/// before it (in either listing order, see [`tree_cmp`]) is counted as unowned (never collected) instead of being given to a repository
/// that may already be handed out.
#[derive(Debug, Default)]
pub(crate) struct Order {
    last: Option<String>,
}

impl Order {
    /// Whether `key` comes after every key seen so far (and remembers it if so).
    pub(crate) fn accept(&mut self, key: &str) -> bool {
        match &mut self.last {
            // Later in byte order (S3, the directory store) or in tree order (SeaweedFS).
            Some(last)
                if key <= last.as_str() && tree_cmp(key, last) != std::cmp::Ordering::Greater =>
            {
                tracing::warn!(%key, after = %last, "listing out of order; key left alone");
                false
            }
            Some(last) => {
                last.clear();
                last.push_str(key);
                true
            }
            None => {
                self.last = Some(key.to_string());
                true
            }
        }
    }
}

/// Repositories whose keys all lie under their prefix and sort no later than the keys under
/// a `last` prefix of theirs, for layouts that tell a key's repository from the key alone:
/// a repository is complete once the listing passes its `last` prefix.
#[derive(Debug, Default)]
pub(crate) struct OpenRepos {
    open: std::collections::BTreeMap<String, OpenRepo>,
}

#[derive(Debug)]
struct OpenRepo {
    prefix: String,
    last: String,
    objects: Vec<ObjectMeta>,
}

impl OpenRepos {
    /// Adds `object` to repository `name` (at `prefix`, complete after `last`).
    pub(crate) fn insert(&mut self, name: &str, prefix: String, last: String, object: ObjectMeta) {
        match self.open.get_mut(name) {
            Some(r) => r.objects.push(object),
            None => {
                self.open.insert(
                    name.to_string(),
                    OpenRepo {
                        prefix,
                        last,
                        objects: vec![object],
                    },
                );
            }
        }
    }

    /// Hands out every repository the listing, now at `key` (`None`: over), has passed.
    pub(crate) fn close(
        &mut self,
        key: Option<&str>,
        done: &mut Vec<Repository>,
        rejected: &mut Vec<Rejected>,
    ) {
        let names: Vec<String> = self
            .open
            .iter()
            .filter(|(_, r)| key.is_none_or(|k| passed(&r.last, k)))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            if let Some(r) = self.open.remove(&name) {
                match unit(name, r.prefix, r.objects, 0) {
                    Ok(repo) => done.push(repo),
                    Err(r) => rejected.push(r),
                }
            }
        }
    }

    /// Objects held.
    pub(crate) fn held(&self) -> usize {
        self.open.values().map(|r| r.objects.len()).sum()
    }
}

/// Batch partition on top of a streaming partitioner: sorts, pushes everything, finishes.
pub(crate) fn partition_all(
    mut partitioner: Box<dyn Partitioner + '_>,
    mut objects: Vec<ObjectMeta>,
) -> Partition {
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let mut repositories = partitioner.push(objects);
    let mut partition = partitioner.finish();
    repositories.append(&mut partition.repositories);
    repositories.sort_by(|a, b| a.name.cmp(&b.name));
    partition.repositories = repositories;
    partition
}

impl Repository {
    /// Whether this is a layout's global blob space rather than a repository.
    pub fn is_global(&self) -> bool {
        self.kind == UnitKind::Global
    }
}

/// Streaming partition of one part of the key space: keys arrive in lexicographic order, a
/// page at a time, and every repository is handed out as soon as the listing has passed
/// everything it owns (nested repositories included), so that memory follows the
/// repositories in flight, not the bucket.
pub trait Partitioner: Send {
    /// Takes the next page of keys (each key greater than every key before it); returns the
    /// repositories whose keys are now complete.
    fn push(&mut self, page: Vec<ObjectMeta>) -> Vec<Repository>;

    /// The listing of this part is over: every repository still open, and the rest.
    fn finish(self: Box<Self>) -> Partition;

    /// How many listed objects the partitioner holds now (its memory, for metrics and tests).
    fn held_objects(&self) -> usize;
}

/// A partitioner that holds every key until the end and partitions them at once: the
/// fallback for a layout without a streaming one.
pub struct CollectAll<'a> {
    layout: &'a dyn Layout,
    objects: Vec<ObjectMeta>,
}

impl Partitioner for CollectAll<'_> {
    fn push(&mut self, page: Vec<ObjectMeta>) -> Vec<Repository> {
        self.objects.extend(page);
        Vec::new()
    }

    fn finish(self: Box<Self>) -> Partition {
        self.layout.partition(self.objects)
    }

    fn held_objects(&self) -> usize {
        self.objects.len()
    }
}

/// The partitioner of `layout` for one part of the key space.
pub fn partitioner(layout: &dyn Layout) -> Box<dyn Partitioner + '_> {
    layout.streaming_partitioner().unwrap_or_else(|| {
        Box::new(CollectAll {
            layout,
            objects: Vec::new(),
        })
    })
}

/// What a key inside a repository is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A content-addressed blob (layers, configs and manifests alike).
    Blob(Digest),
    /// Leftovers of an abandoned upload: referenced by nothing, deleted once older than the
    /// grace period.
    Scratch,
    /// Anything else: metadata, unknown files. Never swept.
    Other,
}

/// The roots of a repository and the version they were read at.
#[derive(Clone, Debug, Default)]
pub struct Roots {
    /// Descriptors everything reachable hangs off.
    pub descriptors: Vec<Descriptor>,
    /// Version marker of the roots, when the store gives one.
    pub version: Option<RootsVersion>,
    /// The key each descriptor was read from, where roots are objects of their own
    /// (distribution revision links); empty otherwise.
    pub sources: Vec<String>,
    /// Documents read while finding the roots (a tag that is a copy of its manifest), so
    /// that marking does not read them again.
    pub documents: Vec<(Digest, References)>,
}

/// Why the roots of a repository could not be read; the repository fails closed.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    /// The roots document is absent.
    #[error("{0} is missing")]
    Missing(String),
    /// The roots document is unreadable or malformed.
    #[error("{key} is invalid: {reason}")]
    Invalid { key: String, reason: String },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a registry's own GC protocol stopped a repository's deletions.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The registry says not now (a push is in progress): nothing more is deleted in the
    /// repository this run, and its candidates stay pending for the next.
    #[error("{0}")]
    Refused(String),
    /// A request of the protocol failed.
    #[error("{what}: {source}")]
    Store { what: String, source: StoreError },
}

/// A registry's own GC protocol around one repository's deletions, which ocigc takes part in
/// so that the registry's pushers are protected from ocigc as from the registry's own GC.
///
/// The engine calls [`begin`](Self::begin) right before the first delete batch,
/// [`before_batch`](Self::before_batch) before every batch, and [`end`](Self::end) after the
/// sweep whatever its outcome, if `begin` was called. Dry runs never call it.
#[async_trait]
pub trait DeletionProtocol: Send {
    /// Announces the collection to the registry.
    async fn begin(&mut self, store: &dyn Store, now: SystemTime) -> Result<(), ProtocolError>;

    /// Asks the registry for leave to delete one batch; an error stops the repository's
    /// deletions before that batch.
    async fn before_batch(
        &mut self,
        store: &dyn Store,
        now: SystemTime,
    ) -> Result<(), ProtocolError>;

    /// Withdraws the announcement.
    async fn end(&mut self, store: &dyn Store, now: SystemTime) -> Result<(), ProtocolError>;

    /// Withdraws an announcement that `dead_owner`, a collector whose expired lease this run
    /// took over, left behind; true if there was one. An announcement of anyone else (the
    /// registry's own GC) is left alone.
    async fn recover(
        &mut self,
        _store: &dyn Store,
        _now: SystemTime,
        _dead_owner: &str,
    ) -> Result<bool, ProtocolError> {
        Ok(false)
    }
}

/// One tag of a repository as its layout stores it (retention reads and removes tags).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredTag {
    /// The tag.
    pub name: String,
    /// The manifest it points at.
    pub digest: Digest,
    /// The latest time the tag can have moved to `digest`: its own object's LastModified,
    /// or (`oci`, where tags are entries of one document) that of `index.json`.
    pub moved_by: SystemTime,
    /// When its manifest was pushed, which orders "most recently pushed".
    pub pushed_at: SystemTime,
    /// What restoring the tag writes back, where the layout needs more than the digest (the
    /// `index.json` entry of `oci`).
    pub entry: Option<serde_json::Value>,
}

/// An untagged root manifest (an `index.json` entry without a tag).
#[derive(Clone, Debug, PartialEq)]
pub struct StoredUntagged {
    /// The manifest.
    pub digest: Digest,
    /// The latest time the entry can have been added.
    pub moved_by: SystemTime,
    /// The entry, for restoring it.
    pub entry: Option<serde_json::Value>,
    /// Its size as listed, where known: what keeping its content in the trash costs.
    pub size: Option<u64>,
    /// Where the layout read it already: `Some(subject)` (`None` inside for no referrer; its
    /// `_referrers/` index counts too on `serverless-registry`). `None`: read from the content.
    pub subject: Option<Option<Digest>>,
}

/// Every tag of a repository, read at one version.
#[derive(Clone, Debug, Default)]
pub struct TagSet {
    /// The tags.
    pub tags: Vec<StoredTag>,
    /// Untagged roots, where the layout can remove them by themselves (`oci`).
    pub untagged: Vec<StoredUntagged>,
    /// The version removals are made against (the ETag of `index.json`).
    pub version: Option<String>,
    /// The tags live in one document whose LastModified is all the layout knows of when each
    /// moved: ocigc records when it first saw each tag→digest pair (`oci`).
    pub shared_document: bool,
}

/// Manifests the trash holds as roots, as [`Layout::read_untagged`] needs them: their
/// children are no untagged roots either.
#[derive(Clone, Debug, Default)]
pub struct Held {
    /// Each trashed manifest, with its content where the trash keeps it (a layout that
    /// deletes the manifest itself, `serverless-registry`).
    pub manifests: Vec<(Digest, Option<bytes::Bytes>)>,
}

impl Held {
    /// The trashed digests.
    pub fn digests(&self) -> Vec<Digest> {
        self.manifests.iter().map(|(d, _)| d.clone()).collect()
    }
}

/// Field of a trash entry's layout `entry` that carries a removed manifest's content where
/// removing the root deletes the manifest itself (`serverless-registry`): marking reads it
/// while the entry lasts, and `ocigc restore` writes it back.
pub const INLINE_MANIFEST: &str = "manifest_base64";

/// The `entry` that carries `body` inline (see [`INLINE_MANIFEST`]).
pub fn inline_manifest_entry(body: &[u8]) -> serde_json::Value {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(body);
    serde_json::json!({ INLINE_MANIFEST: encoded })
}

/// The manifest content an `entry` carries inline, if it carries any that hashes to `digest`
/// (anything else is as good as absent: marking then reads the store, and fails closed on a
/// missing manifest).
pub fn inline_manifest(entry: Option<&serde_json::Value>, digest: &Digest) -> Option<bytes::Bytes> {
    use base64::Engine as _;
    let encoded = entry?.get(INLINE_MANIFEST)?.as_str()?;
    let body = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    crate::gc::mark::content_matches(digest, &body).then(|| bytes::Bytes::from(body))
}

/// A root that retention removes: a tag, or an untagged entry (`tag` `None`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Doomed {
    /// The tag, if the root is one.
    pub tag: Option<String>,
    /// The manifest it pointed at when decided.
    pub digest: Digest,
    /// For a referrer removed with its subject: that subject. Where roots are removed one by
    /// one, it goes only if its subject was removed earlier in the same call (a push may have
    /// tagged the subject again since the decision).
    pub subject: Option<Digest>,
}

/// What became of one root asked to be removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Removed.
    Removed,
    /// Not removed: it points elsewhere now (a push moved it since the decision), or is gone.
    Moved,
}

/// Why tags could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum TagError {
    /// The tags changed since they were read (`oci`: `index.json` was rewritten): read and
    /// decide again.
    #[error("the tags changed since they were read")]
    Conflict,
    /// The tag to restore exists now; it is never overwritten.
    #[error("tag {0} exists")]
    Exists(String),
    /// The layout cannot do this.
    #[error("{0}")]
    Unsupported(String),
    /// The store refused to delete a key of the tag.
    #[error("deleting {key}: {message}")]
    Delete { key: String, message: String },
    /// Reading the tags failed.
    #[error(transparent)]
    Roots(#[from] RootsError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Deletes a tag's `keys` in batches, in order; the first key the store refused is an error
/// (and keys after its batch are left).
pub(crate) async fn delete_tag_keys(store: &dyn Store, keys: &[String]) -> Result<(), TagError> {
    for chunk in keys.chunks(crate::store::MAX_DELETE_BATCH) {
        if let Some(f) = store.delete_batch(chunk).await?.into_iter().next() {
            return Err(TagError::Delete {
                key: f.key,
                message: f.message,
            });
        }
    }
    Ok(())
}

/// A bucket layout.
#[async_trait]
pub trait Layout: Send + Sync {
    /// The layout's name as given to `--layout`.
    fn name(&self) -> &'static str;

    /// Splits a listing (state keys already removed, any order) into repositories: the same
    /// as pushing it, sorted, through [`Layout::streaming_partitioner`] (the one place the
    /// ownership rules live), except that every placeholder's content copy is found.
    fn partition(&self, objects: Vec<ObjectMeta>) -> Partition;

    /// A streaming partitioner for one part of the key space (see [`Partitioner`]); `None`
    /// where the layout has none, and [`partitioner`] falls back to [`CollectAll`].
    fn streaming_partitioner(&self) -> Option<Box<dyn Partitioner + '_>> {
        None
    }

    /// The layout's settings that change what a run decides (e.g. `--delete-untagged`), as
    /// text for the incremental cache: a unit cached under other settings is observed afresh.
    fn settings(&self) -> String {
        String::new()
    }

    /// Where the layout's keys live (see [`KeySpace`]); the whole bucket unless overridden.
    fn key_space(&self) -> KeySpace {
        KeySpace {
            repositories: String::new(),
            global: None,
        }
    }

    /// Given one level of a delimiter listing under `prefix` (its direct `objects` and its
    /// sub-`prefixes`, each ending in `/`), whether the keys under `prefix` may be listed and
    /// partitioned in parts, one per sub-prefix (and one for the direct objects), without
    /// splitting a repository; false when `prefix` is (or may be) a repository.
    ///
    /// A wrong `true` is unsafe: each part's partitioner would hand out its share of one
    /// repository as a repository of its own (or give it to an enclosing one), so the engine
    /// would collect a repository without seeing all of its keys, twice at once, or under
    /// the wrong owner. A wrong `false` only lists that prefix as one part, less in parallel.
    /// The engine descends only below prefixes this said true of. The default never splits.
    ///
    /// Global units depend on more than their own keys (serverless-registry's temp objects
    /// on every repository's open uploads, distribution's blobs on every revision link): a
    /// prefix whose split would part them from what they depend on is not split; still, a
    /// part's [`Partition::global`] and [`Partition::global_roots`] cover that part only,
    /// and an engine that partitions parts apart must combine them.
    fn may_split(&self, _prefix: &str, _objects: &[ObjectMeta], _prefixes: &[String]) -> bool {
        false
    }

    /// Digests that `repo` stores as placeholders (their content lives elsewhere in the
    /// bucket), so that the engine can build [`Partition::placeholders`] as repositories
    /// complete.
    fn placeholders_in(&self, _repo: &Repository) -> Vec<Digest> {
        Vec::new()
    }

    /// Content copies in `repo` (blobs that are no placeholder) of the digests `wanted`
    /// accepts: where a placeholder elsewhere is read from.
    fn content_copies(
        &self,
        _repo: &Repository,
        _wanted: &dyn Fn(&Digest) -> bool,
    ) -> Vec<(Digest, ContentCopy)> {
        Vec::new()
    }

    /// Links stored in `repo` that keep a blob of another repository alive, as (the target
    /// repository, the digest): what [`Layout::linked_blobs`] gathers over a whole
    /// partition, for one repository at a time. Reads objects where links can only be told
    /// apart by content.
    async fn links_in(
        &self,
        _store: &dyn Store,
        _repo: &Repository,
        _concurrency: usize,
    ) -> Result<Vec<(String, Digest)>, StoreError> {
        Ok(Vec::new())
    }

    /// Whether the listed blob `object` of digest `digest` is a placeholder whose content lives
    /// elsewhere in the bucket (see [`Partition::placeholders`]).
    fn is_placeholder(&self, _object: &ObjectMeta, _digest: &Digest) -> bool {
        false
    }

    /// Objects that keep a repository valid and empty: written instead of deleting them when
    /// a whole-repository deletion must keep some of its blobs (other repositories need
    /// them), so that a later `gc` still finds the repository and collects those blobs once
    /// nothing needs them. Empty where a repository needs no marker.
    fn empty_repository(&self, _repo: &Repository) -> Vec<(String, bytes::Bytes)> {
        Vec::new()
    }

    /// Whether repositories are collected one by one (false where only the global blobs are
    /// swept and a repository has nothing of its own to delete).
    fn per_repository_gc(&self) -> bool {
        true
    }

    /// Whether manifests may sit in `repo` as bare blobs that only their `subject` makes
    /// reachable, so that marking must read the small unreferenced blobs to find them.
    fn scans_for_referrers(&self, _repo: &Repository) -> bool {
        true
    }

    /// Whether the object at `key` (a blob of `repo`) can be a manifest, so that the
    /// referrer scan must read it; false where manifests are stored apart from other blobs.
    fn may_hold_manifest(&self, _repo: &Repository, _key: &str) -> bool {
        true
    }

    /// How many delete batches of `repo` one re-check of its roots covers: 1 where the
    /// re-check is one cheap request; more where it is a whole LIST, so that its cost stays a
    /// fraction of the deletes' (the batches of a round are sent together, right after it).
    fn batches_per_recheck(&self, _repo: &Repository) -> usize {
        1
    }

    /// Whether keys outside a repository's prefix can keep its blobs alive (a mount link, a
    /// placeholder), so that [`Layout::linked_blobs`] must be read and a GC or deletion of one
    /// repository must still list the whole bucket. True unless a layout overrides it: a wrong
    /// `false` lets a one-repository run delete a blob another repository keeps alive, a wrong
    /// `true` only costs a listing.
    fn links_across_repositories(&self) -> bool {
        true
    }

    /// Whether the partitioner hands out global objects of its own ([`Partition::global`]:
    /// serverless-registry's stale temp objects) wherever they are listed, so that the shard
    /// collecting the global unit must list every slice to see them all.
    fn global_in_listing(&self) -> bool {
        false
    }

    /// Blobs that links elsewhere in the bucket keep alive, by the repository that stores
    /// them: roots of that repository that none of its manifests names.
    async fn linked_blobs(
        &self,
        _store: &dyn Store,
        _partition: &Partition,
        _concurrency: usize,
    ) -> Result<HashMap<String, Vec<Digest>>, StoreError> {
        Ok(HashMap::new())
    }

    /// The registry's own GC protocol that deletions in `repo` take part in; `None` where the
    /// layout's registry has none.
    fn deletion_protocol(
        &self,
        _repo: &Repository,
        _owner: &str,
    ) -> Option<Box<dyn DeletionProtocol>> {
        None
    }

    /// How `explain` names what keeps a blob that another repository reads (see
    /// [`Layout::linked_blobs`]): a mount link, or a placeholder whose content this copy is.
    fn kept_from_elsewhere(&self) -> &'static str {
        "a link in another repository (mount)"
    }

    /// The repository a root of the global unit belongs to, by the key it was read from
    /// ([`Roots::sources`]), so that `du` can split the global blobs among repositories;
    /// `None` where roots name no repository.
    fn root_owner<'k>(&self, _source: &'k str) -> Option<&'k str> {
        None
    }

    /// Referrers recorded by key rather than by content, as `(subject, referrer)`: the
    /// referrer is reachable while its subject is.
    fn referrer_links(&self, _repo: &Repository) -> Vec<(Digest, Digest)> {
        Vec::new()
    }

    /// The listing prefix that holds everything of repository `name` (and of repositories
    /// nested in it, which [`Layout::partition`] separates out).
    fn repository_prefix(&self, name: &str) -> String;

    /// Classifies a key owned by `repo`.
    fn classify(&self, repo: &Repository, key: &str) -> KeyKind;

    /// The key the content of `digest` is read from when marking `repo`; `listed` is the
    /// object of `repo` that the listing classified as that digest, if any.
    fn content_key(
        &self,
        repo: &Repository,
        digest: &Digest,
        listed: Option<&ObjectMeta>,
    ) -> String;

    /// Reads the roots of `repo`.
    async fn read_roots(&self, store: &dyn Store, repo: &Repository) -> Result<Roots, RootsError>;

    /// The current version of the roots (e.g. the ETag of `index.json`), as cheaply as the
    /// layout allows; `None` when the store gives none (the caller must then re-read the roots).
    async fn roots_version(
        &self,
        store: &dyn Store,
        repo: &Repository,
    ) -> Result<Option<RootsVersion>, RootsError>;

    /// Every tag of `repo` (and its untagged roots where they can be removed apart), read now.
    async fn read_tags(&self, store: &dyn Store, repo: &Repository) -> Result<TagSet, TagError>;

    /// Whether removing an untagged root deletes its manifest itself (`serverless-registry`):
    /// its trash entry must then keep the content, for marking and for `restore`.
    fn trash_keeps_content(&self) -> bool {
        false
    }

    /// Whether every repository's trashed manifests are roots of the global unit (its blobs
    /// are shared: `distribution`).
    fn global_roots_include_trash(&self) -> bool {
        false
    }

    /// Whether retention can remove untagged root manifests of this layout by themselves
    /// (`untagged_older_than`): `oci` (untagged `index.json` entries, in
    /// [`Layout::read_tags`]), `distribution` (revision links) and `serverless-registry`
    /// without `--delete-untagged` (manifests by digest), in [`Layout::read_untagged`].
    fn removes_untagged(&self) -> bool {
        false
    }

    /// Adds to `set` the untagged roots of `repo` where they are read apart from the tags
    /// (only when a table asks for them: it may read every manifest of the repository);
    /// `held` are manifests outside the repository's listing (in the trash) whose children
    /// are not roots either. Does nothing where [`Layout::read_tags`] reads them already.
    async fn read_untagged(
        &self,
        _store: &dyn Store,
        _repo: &Repository,
        _set: &mut TagSet,
        _held: &Held,
    ) -> Result<(), TagError> {
        Ok(())
    }

    /// Removes `doomed` roots of `repo`, read as `set`, each only if it still points where it
    /// did when read: one outcome per root, in order; [`TagError::Conflict`] where the layout
    /// removes them all at once and the tags changed meanwhile (nothing was removed).
    async fn remove_tags(
        &self,
        store: &dyn Store,
        repo: &Repository,
        set: &TagSet,
        doomed: &[Doomed],
    ) -> Result<Vec<Removal>, TagError>;

    /// Puts tag `tag` of repository `name` back at `digest` (with its stored `entry`, where the
    /// layout has one), or the untagged root `digest` for `tag` `None`; refuses
    /// ([`TagError::Exists`]) to overwrite a tag that exists now.
    async fn restore_tag(
        &self,
        store: &dyn Store,
        name: &str,
        tag: Option<&str>,
        digest: &Digest,
        entry: Option<&serde_json::Value>,
    ) -> Result<(), TagError>;

    /// The keys of `repo` in the order whole-repository deletion removes them: each inner list
    /// is finished before the next starts (e.g. the index first, so pulls stop resolving).
    fn deletion_phases(&self, repo: &Repository) -> Vec<Vec<ObjectMeta>>;
}

/// Every object under `prefix`, listed now.
pub(crate) async fn list_prefix(
    store: &dyn Store,
    prefix: &str,
) -> Result<Vec<ObjectMeta>, StoreError> {
    use futures::TryStreamExt;
    let pages: Vec<Vec<ObjectMeta>> = store.list(prefix).try_collect().await?;
    Ok(pages.into_iter().flatten().collect())
}

/// Sub-listings [`list_prefix_in_parts`] makes at once.
const LIST_PARTS_AT_ONCE: usize = 16;
/// Levels [`list_prefix_in_parts`] descends through while each holds a single name.
const LIST_PARTS_DESCENT: usize = 4;

/// Every object under `prefix`, listed now, in key order: what [`list_prefix`] returns, from
/// delimiter listings (down through levels of a single name, such as a registry's one
/// namespace) and then each sub-prefix's listing, several at once. A prefix of many pages
/// (every repository's revisions) is listed in a fraction of the time; like any listing it is
/// no snapshot.
pub(crate) async fn list_prefix_in_parts(
    store: &dyn Store,
    prefix: &str,
) -> Result<Vec<ObjectMeta>, StoreError> {
    use futures::{StreamExt, TryStreamExt};
    let level = store.list_level(prefix).await?;
    let (mut out, mut prefixes) = (level.objects, level.prefixes);
    for _ in 0..LIST_PARTS_DESCENT {
        let [only] = prefixes.as_slice() else {
            break;
        };
        let deeper = store.list_level(only).await?;
        out.extend(deeper.objects);
        prefixes = deeper.prefixes;
    }
    let parts: Vec<Vec<ObjectMeta>> = futures::stream::iter(prefixes)
        .map(|p| async move { list_prefix(store, &p).await })
        .buffered(LIST_PARTS_AT_ONCE)
        .try_collect()
        .await?;
    out.extend(parts.into_iter().flatten());
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// What the re-check compares to see whether a unit's roots changed since they were read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootsVersion {
    /// The ETag of the one object that holds the roots (`index.json`).
    Etag(String),
    /// The roots are objects of their own (links, manifests): the sum of their listing, so
    /// roots gathered from the parts of one listing have the version a listing of them all
    /// gives ([`listing_version`]).
    Listing(ListingSum),
}

/// A version of a set of listed objects, for roots that are objects of their own: it changes
/// whenever one is added, removed or rewritten (key, size, ETag or modification time), and
/// does not depend on the order they are listed in.
pub(crate) fn listing_version<'a>(objects: impl Iterator<Item = &'a ObjectMeta>) -> ListingSum {
    use sha2::Digest as _;
    let mut sum = ListingSum::default();
    for o in objects {
        let modified = o
            .last_modified
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let etag = o.etag.as_deref().unwrap_or("");
        let line = format!("{} {} {etag} {modified}", o.key, o.size);
        sum.add(sha2::Sha256::digest(line.as_bytes()).into());
    }
    sum
}

#[cfg(test)]
mod order_tests {
    use super::*;

    #[test]
    fn both_listing_orders_are_accepted_and_neither_passes_a_prefix_early() {
        // Byte order (S3) and tree order (SeaweedFS) of the same keys.
        let bytes = ["a-b/x", "a/x", "a/z"];
        let tree = ["a/x", "a/z", "a-b/x"];
        for keys in [bytes, tree] {
            let mut order = Order::default();
            assert!(keys.iter().all(|k| order.accept(k)), "{keys:?}");
            assert!(!order.accept(keys[2]), "a repeated key");
            assert!(!order.accept(""), "a key before every other");
        }
        // `a-b/x` is before `a/` in byte order: it does not prove `a/` complete.
        assert!(!passed("a/", "a-b/x"));
        assert!(passed("a/", "b"));
        assert!(!passed("a/", "a/y"));
    }
    #[tokio::test]
    async fn a_listing_in_parts_is_the_listing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::DirStore::open(dir.path()).expect("open");
        let keys = [
            "r/top",
            // One name, then one more: the parts are below both.
            "r/bench/app-1/_manifests/revisions/sha256/aa/link",
            "r/bench/app-1/tools-2/_layers/sha256/bb/link",
            "r/bench/app-2/_manifests/tags/v1/current/link",
            "r/bench/app-2/x",
            "r/bench/loose",
            "r-other/not/below",
        ];
        for k in keys {
            let body = bytes::Bytes::from_static(b"x");
            let put = store.put(k, body, crate::store::PutCondition::None).await;
            assert!(put.is_ok(), "{k}: {put:?}");
        }
        let whole = list_prefix(&store, "r/").await.expect("list");
        let parts = list_prefix_in_parts(&store, "r/")
            .await
            .expect("list in parts");
        let names = |l: &[ObjectMeta]| l.iter().map(|o| o.key.clone()).collect::<Vec<_>>();
        // The same keys, in byte order (a store may list in tree order).
        let mut expected = names(&whole);
        expected.sort();
        assert_eq!(names(&parts), expected);
        assert_eq!(whole.len(), 6);
        assert!(list_prefix_in_parts(&store, "none/")
            .await
            .expect("empty")
            .is_empty());
    }
}

/// A listed object with only a key, for the layouts' unit tests.
#[cfg(test)]
pub(crate) fn test_object(key: &str) -> ObjectMeta {
    ObjectMeta::new(key, 1, std::time::SystemTime::UNIX_EPOCH, None)
}

/// Names accepted by `--layout`.
pub const NAMES: [&str; 3] = ["oci", "serverless-registry", "distribution"];

/// Settings that change what a layout treats as garbage.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayoutOptions {
    /// Manifests no tag reaches are garbage too (not for `oci`, whose roots are explicit).
    pub delete_untagged: bool,
}

/// The layout called `name`, or why it cannot be had with these options.
pub fn by_name(name: &str, opts: LayoutOptions) -> Result<std::sync::Arc<dyn Layout>, String> {
    match name {
        "oci" if opts.delete_untagged => Err(
            "--delete-untagged does not apply to the oci layout (every index.json entry is a \
             root there)"
                .into(),
        ),
        "oci" => Ok(std::sync::Arc::new(oci::OciLayout)),
        "serverless-registry" => Ok(std::sync::Arc::new(
            serverless_registry::ServerlessRegistryLayout {
                delete_untagged: opts.delete_untagged,
            },
        )),
        "distribution" => Ok(std::sync::Arc::new(distribution::DistributionLayout {
            delete_untagged: opts.delete_untagged,
        })),
        _ => Err(format!(
            "unknown layout {name:?} (expected one of {})",
            NAMES.join(", ")
        )),
    }
}
