//! Marking: everything reachable from a repository's roots.
//!
//! Breadth-first over descriptors, reading each document once with bounded concurrency; a
//! digest first reached as a layer or config is read when a descriptor that asks for reading
//! (a manifest or unknown media type) reaches it too. The
//! first time, one pass over the small unreferenced blobs finds referrers that no index lists (a
//! manifest whose `subject` is reachable is reachable too, and so are its own referrers), and
//! marking continues from them until nothing changes. Blobs that scan found content-addressed
//! and without `subject` are remembered in the pending state, so a later run skips them.
//!
//! A [`Marker`] keeps what it has read, so the re-check before each delete batch and the verify
//! pass after the sweep only fetch documents that are new since the first mark. Every document
//! read is hashed: what hashes to its digest can never change, so a later run may be primed
//! with it from the persistent cache ([`Marker::prime_cached`], [`Marker::learned_documents`])
//! instead of reading it again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::SystemTime;

use futures::{stream, StreamExt};

use super::plan::{deletes_scratch, deletes_unreferenced, PlanPolicy};
use crate::digest::Digest;
use crate::layout::{ContentCopy, KeyKind, Layout, Repository};
use crate::manifest::{self, ContentKind, Descriptor, References, MAX_MANIFEST_SIZE};
use crate::report::UnitShare;
use crate::store::{ObjectMeta, Store, StoreError};

/// The repository cannot be marked safely; nothing in it may be deleted this run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FailClosed(pub String);

/// A document known from an earlier read, for [`Marker::prime_cached`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedDocument {
    /// Its digest; its content hashed to it.
    pub digest: Digest,
    /// What it references.
    pub references: References,
    /// How the repository's listing showed the object it was read from; `None` when it was
    /// not listed there (content kept in a global blob space).
    pub listed: Option<ListedVersion>,
}

/// What a listing shows of one object, enough to tell that it was not rewritten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedVersion {
    /// Size in bytes.
    pub size: u64,
    /// Last modification time.
    pub last_modified: SystemTime,
    /// Entity tag, where the listing gives one.
    pub etag: Option<String>,
}

impl ListedVersion {
    /// The version of a listed object.
    pub fn of(o: &ObjectMeta) -> ListedVersion {
        ListedVersion {
            size: o.size,
            last_modified: o.last_modified,
            etag: o.etag.clone(),
        }
    }
}

/// Inputs that stay fixed while one repository is marked.
pub struct MarkContext<'a> {
    /// Where blobs are read from.
    pub store: &'a dyn Store,
    /// How digests map to keys.
    pub layout: &'a dyn Layout,
    /// The repository being marked.
    pub repo: &'a Repository,
    /// The repository's blobs by digest, from the listing.
    pub blobs: &'a HashMap<Digest, &'a ObjectMeta>,
    /// Digests stored as placeholders somewhere in the bucket, with a content copy to read.
    pub placeholders: &'a HashMap<Digest, Option<ContentCopy>>,
    /// Reads in flight at most.
    pub concurrency: usize,
    /// `blobs` is empty and the unit is listed after marking, against what marking found
    /// (the global blob space, see [`Marker::begin_listing`]): a blob not in `blobs` is not
    /// missing yet, and cached documents are checked against that listing.
    pub listed_later: bool,
}

/// `addressed` says the content hashed to its digest: such a blob can never change, and
/// neither can what was learnt from it.
enum Read {
    /// Parsed references.
    Doc { refs: References, addressed: bool },
    /// Read, but not a document with references.
    Opaque { addressed: bool },
    /// Not in the bucket.
    Missing,
}

/// What the referrer scan keeps of one blob.
enum Scanned {
    /// A document that references something (a referrer if it has a `subject`).
    Document { refs: References, addressed: bool },
    /// Anything else; `addressed` as in [`Read`].
    NotReferrer { addressed: bool },
    /// Gone since the listing.
    Missing,
}

/// One closure's walk.
#[derive(Default)]
struct Walk {
    /// Reachable digests.
    seen: HashSet<Digest>,
    /// Digests whose document's references have been followed.
    followed: HashSet<Digest>,
    /// Digests read and found missing (not cached across closures: a push may bring them).
    missing: HashSet<Digest>,
}

