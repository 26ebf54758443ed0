//! The `serverless-registry` layout: the R2 bucket of cloudflare/serverless-registry.
//!
//! Per repository: `<repo>/blobs/<alg>:<hex>`, `<repo>/manifests/<tag>` (a full copy of the
//! manifest) and `<repo>/manifests/<alg>:<hex>`, `<repo>/_referrers/<subject>/<referrer>`,
//! upload state `<repo>/uploads/<uuid>`, and the registry's own GC markers (`<repo>/gc/…`,
//! `<repo>/insertion/…`), which are never swept: deletions take part in the registry's
//! protocol around them instead (`serverless_protocol`). A cross-repository mount is a tiny object
//! `<dest>/blobs/<digest>` whose content is the source key `<src>/blobs/<digest>`: the source
//! blob is a root of its repository while the link exists. Multipart temp objects (`<uuid>`,
//! `<uuid>-helper`) sit at the bucket root; they are swept as the pseudo-repository
//! [`GLOBAL_REPOSITORY`] once older than the grace period, unless an upload of that id is
//! still open.
//!
//! Roots are every manifest under `manifests/` (tags and digests alike), or with
//! `--delete-untagged` the tags only, so that untagged manifests are swept like blobs unless an
//! index or a kept manifest's referrer needs them.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use async_trait::async_trait;
use futures::{stream, StreamExt, TryStreamExt};

use super::serverless_protocol::ServerlessProtocol;
use super::{
    list_prefix, listing_version, partition_all, DeletionProtocol, Doomed, Held, KeyKind, Layout,
    OpenRepos, Order, Partition, Partitioner, Rejected, Removal, Repository, Roots, RootsError,
    RootsVersion, StoredTag, StoredUntagged, TagError, TagSet, UnitKind, GLOBAL_REPOSITORY,
};
use crate::digest::Digest;
use crate::manifest::{self, Descriptor, UNTYPED_MANIFEST};
use crate::store::{ListingSum, ObjectMeta, PutCondition, PutOutcome, Store, StoreError};

/// Second-to-last path components that end a repository name.
const KINDS: [&str; 5] = ["blobs", "manifests", "uploads", "gc", "insertion"];
const REFERRERS: &str = "/_referrers/";
/// Longest key the stores the registry runs on accept (R2, S3): a link holds a key, so no
/// link is larger.
const MAX_KEY_SIZE: u64 = 1024;

/// cloudflare/serverless-registry's R2 layout.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerlessRegistryLayout {
    /// Only tags are roots; untagged manifests are swept (`--delete-untagged`).
    pub delete_untagged: bool,
}

