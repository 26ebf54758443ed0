//! The `distribution` layout: the on-bucket format of distribution/distribution (the classic
//! registry) under `docker/registry/v2/`.
//!
//! Blobs are global (`blobs/<alg>/<2 hex>/<hex>/data`) and shared by every repository, so the
//! blob sweep is one pseudo-repository, [`GLOBAL_REPOSITORY`], whose roots are every
//! repository's manifest revisions, read from a fresh LIST of `repositories/` (and, added by
//! the GC, every repository's trashed manifests: retention's `untagged_older_than` deletes an
//! untagged root's revision link while it is in the trash). Repositories
//! (`repositories/<name>/_manifests|_layers|_uploads/…`) matter for whole-repository deletion
//! and, with `--delete-untagged`, are collected first: there a revision link is the thing that
//! is swept when no tag reaches its manifest (directly, through an index, or as a referrer of a
//! kept manifest), and the global sweep then reclaims what only that manifest used.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::SystemTime;

use async_trait::async_trait;

use super::{
    list_prefix as list, list_prefix_in_parts, listing_version, partition_all, Doomed, Held,
    KeyKind, KeySpace, Layout, OpenRepos, Order, Partition, Partitioner, Rejected, Removal,
    Repository, Roots, RootsError, RootsVersion, StoredTag, StoredUntagged, TagError, TagSet,
    UnitKind, GLOBAL_REPOSITORY,
};
use crate::digest::Digest;
use crate::manifest::{Descriptor, UNTYPED_MANIFEST};
use crate::store::{ObjectMeta, PutCondition, PutOutcome, Store, StoreError};

/// Everything the classic registry stores lives under this prefix.
pub const ROOT: &str = "docker/registry/v2/";
const BLOBS: &str = "docker/registry/v2/blobs/";
const REPOSITORIES: &str = "docker/registry/v2/repositories/";
/// Path components that end a repository name (a name component never starts with `_`).
const REPO_DIRS: [&str; 3] = ["_manifests", "_layers", "_uploads"];
const TAGS: &str = "_manifests/tags/";
/// Largest link file read: a link holds one digest (71 bytes for sha256).
const MAX_LINK_SIZE: u64 = 1024;
/// Delete batches per re-check of the global roots (8 × 1000 keys, sent together).
const RECHECK_ROUND: usize = 8;
const REVISIONS: &str = "_manifests/revisions/";
/// The link of a tag's current manifest, below `_manifests/tags/<tag>/`.
const CURRENT: &str = "/current/link";
/// Largest manifest read to find the children of a repository's manifests.
const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// The classic registry's layout.
#[derive(Clone, Copy, Debug, Default)]
pub struct DistributionLayout {
    /// Sweep manifest revisions that no tag reaches (`--delete-untagged`).
    pub delete_untagged: bool,
}

/// The repository a key under `repositories/` belongs to: the path before its first
/// `_manifests`, `_layers` or `_uploads` component.
fn repository_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(REPOSITORIES)?;
    let mut end = 0;
    for component in rest.split('/') {
        if REPO_DIRS.contains(&component) {
            return (end > 0).then(|| &rest[..end - 1]);
        }
        end += component.len() + 1;
    }
    None
}

/// The digest a global blob key names: `<alg>/<2 hex>/<hex>/data`.
fn global_blob(rest: &str) -> Option<Digest> {
    let mut parts = rest.split('/');
    let (alg, dir, hex, data) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if data != "data" || parts.next().is_some() || hex.get(..2) != Some(dir) {
        return None;
    }
    Digest::from_parts(alg, hex)
}

/// The digest a revision link names: `<alg>/<hex>/link` below `_manifests/revisions/`.
fn revision(rest: &str) -> Option<Digest> {
    let (alg, tail) = rest.split_once('/')?;
    let hex = tail.strip_suffix("/link")?;
    Digest::from_parts(alg, hex)
}

/// The global key of a blob's (or manifest's) content.
fn data_key(digest: &Digest) -> String {
    let hex = digest.hex();
    let hex: &str = &hex;
    format!(
        "{BLOBS}{}/{}/{hex}/data",
        digest.algorithm(),
        hex.get(..2).unwrap_or(hex)
    )
}