/// Marks a repository and remembers what it read.
pub struct Marker<'a> {
    ctx: MarkContext<'a>,
    /// Documents already read: `Some(references)`, or `None` for opaque or missing blobs.
    docs: HashMap<Digest, Option<References>>,
    /// Documents of `docs` whose content hashed to their digest (here, or when a cache entry
    /// was written): only these may outlive the run.
    addressed: HashSet<Digest>,
    /// Referrers found among unreferenced blobs, by subject.
    referrers: HashMap<Digest, Vec<Descriptor>>,
    scanned: bool,
    /// Blobs known not to be referrers (content-addressed, and opaque or without `subject`):
    /// the scan skips them, and adds the ones it reads and finds so.
    not_referrers: HashSet<Digest>,
    /// Everything found reachable by any [`Marker::mark`] call of this run. It never shrinks
    /// once anything is decided; before that, a streamed unit's listing holds it aside
    /// ([`Marker::begin_listing`]) and a restart clears it ([`Marker::restart`]).
    pub reachable: HashSet<Digest>,
    /// Documents read.
    pub manifests_fetched: u64,
    /// Non-fatal findings.
    pub warnings: BTreeSet<String>,
    /// With [`MarkContext::listed_later`]: reachable digests not listed yet, while the
    /// listing goes by.
    unseen: HashSet<Digest>,
    /// With [`MarkContext::listed_later`]: documents taken from the cache, with the version
    /// of the object each was read from then.
    cached_then: HashMap<Digest, Option<ListedVersion>>,
    /// With [`MarkContext::listed_later`]: the listed version of each document's object,
    /// and of every blob the listing kept (what is marked after it reads their sizes).
    listed_late: HashMap<Digest, ListedVersion>,
    /// When asked for (`explain`), the first parent each digest was reached from, and how:
    /// one path from a root. `None` in a normal run, which keeps nothing more.
    pub parents: Option<HashMap<Digest, Parent>>,
    /// Where set (a dry run), what this run could delete: the referrer scan runs only if a
    /// key of the repository that nothing reaches could go (a blob, or an abandoned upload).
    /// What the scan finds only keeps blobs, so where nothing could go it changes no
    /// deletion, and a preview of a first observation reads none of the small garbage blobs
    /// the real run will read (once, remembering its verdicts). It may still fail the real
    /// run closed (a found referrer naming a missing manifest), which such a preview does not
    /// see.
    pub scan_only_if_deletable: Option<Deletable>,
}

/// What decides whether a dry run could delete an unreferenced key (see
/// [`Marker::scan_only_if_deletable`]).
pub struct Deletable {
    /// The run's grace and delay.
    pub policy: PlanPolicy,
    /// When each pending candidate was first seen unreferenced.
    pub first_seen: HashMap<Digest, SystemTime>,
}

/// The first parent a digest was reached from (see [`Marker::parents`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    /// The parent's digest.
    pub digest: Digest,
    /// How it leads here.
    pub via: Via,
    /// The media type the parent's descriptor gives this digest, if any.
    pub media_type: Option<crate::manifest::MediaType>,
}

/// How a digest was reached from its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The parent document references it (index entry, config, layer, blob).
    Reference,
    /// It is a referrer whose `subject` is the parent.
    Subject,
}