/// What a key of the layout is, with the repository it belongs to.
#[derive(Debug, PartialEq, Eq)]
enum Key<'a> {
    Blob(&'a str, Digest),
    Manifest(&'a str, &'a str),
    Referrer(&'a str, Digest, Digest),
    /// Upload state, by upload id.
    Upload(&'a str, &'a str),
    /// Registry GC markers, anything else under a known directory.
    Other(&'a str),
    /// A multipart temp object at the bucket root, by upload id.
    Temp(&'a str),
    Unknown,
}

pub(super) fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn parse(key: &str) -> Key<'_> {
    if let Some((repo, rest)) = key.split_once(REFERRERS) {
        let pair = rest
            .split_once('/')
            .and_then(|(s, r)| Some((Digest::parse(s)?, Digest::parse(r)?)));
        return match pair {
            Some((s, r)) if !repo.is_empty() => Key::Referrer(repo, s, r),
            _ if !repo.is_empty() => Key::Other(repo),
            _ => Key::Unknown,
        };
    }
    let Some((dir, leaf)) = key.rsplit_once('/') else {
        let id = key.strip_suffix("-helper").unwrap_or(key);
        return if is_uuid(id) {
            Key::Temp(id)
        } else {
            Key::Unknown
        };
    };
    let (repo, kind) = dir.rsplit_once('/').unwrap_or(("", dir));
    if repo.is_empty() || leaf.is_empty() || !KINDS.contains(&kind) {
        return Key::Unknown;
    }
    match kind {
        "blobs" => Digest::parse(leaf).map_or(Key::Other(repo), |d| Key::Blob(repo, d)),
        "manifests" => Key::Manifest(repo, leaf),
        "uploads" => Key::Upload(repo, leaf),
        _ => Key::Other(repo),
    }
}

/// The repository whose blob `key` (in repository `name`) links to, if it is a link.
async fn read_link(
    store: &dyn Store,
    name: String,
    key: String,
    digest: Digest,
) -> Result<Option<(String, Digest)>, StoreError> {
    let body = match store.get(&key).await {
        Ok(b) => b.body,
        // Deleted since the listing: it links nothing any more.
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    // Content that hashes to its own digest is a real blob, whatever it says.
    if Digest::sha256_of(&body) == digest {
        return Ok(None);
    }
    let target = std::str::from_utf8(&body).ok().and_then(|text| {
        let (src, d) = text.split_once("/blobs/")?;
        (Digest::parse(d)? == digest && src != name).then(|| src.to_string())
    });
    Ok(target.map(|src| (src, digest)))
}

/// The blobs of `repo` that may be links, as (repository, key, digest): a link holds
/// `<target>/blobs/<digest>`, a key, so its size is at most that of a key, and that of
/// `/blobs/<digest>` plus the length of a target name that `name_len` accepts.
fn link_candidates<'a>(
    repo: &'a Repository,
    name_len: &'a dyn Fn(u64) -> bool,
) -> impl Iterator<Item = (String, String, Digest)> + 'a {
    repo.objects
        .iter()
        .filter_map(move |o| match parse(&o.key) {
            Key::Blob(r, d) if r == repo.name => {
                let overhead = ("/blobs/".len() + d.as_str().len()) as u64;
                let fits =
                    o.size > overhead && o.size <= MAX_KEY_SIZE && name_len(o.size - overhead);
                fits.then(|| (repo.name.clone(), o.key.clone(), d))
            }
            _ => None,
        })
}

/// Reads candidate links, as (target repository, digest) for those that are links.
async fn read_links(
    store: &dyn Store,
    candidates: Vec<(String, String, Digest)>,
    concurrency: usize,
) -> Result<Vec<(String, Digest)>, StoreError> {
    let read: Vec<Option<(String, Digest)>> = stream::iter(candidates)
        .map(|(name, key, digest)| read_link(store, name, key, digest))
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    Ok(read.into_iter().flatten().collect())
}

/// The streaming partitioner of the layout: a key names its repository, whose keys all sort
/// under `<name>/` and no later than `<name>/uploads/`.
#[derive(Debug, Default)]
struct ServerlessPartitioner {
    order: Order,
    open: OpenRepos,
    done: Vec<Repository>,
    rejected: Vec<Rejected>,
    /// Temp objects at the bucket root: whether they are stale needs every upload id.
    temps: Vec<ObjectMeta>,
    open_uploads: HashSet<String>,
    unowned: u64,
}

impl ServerlessPartitioner {
    fn push_one(&mut self, o: ObjectMeta) {
        if !self.order.accept(&o.key) {
            self.unowned += 1;
            return;
        }
        self.open
            .close(Some(&o.key), &mut self.done, &mut self.rejected);
        let repo = match parse(&o.key) {
            Key::Temp(_) => {
                self.temps.push(o);
                return;
            }
            Key::Unknown => {
                self.unowned += 1;
                return;
            }
            Key::Upload(r, id) => {
                self.open_uploads.insert(id.to_string());
                r.to_string()
            }
            Key::Blob(r, _) | Key::Manifest(r, _) | Key::Referrer(r, ..) | Key::Other(r) => {
                r.to_string()
            }
        };
        let prefix = format!("{repo}/");
        let last = format!("{prefix}uploads/");
        self.open.insert(&repo, prefix, last, o);
    }
}

impl Partitioner for ServerlessPartitioner {
    fn push(&mut self, page: Vec<ObjectMeta>) -> Vec<Repository> {
        for o in page {
            self.push_one(o);
        }
        std::mem::take(&mut self.done)
    }

    fn finish(mut self: Box<Self>) -> Partition {
        self.open.close(None, &mut self.done, &mut self.rejected);
        self.done.sort_by(|a, b| a.name.cmp(&b.name));
        self.rejected.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        let mut partition = Partition {
            repositories: self.done,
            rejected: self.rejected,
            unowned: self.unowned,
            ..Partition::default()
        };
        // Temp objects of an upload that is still open are the registry's business.
        let open_uploads = self.open_uploads;
        let (open, stale): (Vec<ObjectMeta>, Vec<ObjectMeta>) =
            self.temps.into_iter().partition(|o| match parse(&o.key) {
                Key::Temp(id) => open_uploads.contains(id),
                _ => true,
            });
        partition.unowned += open.len() as u64;
        if !stale.is_empty() {
            partition.global = Some(Repository {
                kind: UnitKind::Global,
                name: GLOBAL_REPOSITORY.into(),
                prefix: String::new(),
                objects: stale,
            });
        }
        partition
    }

    fn held_objects(&self) -> usize {
        self.open.held() + self.temps.len()
    }
}

impl ServerlessRegistryLayout {
    /// The manifests of `repo` as listed now (nested repositories' keys left out).
    async fn list_manifests(
        &self,
        store: &dyn Store,
        repo: &Repository,
    ) -> Result<Vec<ObjectMeta>, StoreError> {
        Ok(list_prefix(store, &format!("{}manifests/", repo.prefix))
            .await?
            .into_iter()
            .filter(|o| matches!(parse(&o.key), Key::Manifest(r, _) if r == repo.name))
            .collect())
    }

    /// The untagged roots of `repo`: manifests stored by digest that no tag names and that
    /// no manifest lists (an index's children), nor one in `held` (trashed). Each comes with
    /// its LastModified, size and subject (a referrer's, from its content or the
    /// `_referrers/` index). Every manifest is read, a few at a time, and only its references
    /// kept. A manifest that cannot be read or parsed fails the look: what it lists is
    /// unknown.
    async fn untagged_roots(
        &self,
        store: &dyn Store,
        repo: &Repository,
        tags: &[StoredTag],
        held: &Held,
    ) -> Result<Vec<UntaggedRoot>, TagError> {
        let listed = self.list_manifests(store, repo).await?;
        let tagged: HashSet<&Digest> = tags.iter().map(|t| &t.digest).collect();
        let mut children: HashSet<Digest> = HashSet::new();
        let mut candidates = Vec::new();
        let mut learn = |key: &str, body: &[u8]| -> Result<Option<Digest>, TagError> {
            let refs = manifest::references(body).map_err(|e| {
                TagError::Roots(RootsError::Invalid {
                    key: key.to_string(),
                    reason: e.to_string(),
                })
            })?;
            // A referrer's subject is among its references but is no child of it.
            let subject = refs.subjects.first().map(|s| s.digest.clone());
            let subjects: Vec<&Digest> = refs.subjects.iter().map(|s| &s.digest).collect();
            children.extend(
                (refs.children.iter())
                    .filter(|c| !subjects.contains(&&c.digest))
                    .map(|c| c.digest.clone()),
            );
            Ok(subject)
        };
        // Tags are copies of their manifests: any manifest may list children.
        // Owned, so that the reads borrow nothing but the store.
        let by_digest: HashSet<Digest> = (listed.iter())
            .filter_map(|o| match parse(&o.key) {
                Key::Manifest(_, leaf) => Digest::parse(leaf),
                _ => None,
            })
            .collect();
        // A tag whose manifest is also stored by digest lists the same children: read once.
        let copied: HashSet<&str> = (tags.iter())
            .filter(|t| by_digest.contains(&t.digest))
            .map(|t| t.name.as_str())
            .collect();
        let manifests: Vec<(ObjectMeta, Option<Digest>)> = (listed.into_iter())
            .filter_map(|o| {
                let digest = match parse(&o.key) {
                    Key::Manifest(_, leaf) if copied.contains(leaf) => return None,
                    Key::Manifest(_, leaf) => Digest::parse(leaf),
                    _ => return None,
                };
                Some((o, digest))
            })
            .collect();
        let mut reads = stream::iter(manifests)
            .map(move |(o, digest)| async move {
                let read = store.get_capped(&o.key, MAX_MANIFEST_SIZE).await;
                (o, digest, read)
            })
            .buffer_unordered(UNTAGGED_READS);
        while let Some((o, digest, read)) = reads.next().await {
            let body = match read {
                Ok(b) => b.body,
                // Gone since the listing: it lists nothing any more.
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let subject = learn(&o.key, &body)?;
            if let Some(d) = digest.filter(|d| !tagged.contains(d)) {
                candidates.push(UntaggedRoot {
                    digest: d,
                    moved_by: o.last_modified,
                    size: o.size,
                    subject,
                });
            }
        }
        for (d, body) in &held.manifests {
            if let Some(body) = body {
                learn(&format!("trash entry {d}"), body)?;
            }
        }
        candidates.retain(|c| !children.contains(&c.digest));
        // A referrer the registry indexed under `_referrers/` follows that subject even if its
        // content names none.
        let linked: HashMap<Digest, Digest> = (self.referrer_links(repo).into_iter())
            .map(|(subject, referrer)| (referrer, subject))
            .collect();
        for c in candidates.iter_mut().filter(|c| c.subject.is_none()) {
            c.subject = linked.get(&c.digest).cloned();
        }
        candidates.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(candidates)
    }
}

/// Largest manifest read (distribution refuses larger ones too).
const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;
/// Manifests read at once to find the untagged roots.
const UNTAGGED_READS: usize = 16;

/// An untagged root as [`ServerlessRegistryLayout::untagged_roots`] finds it.
struct UntaggedRoot {
    digest: Digest,
    moved_by: SystemTime,
    size: u64,
    subject: Option<Digest>,
}

#[async_trait]
impl Layout for ServerlessRegistryLayout {
    fn settings(&self) -> String {
        format!("delete_untagged={}", self.delete_untagged)
    }

    fn name(&self) -> &'static str {
        "serverless-registry"
    }

    fn partition(&self, objects: Vec<ObjectMeta>) -> Partition {
        partition_all(Box::new(ServerlessPartitioner::default()), objects)
    }

    fn streaming_partitioner(&self) -> Option<Box<dyn Partitioner + '_>> {
        Some(Box::new(ServerlessPartitioner::default()))
    }

    fn global_in_listing(&self) -> bool {
        // Stale temp objects may sit in any slice of the key space.
        true
    }

    fn may_split(&self, prefix: &str, objects: &[ObjectMeta], prefixes: &[String]) -> bool {
        // A repository's keys are `<name>/<kind>/<leaf>` and `<name>/_referrers/...`: a
        // prefix with such a sub-directory (or a key named like one) is a repository.
        let is_kind = |rest: &str| {
            let rest = rest.trim_end_matches('/');
            KINDS.contains(&rest) || rest == REFERRERS.trim_matches('/')
        };
        // Temp objects (at the bucket root) are stale only if no repository has their upload
        // open: a part holding them must see every upload, so a root with any is one part.
        let temps = objects
            .iter()
            .any(|o| matches!(parse(&o.key), Key::Temp(_)));
        !temps
            && !prefixes
                .iter()
                .filter_map(|p| p.strip_prefix(prefix))
                .chain(objects.iter().filter_map(|o| o.key.strip_prefix(prefix)))
                .any(is_kind)
    }

    async fn links_in(
        &self,
        store: &dyn Store,
        repo: &Repository,
        concurrency: usize,
    ) -> Result<Vec<(String, Digest)>, StoreError> {
        // The repositories a link may name are not all listed yet: any name will do.
        let any = |_: u64| true;
        read_links(store, link_candidates(repo, &any).collect(), concurrency).await
    }

    fn removes_untagged(&self) -> bool {
        // With --delete-untagged they are no roots at all, and go after --grace anyway.
        !self.delete_untagged
    }

    async fn read_untagged(
        &self,
        store: &dyn Store,
        repo: &Repository,
        set: &mut TagSet,
        held: &Held,
    ) -> Result<(), TagError> {
        let roots = self.untagged_roots(store, repo, &set.tags, held).await?;
        set.untagged = roots
            .into_iter()
            .map(|r| StoredUntagged {
                digest: r.digest,
                moved_by: r.moved_by,
                // The manifest itself is deleted: retention keeps its content in the trash.
                entry: None,
                size: Some(r.size),
                subject: Some(r.subject),
            })
            .collect();
        Ok(())
    }

    fn trash_keeps_content(&self) -> bool {
        true
    }

    fn scans_for_referrers(&self, repo: &Repository) -> bool {
        // Manifests live under manifests/, never among the blobs; only untagged ones can be
        // unreferenced referrers.
        self.delete_untagged && !repo.is_global()
    }

    fn may_hold_manifest(&self, _repo: &Repository, key: &str) -> bool {
        matches!(parse(key), Key::Manifest(..))
    }

    fn deletion_protocol(
        &self,
        repo: &Repository,
        owner: &str,
    ) -> Option<Box<dyn DeletionProtocol>> {
        // The temp objects at the bucket root belong to no repository's protocol.
        (!repo.is_global()).then(|| {
            Box::new(ServerlessProtocol::new(&repo.prefix, owner)) as Box<dyn DeletionProtocol>
        })
    }

    fn repository_prefix(&self, name: &str) -> String {
        format!("{name}/")
    }

    fn classify(&self, repo: &Repository, key: &str) -> KeyKind {
        if repo.is_global() {
            return match parse(key) {
                Key::Temp(_) => KeyKind::Scratch,
                _ => KeyKind::Other,
            };
        }
        match parse(key) {
            Key::Blob(r, d) if r == repo.name => KeyKind::Blob(d),
            Key::Manifest(r, leaf) if r == repo.name && self.delete_untagged => {
                Digest::parse(leaf).map_or(KeyKind::Other, KeyKind::Blob)
            }
            // Upload state outlives its upload only when the upload was abandoned (its token
            // expires after two hours); the temp objects go once it is gone.
            Key::Upload(r, _) if r == repo.name => KeyKind::Scratch,
            _ => KeyKind::Other,
        }
    }

    fn content_key(
        &self,
        repo: &Repository,
        digest: &Digest,
        listed: Option<&ObjectMeta>,
    ) -> String {
        // Unlisted content is a manifest pushed since the listing: manifests are only ever
        // stored under manifests/.
        listed.map_or_else(
            || format!("{}manifests/{digest}", repo.prefix),
            |o| o.key.clone(),
        )
    }

    fn referrer_links(&self, repo: &Repository) -> Vec<(Digest, Digest)> {
        repo.objects
            .iter()
            .filter_map(|o| match parse(&o.key) {
                Key::Referrer(r, subject, referrer) if r == repo.name => Some((subject, referrer)),
                _ => None,
            })
            .collect()
    }

    async fn linked_blobs(
        &self,
        store: &dyn Store,
        partition: &Partition,
        concurrency: usize,
    ) -> Result<HashMap<String, Vec<Digest>>, StoreError> {
        // With every repository listed, a link can only matter if it names one of them.
        let lengths: HashSet<u64> = partition
            .repositories
            .iter()
            .map(|r| r.name.len() as u64)
            .collect();
        let listed = |len: u64| lengths.contains(&len);
        let candidates = partition
            .repositories
            .iter()
            .flat_map(|r| link_candidates(r, &listed))
            .collect();
        let mut out: HashMap<String, Vec<Digest>> = HashMap::new();
        for (src, d) in read_links(store, candidates, concurrency).await? {
            out.entry(src).or_default().push(d);
        }
        Ok(out)
    }

    async fn read_roots(&self, store: &dyn Store, repo: &Repository) -> Result<Roots, RootsError> {
        if repo.is_global() {
            // No roots: the empty listing's version, which never changes.
            return Ok(Roots {
                version: Some(RootsVersion::Listing(ListingSum::default())),
                ..Roots::default()
            });
        }
        let listed = self.list_manifests(store, repo).await?;
        let mut roots = Roots {
            version: Some(RootsVersion::Listing(listing_version(listed.iter()))),
            ..Roots::default()
        };
        let mut seen = HashSet::new();
        // Tags are read (their digest is that of their content); digests are roots by name
        // unless untagged manifests may go.
        let mut tags = Vec::new();
        for o in &listed {
            let Key::Manifest(_, leaf) = parse(&o.key) else {
                continue;
            };
            match Digest::parse(leaf) {
                Some(d) if !self.delete_untagged => {
                    if seen.insert(d.clone()) {
                        roots.descriptors.push(Descriptor {
                            media_type: Some(crate::manifest::media_type(UNTYPED_MANIFEST)),
                            digest: d,
                            size: Some(o.size),
                        });
                    }
                }
                Some(_) => {}
                None => tags.push(o.key.clone()),
            }
        }
        for key in tags {
            let body = match store.get(&key).await {
                Ok(b) => b.body,
                // Untagged since the listing.
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let invalid = |reason: String| RootsError::Invalid {
                key: key.clone(),
                reason,
            };
            let refs = manifest::references(&body).map_err(|e| invalid(e.to_string()))?;
            let digest = Digest::sha256_of(&body);
            if seen.insert(digest.clone()) {
                roots.descriptors.push(Descriptor {
                    media_type: Some(crate::manifest::media_type(UNTYPED_MANIFEST)),
                    digest: digest.clone(),
                    size: Some(body.len() as u64),
                });
            }
            roots.documents.push((digest, refs));
        }
        Ok(roots)
    }

    async fn roots_version(
        &self,
        store: &dyn Store,
        repo: &Repository,
    ) -> Result<Option<RootsVersion>, RootsError> {
        if repo.is_global() {
            return Ok(Some(RootsVersion::Listing(ListingSum::default())));
        }
        let listed = self.list_manifests(store, repo).await?;
        Ok(Some(RootsVersion::Listing(listing_version(listed.iter()))))
    }

    async fn read_tags(&self, store: &dyn Store, repo: &Repository) -> Result<TagSet, TagError> {
        let listed = self.list_manifests(store, repo).await?;
        let mut set = TagSet {
            version: Some(listing_version(listed.iter()).to_string()),
            ..TagSet::default()
        };
        for o in &listed {
            let Key::Manifest(_, leaf) = parse(&o.key) else {
                continue;
            };
            if Digest::parse(leaf).is_some() {
                continue;
            }
            // A tag is a copy of its manifest: its digest is that of its content.
            let body = match store.get(&o.key).await {
                Ok(b) => b.body,
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            set.tags.push(StoredTag {
                name: leaf.to_string(),
                digest: Digest::sha256_of(&body),
                moved_by: o.last_modified,
                pushed_at: o.last_modified,
                entry: None,
            });
        }
        Ok(set)
    }

    async fn remove_tags(
        &self,
        store: &dyn Store,
        repo: &Repository,
        _set: &TagSet,
        doomed: &[Doomed],
    ) -> Result<Vec<Removal>, TagError> {
        let mut out = Vec::with_capacity(doomed.len());
        // The untagged roots as read again right before they go (once per call).
        let mut untagged_now: Option<HashSet<Digest>> = None;
        // Digests this call removed: a referrer goes only after its subject did.
        let mut removed: HashSet<Digest> = HashSet::new();
        for d in doomed {
            if d.subject.as_ref().is_some_and(|s| !removed.contains(s)) {
                out.push(Removal::Moved);
                continue;
            }
            let Some(tag) = &d.tag else {
                if untagged_now.is_none() {
                    // Re-read: a manifest a push tagged (or listed in an index) since the
                    // decision is no untagged root any more and stays. (Between this read and
                    // the delete a push can still land; see the README.)
                    let tags = self.read_tags(store, repo).await?;
                    let roots = self
                        .untagged_roots(store, repo, &tags.tags, &Held::default())
                        .await?;
                    untagged_now = Some(roots.into_iter().map(|r| r.digest).collect());
                }
                if !untagged_now.as_ref().is_some_and(|u| u.contains(&d.digest)) {
                    out.push(Removal::Moved);
                    continue;
                }
                let key = format!("{}manifests/{}", repo.prefix, d.digest);
                super::delete_tag_keys(store, std::slice::from_ref(&key)).await?;
                removed.insert(d.digest.clone());
                out.push(Removal::Removed);
                continue;
            };
            let key = format!("{}manifests/{tag}", repo.prefix);
            // Re-read right before the delete: a tag a push moved since the decision stays.
            // (Between this read and the delete a push can still land; see the README.)
            let now = match store.get(&key).await {
                Ok(b) => Some(Digest::sha256_of(&b.body)),
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            if now.as_ref() != Some(&d.digest) {
                out.push(Removal::Moved);
                continue;
            }
            super::delete_tag_keys(store, std::slice::from_ref(&key)).await?;
            removed.insert(d.digest.clone());
            out.push(Removal::Removed);
        }
        Ok(out)
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
        let source = format!("{prefix}manifests/{digest}");
        let inline = super::inline_manifest(entry, digest);
        let Some(tag) = tag else {
            // The untagged manifest itself, from the content its trash entry keeps.
            let body = inline.ok_or_else(|| {
                TagError::Unsupported(format!(
                    "the trash entry of {digest} keeps no content to restore"
                ))
            })?;
            return match store.put(&source, body, PutCondition::IfNoneMatch).await? {
                PutOutcome::Written { .. } => Ok(()),
                PutOutcome::PreconditionFailed => Err(TagError::Exists(digest.to_string())),
            };
        };
        let key = format!("{prefix}manifests/{tag}");
        let body = match store.get(&source).await {
            Ok(o) => o.body,
            // Removed since as an untagged root: its content is in that trash entry, and the
            // manifest by digest comes back first (an image is pulled by digest too).
            Err(StoreError::NotFound { .. }) if inline.is_some() => {
                let body = inline.clone().unwrap_or_default();
                store
                    .put(&source, body.clone(), PutCondition::IfNoneMatch)
                    .await?;
                body
            }
            Err(e) => return Err(e.into()),
        };
        if Digest::sha256_of(&body) != *digest {
            return Err(TagError::Unsupported(format!(
                "{source} does not hold {digest}"
            )));
        }
        match store.put(&key, body, PutCondition::IfNoneMatch).await? {
            PutOutcome::Written { .. } => Ok(()),
            PutOutcome::PreconditionFailed => Err(TagError::Exists(tag.to_string())),
        }
    }

    fn deletion_phases(&self, repo: &Repository) -> Vec<Vec<ObjectMeta>> {
        // Tags first, then digests (pulls stop resolving), then everything else.
        let (mut tags, mut digests, mut rest) = (Vec::new(), Vec::new(), Vec::new());
        for o in &repo.objects {
            match parse(&o.key) {
                Key::Manifest(_, leaf) if Digest::parse(leaf).is_none() => tags.push(o.clone()),
                Key::Manifest(..) => digests.push(o.clone()),
                _ => rest.push(o.clone()),
            }
        }
        vec![tags, digests, rest]
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_object as obj;
    use super::*;

    #[test]
    fn keys() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let e = format!("sha256:{}", "cd".repeat(32));
        let id = "0f0e0d0c-0b0a-4909-8807-060504030201";
        assert_eq!(
            parse(&format!("team/app/blobs/{d}")),
            Key::Blob("team/app", Digest::parse(&d).expect("d"))
        );
        assert_eq!(
            parse("team/blobs/manifests/latest"),
            Key::Manifest("team/blobs", "latest")
        );
        assert_eq!(
            parse(&format!("a/_referrers/{d}/{e}")),
            Key::Referrer(
                "a",
                Digest::parse(&d).expect("d"),
                Digest::parse(&e).expect("e")
            )
        );
        assert_eq!(parse("a/gc/marker"), Key::Other("a"));
        assert_eq!(parse("a/insertion/last_update"), Key::Other("a"));
        assert_eq!(parse(&format!("a/uploads/{id}")), Key::Upload("a", id));
        assert_eq!(parse("a/uploads/gc/marker"), Key::Other("a/uploads"));
        assert_eq!(parse("a/blobs/not-a-digest"), Key::Other("a"));
        assert_eq!(parse(id), Key::Temp(id));
        assert_eq!(parse(&format!("{id}-helper")), Key::Temp(id));
        for unknown in ["README", "a/README", "blobs/x", "a/other/x", "a/manifests/"] {
            assert_eq!(parse(unknown), Key::Unknown, "{unknown}");
        }
    }

    #[test]
    fn registry_markers_stay_with_their_repository_and_are_never_blobs() {
        let id = "0f0e0d0c-0b0a-4909-8807-060504030201";
        let d = format!("sha256:{}", "ab".repeat(32));
        let layout = ServerlessRegistryLayout {
            delete_untagged: true,
        };
        let markers = [
            "a/gc/marker".to_string(),
            "a/gc/last_update".to_string(),
            "a/insertion/last_update".to_string(),
            format!("a/insertion/{id}"),
        ];
        let mut keys = markers.to_vec();
        keys.extend([
            format!("a/insertion/blobs/{d}"),
            "a/insertion/manifests/v1".to_string(),
            "gone/gc/marker".to_string(),
        ]);
        let p = layout.partition(keys.iter().map(|k| obj(k)).collect());
        let names: Vec<_> = p.repositories.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "a/insertion", "gone"]);
        let a = &p.repositories[0];
        let owned: Vec<_> = a.objects.iter().map(|o| o.key.clone()).collect();
        let mut sorted = markers.to_vec();
        sorted.sort();
        assert_eq!(owned, sorted, "in listing order");
        for k in &markers {
            assert_eq!(layout.classify(a, k), KeyKind::Other, "{k}");
        }
        let nested = &p.repositories[1];
        assert_eq!(
            layout.classify(nested, &format!("a/insertion/blobs/{d}")),
            KeyKind::Blob(Digest::parse(&d).expect("d"))
        );
    }

    #[test]
    fn partition_keeps_open_uploads_temp_objects() {
        let open = "0f0e0d0c-0b0a-4909-8807-060504030201";
        let done = "1f0e0d0c-0b0a-4909-8807-060504030201";
        let p = ServerlessRegistryLayout::default().partition(
            [
                "team/app/manifests/latest".to_string(),
                "team/app/tools/manifests/latest".to_string(),
                "team/app-edge/blobs/x".to_string(),
                format!("team/app/uploads/{open}"),
                open.to_string(),
                format!("{open}-helper"),
                done.to_string(),
                "Bad/manifests/latest".to_string(),
                "README".to_string(),
            ]
            .iter()
            .map(|k| obj(k))
            .collect(),
        );
        let names: Vec<_> = p.repositories.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["team/app", "team/app-edge", "team/app/tools"]);
        assert_eq!(p.rejected.len(), 1);
        assert_eq!(
            p.unowned, 3,
            "README and the open upload's two temp objects"
        );
        let global = p.global.expect("stale temp objects");
        assert_eq!(global.objects.len(), 1);
        assert_eq!(global.objects[0].key, done);
    }
}
