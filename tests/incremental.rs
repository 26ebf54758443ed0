//! The incremental cache (`_ocigc/cache/`) at the level of whole runs, on the three layouts
//! and on every store: what an unchanged or a changed bucket costs, and that no state of the
//! cache - corrupt, foreign, stale, raced by a second shard, outrun by keys outside its unit
//! or by the clock - ever costs a reachable blob or keeps garbage forever.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use common::dist::{data_key, dist_dangling, DistWriter, V2};
use common::serverless::{sr_blob, sr_dangling, sr_manifest, SrWriter};
use common::wrap::{Intercept, Wrapped};
use common::*;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use ocigc::digest::Digest;
use ocigc::gc::cache::{self, Contents, Summary, CACHE_PREFIX, CACHE_ROOT};
use ocigc::gc::{intent, run_gc, GcOptions, Shard};
use ocigc::layout::oci::OciLayout;
use ocigc::layout::{by_name, Layout, LayoutOptions, GLOBAL_REPOSITORY, STATE_PREFIX};
use ocigc::report::Report;
use ocigc::store::{
    DeleteFailure, Instrumented, Level, Metadata, Object, ObjectMeta, PutCondition, PutOutcome,
    RequestCounts, Store, StoreResult,
};

// ---- the three layouts behind one interface ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Oci,
    Serverless,
    Distribution,
}

/// A bucket of one layout: writes images and tags as its registry would, and runs `gc` on it.
struct Registry {
    kind: Kind,
    raw: Arc<dyn Store>,
    writer: Arc<dyn Store>,
    /// The tags of each `oci` repository (its `index.json` is written whole).
    oci_tags: Mutex<BTreeMap<String, Vec<(String, Desc)>>>,
}

/// What one repository of [`Registry::populate`] holds.
struct Content {
    repo: &'static str,
    /// Tagged (or reachable from a tag): never deleted.
    kept: Vec<Desc>,
    /// Referenced by nothing.
    garbage: Desc,
}

/// Repositories that nest and collide by prefix.
const REPOS: [&str; 3] = ["library/alpine", "team/app", "team/app/tools"];

impl Registry {
    fn new(t: &TestStore, kind: Kind) -> Registry {
        let raw = t.store.clone();
        let writer: Arc<dyn Store> = match kind {
            Kind::Oci => raw.clone(),
            Kind::Serverless => Arc::new(SrWriter::new(raw.clone())),
            Kind::Distribution => Arc::new(DistWriter::new(raw.clone())),
        };
        Registry {
            kind,
            raw,
            writer,
            oci_tags: Mutex::new(BTreeMap::new()),
        }
    }

    fn layout(&self) -> Arc<dyn Layout> {
        let opts = LayoutOptions {
            delete_untagged: true,
        };
        match self.kind {
            Kind::Oci => Arc::new(OciLayout),
            Kind::Serverless => by_name("serverless-registry", opts).expect("layout"),
            Kind::Distribution => by_name("distribution", opts).expect("layout"),
        }
    }

    fn fixture(&self) -> Fixture<'_> {
        Fixture {
            store: self.writer.as_ref(),
        }
    }

    async fn gc(&self, opts: &GcOptions) -> Report {
        self.gc_on(self.raw.clone(), opts).await
    }

    /// A run through `store` (a wrapper of this bucket).
    async fn gc_on(&self, store: Arc<dyn Store>, opts: &GcOptions) -> Report {
        run_gc(store, self.layout(), opts).await.expect("gc run")
    }

    /// Points `tag` of `repo` at `desc` (a new tag, or one moved).
    async fn tag(&self, repo: &str, tag: &str, desc: &Desc) {
        match self.kind {
            Kind::Oci => {
                let roots = {
                    let mut all = self.oci_tags.lock().expect("tags");
                    let tags = all.entry(repo.to_string()).or_default();
                    tags.retain(|(t, _)| t != tag);
                    tags.push((tag.to_string(), desc.clone()));
                    tags.clone()
                };
                self.write_index(repo, &roots).await;
            }
            Kind::Serverless => {
                SrWriter {
                    inner: self.raw.clone(),
                }
                .tag(repo, tag, desc)
                .await
            }
            Kind::Distribution => {
                DistWriter {
                    inner: self.raw.clone(),
                }
                .tag(repo, tag, desc)
                .await
            }
        }
    }

    /// Removes `tag` of `repo`.
    async fn untag(&self, repo: &str, tag: &str) {
        match self.kind {
            Kind::Oci => {
                let roots = {
                    let mut all = self.oci_tags.lock().expect("tags");
                    let tags = all.entry(repo.to_string()).or_default();
                    tags.retain(|(t, _)| t != tag);
                    tags.clone()
                };
                self.write_index(repo, &roots).await;
            }
            Kind::Serverless => self.remove(&[sr_manifest(repo, tag)]).await,
            Kind::Distribution => {
                let dir = format!("{V2}/repositories/{repo}/_manifests/tags/{tag}/");
                let gone: Vec<String> = keys(self.raw.as_ref())
                    .await
                    .into_iter()
                    .filter(|k| k.starts_with(&dir))
                    .collect();
                assert!(!gone.is_empty(), "no tag {tag} in {repo}");
                self.remove(&gone).await;
            }
        }
    }

    async fn write_index(&self, repo: &str, roots: &[(String, Desc)]) {
        let roots: Vec<(Option<&str>, &Desc)> =
            roots.iter().map(|(t, d)| (Some(t.as_str()), d)).collect();
        self.fixture().layout(repo, &roots).await;
    }

    /// A manifest revision with no tag (the registry keeps one for every manifest pushed);
    /// the other layouts need nothing for it.
    async fn untagged(&self, repo: &str, desc: &Desc) {
        if self.kind == Kind::Distribution {
            DistWriter {
                inner: self.raw.clone(),
            }
            .untagged(repo, desc)
            .await;
        }
    }

    async fn remove(&self, keys: &[String]) {
        let failed = self.raw.delete_batch(keys).await.expect("delete");
        assert!(failed.is_empty(), "{failed:?}");
    }

    /// Every repository of [`REPOS`]: a multi-arch index, an image with a referrer only its
    /// subject ties to it, and an image nothing references.
    async fn populate(&self) -> Vec<Content> {
        let f = self.fixture();
        let mut out = Vec::new();
        for repo in REPOS {
            let one = f.image(repo, &format!("{repo} one")).await;
            let two = f.image(repo, &format!("{repo} two")).await;
            let idx = f.index(repo, OCI_INDEX, &[&one, &two]).await;
            let solo = f.image(repo, &format!("{repo} solo")).await;
            let sig = f.referrer(repo, &solo, repo).await;
            let garbage = f.image(repo, &format!("{repo} garbage")).await;
            self.tag(repo, "multi", &idx).await;
            self.tag(repo, "solo", &solo).await;
            self.untagged(repo, &sig).await;
            out.push(Content {
                repo,
                kept: vec![idx, solo, sig],
                garbage,
            });
        }
        out
    }

    /// The key at which `digest` of `repo` is stored, if it is.
    fn stored(&self, keys: &BTreeSet<String>, repo: &str, digest: &str) -> Option<String> {
        let candidates = match self.kind {
            Kind::Oci => vec![blob_key(repo, digest)],
            Kind::Serverless => vec![sr_manifest(repo, digest), sr_blob(repo, digest)],
            Kind::Distribution => vec![data_key(digest)],
        };
        candidates.into_iter().find(|k| keys.contains(k))
    }

    /// The object a tag of `repo` is read from (written whole when the tag moves).
    fn tag_key(&self, repo: &str, tag: &str) -> String {
        match self.kind {
            Kind::Oci => format!("{repo}/index.json"),
            Kind::Serverless => sr_manifest(repo, tag),
            Kind::Distribution => {
                format!("{V2}/repositories/{repo}/_manifests/tags/{tag}/current/link")
            }
        }
    }

    /// The key a document (manifest or index) of `repo` is read from.
    fn document_key(&self, repo: &str, digest: &str) -> String {
        match self.kind {
            Kind::Oci => blob_key(repo, digest),
            Kind::Serverless => sr_manifest(repo, digest),
            Kind::Distribution => data_key(digest),
        }
    }

    async fn assert_kept(&self, repo: &str, desc: &Desc, what: &str) {
        let k = keys(self.raw.as_ref()).await;
        for d in &desc.subtree {
            assert!(
                self.stored(&k, repo, d).is_some(),
                "{:?} {what}: {d} of {repo} was deleted",
                self.kind
            );
        }
    }

    async fn assert_collected(&self, repo: &str, desc: &Desc, what: &str) {
        let k = keys(self.raw.as_ref()).await;
        for d in &desc.subtree {
            assert_eq!(
                self.stored(&k, repo, d),
                None,
                "{:?} {what}: {d} of {repo} should be gone",
                self.kind
            );
        }
    }

    /// What some tag needs and the bucket no longer holds (an independent walker per layout).
    async fn dangling(&self) -> Vec<String> {
        match self.kind {
            Kind::Oci => dangling(self.raw.as_ref()).await,
            Kind::Serverless => sr_dangling(self.raw.as_ref()).await,
            Kind::Distribution => dist_dangling(self.raw.as_ref()).await,
        }
    }

    /// Asserts the populated content: kept intact, nothing dangling, garbage gone.
    async fn assert_collected_garbage_only(&self, content: &[Content]) {
        for c in content {
            for d in &c.kept {
                self.assert_kept(c.repo, d, "tagged").await;
            }
            self.assert_collected(c.repo, &c.garbage, "garbage").await;
        }
        assert!(self.dangling().await.is_empty(), "{:?}", self.kind);
    }

    /// The page requests of one listing of ocigc's state and of the layout's key space: all
    /// that a run whose units are all unchanged may cost besides the clock.
    async fn listing_pages(&self) -> u64 {
        let counted = Instrumented::new(self.raw.clone(), 4, Duration::from_secs(60));
        for prefix in self.listed_prefixes() {
            let _: Vec<Vec<ObjectMeta>> = counted.list(&prefix).try_collect().await.expect("list");
        }
        counted.counts().list
    }

    /// The prefixes a run of the whole bucket lists: the state only where the key space does
    /// not hold it (no repository here sorts before it, so the first page holds it).
    fn listed_prefixes(&self) -> BTreeSet<String> {
        let space = self.layout().key_space();
        let mut prefixes = BTreeSet::from([space.repositories.clone()]);
        if !STATE_PREFIX.starts_with(&space.repositories) {
            prefixes.insert(STATE_PREFIX.to_string());
        }
        prefixes.extend(space.global);
        prefixes
    }

    /// The collection units of a run: the repositories, and the global unit where the layout
    /// has one that holds anything.
    fn units(&self) -> BTreeSet<String> {
        let mut units: BTreeSet<String> = REPOS.iter().map(|r| r.to_string()).collect();
        if self.kind == Kind::Distribution {
            units.insert(GLOBAL_REPOSITORY.into());
        }
        units
    }
}