impl<'a> Marker<'a> {
    /// A marker with nothing read yet.
    pub fn new(ctx: MarkContext<'a>) -> Marker<'a> {
        let mut referrers: HashMap<Digest, Vec<Descriptor>> = HashMap::new();
        for (subject, referrer) in ctx.layout.referrer_links(ctx.repo) {
            referrers.entry(subject).or_default().push(Descriptor {
                media_type: None,
                digest: referrer,
                size: None,
            });
        }
        Marker {
            // A layout that cannot hold referrers as bare blobs needs no scan.
            scanned: !ctx.layout.scans_for_referrers(ctx.repo),
            ctx,
            docs: HashMap::new(),
            addressed: HashSet::new(),
            not_referrers: HashSet::new(),
            referrers,
            reachable: HashSet::new(),
            manifests_fetched: 0,
            warnings: BTreeSet::new(),
            unseen: HashSet::new(),
            cached_then: HashMap::new(),
            listed_late: HashMap::new(),
            parents: None,
            scan_only_if_deletable: None,
        }
    }

    /// Remembers documents the layout already read (and counts them as fetched).
    pub fn prime(&mut self, documents: Vec<(Digest, References)>) {
        self.manifests_fetched += documents.len() as u64;
        for (digest, refs) in documents {
            self.docs.entry(digest).or_insert(Some(refs));
        }
    }

    /// Documents and scan verdicts from the persistent cache, all verified against their
    /// digests when the cache was written. Not counted as fetched: no request was made.
    ///
    /// A cached document stands for a read of its content only while the object it was read
    /// from is listed exactly as it was then (size, time, ETag): one overwritten, deleted or
    /// stored as a placeholder since is left out and read again if reached, so that it
    /// behaves exactly as a read would.
    pub fn prime_cached(&mut self, documents: Vec<CachedDocument>, not_referrers: Vec<Digest>) {
        for doc in documents {
            // Checked once the unit has been listed (`end_listing`), before any decision.
            let later = self.ctx.listed_later;
            if !later && !self.cache_still_valid(&doc) {
                continue;
            }
            let CachedDocument {
                digest,
                references,
                listed,
            } = doc;
            match self.docs.get(&digest) {
                None => {
                    if later {
                        self.cached_then.insert(digest.clone(), listed);
                    }
                    self.docs.insert(digest.clone(), Some(references));
                    self.addressed.insert(digest);
                }
                // Read this run already: the cache confirms what it says, nothing more.
                Some(Some(known)) if *known == references => {
                    self.addressed.insert(digest);
                }
                Some(_) => {}
            }
        }
        self.not_referrers.extend(not_referrers);
    }

    /// Documents that hashed to their digest and still matter (reachable, or listed in the
    /// repository), by digest: what a cache entry may keep for the next run. Placeholders
    /// are left out (their content copy is checked on every read).
    pub fn learned_documents(&self) -> Vec<CachedDocument> {
        let mut out: Vec<CachedDocument> = self
            .docs
            .iter()
            .filter_map(|(d, refs)| {
                let refs = refs.as_ref()?;
                let listed = self.ctx.blobs.get(d);
                let version = listed
                    .map(|o| ListedVersion::of(o))
                    .or_else(|| self.listed_late.get(d).cloned());
                // A streamed unit's document read without a listed version (pushed during the
                // run) would make the next run's listing look changed: read again instead.
                if !self.addressed.contains(d)
                    || listed.is_some_and(|o| self.ctx.layout.is_placeholder(o, d))
                    || (version.is_none() && (self.ctx.listed_later || !self.reachable.contains(d)))
                {
                    return None;
                }
                Some(CachedDocument {
                    digest: d.clone(),
                    references: refs.clone(),
                    listed: version,
                })
            })
            .collect();
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        out
    }

    /// Listed blobs known not to be referrers (content-addressed, so for good), by digest.
    pub fn learned_not_referrers(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = self
            .not_referrers
            .iter()
            .filter(|d| self.ctx.blobs.contains_key(*d))
            .cloned()
            .collect();
        out.sort();
        out
    }

    /// Whether a cached document may stand for a read now: its object is listed as it was
    /// when read, or it was not in the listing then and its content is kept outside this
    /// repository (a global blob space), where the repository's listing cannot tell.
    fn cache_still_valid(&self, doc: &CachedDocument) -> bool {
        match self.ctx.blobs.get(&doc.digest) {
            Some(o) if self.ctx.layout.is_placeholder(o, &doc.digest) => false,
            listed => self.listed_as_cached(
                &doc.digest,
                listed.map(|o| ListedVersion::of(o)).as_ref(),
                &doc.listed,
            ),
        }
    }

    /// The rule of [`Marker::cache_still_valid`] for an object listed as `now` whose
    /// document was cached from `then`.
    fn listed_as_cached(
        &self,
        digest: &Digest,
        now: Option<&ListedVersion>,
        then: &Option<ListedVersion>,
    ) -> bool {
        match (now, then) {
            (Some(now), Some(then)) => now == then,
            (None, None) => !self
                .ctx
                .layout
                .content_key(self.ctx.repo, digest, None)
                .starts_with(&self.ctx.repo.prefix),
            _ => false,
        }
    }

    /// Forgets what was marked, before anything is decided on it: a streamed unit whose
    /// cached documents went stale is marked again from scratch.
    pub fn restart(&mut self) {
        self.reachable.clear();
        self.listed_late.clear();
    }

    /// Starts the listing of a unit marked before it was listed
    /// ([`MarkContext::listed_later`]): every digest reachable so far is unseen.
    pub fn begin_listing(&mut self) {
        self.unseen = std::mem::take(&mut self.reachable);
        // Grown once to its size rather than doubled as the listing goes by.
        self.reachable.reserve(self.unseen.len());
    }

    /// One blob of that listing: whether it is reachable. Only the reachable set is held,
    /// and the listed version of what a document was read from (for the cache) and of every
    /// blob the listing keeps (whose size stands in for the listing's when what is marked
    /// after it, intents, the trash or the re-check, reaches it).
    pub fn listed(&mut self, digest: &Digest, o: &ObjectMeta) -> bool {
        let reachable = match self.unseen.take(digest) {
            Some(d) => {
                self.reachable.insert(d);
                true
            }
            None => self.reachable.contains(digest),
        };
        if !reachable || self.docs.contains_key(digest) {
            self.listed_late
                .insert(digest.clone(), ListedVersion::of(o));
        }
        reachable
    }

    /// Ends that listing; `complete` says it went through. A cached document whose object
    /// it does not show as when cached is forgotten; returns whether one of those was
    /// reachable, in which case what it said decided what the listing dropped, and the unit
    /// must be marked and listed again (reading it, failing closed on a manifest that is
    /// gone). Otherwise, after a complete listing, a reachable blob it did not show and that
    /// was not read is referenced but missing (a warning, as for a listed unit).
    pub fn end_listing(&mut self, complete: bool) -> bool {
        let unseen = std::mem::take(&mut self.unseen);
        let cached = std::mem::take(&mut self.cached_then);
        let stale: Vec<Digest> = cached
            .into_iter()
            .filter(|(d, then)| !self.listed_as_cached(d, self.listed_late.get(d), then))
            .map(|(d, _)| d)
            .collect();
        let restart = stale
            .iter()
            .any(|d| unseen.contains(d) || self.reachable.contains(d));
        if complete && !restart {
            for d in &unseen {
                if !self.docs.contains_key(d) {
                    self.warnings
                        .insert(format!("blob {d} is referenced but missing"));
                }
            }
        }
        self.reachable.extend(unseen);
        for d in &stale {
            self.docs.remove(d);
            self.addressed.remove(d);
        }
        restart
    }

    /// Reachable digests read as documents with references (manifests and indexes).
    pub fn reachable_documents(&self) -> u64 {
        (self.docs.iter())
            .filter(|(d, refs)| refs.is_some() && self.reachable.contains(*d))
            .count() as u64
    }

    /// `du`'s split of a global unit by the owners of its roots: per `(owner, roots)`, the
    /// listed bytes and documents those roots reach, and the bytes no other owner's roots
    /// reach. Walks only what marking read, with no request (a digest not read is a leaf, as
    /// it was to marking); memory is one owner per reachable blob and one walk at a time.
    pub fn shares(&self, owners: &[(String, Vec<Digest>)]) -> Vec<UnitShare> {
        const MANY: usize = usize::MAX;
        let size = |d: &Digest| self.ctx.blobs.get(d).map(|o| o.size);
        let mut owner_of: HashMap<&Digest, usize> = HashMap::new();
        let mut seen: HashSet<&Digest> = HashSet::new();
        let mut out: Vec<UnitShare> = Vec::with_capacity(owners.len());
        for (i, (name, roots)) in owners.iter().enumerate() {
            self.walk_read(roots, &mut seen);
            let mut share = UnitShare {
                name: name.clone(),
                ..UnitShare::default()
            };
            for d in &seen {
                if matches!(self.docs.get(*d), Some(Some(_))) {
                    share.manifests += 1;
                }
                if let Some(s) = size(d) {
                    share.reachable_bytes += s;
                    owner_of
                        .entry(*d)
                        .and_modify(|o| {
                            if *o != i {
                                *o = MANY;
                            }
                        })
                        .or_insert(i);
                }
            }
            out.push(share);
        }
        for (d, o) in owner_of {
            if let Some(share) = out.get_mut(o) {
                share.unique_bytes += size(d).unwrap_or(0);
            }
        }
        out
    }

    /// Fills `seen` with what `roots` reach through the documents and referrers marking
    /// knows, the way marking followed them; only reachable digests are followed, so that a
    /// share never exceeds the unit's reachable set.
    fn walk_read<'s>(&'s self, roots: &'s [Digest], seen: &mut HashSet<&'s Digest>) {
        seen.clear();
        let mut stack: Vec<&'s Digest> = roots.iter().collect();
        while let Some(d) = stack.pop() {
            if !self.reachable.contains(d) || !seen.insert(d) {
                continue;
            }
            if let Some(Some(refs)) = self.docs.get(d) {
                stack.extend(refs.children.iter().map(|c| &c.digest));
            }
            if let Some(rs) = self.referrers.get(d) {
                stack.extend(rs.iter().map(|r| &r.digest));
            }
        }
    }