/// The revision link of `digest` below a repository's `prefix`.
fn revision_key(prefix: &str, digest: &Digest) -> String {
    format!(
        "{prefix}{REVISIONS}{}/{}/link",
        digest.algorithm(),
        digest.hex()
    )
}

/// The digest a revision link of any repository names.
fn revision_link(key: &str) -> Option<Digest> {
    let name = repository_of(key)?;
    let rest = key[REPOSITORIES.len() + name.len() + 1..].strip_prefix(REVISIONS)?;
    revision(rest)
}

/// The roots of the global sweep, from the revision links of every repository.
fn revision_roots(revisions: Vec<(ObjectMeta, Digest)>) -> Roots {
    Roots {
        version: Some(RootsVersion::Listing(listing_version(
            revisions.iter().map(|(o, _)| o),
        ))),
        sources: revisions.iter().map(|(o, _)| o.key.clone()).collect(),
        documents: Vec::new(),
        descriptors: revisions
            .into_iter()
            .map(|(_, d)| untyped_root(d))
            .collect(),
    }
}

fn untyped_root(digest: Digest) -> Descriptor {
    Descriptor {
        media_type: Some(crate::manifest::media_type(UNTYPED_MANIFEST)),
        digest,
        size: None,
    }
}

/// The streaming partitioner of the layout: a repository's keys all sort under its prefix and
/// no later than its `_uploads/`; the global blobs and every revision link (the global roots)
/// are kept to the end.
#[derive(Debug, Default)]
struct DistributionPartitioner {
    order: Order,
    open: OpenRepos,
    done: Vec<Repository>,
    rejected: Vec<Rejected>,
    global: Vec<ObjectMeta>,
    revisions: Vec<(ObjectMeta, Digest)>,
    /// Whether any repository key was seen: the global roots are then read from the listing.
    repositories_seen: bool,
    unowned: u64,
}

impl DistributionPartitioner {
    fn push_one(&mut self, o: ObjectMeta) {
        if !self.order.accept(&o.key) {
            self.unowned += 1;
            return;
        }
        self.open
            .close(Some(&o.key), &mut self.done, &mut self.rejected);
        if o.key.starts_with(BLOBS) {
            self.global.push(o);
        } else if let Some(name) = repository_of(&o.key).map(str::to_string) {
            self.repositories_seen = true;
            if let Some(d) = revision_link(&o.key) {
                self.revisions.push((o.clone(), d));
            }
            let prefix = format!("{REPOSITORIES}{name}/");
            let last = format!("{prefix}_uploads/");
            self.open.insert(&name, prefix, last, o);
        } else {
            self.unowned += 1;
        }
    }
}

impl Partitioner for DistributionPartitioner {
    fn push(&mut self, page: Vec<ObjectMeta>) -> Vec<Repository> {
        for o in page {
            self.push_one(o);
        }
        std::mem::take(&mut self.done)
    }

    fn finish(self: Box<Self>) -> Partition {
        let mut this = *self;
        this.open.close(None, &mut this.done, &mut this.rejected);
        this.done.sort_by(|a, b| a.name.cmp(&b.name));
        this.rejected.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        let revisions = this.revisions;
        Partition {
            repositories: this.done,
            rejected: this.rejected,
            unowned: this.unowned,
            // Every revision link listed, of valid names or not: more roots keep more blobs.
            // Given whenever the part held repositories (with or without blobs, which an
            // engine may list on their own); a part of blobs alone leaves the engine to read
            // the roots, never to take none for all.
            global_roots: this.repositories_seen.then(|| revision_roots(revisions)),
            // Nothing to sweep globally without blobs: skip the marking it would cost.
            global: (!this.global.is_empty()).then(|| Repository {
                kind: UnitKind::Global,
                name: GLOBAL_REPOSITORY.into(),
                prefix: BLOBS.into(),
                objects: this.global,
            }),
            placeholders: HashMap::new(),
        }
    }

    fn held_objects(&self) -> usize {
        self.open.held() + self.global.len() + self.revisions.len()
    }
}

impl DistributionLayout {
    /// Every manifest revision of every repository, read now: the roots of the global sweep.
    async fn current_revision_roots(&self, store: &dyn Store) -> Result<Roots, RootsError> {
        let links = list_prefix_in_parts(store, REPOSITORIES).await?;
        Ok(revision_roots(
            links
                .into_iter()
                .filter_map(|o| revision_link(&o.key).map(|d| (o, d)))
                .collect(),
        ))
    }