// ---- a store that records every request ----

/// One request as the store saw it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Req {
    /// A listing (one per call, whatever its pages).
    List(String),
    Get(String),
    Head(String),
    /// The bucket clock.
    Clock,
    Put(String),
    /// One key of a batch delete.
    Delete(String),
}

struct Log {
    inner: Arc<dyn Store>,
    reqs: Mutex<Vec<Req>>,
}

impl Log {
    fn new(inner: Arc<dyn Store>) -> Arc<Wrapped<Log>> {
        Arc::new(Wrapped(Log {
            inner,
            reqs: Mutex::new(Vec::new()),
        }))
    }

    fn push(&self, r: Req) {
        self.reqs.lock().expect("log").push(r);
    }

    fn take(&self) -> Vec<Req> {
        std::mem::take(&mut *self.reqs.lock().expect("log"))
    }
}

#[async_trait]
impl Intercept for Log {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.push(Req::List(prefix.to_string()));
        self.inner.list(prefix)
    }
    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.push(Req::List(prefix.to_string()));
        self.inner.list_after(prefix, start_after)
    }
    fn list_level_pages<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Level>> {
        self.push(Req::List(prefix.to_string()));
        self.inner.list_level_pages(prefix)
    }
    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object> {
        self.push(Req::Get(key.to_string()));
        self.inner.get_capped(key, limit).await
    }
    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>> {
        self.push(Req::Head(key.to_string()));
        self.inner.head_with_metadata(key).await
    }
    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        c: PutCondition,
        m: Metadata,
    ) -> StoreResult<PutOutcome> {
        self.push(Req::Put(key.to_string()));
        self.inner.put_with_metadata(key, body, c, m).await
    }
    async fn server_time(&self) -> StoreResult<SystemTime> {
        self.push(Req::Clock);
        self.inner.server_time().await
    }
    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        for k in keys {
            self.push(Req::Delete(k.clone()));
        }
        self.inner.delete_batch(keys).await
    }
}

/// The repository of [`REPOS`] a key (of content or of ocigc's state) belongs to.
fn repo_of(key: &str) -> Option<&'static str> {
    REPOS
        .into_iter()
        .filter(|r| {
            key.starts_with(&format!("{r}/"))
                || key.contains(&format!("/{r}/"))
                || key.contains(&format!("/{r}."))
        })
        .max_by_key(|r| r.len())
}

fn gets(reqs: &[Req]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in reqs {
        if let Req::Get(k) = r {
            *out.entry(k.clone()).or_default() += 1;
        }
    }
    out
}

// ---- helpers over reports and the cache ----

/// The numbers of each unit of a report that the cache keeps.
fn figures(report: &Report) -> BTreeMap<String, (Summary, u64, u64)> {
    report
        .repositories
        .iter()
        .map(|r| {
            let s = Summary {
                reachable_blobs: r.reachable.blobs,
                reachable_bytes: r.reachable.bytes,
                pending_blobs: r.pending.blobs,
                pending_bytes: r.pending.bytes,
                other_keys: r.other_keys,
            };
            (r.name.clone(), (s, r.objects, r.bytes))
        })
        .collect()
}

fn unchanged_units(report: &Report) -> BTreeSet<String> {
    report
        .repositories
        .iter()
        .filter(|r| r.unchanged)
        .map(|r| r.name.clone())
        .collect()
}

fn names(report: &Report) -> BTreeSet<String> {
    report.repositories.iter().map(|r| r.name.clone()).collect()
}

/// The cache entries in the bucket, by unit.
async fn entries(store: &dyn Store) -> BTreeMap<String, cache::IndexEntry> {
    all_keys(store)
        .await
        .into_iter()
        .filter_map(|k| cache::parse_entry_key(&k))
        .map(|e| (e.unit.clone(), e))
        .collect()
}