    /// The platform (`os/architecture[/variant]`) the index `index` gives each of its entries,
    /// by the entry's digest, read again from the store: the references marking keeps (and
    /// caches) have no platforms, and only `explain` wants them. Empty, with no request, for
    /// a digest marking did not read as an index; empty too if it cannot be read now.
    pub async fn platforms(&self, index: &Digest) -> HashMap<Digest, String> {
        if !matches!(self.docs.get(index), Some(Some(r)) if r.has_manifests) {
            return HashMap::new();
        }
        let Ok((key, _)) = self.source_key(index) else {
            return HashMap::new();
        };
        match self.ctx.store.get_capped(&key, MAX_MANIFEST_SIZE).await {
            // Only the content the digest names: anything else may say anything.
            Ok(o) if content_matches(index, &o.body) => platforms_in(&o.body),
            _ => HashMap::new(),
        }
    }

    /// Blobs an earlier run's scan found not to be referrers: this run's scan skips them.
    pub fn assume_not_referrers(&mut self, digests: impl IntoIterator<Item = Digest>) {
        self.not_referrers.extend(digests);
    }

    /// Whether `digest` is known not to be a referrer (content-addressed, so for good).
    pub fn is_not_a_referrer(&self, digest: &Digest) -> bool {
        self.not_referrers.contains(digest)
    }