    /// The manifests a repository's tags point at now (one GET per tag).
    async fn tag_roots(&self, store: &dyn Store, repo: &Repository) -> Result<Roots, RootsError> {
        let tags = list(store, &format!("{}{TAGS}", repo.prefix)).await?;
        let current: Vec<&ObjectMeta> = tags
            .iter()
            .filter(|o| o.key.ends_with("/current/link"))
            .collect();
        let mut descriptors = Vec::with_capacity(current.len());
        for o in &current {
            let body = match store.get_capped(&o.key, MAX_LINK_SIZE).await {
                Ok(b) => b.body,
                // Untagged since the listing: that tag roots nothing any more.
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let text = String::from_utf8_lossy(&body);
            let digest = Digest::parse(text.trim()).ok_or_else(|| RootsError::Invalid {
                key: o.key.clone(),
                reason: format!("not a digest: {:?}", text.trim()),
            })?;
            descriptors.push(untyped_root(digest));
        }
        Ok(Roots {
            descriptors,
            version: Some(RootsVersion::Listing(listing_version(current.into_iter()))),
            ..Roots::default()
        })
    }
}

impl DistributionLayout {
    /// The untagged roots of `repo` now, with their revision links' LastModified: the
    /// revisions no tag points at (`tagged`) and no manifest lists as a child — no revision of
    /// the repository (an index, tagged or itself an untagged root), no tagged manifest and
    /// none of `held` (trashed). Children of an index are reachable through it, never roots of
    /// their own; a referrer names its subject, which lists nothing, so it is a root here and
    /// retention tells it apart by its `subject`. A revision whose manifest data is gone is
    /// left out (nothing of it is left to keep, nor can it be told a referrer).
    async fn untagged_roots(
        &self,
        store: &dyn Store,
        repo: &Repository,
        tagged: &[Digest],
        held: &[Digest],
    ) -> Result<Vec<(Digest, SystemTime)>, TagError> {
        let prefix = format!("{}{REVISIONS}", repo.prefix);
        let listed = list(store, &prefix).await?;
        let revisions: Vec<(Digest, SystemTime)> = listed
            .iter()
            .filter_map(|o| {
                Some((
                    revision(o.key.strip_prefix(prefix.as_str())?)?,
                    o.last_modified,
                ))
            })
            .collect();
        let parents: BTreeSet<&Digest> = (revisions.iter().map(|(d, _)| d))
            .chain(tagged)
            .chain(held)
            .collect();
        let mut children: HashSet<Digest> = HashSet::new();
        let mut missing: HashSet<&Digest> = HashSet::new();
        for d in parents {
            let key = data_key(d);
            let body = match store.get_capped(&key, MAX_MANIFEST_SIZE).await {
                Ok(o) => o.body,
                Err(StoreError::NotFound { .. }) => {
                    missing.insert(d);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let refs = crate::manifest::references(&body).map_err(|e| {
                TagError::Roots(RootsError::Invalid {
                    key: key.clone(),
                    reason: e.to_string(),
                })
            })?;
            // A referrer's subject is among its references but is no child of it.
            let subjects: Vec<&Digest> = refs.subjects.iter().map(|s| &s.digest).collect();
            children.extend(
                (refs.children.iter())
                    .filter(|c| !subjects.contains(&&c.digest))
                    .map(|c| c.digest.clone()),
            );
        }
        let roots = revisions
            .iter()
            .filter(|(d, _)| !tagged.contains(d) && !children.contains(d) && !missing.contains(d))
            .cloned()
            .collect();
        Ok(roots)
    }

    /// Puts the revision link of untagged root `digest` back in repository `name`: only if
    /// its manifest's data is still there, never over an existing link.
    async fn restore_untagged(
        &self,
        store: &dyn Store,
        name: &str,
        digest: &Digest,
    ) -> Result<(), TagError> {
        let data = data_key(digest);
        if store.head(&data).await?.is_none() {
            return Err(TagError::Unsupported(format!(
                "{data} is gone: the manifest cannot be restored"
            )));
        }
        let link = revision_key(&self.repository_prefix(name), digest);
        if store.head(&link).await?.is_some() {
            return Err(TagError::Exists(digest.as_str().to_string()));
        }
        let body = bytes::Bytes::from(digest.as_str().to_string());
        match store.put(&link, body, PutCondition::IfNoneMatch).await? {
            PutOutcome::Written { .. } => Ok(()),
            PutOutcome::PreconditionFailed => Err(TagError::Exists(digest.as_str().to_string())),
        }
    }
}

/// The digest a link file holds, `None` if it is gone.
async fn read_link(store: &dyn Store, key: &str) -> Result<Option<Digest>, TagError> {
    let body = match store.get_capped(key, MAX_LINK_SIZE).await {
        Ok(b) => b.body,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let text = String::from_utf8_lossy(&body);
    Digest::parse(text.trim()).map(Some).ok_or_else(|| {
        TagError::Roots(RootsError::Invalid {
            key: key.to_string(),
            reason: format!("not a digest: {:?}", text.trim()),
        })
    })
}

#[async_trait]
impl Layout for DistributionLayout {
    fn name(&self) -> &'static str {
        "distribution"
    }

    fn removes_untagged(&self) -> bool {
        true
    }

    fn partition(&self, objects: Vec<ObjectMeta>) -> Partition {
        partition_all(Box::new(DistributionPartitioner::default()), objects)
    }

    fn streaming_partitioner(&self) -> Option<Box<dyn Partitioner + '_>> {
        Some(Box::new(DistributionPartitioner::default()))
    }

    fn key_space(&self) -> KeySpace {
        KeySpace {
            repositories: REPOSITORIES.into(),
            global: Some(BLOBS.into()),
        }
    }

    fn may_split(&self, prefix: &str, objects: &[ObjectMeta], prefixes: &[String]) -> bool {
        // Above the blob space, a split would part the global blobs from the revision links
        // that are their roots: the engine lists the two spaces on its own (`key_space`).
        if BLOBS.starts_with(prefix) && prefix != BLOBS {
            return false;
        }
        // A repository is the path before its first `_manifests`, `_layers` or `_uploads`
        // component: a prefix with one below it (a directory, or a key so named) is one.
        !prefixes
            .iter()
            .filter_map(|p| p.strip_prefix(prefix))
            .chain(objects.iter().filter_map(|o| o.key.strip_prefix(prefix)))
            .any(|rest| REPO_DIRS.contains(&rest.trim_end_matches('/')))
    }

    fn per_repository_gc(&self) -> bool {
        self.delete_untagged
    }

    fn settings(&self) -> String {
        format!("delete_untagged={}", self.delete_untagged)
    }

    fn links_across_repositories(&self) -> bool {
        // A repository owns only links; the blobs they name are global and swept by the
        // global pseudo-repository alone, which a one-repository run never selects. What keeps
        // a revision link is the repository's own tags and manifests.
        false
    }

    fn global_roots_include_trash(&self) -> bool {
        true
    }

    fn root_owner<'k>(&self, source: &'k str) -> Option<&'k str> {
        // The global roots are every repository's revision links.
        repository_of(source)
    }