/// Options of a dry run that neither reads nor writes the cache: the reference figures.
fn uncached_dry(base: &GcOptions) -> GcOptions {
    GcOptions {
        dry_run: true,
        no_cache: true,
        ..base.clone()
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// Eager options with the bucket clock `offset` ahead.
fn at(offset: Duration, base: &GcOptions) -> GcOptions {
    GcOptions {
        clock_offset: offset,
        ..base.clone()
    }
}

// ---- an unchanged re-run ----

/// What a run of a bucket whose units are all unchanged costs: the listing pages (the bucket
/// clock is the first one's `Date`), and on `distribution` the global unit's cache read: its
/// blob space is marked before it is listed (streamed against the reachable set), from the
/// documents that entry holds, so it is read before the listing can tell it unchanged.
async fn again_cost(reg: &Registry) -> RequestCounts {
    RequestCounts {
        list: reg.listing_pages().await,
        get: u64::from(reg.kind == Kind::Distribution),
        head: 0,
        put: 0,
        delete: 0,
        throttled: 0,
    }
}

/// After a run that collected the garbage, the next run costs the listing pages and the
/// clock: no GET, HEAD, PUT or DELETE, and the same figures as a full observation.
async fn unchanged_rerun(t: TestStore, kind: Kind) {
    let reg = Registry::new(&t, kind);
    let content = reg.populate().await;
    let first = reg.gc(&eager()).await;
    assert!(first.all_ok(), "{first:#?}");
    assert!(unchanged_units(&first).is_empty());
    assert!(first.totals.blobs_deleted > 0);
    reg.assert_collected_garbage_only(&content).await;
    assert_eq!(
        entries(t.store.as_ref())
            .await
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>(),
        reg.units(),
        "{kind:?}: one entry per unit"
    );

    let log = Log::new(t.store.clone());
    let settled = reg.gc_on(log.clone(), &eager()).await;
    let reqs = log.take();
    assert!(settled.all_ok(), "{settled:#?}");
    assert_eq!(settled.totals.blobs_deleted, 0);
    if kind == Kind::Serverless {
        // The registry's protocol stamps (`gc/last_update`, `insertion/last_update`) that
        // the first run rewrote in each unit it deleted from change its listing: one more
        // look, with every document from the cache (only the tags, which are roots, are read).
        let deleted: BTreeSet<String> = first
            .repositories
            .iter()
            .filter(|r| !r.deleted.is_empty())
            .map(|r| r.name.clone())
            .collect();
        assert_eq!(
            &reg.units() - &unchanged_units(&settled),
            deleted,
            "{settled:#?}"
        );
        for (key, n) in gets(&reqs) {
            let tag = key
                .split_once("/manifests/")
                .is_some_and(|(_, r)| !r.contains(':'));
            // (Each look reads the unit's trash: another collector may have written one.)
            let trash = key.starts_with("_ocigc/trash/");
            assert!(
                n == 1 && (tag || trash || key.starts_with(CACHE_PREFIX)),
                "{key} read {n} times"
            );
        }
    } else {
        // Deleted keys are left out of the entry's fingerprint: nothing to look at again.
        assert_eq!(unchanged_units(&settled), reg.units(), "{settled:#?}");
        assert_eq!(settled.requests, again_cost(&reg).await, "{reqs:#?}");
    }

    let bucket = keys(t.store.as_ref()).await;
    let cached = all_keys(t.store.as_ref()).await;
    let again = reg.gc_on(log.clone(), &eager()).await;
    let reqs = log.take();
    assert!(again.all_ok(), "{again:#?}");
    assert_eq!(names(&again), reg.units());
    assert_eq!(unchanged_units(&again), reg.units(), "{kind:?}: {again:#?}");
    assert_eq!(
        again.requests,
        again_cost(&reg).await,
        "{kind:?} on {}: {reqs:#?}",
        t.kind
    );
    // Every listing is one of the run's own prefixes (the clock is the first one's `Date`).
    let listed: BTreeSet<String> = reqs
        .iter()
        .filter_map(|r| match r {
            Req::List(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(listed, reg.listed_prefixes(), "{kind:?}");
    // Beyond the listing, only the global unit's cache entry is read (see `again_cost`).
    assert!(
        reqs.iter().all(|r| match r {
            Req::List(_) | Req::Clock => true,
            Req::Get(k) => kind == Kind::Distribution && k.starts_with(CACHE_PREFIX),
            _ => false,
        }),
        "{reqs:#?}"
    );
    assert_eq!(again.totals.manifests_fetched, 0);
    assert_eq!(all_keys(t.store.as_ref()).await, cached, "nothing written");
    assert_eq!(keys(t.store.as_ref()).await, bucket);

    // The figures are those of a full observation that does without the cache.
    let full = reg.gc(&uncached_dry(&eager())).await;
    assert!(unchanged_units(&full).is_empty());
    assert!(full.totals.manifests_fetched > 0);
    assert_eq!(figures(&again), figures(&full), "{kind:?}");
    assert_eq!(figures(&again), figures(&settled), "{kind:?}");
}

async fn unchanged_rerun_oci(t: TestStore) {
    unchanged_rerun(t, Kind::Oci).await
}
async fn unchanged_rerun_serverless(t: TestStore) {
    unchanged_rerun(t, Kind::Serverless).await
}
async fn unchanged_rerun_distribution(t: TestStore) {
    unchanged_rerun(t, Kind::Distribution).await
}

both_stores!(
    unchanged_rerun_oci,
    unchanged_rerun_serverless,
    unchanged_rerun_distribution,
);

// ---- a changed repository ----

/// A new tag in one repository: that repository (and the global unit its blobs land in) is
/// looked at again and reads only the new manifest; the others cost nothing.
async fn changed_repository(t: TestStore, kind: Kind) {
    let reg = Registry::new(&t, kind);
    let content = reg.populate().await;
    for _ in 0..2 {
        assert!(reg.gc(&eager()).await.all_ok());
    }
    let before = entries(t.store.as_ref()).await;
    let f = reg.fixture();
    let new = f.image("team/app", "pushed later").await;
    reg.tag("team/app", "new", &new).await;

    let log = Log::new(t.store.clone());
    let report = reg.gc_on(log.clone(), &eager()).await;
    let reqs = log.take();
    assert!(report.all_ok(), "{report:#?}");
    assert_eq!(report.totals.blobs_deleted, 0);
    let mut changed = BTreeSet::from(["team/app".to_string()]);
    if kind == Kind::Distribution {
        changed.insert(GLOBAL_REPOSITORY.into());
    }
    assert_eq!(
        &reg.units() - &unchanged_units(&report),
        changed,
        "{report:#?}"
    );
    // Exactly: the changed units' cache entries, the roots of the repository (its tags), and
    // the new manifest once per unit that reaches it - no document read before.
    let mut expected: BTreeMap<String, usize> =
        changed.iter().map(|u| (before[u].key.clone(), 1)).collect();
    let tags = ["multi", "solo", "new"];
    match kind {
        Kind::Oci => {
            expected.insert("team/app/index.json".into(), 1);
            expected.insert(reg.document_key("team/app", &new.digest), 1);
        }
        // A tag object is a copy of its manifest and stands in for it.
        Kind::Serverless => {
            expected.extend(tags.map(|t| (sr_manifest("team/app", t), 1)));
        }
        // The repository's unit and the global one each read it.
        Kind::Distribution => {
            expected.extend(tags.map(|t| {
                let link = format!("{V2}/repositories/team/app/_manifests/tags/{t}/current/link");
                (link, 1)
            }));
            expected.insert(reg.document_key("team/app", &new.digest), 2);
        }
    }
    // Its look reads its trash (none: another collector's retention may have written one).
    expected.insert("_ocigc/trash/team/app.json".into(), 1);
    let got = gets(&reqs);
    assert_eq!(got, expected, "{kind:?} on {}", t.kind);
    let old: BTreeSet<String> = content
        .iter()
        .flat_map(|c| c.kept.iter().map(|d| reg.document_key(c.repo, &d.digest)))
        .collect();
    // Other listings than the run's own are the changed repository's (its tags) and, for
    // distribution's global unit, every repository's trash, read after its roots (a
    // retention run elsewhere may have moved a root there since the run's state listing).
    for r in &reqs {
        if let Req::List(p) = r {
            assert!(
                reg.listed_prefixes().contains(p)
                    || p.contains("team/app/")
                    || (matches!(kind, Kind::Distribution) && p == "_ocigc/trash/"),
                "{p}"
            );
        }
    }
    // Nothing of the other repositories is touched.
    for r in &reqs {
        if let Req::Get(k) | Req::Head(k) | Req::Put(k) | Req::Delete(k) = r {
            assert!(
                repo_of(k).is_none_or(|repo| repo == "team/app"),
                "{k}: {reqs:#?}"
            );
        }
    }
    reg.assert_kept("team/app", &new, "the new image").await;
    assert!(reg.dangling().await.is_empty());

    // Without the cache, the same run reads every document again.
    let log = Log::new(t.store.clone());
    let full = reg.gc_on(log.clone(), &uncached_dry(&eager())).await;
    let full_gets = gets(&log.take());
    assert!(
        old.iter().any(|k| full_gets.contains_key(k)),
        "{full_gets:#?}"
    );
    assert!(full.totals.manifests_fetched > report.totals.manifests_fetched);
    assert_eq!(figures(&full), figures(&report));
}

async fn changed_repository_oci(t: TestStore) {
    changed_repository(t, Kind::Oci).await
}
async fn changed_repository_serverless(t: TestStore) {
    changed_repository(t, Kind::Serverless).await
}
async fn changed_repository_distribution(t: TestStore) {
    changed_repository(t, Kind::Distribution).await
}

both_stores!(
    changed_repository_oci,
    changed_repository_serverless,
    changed_repository_distribution,
);

// ---- (a) corrupt cache objects ----

/// Writes `body` at `key`, replacing what is there.
async fn overwrite(store: &dyn Store, key: &str, body: Vec<u8>) {
    store
        .put(key, Bytes::from(body), PutCondition::None)
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

/// A new tagged image and a new unreferenced one in every repository: every unit's listing
/// changes for good, so every unit is marked again (from its cache, where it trusts it), has
/// something to delete, and gets a new entry.
async fn more_content(reg: &Registry, round: &str) -> Vec<(&'static str, Desc, Desc)> {
    let mut out = Vec::new();
    for repo in REPOS {
        let f = reg.fixture();
        let tagged = f.image(repo, &format!("{repo} tagged {round}")).await;
        reg.tag(repo, round, &tagged).await;
        let garbage = f.image(repo, &format!("{repo} garbage {round}")).await;
        out.push((repo, tagged, garbage));
    }
    out
}

/// Asserts what [`more_content`] added: the tagged images whole, the garbage gone.
async fn assert_more_content(reg: &Registry, added: &[(&'static str, Desc, Desc)], what: &str) {
    for (repo, tagged, garbage) in added {
        reg.assert_kept(repo, tagged, what).await;
        reg.assert_collected(repo, garbage, what).await;
    }
}

/// Marks every unit again with its cache entry's object damaged in one way after another:
/// each time every tagged image stays whole, the new garbage goes, the documents are read
/// again (as many as without a cache), and the entries are valid again afterwards.
async fn corrupt_cache_objects(t: TestStore, kind: Kind) {
    let reg = Registry::new(&t, kind);
    let content = reg.populate().await;
    for _ in 0..2 {
        assert!(reg.gc(&eager()).await.all_ok());
    }
    type Damage = fn(&[u8], &[u8], &str) -> Vec<u8>;
    let damages: [(&str, Damage); 6] = [
        ("garbage bytes", |_, _, _| {
            b"definitely not a cache object".to_vec()
        }),
        ("empty", |_, _, _| Vec::new()),
        ("truncated", |body, _, _| body[..body.len() / 2].to_vec()),
        ("one byte flipped", |body, _, _| {
            let mut b = body.to_vec();
            let mid = b.len() / 2;
            b[mid] ^= 0x40;
            b
        }),
        ("another unit's object", |_, other, _| other.to_vec()),
        (
            "this unit's object for another fingerprint",
            |body, _, unit| {
                let (_, _, contents) = cache::decode(body).expect("a valid body");
                cache::encode(unit, &cache::Fingerprint([0x5a; 32]), &contents)
            },
        ),
    ];
    // Each unit a different damage per round, until every damage was dealt.
    let rounds = damages.len().div_ceil(reg.units().len());
    let mut kept = Vec::new();
    for round in 0..rounds {
        let before = entries(t.store.as_ref()).await;
        assert_eq!(before.keys().cloned().collect::<BTreeSet<_>>(), reg.units());
        let units: Vec<&cache::IndexEntry> = before.values().collect();
        let mut bodies = Vec::new();
        for e in &units {
            let body = t.store.get(&e.key).await.expect("cache object").body;
            bodies.push(body.to_vec());
        }
        let mut dealt = Vec::new();
        for (i, e) in units.iter().enumerate() {
            let (what, damage) = damages[(round * units.len() + i) % damages.len()];
            let other = &bodies[(i + 1) % bodies.len()];
            overwrite(t.store.as_ref(), &e.key, damage(&bodies[i], other, &e.unit)).await;
            dealt.push(format!("{}: {what}", e.unit));
        }
        let what = dealt.join(", ");
        let added = more_content(&reg, &format!("r{round}")).await;
        let reference = reg.gc(&uncached_dry(&eager())).await;

        let report = reg.gc(&eager()).await;
        assert!(report.all_ok(), "{what}: {report:#?}");
        assert!(unchanged_units(&report).is_empty(), "{what}");
        reg.assert_collected_garbage_only(&content).await;
        assert_more_content(&reg, &added, &what).await;
        kept.extend(added);
        assert_more_content(&reg, &kept, &what).await;
        assert!(
            report.totals.manifests_fetched >= reference.totals.manifests_fetched,
            "{what}: {} documents read, {} without a cache",
            report.totals.manifests_fetched,
            reference.totals.manifests_fetched
        );
        // Replaced, since every unit changed.
        for e in entries(t.store.as_ref()).await.values() {
            assert!(
                cache::read(t.store.as_ref(), e).await.is_some(),
                "{what}: {}",
                e.key
            );
        }
    }
}

async fn corrupt_cache_objects_oci(t: TestStore) {
    corrupt_cache_objects(t, Kind::Oci).await
}
async fn corrupt_cache_objects_serverless(t: TestStore) {
    corrupt_cache_objects(t, Kind::Serverless).await
}
async fn corrupt_cache_objects_distribution(t: TestStore) {
    corrupt_cache_objects(t, Kind::Distribution).await
}

both_stores!(
    corrupt_cache_objects_oci,
    corrupt_cache_objects_serverless,
    corrupt_cache_objects_distribution,
);

// ---- (b) caches of other versions ----

/// What each unit's entry holds, with every document's references emptied: what a version of
/// ocigc that parsed nothing out of them would have cached.
async fn blind_contents(store: &dyn Store) -> BTreeMap<String, Contents> {
    let mut out = BTreeMap::new();
    for (unit, e) in entries(store).await {
        let mut c = cache::read(store, &e).await.expect("a valid entry");
        assert!(!c.documents.is_empty(), "{unit}");
        for d in &mut c.documents {
            d.references.children.clear();
            d.references.subjects.clear();
        }
        out.insert(unit, c);
    }
    out
}

/// Entries another version of ocigc left: under another cache version's prefix, and under
/// this one's but written by another release (another fingerprint context, and documents as
/// that release parsed them). None may cost a reachable blob; the other prefixes are left
/// alone, the other release's entries are replaced.
async fn other_version_caches(t: TestStore, kind: Kind) {
    let reg = Registry::new(&t, kind);
    let content = reg.populate().await;
    for _ in 0..2 {
        assert!(reg.gc(&eager()).await.all_ok());
    }
    let current = entries(t.store.as_ref()).await;
    let blind = blind_contents(t.store.as_ref()).await;
    let old: Vec<String> = current.values().map(|e| e.key.clone()).collect();
    reg.remove(&old).await;
    let mut foreign = BTreeSet::new();
    for (unit, e) in &current {
        let name = e.key.rsplit_once('/').expect("entry name").1;
        // Another cache version, with this run's own fingerprint and blind documents.
        for v in ["v0", "v9"] {
            let key = format!("{CACHE_ROOT}{v}/{unit}/{name}");
            overwrite(
                t.store.as_ref(),
                &key,
                cache::encode(unit, &e.fingerprint, &blind[unit]),
            )
            .await;
            foreign.insert(key);
        }
        // This cache version, written by another release of ocigc.
        let fp = cache::Fingerprint([0xa5; 32]);
        let key = cache::entry_key(unit, &fp, None, e.has_links, &e.summary).expect("key");
        let body = cache::encode_as("0.0.0-another-release", unit, &fp, &blind[unit]);
        overwrite(t.store.as_ref(), &key, body).await;
    }
    let added = more_content(&reg, "upgraded").await;

    let report = reg.gc(&eager()).await;
    assert!(report.all_ok(), "{report:#?}");
    assert!(unchanged_units(&report).is_empty());
    reg.assert_collected_garbage_only(&content).await;
    assert_more_content(&reg, &added, "after the upgrade").await;
    let k = all_keys(t.store.as_ref()).await;
    assert!(
        foreign.is_subset(&k),
        "another version's entries are not ours"
    );
    let now = entries(t.store.as_ref()).await;
    assert_eq!(now.keys().cloned().collect::<BTreeSet<_>>(), reg.units());
    for e in now.values() {
        assert_ne!(e.fingerprint, cache::Fingerprint([0xa5; 32]), "{}", e.key);
    }
    // The next run trusts what this one wrote.
    let settled = reg.gc(&eager()).await;
    let again = reg.gc(&eager()).await;
    assert_eq!(unchanged_units(&again), reg.units(), "{settled:#?}");
}

async fn other_version_caches_oci(t: TestStore) {
    other_version_caches(t, Kind::Oci).await
}
async fn other_version_caches_serverless(t: TestStore) {
    other_version_caches(t, Kind::Serverless).await
}
async fn other_version_caches_distribution(t: TestStore) {
    other_version_caches(t, Kind::Distribution).await
}

both_stores!(
    other_version_caches_oci,
    other_version_caches_serverless,
    other_version_caches_distribution,
);

// ---- (c) roots and documents that change behind the cache ----

/// A tag moved to another manifest of the same size (the object that records it rewritten
/// with as many bytes): the repository is looked at again at once, the new target and its
/// blobs are kept, and the old one goes when it would without a cache.
async fn tag_moved_behind_the_cache(t: TestStore, kind: Kind) {
    let reg = Registry::new(&t, kind);
    let f = reg.fixture();
    let a = f.image("app", "image-a").await;
    let b = f.image("app", "image-b").await;
    assert_eq!(a.size, b.size);
    reg.tag("app", "v1", &a).await;
    reg.untagged("app", &b).await;
    // `b` is young: kept (pending) by the grace period, and cached with it.
    let young = GcOptions {
        grace: HOUR,
        ..eager()
    };
    let first = reg.gc(&young).await;
    assert!(first.all_ok(), "{first:#?}");
    assert_eq!(first.totals.blobs_deleted, 0);
    assert!(first.totals.pending_blobs > 0);
    reg.gc(&young).await;
    assert_eq!(unchanged_units(&reg.gc(&young).await), names(&first));

    let tag_key = reg.tag_key("app", "v1");
    let size = |k: BTreeMap<String, u64>| k.get(&tag_key).copied();
    let before = size(sizes(t.store.as_ref()).await);
    reg.tag("app", "v1", &b).await;
    assert_eq!(
        size(sizes(t.store.as_ref()).await),
        before,
        "{tag_key}: same size"
    );

    let moved = reg.gc(&young).await;
    assert!(moved.all_ok(), "{moved:#?}");
    assert!(!unchanged_units(&moved).contains("app"), "{moved:#?}");
    assert_eq!(
        figures(&moved),
        figures(&reg.gc(&uncached_dry(&young)).await)
    );
    reg.assert_kept("app", &b, "the tag's new target").await;

    // Past the grace period: exactly what a run without the cache deletes.
    let later = at(2 * HOUR, &young);
    let reference = reg.gc(&uncached_dry(&later)).await;
    let report = reg.gc(&later).await;
    assert!(report.all_ok(), "{report:#?}");
    assert_eq!(all_deleted_keys(&report), all_deleted_keys(&reference));
    reg.assert_kept("app", &b, "the tag's new target").await;
    reg.assert_collected("app", &a, "the tag's old target")
        .await;
    assert!(reg.dangling().await.is_empty());
}

/// Listed sizes by key.
async fn sizes(store: &dyn Store) -> BTreeMap<String, u64> {
    let pages: Vec<Vec<ObjectMeta>> = store.list("").try_collect().await.expect("list");
    pages
        .into_iter()
        .flatten()
        .map(|o| (o.key, o.size))
        .collect()
}

async fn tag_moved_behind_the_cache_oci(t: TestStore) {
    tag_moved_behind_the_cache(t, Kind::Oci).await
}
async fn tag_moved_behind_the_cache_serverless(t: TestStore) {
    tag_moved_behind_the_cache(t, Kind::Serverless).await
}
async fn tag_moved_behind_the_cache_distribution(t: TestStore) {
    tag_moved_behind_the_cache(t, Kind::Distribution).await
}

/// A cached manifest's key rewritten with another manifest of the same size (content that no
/// longer hashes to the key's digest): marking follows what the key holds now, as a run
/// without the cache does, and keeps the blobs that content references.
async fn manifest_rewritten_behind_the_cache(t: TestStore) {
    let reg = Registry::new(&t, Kind::Oci);
    let (m, x, young) = two_images_cached(&reg).await;
    assert_eq!(unchanged_units(&reg.gc(&young).await), reg_units(&["app"]));

    let body = t
        .store
        .get(&blob_key("app", &x.digest))
        .await
        .expect("x's manifest")
        .body;
    overwrite(t.store.as_ref(), &blob_key("app", &m.digest), body.to_vec()).await;
    let later = at(2 * HOUR, &young);
    let reference = reg.gc(&uncached_dry(&later)).await;
    let report = reg.gc(&later).await;
    assert!(report.all_ok(), "{report:#?}");
    assert!(unchanged_units(&report).is_empty());
    assert_eq!(all_deleted_keys(&report), all_deleted_keys(&reference));
    let k = keys(t.store.as_ref()).await;
    for d in &x.subtree[1..] {
        assert!(
            k.contains(&blob_key("app", d)),
            "{}: {d}, referenced by what the tag's key holds now, was deleted",
            t.kind
        );
    }
    for d in &m.subtree[1..] {
        assert!(
            !k.contains(&blob_key("app", d)),
            "{d}: no longer referenced"
        );
    }
}

/// The global unit of a report.
fn global_of(report: &Report) -> &ocigc::report::RepoReport {
    (report.repositories.iter())
        .find(|r| r.name == GLOBAL_REPOSITORY)
        .expect("a global unit")
}

/// Two images `m` (tagged `app:v1`) and `x` (untagged) of the same size, and a first run that
/// caches them, with an hour's grace (its options are returned): nothing is deleted yet.
async fn two_images_cached(reg: &Registry) -> (Desc, Desc, GcOptions) {
    let f = reg.fixture();
    let m = f.image("app", "image-m").await;
    let x = f.image("app", "image-x").await;
    assert_eq!(m.size, x.size);
    reg.tag("app", "v1", &m).await;
    let young = GcOptions {
        grace: HOUR,
        ..eager()
    };
    reg.gc(&young).await;
    (m, x, young)
}

/// A `distribution` bucket whose tagged manifest `m` is in the global unit's cache entry,
/// with a second image `x` of the same size pushed and untagged. Returns the two images and
/// the options of a run that may delete (the clock two hours on).
async fn cached_global(reg: &Registry) -> (Desc, Desc, GcOptions) {
    let (m, x, young) = two_images_cached(reg).await;
    let again = reg.gc(&young).await;
    assert!(
        unchanged_units(&again).contains(GLOBAL_REPOSITORY),
        "the global unit has a cache entry: {again:#?}"
    );
    (m, x, at(2 * HOUR, &young))
}

/// The global blob space is marked from its cached documents before it is listed (streamed
/// against the reachable set). A cached manifest's data rewritten with another manifest of
/// the same size shows in that listing: the document is read again, and the blobs the data
/// references now are kept, as a run without the cache keeps them.
async fn manifest_rewritten_behind_the_streamed_cache(t: TestStore) {
    let reg = Registry::new(&t, Kind::Distribution);
    let (m, x, later) = cached_global(&reg).await;
    let body = (t.store.get(&data_key(&x.digest)).await)
        .expect("x's manifest")
        .body;
    overwrite(t.store.as_ref(), &data_key(&m.digest), body.to_vec()).await;
    let reference = reg.gc(&uncached_dry(&later)).await;
    let report = reg.gc(&later).await;
    assert!(report.all_ok(), "{report:#?}");
    assert!(!global_of(&report).unchanged);
    assert_eq!(all_deleted_keys(&report), all_deleted_keys(&reference));
    let k = keys(t.store.as_ref()).await;
    for d in &x.subtree[1..] {
        assert!(
            k.contains(&data_key(d)),
            "{}: {d}, referenced by what the tag's manifest key holds now, was deleted",
            t.kind
        );
    }
    for d in &m.subtree[1..] {
        assert!(!k.contains(&data_key(d)), "{d}: no longer referenced");
    }
}

/// A cached manifest whose data is deleted behind the cache: the streamed listing does not
/// show it, the document is read again and found missing, and the global unit fails closed
/// with nothing deleted, as a run without the cache does.
async fn manifest_deleted_behind_the_streamed_cache(t: TestStore) {
    let reg = Registry::new(&t, Kind::Distribution);
    let (m, _x, later) = cached_global(&reg).await;
    let failed = (t.store.delete_batch(&[data_key(&m.digest)]).await).expect("delete");
    assert!(failed.is_empty(), "{failed:?}");
    let before = keys(t.store.as_ref()).await;
    let reference = reg.gc(&uncached_dry(&later)).await;
    let report = reg.gc(&later).await;
    let (global, expected) = (global_of(&report), global_of(&reference));
    assert_eq!(global.status, expected.status, "{report:#?}");
    assert_ne!(global.status, ocigc::report::RepoStatus::Ok, "{report:#?}");
    assert!(global.deleted.is_empty(), "{report:#?}");
    let after = keys(t.store.as_ref()).await;
    for d in &m.subtree[1..] {
        assert!(
            after.contains(&data_key(d)),
            "{d} of the tagged image was deleted"
        );
    }
    assert!(after.is_subset(&before));
}

/// A cached manifest the run deletes (untagged, `--delete-untagged`) is in the entry that run
/// writes; the next run's listing does not show it, and as it is no longer reachable that is
/// no reason to list the blob space again: one listing, and nothing read twice.
async fn a_deleted_cached_manifest_costs_no_second_listing(t: TestStore) {
    let reg = Registry::new(&t, Kind::Distribution);
    let (_m, x, later) = cached_global(&reg).await;
    reg.tag("app", "v2", &x).await;
    reg.gc(&later).await;
    reg.untag("app", "v2").await;
    let report = reg.gc(&at(HOUR, &later)).await;
    assert!(report.all_ok(), "{report:#?}");
    let k = keys(t.store.as_ref()).await;
    assert!(
        !k.contains(&data_key(&x.digest)),
        "x's manifest was collected"
    );
    let log = Log::new(t.store.clone());
    let next = reg.gc_on(log.clone(), &at(2 * HOUR, &later)).await;
    assert!(next.all_ok(), "{next:#?}");
    let blob_space = format!("{V2}/blobs/");
    let reqs = log.take();
    let listings = (reqs.iter())
        .filter(|r| matches!(r, Req::List(p) if *p == blob_space))
        .count();
    assert_eq!(listings, 1, "{reqs:#?}");
}

fn reg_units(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

both_stores!(
    tag_moved_behind_the_cache_oci,
    tag_moved_behind_the_cache_serverless,
    tag_moved_behind_the_cache_distribution,
    manifest_rewritten_behind_the_cache,
    manifest_rewritten_behind_the_streamed_cache,
    manifest_deleted_behind_the_streamed_cache,
    a_deleted_cached_manifest_costs_no_second_listing,
);

// ---- (d) shards running at once ----

/// Three shards at once, each with the cache, over several rounds (cold, changed, settled,
/// unchanged): every unit is collected by exactly the shard that owns it, and no shard ever
/// deletes what a tag needs.
async fn concurrent_shards(t: TestStore, kind: Kind) {
    let reg = Registry::new(&t, kind);
    let content = reg.populate().await;
    let shards: Vec<Shard> = (0..3).map(|index| Shard { index, count: 3 }).collect();
    // Who owns what is the first round's answer; every later round must give the same.
    let mut owned: Vec<BTreeSet<String>> = Vec::new();
    let opts: Vec<GcOptions> = shards
        .iter()
        .map(|s| GcOptions {
            shard: Some(*s),
            ..eager()
        })
        .collect();
    let mut kept = Vec::new();
    for round in 0..4 {
        let added = if round == 1 {
            more_content(&reg, "while sharded").await
        } else {
            Vec::new()
        };
        let (r0, r1, r2) = tokio::join!(reg.gc(&opts[0]), reg.gc(&opts[1]), reg.gc(&opts[2]));
        let reports = [r0, r1, r2];
        if owned.is_empty() {
            owned = reports.iter().map(names).collect();
            let all: BTreeSet<String> = owned.iter().flatten().cloned().collect();
            let total: usize = owned.iter().map(BTreeSet::len).sum();
            assert_eq!(
                (all.clone(), total),
                (reg.units(), all.len()),
                "each unit once"
            );
            assert!(
                owned.iter().filter(|o| !o.is_empty()).count() >= 2,
                "the units fall to one shard: {owned:?}"
            );
        }
        for (i, r) in reports.iter().enumerate() {
            assert!(r.all_ok(), "round {round}, shard {i}: {r:#?}");
            assert_eq!(names(r), owned[i], "round {round}, shard {i}");
        }
        reg.assert_collected_garbage_only(&content).await;
        assert_more_content(&reg, &added, "added while sharded").await;
        kept.extend(added);
        assert_more_content(&reg, &kept, "added while sharded").await;
        let unchanged: BTreeSet<String> = reports.iter().flat_map(unchanged_units).collect();
        // Settled after a round that deleted; the serverless registry's stamps need one more.
        let settled = match kind {
            Kind::Serverless => 3,
            _ => 2,
        };
        if round >= settled {
            assert_eq!(unchanged, reg.units(), "round {round}");
        }
    }
}

async fn concurrent_shards_oci(t: TestStore) {
    concurrent_shards(t, Kind::Oci).await
}
async fn concurrent_shards_serverless(t: TestStore) {
    concurrent_shards(t, Kind::Serverless).await
}
async fn concurrent_shards_distribution(t: TestStore) {
    concurrent_shards(t, Kind::Distribution).await
}

both_stores!(
    concurrent_shards_oci,
    concurrent_shards_serverless,
    concurrent_shards_distribution,
);

// ---- (e) keys outside a unit that keep its blobs ----

/// A push intent keeps a blob nothing references, run after run; once it is released the
/// next run collects the blob, though the unit's own listing has not changed.
async fn intent_keeps_until_released(t: TestStore, kind: Kind) {
    let reg = Registry::new(&t, kind);
    let f = reg.fixture();
    let img = f.image("app", "tagged").await;
    reg.tag("app", "v1", &img).await;
    let reused = f
        .blob("app", OCI_LAYER, b"a layer a pusher is about to reuse")
        .await;
    let digest = Digest::parse(&reused.digest).expect("digest");
    let intent = intent::write_intent(t.store.as_ref(), "app", &[digest], HOUR)
        .await
        .expect("intent");
    let holder = match kind {
        Kind::Distribution => GLOBAL_REPOSITORY,
        _ => "app",
    };
    for round in 0..3 {
        let r = reg.gc(&eager()).await;
        assert!(r.all_ok(), "{r:#?}");
        reg.assert_kept("app", &reused, "named by an intent").await;
        assert!(
            !unchanged_units(&r).contains(holder),
            "round {round}: {holder} skipped while an intent decides it"
        );
    }
    reg.remove(&[intent]).await;
    let r = reg.gc(&eager()).await;
    assert!(r.all_ok(), "{r:#?}");
    reg.assert_collected("app", &reused, "the intent is gone")
        .await;
    reg.assert_kept("app", &img, "tagged").await;
    assert!(reg.dangling().await.is_empty());
    reg.gc(&eager()).await;
    let again = reg.gc(&eager()).await;
    assert_eq!(unchanged_units(&again), names(&again), "{again:#?}");
}

async fn intent_keeps_until_released_oci(t: TestStore) {
    intent_keeps_until_released(t, Kind::Oci).await
}
async fn intent_keeps_until_released_serverless(t: TestStore) {
    intent_keeps_until_released(t, Kind::Serverless).await
}
async fn intent_keeps_until_released_distribution(t: TestStore) {
    intent_keeps_until_released(t, Kind::Distribution).await
}

/// `b` tags an image whose content `a` holds (zot's dedupe: 0-byte placeholders in `b`): `a`'s
/// copies stay while a placeholder does, though `a` itself never changes, and go in the run
/// after the last placeholder went.
async fn placeholders_elsewhere_keep_then_release(t: TestStore) {
    let reg = Registry::new(&t, Kind::Oci);
    let f = reg.fixture();
    let own = f.image("a", "own").await;
    reg.tag("a", "v1", &own).await;
    let shared = f.image("a", "shared").await;
    for d in &shared.subtree {
        f.put(&blob_key("b", d), b"").await;
    }
    reg.tag("b", "v1", &shared).await;
    for round in 0..3 {
        let r = reg.gc(&eager()).await;
        assert!(r.all_ok(), "{r:#?}");
        reg.assert_kept("a", &shared, "content of b's placeholders")
            .await;
        reg.assert_kept("a", &own, "tagged").await;
        // What keeps them is outside `a`: it is looked at every run.
        assert!(!unchanged_units(&r).contains("a"), "round {round}: {r:#?}");
        assert!(unchanged_units(&r).contains("b") || round == 0, "{r:#?}");
    }
    // `b` drops the image: its placeholders go now, `a`'s copies in the next run.
    reg.untag("b", "v1").await;
    let r = reg.gc(&eager()).await;
    assert!(r.all_ok(), "{r:#?}");
    let k = keys(t.store.as_ref()).await;
    assert!(shared
        .subtree
        .iter()
        .all(|d| !k.contains(&blob_key("b", d))));
    reg.assert_kept("a", &shared, "listed with its placeholders")
        .await;
    let r = reg.gc(&eager()).await;
    assert!(r.all_ok(), "{r:#?}");
    reg.assert_collected("a", &shared, "no placeholder left")
        .await;
    reg.assert_kept("a", &own, "tagged").await;
    assert!(dangling(t.store.as_ref()).await.is_empty());
    let again = reg.gc(&eager()).await;
    assert_eq!(
        unchanged_units(&again),
        reg_units(&["a", "b"]),
        "{again:#?}"
    );
}

/// `b` mounted a layer of `a` that no manifest of `a` uses (a link object in `b` naming it):
/// kept while the link is, also when the link's holder is unchanged and its cache object is
/// damaged; collected the run after the link went.
async fn mount_link_elsewhere_keeps_then_releases(t: TestStore) {
    let reg = Registry::new(&t, Kind::Serverless);
    let f = reg.fixture();
    let own = f.image("a", "own").await;
    reg.tag("a", "v1", &own).await;
    let base = f.blob("a", OCI_LAYER, b"mounted base layer").await;
    let sr = SrWriter {
        inner: t.store.clone(),
    };
    sr.mount("a", "b", &base.digest).await;
    let cfg = f.blob("b", OCI_CONFIG, b"{\"mounted\":1}").await;
    let mounted = f.manifest("b", &cfg, &[&base], None).await;
    reg.tag("b", "v1", &mounted).await;
    for _ in 0..3 {
        let r = reg.gc(&eager()).await;
        assert!(r.all_ok(), "{r:#?}");
        reg.assert_kept("a", &base, "linked from b").await;
    }
    // `b` is unchanged and its links come from its cache object: damaged, they are read
    // from the bucket again while `a` (changed) decides.
    let b_entry = entries(t.store.as_ref()).await["b"].clone();
    assert!(b_entry.has_links, "{b_entry:?}");
    overwrite(t.store.as_ref(), &b_entry.key, b"damaged".to_vec()).await;
    let garbage = f.image("a", "garbage").await;
    let r = reg.gc(&eager()).await;
    assert!(r.all_ok(), "{r:#?}");
    assert!(unchanged_units(&r).contains("b") && !unchanged_units(&r).contains("a"));
    reg.assert_kept("a", &base, "linked from an unchanged b")
        .await;
    reg.assert_collected("a", &garbage, "garbage").await;

    // `b` drops its image: the link goes now, the layer in the next run.
    reg.untag("b", "v1").await;
    let r = reg.gc(&eager()).await;
    assert!(r.all_ok(), "{r:#?}");
    assert!(!keys(t.store.as_ref())
        .await
        .contains(&sr_blob("b", &base.digest)));
    reg.assert_kept("a", &base, "listed with its link").await;
    let r = reg.gc(&eager()).await;
    assert!(r.all_ok(), "{r:#?}");
    reg.assert_collected("a", &base, "no link left").await;
    reg.assert_kept("a", &own, "tagged").await;
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
}

/// A layer two repositories' images share (stored once, globally): kept while either tags
/// its image; collected once neither does, though the global unit's roots changed only in
/// other units' listings.
async fn layer_shared_across_repositories(t: TestStore) {
    let reg = Registry::new(&t, Kind::Distribution);
    let f = reg.fixture();
    let mut images = Vec::new();
    for repo in ["a", "b"] {
        let cfg = f
            .blob(
                repo,
                OCI_CONFIG,
                format!("{{\"repo\":\"{repo}\"}}").as_bytes(),
            )
            .await;
        let layer = f.blob(repo, OCI_LAYER, b"a layer both use").await;
        let img = f.manifest(repo, &cfg, &[&layer], None).await;
        reg.tag(repo, "v1", &img).await;
        images.push((repo, img, layer));
    }
    let layer = images[0].2.clone();
    for _ in 0..2 {
        assert!(reg.gc(&eager()).await.all_ok());
    }
    reg.untag("a", "v1").await;
    for _ in 0..2 {
        let r = reg.gc(&eager()).await;
        assert!(r.all_ok(), "{r:#?}");
        reg.assert_kept("b", &layer, "b still tags it").await;
        reg.assert_kept("b", &images[1].1, "b's image").await;
    }
    reg.untag("b", "v1").await;
    let r = reg.gc(&eager()).await;
    assert!(r.all_ok(), "{r:#?}");
    let r2 = reg.gc(&eager()).await;
    assert!(r2.all_ok(), "{r2:#?}");
    reg.assert_collected("b", &layer, "no tag needs it").await;
    let again = reg.gc(&eager()).await;
    assert_eq!(unchanged_units(&again), names(&again), "{again:#?}");
}

both_stores!(
    intent_keeps_until_released_oci,
    intent_keeps_until_released_serverless,
    intent_keeps_until_released_distribution,
    placeholders_elsewhere_keep_then_release,
    mount_link_elsewhere_keeps_then_releases,
    layer_shared_across_repositories,
);

// ---- (f) the clock ----

fn parse_time(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// With `--delay`, a candidate's second observation comes with the first run after its time:
/// the cache skips the unit until then (no request), never after.
async fn pending_candidates_mature(t: TestStore, kind: Kind) {
    let reg = Registry::new(&t, kind);
    let content = reg.populate().await;
    let waiting = GcOptions {
        delay: HOUR,
        ..eager()
    };
    let first = reg.gc(&waiting).await;
    assert!(first.all_ok(), "{first:#?}");
    assert_eq!(first.totals.blobs_deleted, 0);
    let holders: BTreeSet<String> = first
        .repositories
        .iter()
        .filter(|r| r.pending.blobs > 0)
        .map(|r| r.name.clone())
        .collect();
    assert!(!holders.is_empty());
    let (started, finished) = (
        parse_time(&first.started_at),
        parse_time(&first.finished_at),
    );
    for (unit, e) in entries(t.store.as_ref()).await {
        match e.wake_at {
            Some(w) => {
                assert!(holders.contains(&unit), "{unit} wakes with nothing pending");
                assert!(
                    w >= started + HOUR && w <= finished + HOUR + Duration::from_secs(2),
                    "{unit}: wakes at {w:?}, first observed {started:?}..{finished:?}"
                );
            }
            None => assert!(!holders.contains(&unit), "{unit} never wakes"),
        }
    }
    for c in &content {
        reg.assert_kept(c.repo, &c.garbage, "first observation")
            .await;
    }

    // Before the time: skipped, at no cost.
    for offset in [Duration::ZERO, HOUR / 2] {
        let log = Log::new(t.store.clone());
        let r = reg.gc_on(log.clone(), &at(offset, &waiting)).await;
        assert_eq!(unchanged_units(&r), reg.units(), "{offset:?}: {r:#?}");
        assert_eq!(r.requests, again_cost(&reg).await, "{:#?}", log.take());
        assert_eq!(figures(&r), figures(&first));
    }
    // The first run after it: the second observation, and the deletions.
    let later = at(HOUR + Duration::from_secs(120), &waiting);
    let r = reg.gc(&later).await;
    assert!(r.all_ok(), "{r:#?}");
    assert!(holders.is_disjoint(&unchanged_units(&r)), "{r:#?}");
    reg.assert_collected_garbage_only(&content).await;
    assert_eq!(r.totals.pending_blobs, 0);
    for e in entries(t.store.as_ref()).await.values() {
        assert_eq!(e.wake_at, None, "{}", e.key);
    }
}

async fn pending_candidates_mature_oci(t: TestStore) {
    pending_candidates_mature(t, Kind::Oci).await
}
async fn pending_candidates_mature_serverless(t: TestStore) {
    pending_candidates_mature(t, Kind::Serverless).await
}
async fn pending_candidates_mature_distribution(t: TestStore) {
    pending_candidates_mature(t, Kind::Distribution).await
}

/// Garbage younger than `--grace` is cached with the time it comes of age, and collected by
/// the first run after that.
async fn young_garbage_comes_of_age(t: TestStore) {
    let reg = Registry::new(&t, Kind::Oci);
    let content = reg.populate().await;
    let young = GcOptions {
        grace: HOUR,
        ..eager()
    };
    let first = reg.gc(&young).await;
    assert_eq!(first.totals.blobs_deleted, 0);
    let r = reg.gc(&at(HOUR / 2, &young)).await;
    assert_eq!(unchanged_units(&r), reg.units(), "{r:#?}");
    for c in &content {
        reg.assert_kept(c.repo, &c.garbage, "within grace").await;
    }
    let r = reg.gc(&at(HOUR + Duration::from_secs(120), &young)).await;
    assert!(r.all_ok(), "{r:#?}");
    assert!(unchanged_units(&r).is_empty(), "{r:#?}");
    reg.assert_collected_garbage_only(&content).await;
}

both_stores!(
    pending_candidates_mature_oci,
    pending_candidates_mature_serverless,
    pending_candidates_mature_distribution,
    young_garbage_comes_of_age,
);

// ---- the daemon's hook runs of one repository ----

/// A hook GC of one repository (what `POST /v1/repos/{name}/gc` runs) reads and writes only
/// that unit's entry: a second one with nothing changed reads no document and writes nothing.
async fn hook_runs_use_the_cache(t: TestStore, kind: Kind) {
    let reg = Registry::new(&t, kind);
    let content = reg.populate().await;
    let hook = GcOptions {
        repos: only(&["team/app"]),
        only: Some("team/app".into()),
        ..eager()
    };
    let first = reg.gc(&hook).await;
    assert!(first.all_ok(), "{first:#?}");
    assert_eq!(names(&first), reg_units(&["team/app"]));
    assert!(unchanged_units(&first).is_empty());
    let app = content
        .iter()
        .find(|c| c.repo == "team/app")
        .expect("team/app");
    for d in &app.kept {
        reg.assert_kept("team/app", d, "tagged").await;
    }
    let cached: BTreeSet<String> = entries(t.store.as_ref()).await.into_keys().collect();
    assert_eq!(cached, reg_units(&["team/app"]));
    reg.gc(&hook).await;
    let log = Log::new(t.store.clone());
    let again = reg.gc_on(log.clone(), &hook).await;
    let reqs = log.take();
    assert_eq!(
        unchanged_units(&again),
        reg_units(&["team/app"]),
        "{again:#?}"
    );
    assert_eq!(again.totals.manifests_fetched, 0);
    assert_eq!(
        figures(&again),
        figures(&reg.gc(&uncached_dry(&hook)).await)
    );
    // A hook run lists what its layout lets it (the repository's prefix and state, or the
    // bucket) and may look for the repository's state by key; it reads and writes nothing.
    for r in &reqs {
        assert!(
            matches!(r, Req::List(_) | Req::Clock | Req::Head(_)),
            "{kind:?}: {r:?}"
        );
    }
}

async fn hook_runs_use_the_cache_oci(t: TestStore) {
    hook_runs_use_the_cache(t, Kind::Oci).await
}
async fn hook_runs_use_the_cache_distribution(t: TestStore) {
    hook_runs_use_the_cache(t, Kind::Distribution).await
}

both_stores!(
    hook_runs_use_the_cache_oci,
    hook_runs_use_the_cache_distribution,
);

// ---- `--no-cache` on the command line ----

/// Runs the `ocigc` binary on `t` with `args` and extra environment; returns the report.
fn ocigc_gc(t: &TestStore, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let (target, target_env) = cli_target(t);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .arg("gc")
        .args(&target)
        .args(["--grace", "0s", "--delay", "0s", "--report", "-"])
        .args(args)
        .envs(target_env)
        .envs(env.iter().copied())
        .env("OCIGC_LOG", "warn")
        .output()
        .expect("run ocigc");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{args:?} {env:?}: {stderr}");
    serde_json::from_slice(&out.stdout).expect("report")
}

fn report_unchanged(report: &serde_json::Value) -> Vec<bool> {
    report["repositories"]
        .as_array()
        .expect("repositories")
        .iter()
        .map(|r| r["unchanged"].as_bool().expect("unchanged"))
        .collect()
}

async fn cache_keys(store: &dyn Store) -> BTreeSet<String> {
    all_keys(store)
        .await
        .into_iter()
        .filter(|k| k.starts_with(CACHE_ROOT))
        .collect()
}

/// `--no-cache` (flag, `OCIGC_NO_CACHE` or config key `no_cache`): no entry written, and over
/// a cached bucket every document read as without one; without it, the next run is free.
async fn no_cache_from_the_command_line(t: TestStore) {
    let reg = Registry::new(&t, Kind::Oci);
    let content = reg.populate().await;
    let uncached = ocigc_gc(&t, &["--no-cache"], &[]);
    assert!(uncached["totals"]["blobs_deleted"].as_u64() > Some(0));
    assert!(cache_keys(t.store.as_ref()).await.is_empty(), "{}", t.kind);
    reg.assert_collected_garbage_only(&content).await;
    assert!(uncached["totals"]["manifests_fetched"].as_u64() > Some(0));
    assert!(report_unchanged(&uncached).iter().all(|u| !u));

    // Nothing cached yet: a full read, which the runs without the cache below repeat.
    let cold = ocigc_gc(&t, &[], &[]);
    assert!(report_unchanged(&cold).iter().all(|u| !u));
    let full = cold["totals"]["manifests_fetched"]
        .as_u64()
        .expect("fetched");
    assert!(full > 0);
    let written = cache_keys(t.store.as_ref()).await;
    assert_eq!(written.len(), REPOS.len(), "{written:#?}");
    let warm = ocigc_gc(&t, &[], &[]);
    assert!(report_unchanged(&warm).iter().all(|u| *u), "{warm:#}");
    assert_eq!(warm["totals"]["manifests_fetched"].as_u64(), Some(0));
    assert_eq!(warm["requests"]["get"].as_u64(), Some(0));

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ocigc.toml");
    std::fs::write(&config, "no_cache = true\n").expect("config");
    let config = config.to_str().expect("utf-8 path");
    type Way<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let ways: [Way; 3] = [
        (&["--no-cache"], &[]),
        (&[], &[("OCIGC_NO_CACHE", "true")]),
        (&["--config", config], &[]),
    ];
    for (args, env) in ways {
        let r = ocigc_gc(&t, args, env);
        assert_eq!(
            r["totals"]["manifests_fetched"].as_u64(),
            Some(full),
            "{args:?} {env:?}"
        );
        assert!(report_unchanged(&r).iter().all(|u| !u), "{args:?} {env:?}");
        assert_eq!(r["requests"]["put"].as_u64(), Some(0), "{args:?} {env:?}");
        assert_eq!(
            cache_keys(t.store.as_ref()).await,
            written,
            "{args:?} {env:?}"
        );
    }
}

both_stores!(no_cache_from_the_command_line);

// ---- a run killed between its deletions and its cache write ----

/// Runs the `ocigc` binary's `gc` on `t` until it reaches `failpoint`, then SIGKILLs it.
fn kill_at(t: &TestStore, failpoint: &str) {
    use std::io::{BufRead, BufReader};
    let (target, env) = cli_target(t);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .arg("gc")
        .args(&target)
        .args(["--grace", "0s", "--delay", "0s"])
        .envs(env)
        .env("OCIGC_LOG", "warn")
        .env("OCIGC_FAILPOINT", failpoint)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ocigc");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wanted = format!("failpoint {failpoint} reached");
    let mut seen = Vec::new();
    let reached = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains(&wanted) => break true,
            Ok(line) => seen.push(line),
            // Exited (stderr closed) or stuck: the point was never reached.
            Err(_) => break false,
        }
    };
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert!(reached, "{}: never reached {failpoint}: {seen:?}", t.kind);
}

/// A run killed after a repository's deletions and pending state, before its cache entry:
/// the old entry no longer matches the listing, so the next run looks again (and takes over
/// the dead run's lease), finishes the work and leaves one valid entry per unit.
async fn killed_before_its_cache_write(t: TestStore) {
    let reg = Registry::new(&t, Kind::Oci);
    let content = reg.populate().await;
    assert!(reg.gc(&eager()).await.all_ok());
    let before = entries(t.store.as_ref()).await;
    let added = more_content(&reg, "before the crash").await;
    kill_at(&t, "after-state-write");
    assert!(dangling(t.store.as_ref()).await.is_empty(), "{}", t.kind);

    // Past the dead run's lease.
    let later = at(HOUR, &eager());
    let r = reg.gc(&later).await;
    assert!(r.all_ok(), "{r:#?}");
    assert!(unchanged_units(&r).is_empty(), "{r:#?}");
    reg.assert_collected_garbage_only(&content).await;
    assert_more_content(&reg, &added, "added before the crash").await;
    let after = entries(t.store.as_ref()).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    let written: BTreeSet<String> = cache_keys(t.store.as_ref()).await;
    assert_eq!(
        written.len(),
        after.len(),
        "one entry per unit: {written:#?}"
    );
    for e in after.values() {
        assert!(!before.values().any(|b| b.key == e.key), "{}", e.key);
        assert!(
            cache::read(t.store.as_ref(), e).await.is_some(),
            "{}",
            e.key
        );
    }
    let again = reg.gc(&later).await;
    assert_eq!(unchanged_units(&again), reg.units(), "{again:#?}");
}

both_stores!(killed_before_its_cache_write);
