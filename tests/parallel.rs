//! Listing in parts and shards by key range (issue 12 items 2 and 4), on every store: a bucket
//! longer than one listing page, with the orderings that make cutting it hard (nested
//! repositories, `alpine` next to `alpine-edge`, dedupe placeholders on both sides of a cut),
//! collected in parts and in shards, must lose nothing an image needs and collect exactly what
//! one sequential listing would.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use common::wrap::{Intercept, Wrapped};
use futures::stream::BoxStream;
use ocigc::store::{ObjectMeta, Store, StoreResult};

use common::*;
use futures::StreamExt as _;
use ocigc::gc::{GcOptions, Shard};
use ocigc::report::Report;

/// Repositories of plain images: enough, with the others, for more than one page (1000 keys).
const PLAIN: usize = 170;

/// What the bucket must keep: every repository's tagged image, by repository.
struct Bucket {
    kept: Vec<(String, Desc)>,
}

/// Writes the bucket: plain repositories (a tagged image and an unreferenced blob each), nested ones, siblings the two listing orders disagree on, and placeholders whose
/// content copies lie before and after them in the listing.
async fn bucket(t: &TestStore) -> Bucket {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let mut names: Vec<String> = (0..PLAIN).map(|i| format!("r{i:03}/app")).collect();
    names.extend(
        [
            "lib/alpine",
            "lib/alpine-edge",
            "lib/alpine/tools",
            "lib/alpine0",
        ]
        .map(String::from),
    );
    let written: Vec<(String, Desc)> = futures::stream::iter(names)
        .map(|name| {
            let f = &f;
            async move {
                let image = f.image(&name, "kept").await;
                f.blob(&name, "application/octet-stream", name.as_bytes())
                    .await;
                f.layout(&name, &[(Some("v1"), &image)]).await;
                (name, image)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut kept = written;
    // Content copies at both ends of the bucket, tagged only through placeholders in the
    // other end: `a-origin` lists before `zz-dedupe`'s placeholders, `zz-origin` after
    // `a-dedupe`'s.
    for (origin, dedupe) in [("a-origin", "zz-dedupe"), ("zz-origin", "a-dedupe")] {
        let shared = f.image(origin, &format!("shared by {dedupe}")).await;
        f.layout(origin, &[]).await;
        for d in &shared.subtree {
            f.put(&blob_key(dedupe, d), b"").await;
        }
        f.layout(dedupe, &[(Some("latest"), &shared)]).await;
        kept.push((origin.to_string(), shared.clone()));
    }
    Bucket { kept }
}

fn opts(list_parts: usize) -> GcOptions {
    GcOptions {
        list_parts,
        ..eager()
    }
}

/// The keys a report deleted (a dry run: would delete).
fn deleted(report: &Report) -> BTreeSet<String> {
    report
        .repositories
        .iter()
        .flat_map(|r| r.deleted.iter().map(|d| d.key.clone()))
        .collect()
}

fn list_requests(report: &Report) -> u64 {
    report.requests.list
}

/// Parts decide exactly what one listing decides; four shards at once then collect every
/// repository exactly once, delete what that one listing would, and lose nothing.
async fn parts_and_shards_decide_what_one_listing_does(t: TestStore) {
    let b = bucket(&t).await;
    let before = keys(t.store.as_ref()).await;
    assert!(before.len() > 1000, "more than a page: {}", before.len());

    let dry = |n| GcOptions {
        dry_run: true,
        ..opts(n)
    };
    let sequential = gc(&t.store, &dry(1)).await;
    let parallel = gc(&t.store, &dry(8)).await;
    assert!(sequential.all_ok() && parallel.all_ok(), "{parallel:#?}");
    let expected = deleted(&sequential);
    assert!(expected.len() >= PLAIN, "{}", expected.len());
    assert_eq!(deleted(&parallel), expected, "parts decide as one listing");
    let names = |r: &Report| -> BTreeSet<String> {
        r.repositories.iter().map(|r| r.name.clone()).collect()
    };
    assert_eq!(names(&parallel), names(&sequential));
    assert_eq!(parallel.repositories.len(), sequential.repositories.len());
    // The parts were planned: the plan's level listing of the root is one more LIST (the
    // first page's keys are not listed again).
    assert!(
        list_requests(&parallel) > list_requests(&sequential),
        "parallel {} vs sequential {} LIST requests",
        list_requests(&parallel),
        list_requests(&sequential)
    );

    let shard = |index| GcOptions {
        shard: Some(Shard { index, count: 4 }),
        ..opts(8)
    };
    let o = [shard(0), shard(1), shard(2), shard(3)];
    let (s0, s1, s2, s3) = tokio::join!(
        gc(&t.store, &o[0]),
        gc(&t.store, &o[1]),
        gc(&t.store, &o[2]),
        gc(&t.store, &o[3]),
    );
    let shards = [s0, s1, s2, s3];
    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
    for (i, s) in shards.iter().enumerate() {
        assert!(s.all_ok(), "shard {i}: {s:#?}");
        for r in &s.repositories {
            assert_eq!(owner.insert(r.name.clone(), i), None, "{} twice", r.name);
        }
    }
    assert_eq!(
        owner.keys().cloned().collect::<BTreeSet<_>>(),
        names(&sequential)
    );
    let busy = shards.iter().filter(|s| !s.repositories.is_empty()).count();
    assert_eq!(busy, 4, "the repositories are divided: {owner:?}");
    let union: BTreeSet<String> = shards.iter().flat_map(deleted).collect();
    assert_eq!(union, expected, "the shards delete what one run would");
    let after = keys(t.store.as_ref()).await;
    for (repo, image) in &b.kept {
        assert_intact(
            &after,
            repo,
            image,
            "tagged, or kept by placeholders elsewhere",
        );
    }
    assert_eq!(
        before.difference(&after).cloned().collect::<BTreeSet<_>>(),
        expected,
        "nothing else is gone"
    );

    // Nothing left to delete: a shard whose repositories would delete nothing lists its own
    // slice and none before it (only the shards holding the placeholders' ends need the
    // other slices' facts).
    let counted: Vec<Arc<Wrapped<FirstListed>>> = (0..4)
        .map(|_| Arc::new(FirstListed::new(t.store.clone())))
        .collect();
    let stores: Vec<Arc<dyn Store>> = counted
        .iter()
        .map(|c| c.clone() as Arc<dyn Store>)
        .collect();
    let dry_shard = |index| GcOptions {
        dry_run: true,
        ..shard(index)
    };
    let o = [dry_shard(0), dry_shard(1), dry_shard(2), dry_shard(3)];
    let (d0, d1, d2, d3) = tokio::join!(
        gc(&stores[0], &o[0]),
        gc(&stores[1], &o[1]),
        gc(&stores[2], &o[2]),
        gc(&stores[3], &o[3]),
    );
    let mut alone = 0;
    for (i, d) in [d0, d1, d2, d3].iter().enumerate() {
        assert!(d.all_ok() && deleted(d).is_empty(), "shard {i}: {d:#?}");
        let plain = d.repositories.iter().all(|r| r.name.starts_with("r"));
        let Some(own) = d.repositories.iter().map(|r| r.name.clone()).min() else {
            continue;
        };
        if plain {
            let first = counted[i].first().unwrap_or_default();
            assert!(
                first >= own,
                "shard {i} listed {first}, before its slice ({own})"
            );
            alone += 1;
        }
    }
    assert!(alone >= 2, "most shards hold plain repositories only");
}

/// A store that remembers the first key its listings returned, ocigc's own state left out.
struct FirstListed {
    inner: Arc<dyn Store>,
    first: Arc<Mutex<Option<String>>>,
}

impl FirstListed {
    fn new(inner: Arc<dyn Store>) -> Wrapped<FirstListed> {
        Wrapped(FirstListed {
            inner,
            first: Arc::default(),
        })
    }

    fn first(&self) -> Option<String> {
        self.first.lock().expect("first key lock").clone()
    }
}

impl Intercept for FirstListed {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        let first = self.first.clone();
        self.inner
            .list_after(prefix, start_after)
            .inspect(move |page| {
                let Ok(page) = page else { return };
                let keys = page.iter().map(|o| &o.key);
                if let Some(k) = keys.filter(|k| !k.starts_with("_ocigc/")).min() {
                    let mut first = first.lock().expect("first key lock");
                    if first.as_ref().is_none_or(|f| k < f) {
                        *first = Some(k.clone());
                    }
                }
            })
            .boxed()
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.list_after(prefix, None)
    }
}

/// A bucket the incremental cache knows to be a few pages long is listed in one sequence:
/// parts would cost more requests (the plan's level listings, a partial page each) than
/// their round trips save. Without the cache the same run plans parts.
async fn a_small_bucket_the_cache_knows_is_listed_in_one_sequence(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    // Five keys each: some 1,250 keys, two pages.
    let names: Vec<String> = (0..250).map(|i| format!("r{i:03}/app")).collect();
    let images: Vec<(String, Desc)> = futures::stream::iter(names)
        .map(|name| {
            let f = &f;
            async move {
                let image = f.image(&name, "kept").await;
                f.layout(&name, &[(Some("v1"), &image)]).await;
                (name, image)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let first = gc(&t.store, &opts(8)).await;
    assert!(first.all_ok(), "{first:#?}");
    let listed = keys(t.store.as_ref()).await;
    let pages = listed.len().div_ceil(1000) as u64;
    assert!(pages >= 2, "more than a page: {}", listed.len());
    // No cache yet: planned in parts, more LISTs than the pages.
    assert!(
        list_requests(&first) > pages + 1,
        "first run: {} LIST requests for {pages} pages",
        list_requests(&first)
    );
    let again = gc(&t.store, &opts(8)).await;
    assert!(again.all_ok(), "{again:#?}");
    // ocigc's state (`_ocigc/`, the cache's entries) sorts before every repository: its
    // first page holds it, and the run lists the bucket's pages and nothing else.
    let whole = all_keys(t.store.as_ref()).await.len().div_ceil(1000) as u64;
    assert_eq!(
        list_requests(&again),
        whole,
        "the bucket's pages, the state's among them"
    );
    let uncached = gc(
        &t.store,
        &GcOptions {
            no_cache: true,
            ..opts(8)
        },
    )
    .await;
    assert!(list_requests(&uncached) > pages + 1);
    let after = keys(t.store.as_ref()).await;
    for (repo, image) in &images {
        assert_intact(&after, repo, image, "tagged");
    }
}

both_stores!(
    parts_and_shards_decide_what_one_listing_does,
    a_small_bucket_the_cache_knows_is_listed_in_one_sequence
);