    /// Adds everything reachable from `roots` to [`Marker::reachable`].
    pub async fn mark(&mut self, roots: &[Descriptor]) -> Result<(), FailClosed> {
        let seen = self.closure(roots).await?;
        // Moved, not copied, where nothing is marked yet: a unit's reachable set is held once.
        if self.reachable.is_empty() {
            self.reachable = seen;
        } else {
            self.reachable.extend(seen);
        }
        Ok(())
    }

    /// Everything reachable from `roots` alone (the cache is used and extended).
    pub async fn closure(&mut self, roots: &[Descriptor]) -> Result<HashSet<Digest>, FailClosed> {
        self.closure_with(roots, false).await
    }

    /// Like [`Marker::closure`], but a missing manifest is part of the result instead of an
    /// error: after a sweep, a manifest that is referenced and gone is exactly what the verify
    /// pass is looking for.
    pub async fn closure_allowing_missing(
        &mut self,
        roots: &[Descriptor],
    ) -> Result<HashSet<Digest>, FailClosed> {
        self.closure_with(roots, true).await
    }

    async fn closure_with(
        &mut self,
        roots: &[Descriptor],
        allow_missing: bool,
    ) -> Result<HashSet<Digest>, FailClosed> {
        let mut walk = Walk::default();
        self.expand(&mut walk, roots.to_vec(), allow_missing)
            .await?;
        if !self.scanned {
            self.scanned = true;
            self.scan_for_referrers(&walk.seen).await?;
            let more: Vec<(Digest, Descriptor)> = self
                .referrers
                .iter()
                .filter(|(subject, _)| walk.seen.contains(*subject))
                .flat_map(|(subject, rs)| rs.iter().map(|r| (subject.clone(), r.clone())))
                .collect();
            if let Some(p) = &mut self.parents {
                for (subject, r) in &more {
                    p.entry(r.digest.clone()).or_insert_with(|| Parent {
                        digest: subject.clone(),
                        via: Via::Subject,
                        media_type: r.media_type.clone(),
                    });
                }
            }
            let more: Vec<Descriptor> = more.into_iter().map(|(_, r)| r).collect();
            self.expand(&mut walk, more, allow_missing).await?;
        }
        Ok(walk.seen)
    }

    /// Remembers `digest` as a referrer of each subject it declares (duplicate `subject` keys
    /// may declare several).
    fn index_subjects(&mut self, digest: &Digest, refs: &References) {
        for subject in &refs.subjects {
            let known = self.referrers.entry(subject.digest.clone()).or_default();
            if known.iter().all(|r| r.digest != *digest) {
                known.push(Descriptor {
                    media_type: None,
                    digest: digest.clone(),
                    size: None,
                });
            }
        }
    }

    /// Follows a document's references, once per closure. A digest that only a reader which
    /// normalizes could name fails the repository closed.
    #[allow(clippy::too_many_arguments)]
    fn follow(
        walk: &mut Walk,
        warnings: &mut BTreeSet<String>,
        parents: &mut Option<HashMap<Digest, Parent>>,
        digest: &Digest,
        refs: &References,
        must_parse: bool,
        next: &mut Vec<Descriptor>,
    ) -> Result<(), FailClosed> {
        if must_parse {
            for u in &refs.unsupported {
                warnings.insert(format!("{digest}: unsupported reference kept: {u}"));
            }
        }
        if !walk.followed.insert(digest.clone()) {
            return Ok(());
        }
        if let Some(a) = refs.ambiguous.first() {
            return Err(FailClosed(format!(
                "{digest}: a descriptor's digest is not canonical but could name a blob ({a})"
            )));
        }
        if let Some(p) = parents {
            for c in &refs.children {
                if c.digest != *digest {
                    p.entry(c.digest.clone()).or_insert_with(|| Parent {
                        digest: digest.clone(),
                        via: Via::Reference,
                        media_type: c.media_type.clone(),
                    });
                }
            }
        }
        next.extend(refs.children.iter().cloned());
        Ok(())
    }