    fn scans_for_referrers(&self, repo: &Repository) -> bool {
        // The registry serves only manifests that have a revision link, and every revision is
        // a root of the global sweep; among a repository's untagged revisions (only swept with
        // --delete-untagged), referrers of a kept manifest must be found.
        !repo.is_global()
    }

    fn batches_per_recheck(&self, repo: &Repository) -> usize {
        // The global re-check lists every link file of every repository.
        if repo.is_global() {
            RECHECK_ROUND
        } else {
            1
        }
    }

    fn repository_prefix(&self, name: &str) -> String {
        format!("{REPOSITORIES}{name}/")
    }

    fn classify(&self, repo: &Repository, key: &str) -> KeyKind {
        let Some(rest) = key.strip_prefix(repo.prefix.as_str()) else {
            return KeyKind::Other;
        };
        let digest = if repo.is_global() {
            global_blob(rest)
        } else if self.delete_untagged {
            rest.strip_prefix(REVISIONS).and_then(revision)
        } else {
            None
        };
        digest.map_or(KeyKind::Other, KeyKind::Blob)
    }

    fn content_key(
        &self,
        _repo: &Repository,
        digest: &Digest,
        _listed: Option<&ObjectMeta>,
    ) -> String {
        // A revision link listed for the digest is not its content: that is always global.
        data_key(digest)
    }