    async fn expand(
        &mut self,
        walk: &mut Walk,
        mut frontier: Vec<Descriptor>,
        allow_missing: bool,
    ) -> Result<(), FailClosed> {
        while !frontier.is_empty() {
            let mut next = Vec::new();
            // Digest -> whether any descriptor of it this round requires it to parse.
            let mut wanted: HashMap<Digest, bool> = HashMap::new();
            for d in frontier.drain(..) {
                if walk.seen.insert(d.digest.clone()) {
                    if let Some(rs) = self.referrers.get(&d.digest) {
                        if let Some(p) = &mut self.parents {
                            for r in rs {
                                p.entry(r.digest.clone()).or_insert_with(|| Parent {
                                    digest: d.digest.clone(),
                                    via: Via::Subject,
                                    media_type: r.media_type.clone(),
                                });
                            }
                        }
                        next.extend(rs.iter().cloned());
                    }
                }
                // Not "seen, so done": the same digest may come first as a layer (not read)
                // and later as a manifest, whose config and layers are needed too.
                let kind = manifest::content_kind(d.media_type.as_deref());
                let must_parse = kind == ContentKind::Manifest;
                match self.docs.get(&d.digest) {
                    Some(Some(doc)) => {
                        Self::follow(
                            walk,
                            &mut self.warnings,
                            &mut self.parents,
                            &d.digest,
                            doc,
                            must_parse,
                            &mut next,
                        )?;
                        continue;
                    }
                    // Read earlier and found unparseable or gone, but a manifest after all:
                    // the same failure as reading it here.
                    Some(None) if must_parse && !allow_missing => {
                        return Err(FailClosed(format!(
                            "manifest {} is missing or unparseable",
                            d.digest
                        )));
                    }
                    Some(None) => continue,
                    None => {}
                }
                if walk.missing.contains(&d.digest) {
                    if must_parse && !allow_missing {
                        return Err(FailClosed(format!(
                            "manifest {} is referenced but missing",
                            d.digest
                        )));
                    }
                    continue;
                }
                let listed = self.ctx.blobs.get(&d.digest);
                // A streamed unit knows sizes only of the keys its listing kept: a declared
                // size is no stand-in for the object's (unknown is read, capped).
                let size = match listed {
                    Some(o) => Some(o.size),
                    None if self.ctx.listed_later => {
                        self.listed_late.get(&d.digest).map(|v| v.size)
                    }
                    None => d.size,
                };
                if manifest::should_read(kind, d.media_type.as_deref(), size) {
                    *wanted.entry(d.digest).or_default() |= must_parse;
                } else if listed.is_none() && !self.ctx.listed_later {
                    self.warnings
                        .insert(format!("blob {} is referenced but missing", d.digest));
                }
            }
            for (digest, must_parse, read) in self.read_all(wanted.into_iter().collect()).await {
                match read? {
                    Read::Doc { refs, addressed } => {
                        Self::follow(
                            walk,
                            &mut self.warnings,
                            &mut self.parents,
                            &digest,
                            &refs,
                            must_parse,
                            &mut next,
                        )?;
                        if addressed {
                            self.addressed.insert(digest.clone());
                        }
                        self.docs.insert(digest, Some(refs));
                    }
                    Read::Opaque { .. } => {
                        self.docs.insert(digest, None);
                    }
                    Read::Missing if must_parse && !allow_missing => {
                        return Err(FailClosed(format!(
                            "manifest {digest} is referenced but missing"
                        )));
                    }
                    Read::Missing => {
                        self.warnings
                            .insert(format!("blob {digest} is referenced but missing"));
                        walk.missing.insert(digest);
                    }
                }
            }
            frontier = next;
        }
        Ok(())
    }

    /// Referrers may exist only as blobs: reads each small unreferenced blob once and indexes
    /// the manifests among them by their `subject`.
    ///
    /// Only documents that reference something (manifests, few) are kept, so that a re-check
    /// or the verify pass can follow them even once deleted; configs and other leaf documents
    /// (most garbage) are dropped, and read again should they become reachable.
    async fn scan_for_referrers(&mut self, seen: &HashSet<Digest>) -> Result<(), FailClosed> {
        if let Some(Deletable { policy, first_seen }) = &self.scan_only_if_deletable {
            // Every key, not the digest map: a digest may be stored under two keys of
            // different ages, and the plan decides each.
            let (repo, layout, policy) = (self.ctx.repo, self.ctx.layout, *policy);
            let any = repo
                .objects
                .iter()
                .any(|o| match layout.classify(repo, &o.key) {
                    KeyKind::Blob(d) => {
                        !seen.contains(&d)
                            && deletes_unreferenced(
                                o.last_modified,
                                first_seen.get(&d).copied(),
                                policy,
                            )
                    }
                    KeyKind::Scratch => deletes_scratch(o.last_modified, policy),
                    KeyKind::Other => false,
                });
            if !any {
                return Ok(());
            }
        }
        let mut candidates: Vec<Digest> = Vec::new();
        let mut known: Vec<(Digest, References)> = Vec::new();
        for (d, o) in self.ctx.blobs.iter() {
            let eligible = self.content_size(d, o) <= MAX_MANIFEST_SIZE
                && !seen.contains(d)
                && !self.not_referrers.contains(d)
                && self.ctx.layout.may_hold_manifest(self.ctx.repo, &o.key);
            if !eligible {
                continue;
            }
            match self.docs.get(d) {
                None => candidates.push(d.clone()),
                // Known without a read (primed, or from the cache): its subjects count as
                // much as those of one read now.
                Some(Some(refs)) if !refs.subjects.is_empty() => {
                    known.push((d.clone(), refs.clone()));
                }
                Some(_) => {}
            }
        }
        for (digest, refs) in known {
            self.index_subjects(&digest, &refs);
        }
        self.manifests_fetched += candidates.len() as u64;
        let this = &*self;
        let found: Vec<(Digest, Result<Scanned, FailClosed>)> = stream::iter(candidates)
            .map(|d| async move {
                let r = this.read(&d, false).await.map(|read| match read {
                    Read::Doc { refs, addressed }
                        if !refs.children.is_empty() || !refs.subjects.is_empty() =>
                    {
                        Scanned::Document { refs, addressed }
                    }
                    Read::Doc { addressed, .. } | Read::Opaque { addressed } => {
                        Scanned::NotReferrer { addressed }
                    }
                    Read::Missing => Scanned::Missing,
                });
                (d, r)
            })
            .buffer_unordered(this.ctx.concurrency.max(1))
            .collect()
            .await;
        for (digest, scanned) in found {
            match scanned? {
                Scanned::Document { refs, addressed } => {
                    if addressed && refs.subjects.is_empty() {
                        self.not_referrers.insert(digest.clone());
                    }
                    self.index_subjects(&digest, &refs);
                    // Content that does not hash to its digest may still change (an upload in
                    // progress): not cached, so whatever reaches it later reads it again.
                    if addressed {
                        self.addressed.insert(digest.clone());
                        self.docs.insert(digest, Some(refs));
                    }
                }
                // Content-addressed and no referrer: so for good. Content that does not hash
                // to its digest taught nothing lasting.
                Scanned::NotReferrer { addressed } => {
                    if addressed {
                        self.not_referrers.insert(digest);
                    }
                }
                // Gone since the listing (another collector): nothing learnt about its content,
                // so nothing is cached; a later closure that reaches it reads it again.
                Scanned::Missing => {}
            }
        }
        Ok(())
    }

    /// The size of a listed blob's content: that of its content copy for a placeholder.
    fn content_size(&self, digest: &Digest, listed: &ObjectMeta) -> u64 {
        if self.ctx.layout.is_placeholder(listed, digest) {
            match self.ctx.placeholders.get(digest) {
                Some(Some(copy)) => copy.size,
                // No copy to read: nothing to learn by reading.
                _ => u64::MAX,
            }
        } else {
            listed.size
        }
    }

    /// The key the content of `digest` is read from: a content copy elsewhere in the bucket
    /// for a placeholder.
    fn source_key(&self, digest: &Digest) -> Result<(String, bool), FailClosed> {
        let listed = self.ctx.blobs.get(digest).copied();
        match listed {
            Some(o) if self.ctx.layout.is_placeholder(o, digest) => {
                match self.ctx.placeholders.get(digest) {
                    Some(Some(copy)) => Ok((copy.key.clone(), true)),
                    _ => Err(FailClosed(format!(
                        "{digest} is a placeholder ({}) and no content copy exists anywhere in \
                         the bucket",
                        o.key
                    ))),
                }
            }
            _ => Ok((
                self.ctx.layout.content_key(self.ctx.repo, digest, listed),
                false,
            )),
        }
    }

    /// Reachable placeholders whose content exists nowhere in the bucket: the repository's
    /// images are broken, and it fails closed.
    pub fn check_placeholders(&self) -> Result<(), FailClosed> {
        for d in &self.reachable {
            if let Some(o) = self.ctx.blobs.get(d) {
                if self.ctx.layout.is_placeholder(o, d)
                    && !matches!(self.ctx.placeholders.get(d), Some(Some(_)))
                {
                    return Err(FailClosed(format!(
                        "{d} is reachable, stored as a placeholder ({}), and no content copy \
                         exists anywhere in the bucket",
                        o.key
                    )));
                }
            }
        }
        Ok(())
    }