    async fn read_roots(&self, store: &dyn Store, repo: &Repository) -> Result<Roots, RootsError> {
        if repo.is_global() {
            self.current_revision_roots(store).await
        } else {
            self.tag_roots(store, repo).await
        }
    }

    async fn roots_version(
        &self,
        store: &dyn Store,
        repo: &Repository,
    ) -> Result<Option<RootsVersion>, RootsError> {
        // Listing is the cheapest way to see a new revision or a moved tag; the links' own
        // contents never change without their listing entry changing too.
        let sum = if repo.is_global() {
            let links = list_prefix_in_parts(store, REPOSITORIES).await?;
            listing_version(links.iter().filter(|o| revision_link(&o.key).is_some()))
        } else {
            let tags = list(store, &format!("{}{TAGS}", repo.prefix)).await?;
            listing_version(tags.iter().filter(|o| o.key.ends_with("/current/link")))
        };
        Ok(Some(RootsVersion::Listing(sum)))
    }

    async fn read_tags(&self, store: &dyn Store, repo: &Repository) -> Result<TagSet, TagError> {
        let prefix = format!("{}{TAGS}", repo.prefix);
        let listed = list(store, &prefix).await?;
        let mut set = TagSet {
            version: Some(
                listing_version(listed.iter().filter(|o| o.key.ends_with(CURRENT))).to_string(),
            ),
            ..TagSet::default()
        };
        for o in &listed {
            let Some(tag) = o
                .key
                .strip_prefix(prefix.as_str())
                .and_then(|r| r.strip_suffix(CURRENT))
                .filter(|t| !t.is_empty() && !t.contains('/'))
            else {
                continue;
            };
            let Some(digest) = read_link(store, &o.key).await? else {
                continue;
            };
            set.tags.push(StoredTag {
                name: tag.to_string(),
                digest,
                moved_by: o.last_modified,
                pushed_at: o.last_modified,
                entry: None,
            });
        }
        Ok(set)
    }

    async fn read_untagged(
        &self,
        store: &dyn Store,
        repo: &Repository,
        set: &mut TagSet,
        held: &Held,
    ) -> Result<(), TagError> {
        let tagged: Vec<Digest> = set.tags.iter().map(|t| t.digest.clone()).collect();
        // The trash keeps no content here: a trashed manifest's data stays in `blobs/`.
        let roots = self
            .untagged_roots(store, repo, &tagged, &held.digests())
            .await?;
        set.untagged = roots
            .into_iter()
            .map(|(digest, moved_by)| StoredUntagged {
                digest,
                moved_by,
                entry: None,
                size: None,
                subject: None,
            })
            .collect();
        Ok(())
    }