    async fn read(&self, digest: &Digest, must_parse: bool) -> Result<Read, FailClosed> {
        let (key, elsewhere) = match self.source_key(digest) {
            Ok(k) => k,
            Err(e) if must_parse => return Err(e),
            // A placeholder without content that nothing requires to be a manifest: whether it
            // is reachable is checked after marking.
            Err(_) => return Ok(Read::Opaque { addressed: false }),
        };
        let body = match self.ctx.store.get_capped(&key, MAX_MANIFEST_SIZE).await {
            Ok(o) => o.body,
            Err(StoreError::NotFound { .. }) => return Ok(Read::Missing),
            // Too large to be a manifest: fine for content of unknown kind, fatal for a
            // manifest (distribution refuses manifests over 4 MiB too).
            Err(StoreError::TooLarge { .. }) if !must_parse => {
                return Ok(Read::Opaque { addressed: false })
            }
            // An unreadable document might reference anything: nothing is safe to delete.
            Err(e) => return Err(FailClosed(format!("cannot read {key}: {e}"))),
        };
        // Manifests are at most 4 MiB: hashing every read is cheap, and only what hashes to
        // its digest may be remembered across runs; anything at a digest key that does not
        // (a mount link, an upload in progress) may still change.
        let addressed = content_matches(digest, &body);
        // Content read from another repository's copy must be that digest's content.
        if elsewhere && !addressed {
            return Err(FailClosed(format!(
                "content copy {key} of placeholder {digest} does not match its digest"
            )));
        }
        match manifest::references(&body) {
            Ok(refs) => Ok(Read::Doc { refs, addressed }),
            Err(e) if must_parse => Err(FailClosed(format!("manifest {digest} ({key}): {e}"))),
            Err(_) => Ok(Read::Opaque { addressed }),
        }
    }

    /// Reads documents the walk wants (the referrer scan reads its own way, keeping less).
    async fn read_all(
        &mut self,
        wanted: Vec<(Digest, bool)>,
    ) -> Vec<(Digest, bool, Result<Read, FailClosed>)> {
        self.manifests_fetched += wanted.len() as u64;
        let this = &*self;
        stream::iter(wanted)
            .map(|(d, must)| async move {
                let r = this.read(&d, must).await;
                (d, must, r)
            })
            .buffer_unordered(this.ctx.concurrency.max(1))
            .collect()
            .await
    }
}

/// The platforms of an index's `manifests[]` entries, by digest (the first entry of a digest
/// wins). Values with anything but printable ASCII are left out: they end up on a terminal.
fn platforms_in(body: &[u8]) -> HashMap<Digest, String> {
    use serde_json::Value;
    let mut out = HashMap::new();
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return out;
    };
    let Some(entries) = doc.get("manifests").and_then(Value::as_array) else {
        return out;
    };
    let field = |p: &Value, name: &str| {
        p.get(name)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_string)
    };
    for e in entries {
        let digest = e
            .get("digest")
            .and_then(Value::as_str)
            .and_then(Digest::parse);
        let (Some(digest), Some(p)) = (digest, e.get("platform")) else {
            continue;
        };
        let (Some(os), Some(arch)) = (field(p, "os"), field(p, "architecture")) else {
            continue;
        };
        let platform = match field(p, "variant") {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        };
        out.entry(digest).or_insert(platform);
    }
    out
}

/// Whether `body` is the content `digest` names (sha256 or sha512).
pub(crate) fn content_matches(digest: &Digest, body: &[u8]) -> bool {
    use sha2::Digest as _;
    let hash: Vec<u8> = match digest.algorithm() {
        "sha256" => sha2::Sha256::digest(body).to_vec(),
        "sha512" => sha2::Sha512::digest(body).to_vec(),
        _ => return false,
    };
    hash == digest.bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_of_index_entries() {
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        let c = Digest::sha256_of(b"c");
        let body = format!(
            r#"{{"manifests": [
                {{"digest": "{a}", "platform": {{"os": "linux", "architecture": "arm", "variant": "v7"}}}},
                {{"digest": "{a}", "platform": {{"os": "windows", "architecture": "amd64"}}}},
                {{"digest": "{b}", "platform": {{"os": "linux\u001b[2J", "architecture": "amd64"}}}},
                {{"digest": "{c}"}},
                {{"digest": 7, "platform": {{"os": "linux", "architecture": "amd64"}}}}
            ]}}"#
        );
        let found = platforms_in(body.as_bytes());
        assert_eq!(found.get(&a).map(String::as_str), Some("linux/arm/v7"));
        assert!(!found.contains_key(&b), "control characters are left out");
        assert!(!found.contains_key(&c), "no platform");
        assert_eq!(found.len(), 1);
        assert!(platforms_in(b"[1, 2]").is_empty());
        assert!(platforms_in(b"{\"manifests\": {}}").is_empty());
    }

    #[test]
    fn content_matches_sha256_and_sha512_only() {
        use sha2::Digest as _;
        let body = b"{}";
        assert!(content_matches(&Digest::sha256_of(body), body));
        assert!(!content_matches(&Digest::sha256_of(body), b"{ }"));
        let hex: String = sha2::Sha512::digest(body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let d512 = Digest::from_parts("sha512", &hex).expect("sha512");
        assert!(content_matches(&d512, body));
        assert!(!content_matches(&d512, b"[]"));
    }
}