    async fn remove_tags(
        &self,
        store: &dyn Store,
        repo: &Repository,
        _set: &TagSet,
        doomed: &[Doomed],
    ) -> Result<Vec<Removal>, TagError> {
        let mut out = Vec::with_capacity(doomed.len());
        // The untagged roots as read again right before their links go (once per call).
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
                    // Re-read the tags and the revisions: a manifest a push tagged (or listed
                    // in an index) since the decision is no untagged root any more and stays.
                    // (Between this read and the delete a push can still land; see the README.)
                    let tags = self.read_tags(store, repo).await?;
                    let tagged: Vec<Digest> = tags.tags.into_iter().map(|t| t.digest).collect();
                    let roots = self.untagged_roots(store, repo, &tagged, &[]).await?;
                    untagged_now = Some(roots.into_iter().map(|(d, _)| d).collect());
                }
                if !untagged_now.as_ref().is_some_and(|u| u.contains(&d.digest)) {
                    out.push(Removal::Moved);
                    continue;
                }
                super::delete_tag_keys(store, &[revision_key(&repo.prefix, &d.digest)]).await?;
                removed.insert(d.digest.clone());
                out.push(Removal::Removed);
                continue;
            };
            let dir = format!("{}{TAGS}{tag}/", repo.prefix);
            let mut keys: Vec<String> = list(store, &dir)
                .await?
                .into_iter()
                .map(|o| o.key)
                .collect();
            let current = format!("{dir}current/link");
            // Re-read right before the delete: a tag a push moved since the decision stays.
            // (Between this read and the delete a push can still land; see the README.)
            let now = read_link(store, &current).await?;
            if now.as_ref() != Some(&d.digest) {
                out.push(Removal::Moved);
                continue;
            }
            // The current link first: once it is gone the tag no longer resolves.
            keys.retain(|k| *k != current);
            keys.insert(0, current);
            super::delete_tag_keys(store, &keys).await?;
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
        _entry: Option<&serde_json::Value>,
    ) -> Result<(), TagError> {
        let Some(tag) = tag else {
            return self.restore_untagged(store, name, digest).await;
        };
        let prefix = self.repository_prefix(name);
        let revision = revision_key(&prefix, digest);
        if store.head(&revision).await?.is_none() {
            return Err(TagError::Unsupported(format!(
                "{revision} is gone: the manifest is no longer in the repository"
            )));
        }
        let dir = format!("{prefix}{TAGS}{tag}/");
        let body = bytes::Bytes::from(digest.as_str().to_string());
        let index = format!("{dir}index/{}/{}/link", digest.algorithm(), digest.hex());
        let current = format!("{dir}current/link");
        if store.head(&current).await?.is_some() {
            return Err(TagError::Exists(tag.to_string()));
        }
        store.put(&index, body.clone(), PutCondition::None).await?;
        match store.put(&current, body, PutCondition::IfNoneMatch).await? {
            PutOutcome::Written { .. } => Ok(()),
            PutOutcome::PreconditionFailed => Err(TagError::Exists(tag.to_string())),
        }
    }

    fn deletion_phases(&self, repo: &Repository) -> Vec<Vec<ObjectMeta>> {
        // Tags first, so pulls by tag stop resolving before anything else goes; the blobs the
        // repository alone used are reclaimed by the next gc run's global sweep.
        let tags = format!("{}{TAGS}", repo.prefix);
        let (first, rest) = repo
            .objects
            .iter()
            .cloned()
            .partition(|o| o.key.starts_with(&tags));
        vec![first, rest]
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_object as obj;
    use super::*;

    #[test]
    fn keys_to_repositories_and_blobs() {
        let hex = "ab".repeat(32);
        let p = DistributionLayout::default().partition(
            [
                format!("{BLOBS}sha256/ab/{hex}/data"),
                format!("{REPOSITORIES}team/app/_manifests/revisions/sha256/{hex}/link"),
                format!("{REPOSITORIES}team/app/tools/_layers/sha256/{hex}/link"),
                format!("{REPOSITORIES}team/app-edge/_uploads/u1/startedat"),
                format!("{REPOSITORIES}Bad/_manifests/tags/x/current/link"),
                format!("{REPOSITORIES}team/README"),
                "elsewhere/file".to_string(),
            ]
            .iter()
            .map(|k| obj(k))
            .collect(),
        );
        let names: Vec<_> = p.repositories.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["team/app", "team/app-edge", "team/app/tools"]);
        assert_eq!(p.rejected.len(), 1);
        assert_eq!(p.unowned, 2);
        let global = p.global.expect("global blobs");
        assert_eq!(global.objects.len(), 1);
        let layout = DistributionLayout::default();
        assert!(matches!(
            layout.classify(&global, &global.objects[0].key),
            KeyKind::Blob(_)
        ));
        for other in [
            format!("{BLOBS}sha256/cd/{hex}/data"),
            format!("{BLOBS}sha256/ab/{hex}/other"),
            format!("{BLOBS}sha256/ab/{hex}"),
        ] {
            assert_eq!(layout.classify(&global, &other), KeyKind::Other, "{other}");
        }
        // Revisions are blobs of a repository only when untagged manifests may go.
        let app = &p.repositories[0];
        let rev = &app.objects[0].key;
        assert_eq!(layout.classify(app, rev), KeyKind::Other);
        let untagged = DistributionLayout {
            delete_untagged: true,
        };
        assert!(matches!(untagged.classify(app, rev), KeyKind::Blob(_)));
        assert_eq!(
            layout.content_key(
                app,
                &Digest::parse(&format!("sha256:{hex}")).expect("digest"),
                Some(&app.objects[0])
            ),
            format!("{BLOBS}sha256/ab/{hex}/data")
        );
    }
}
