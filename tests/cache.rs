//! The persistent incremental cache (issue 12 item 3) on every store, and a marker primed from
//! it: no manifest GET, the same reachable set, and no shortcut around content that is gone.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use futures::TryStreamExt;
use ocigc::digest::Digest;
use ocigc::gc::cache::{self, CacheIndex, Contents, Fingerprint, IndexEntry, Summary};
use ocigc::gc::mark::{CachedDocument, ListedVersion, MarkContext, Marker};
use ocigc::layout::distribution::DistributionLayout;
use ocigc::layout::oci::OciLayout;
use ocigc::layout::{KeyKind, Layout, Repository, GLOBAL_REPOSITORY, STATE_PREFIX};
use ocigc::manifest::{Descriptor, References};
use ocigc::store::{Instrumented, ObjectMeta, PutCondition, Store};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn digest(n: u8) -> Digest {
    Digest::sha256_of(&[n])
}

fn contents() -> Contents {
    Contents {
        documents: vec![CachedDocument {
            digest: digest(1),
            listed: Some(ListedVersion {
                size: 321,
                last_modified: UNIX_EPOCH + Duration::new(1_700_000_000, 5),
                etag: Some("\"etag\"".into()),
            }),
            references: References {
                children: vec![
                    Descriptor {
                        media_type: Some(MANIFEST.into()),
                        digest: digest(2),
                        size: Some(42),
                    },
                    Descriptor {
                        media_type: None,
                        digest: digest(3),
                        size: None,
                    },
                ],
                ..References::default()
            },
        }],
        not_referrers: vec![digest(4)],
        links: vec![("other/_layers/x/link".into(), digest(5))],
    }
}

fn summary(n: u64) -> Summary {
    Summary {
        reachable_blobs: n,
        reachable_bytes: n * 100,
        pending_blobs: 1,
        pending_bytes: 7,
        other_keys: 2,
    }
}

async fn state_listing(store: &dyn Store) -> Vec<ObjectMeta> {
    let pages: Vec<Vec<ObjectMeta>> = store.list(STATE_PREFIX).try_collect().await.expect("list");
    pages.into_iter().flatten().collect()
}

async fn index_of(store: &dyn Store) -> CacheIndex {
    CacheIndex::from_listing(&state_listing(store).await)
}

async fn write_object(store: &dyn Store, key: &str) {
    let put = store.put(key, Bytes::from_static(b"x"), PutCondition::None);
    put.await.expect("put");
}

async fn write_entry(
    store: &dyn Store,
    unit: &str,
    fp: u8,
    contents: &Contents,
    previous: Option<&IndexEntry>,
) -> String {
    let wake = Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    cache::write(
        store,
        unit,
        &Fingerprint([fp; 32]),
        wake,
        true,
        &summary(u64::from(fp)),
        contents,
        previous,
    )
    .await
    .expect("write")
}

async fn written_entries_are_listed_and_read_back(t: TestStore) {
    let store = t.store.as_ref();
    let c = contents();
    for unit in ["app", "team/app", "team/app/tools"] {
        write_entry(store, unit, 1, &c, None).await;
    }
    let index = index_of(store).await;
    assert_eq!(index.len(), 3, "{}", t.kind);
    assert!(index.stale_keys().is_empty());
    for unit in ["app", "team/app", "team/app/tools"] {
        let e = index.entry(unit).expect("entry");
        assert_eq!(e.unit, unit);
        assert_eq!(e.fingerprint, Fingerprint([1; 32]));
        assert!(e.has_links);
        assert_eq!(e.summary, summary(1));
        assert_eq!(
            e.wake_at,
            Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        );
        assert_eq!(cache::read(store, e).await, Some(c.clone()), "{unit}");
    }
}

async fn a_new_fingerprint_replaces_the_old_entry(t: TestStore) {
    let store = t.store.as_ref();
    let first = write_entry(store, "app", 1, &contents(), None).await;
    let neighbour = write_entry(store, "app/tools", 1, &contents(), None).await;
    let index = index_of(store).await;
    let previous = index.entry("app").expect("entry").clone();
    assert_eq!(previous.key, first);

    // The same state again: nothing written, nothing deleted.
    let counted = Instrumented::new(t.store.clone(), 4, Duration::from_secs(30));
    let again = write_entry(&counted, "app", 1, &contents(), Some(&previous)).await;
    assert_eq!(again, first);
    assert_eq!(counted.counts().put + counted.counts().delete, 0);

    let second = write_entry(store, "app", 2, &Contents::default(), Some(&previous)).await;
    assert_ne!(second, first);
    // Superseded, and deleted at the run's end with the stale entries (never a neighbour's,
    // nor the entry just written).
    assert!(cache::superseded(&previous, "app", &second));
    assert!(!cache::superseded(&previous, "app", &first));
    assert!(!cache::superseded(&previous, "app/tools", &second));
    // (The run's index is the one it listed before it wrote: it has no stale keys here.)
    // Only cache keys: a key outside the cache that a bug put among them stays.
    let outside = "app/blobs/sha256/0000".to_string();
    write_object(store, &outside).await;
    let deleted = cache::delete_stale(store, &index, &[first.clone(), outside.clone()]).await;
    assert_eq!(deleted.expect("delete"), 1);
    assert!(all_keys(store).await.contains(&outside));
    let k = all_keys(store).await;
    assert!(!k.contains(&first), "{}: old entry left behind", t.kind);
    assert!(k.contains(&second) && k.contains(&neighbour));
    let index = index_of(store).await;
    let e = index.entry("app").expect("entry");
    assert_eq!(e.fingerprint, Fingerprint([2; 32]));
    assert_eq!(cache::read(store, e).await, Some(Contents::default()));
    assert!(index.stale_keys().is_empty());
}

async fn corrupt_or_foreign_objects_are_ignored(t: TestStore) {
    let store = t.store.as_ref();
    let key = write_entry(store, "app", 1, &contents(), None).await;
    let body = store.get(&key).await.expect("get").body;
    let entry = index_of(store).await.entry("app").expect("entry").clone();

    // One flipped byte in the middle.
    let mut bad = body.to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x20;
    store
        .put(&key, Bytes::from(bad), PutCondition::None)
        .await
        .expect("put");
    assert_eq!(cache::read(store, &entry).await, None, "{}", t.kind);

    // A valid body under another unit's key (copied, or a bug): not this unit's.
    store
        .put(
            &key,
            cache::encode("other", &entry.fingerprint, &contents()).into(),
            PutCondition::None,
        )
        .await
        .expect("put");
    assert_eq!(cache::read(store, &entry).await, None);

    // Gone between the listing and the read.
    store
        .delete_batch(std::slice::from_ref(&key))
        .await
        .expect("delete");
    assert_eq!(cache::read(store, &entry).await, None);
}

async fn stale_duplicates_are_reported_and_removed(t: TestStore) {
    let store = t.store.as_ref();
    let older = write_entry(store, "app", 1, &contents(), None).await;
    // A second writer that did not know the first (a crash before its delete, or a race).
    let newer = write_entry(store, "app", 2, &contents(), None).await;
    let malformed = format!("{}app/not-an-entry", cache::CACHE_PREFIX);
    let other_version = format!("{}v999/app/whatever", cache::CACHE_ROOT);
    for k in [&malformed, &other_version] {
        store
            .put(k, Bytes::from_static(b"x"), PutCondition::None)
            .await
            .expect("put");
    }
    let index = index_of(store).await;
    let stale: BTreeSet<String> = index.stale_keys().into_iter().collect();
    let winner = index.entry("app").expect("entry").key.clone();
    // Listings of some stores give seconds only: which one wins a tie is fixed, not the time.
    assert!(winner == older || winner == newer);
    let loser = if winner == older { &newer } else { &older };
    assert_eq!(
        stale,
        BTreeSet::from([loser.clone(), malformed.clone()]),
        "{}",
        t.kind
    );

    assert_eq!(
        cache::delete_stale(store, &index, &[])
            .await
            .expect("delete"),
        2
    );
    let k = all_keys(store).await;
    assert!(k.contains(&winner) && k.contains(&other_version));
    assert!(!k.contains(loser) && !k.contains(&malformed));
    assert!(index_of(store).await.stale_keys().is_empty());
}

both_stores!(
    written_entries_are_listed_and_read_back,
    a_new_fingerprint_replaces_the_old_entry,
    corrupt_or_foreign_objects_are_ignored,
    stale_duplicates_are_reported_and_removed,
);

/// The repository `name` of an OCI bucket, as the engine would see it.
async fn repository(store: &dyn Store, name: &str) -> Repository {
    unit(store, &OciLayout, name).await
}

/// The collection unit `name` (a repository, or the global unit) as `layout` partitions the
/// bucket.
async fn unit(store: &dyn Store, layout: &dyn Layout, name: &str) -> Repository {
    let pages: Vec<Vec<ObjectMeta>> = store.list("").try_collect().await.expect("list");
    let objects: Vec<ObjectMeta> = pages
        .into_iter()
        .flatten()
        .filter(|o| !o.key.starts_with(STATE_PREFIX))
        .collect();
    let partition = layout.partition(objects);
    partition
        .repositories
        .into_iter()
        .chain(partition.global)
        .find(|r| r.name == name)
        .expect("unit")
}

/// What one mark of `repo` found, and what it learnt.
struct Marked {
    reachable: HashSet<Digest>,
    manifests_fetched: u64,
    gets: u64,
    learned: Contents,
}

/// Marks `repo` through a counting store, primed with `cached` if given.
async fn mark(
    store: &Arc<dyn Store>,
    repo: &Repository,
    cached: Option<&Contents>,
) -> Result<Marked, String> {
    mark_with(store, &OciLayout, repo, cached).await
}

/// Marks `repo` of `layout` through a counting store, primed with `cached` if given.
async fn mark_with(
    store: &Arc<dyn Store>,
    layout: &dyn Layout,
    repo: &Repository,
    cached: Option<&Contents>,
) -> Result<Marked, String> {
    // Roots are the layout's business (index.json), not counted here.
    let roots = layout
        .read_roots(store.as_ref(), repo)
        .await
        .map_err(|e| e.to_string())?;
    let counted = Instrumented::new(store.clone(), 4, Duration::from_secs(30));
    let blobs: HashMap<Digest, &ObjectMeta> = repo
        .objects
        .iter()
        .filter_map(|o| match layout.classify(repo, &o.key) {
            KeyKind::Blob(d) => Some((d, o)),
            _ => None,
        })
        .collect();
    let placeholders = HashMap::new();
    let mut marker = Marker::new(MarkContext {
        store: &counted,
        layout,
        repo,
        blobs: &blobs,
        placeholders: &placeholders,
        concurrency: 4,
        listed_later: false,
    });
    if let Some(c) = cached {
        marker.prime_cached(c.documents.clone(), c.not_referrers.clone());
    }
    marker.prime(roots.documents);
    marker.mark(&roots.descriptors).await.map_err(|e| e.0)?;
    let learned = Contents::learned(&marker, Vec::new());
    Ok(Marked {
        reachable: marker.reachable.clone(),
        manifests_fetched: marker.manifests_fetched,
        gets: counted.counts().get,
        learned,
    })
}

fn parse(d: &Desc) -> Digest {
    Digest::parse(&d.digest).expect("digest")
}

/// An image index, a referrer only the scan finds, and garbage the scan reads.
async fn fixture(store: &dyn Store) -> (Desc, Desc, Desc) {
    let f = Fixture { store };
    let amd = f.image("app", "amd64").await;
    let arm = f.image("app", "arm64").await;
    let idx = f.index("app", OCI_INDEX, &[&amd, &arm]).await;
    let sig = f.referrer("app", &amd, "sig").await;
    let garbage = f.image("app", "old").await;
    f.layout("app", &[(Some("1.0"), &idx)]).await;
    (idx, sig, garbage)
}

#[tokio::test]
async fn a_primed_repository_is_marked_without_a_manifest_get() {
    let t = dir_store();
    let (idx, sig, garbage) = fixture(t.store.as_ref()).await;
    let repo = repository(t.store.as_ref(), "app").await;

    let cold = mark(&t.store, &repo, None).await.expect("cold mark");
    assert!(cold.gets > 0 && cold.manifests_fetched > 0);
    let expected: HashSet<Digest> = idx
        .subtree
        .iter()
        .chain(&sig.subtree)
        .map(|d| Digest::parse(d).expect("digest"))
        .collect();
    assert_eq!(cold.reachable, expected);
    // Every manifest read is cached (the garbage one too: it is still listed), and the scan's
    // verdicts on the garbage config and layer-sized blobs it read.
    let learned: HashSet<&Digest> = cold.learned.documents.iter().map(|d| &d.digest).collect();
    for d in [&idx, &sig, &garbage] {
        assert!(learned.contains(&parse(d)), "{} not learnt", d.digest);
    }
    assert!(!cold.learned.not_referrers.is_empty());

    // Through the store and back, as the next run would see it.
    let fp = Fingerprint([9; 32]);
    cache::write(
        t.store.as_ref(),
        "app",
        &fp,
        None,
        false,
        &Summary::default(),
        &cold.learned,
        None,
    )
    .await
    .expect("write");
    let index = index_of(t.store.as_ref()).await;
    let cached = cache::read(t.store.as_ref(), index.entry("app").expect("entry"))
        .await
        .expect("read");
    assert_eq!(cached, cold.learned);

    let warm = mark(&t.store, &repo, Some(&cached))
        .await
        .expect("warm mark");
    assert_eq!(warm.gets, 0, "a primed mark made GETs");
    assert_eq!(warm.manifests_fetched, 0);
    assert_eq!(warm.reachable, cold.reachable);
    assert_eq!(
        warm.learned, cold.learned,
        "what is learnt survives another run"
    );
}

#[tokio::test]
async fn a_cached_manifest_that_is_gone_fails_closed_like_a_read() {
    let t = dir_store();
    let (idx, _, _) = fixture(t.store.as_ref()).await;
    let repo = repository(t.store.as_ref(), "app").await;
    let cold = mark(&t.store, &repo, None).await.expect("cold mark");

    // The index is deleted behind the cache's back; its root still names it.
    t.store
        .delete_batch(&[blob_key("app", &idx.digest)])
        .await
        .expect("delete");
    let repo = repository(t.store.as_ref(), "app").await;
    let uncached = mark(&t.store, &repo, None).await;
    let primed = mark(&t.store, &repo, Some(&cold.learned)).await;
    let uncached = uncached.err().expect("uncached mark fails closed");
    let primed = primed.err().expect("primed mark fails closed too");
    assert_eq!(primed, uncached);
}

#[tokio::test]
async fn a_referrer_known_only_from_the_cache_is_still_found() {
    let t = dir_store();
    let (_, sig, _) = fixture(t.store.as_ref()).await;
    let repo = repository(t.store.as_ref(), "app").await;
    let cold = mark(&t.store, &repo, None).await.expect("cold mark");
    // The scan is skipped for everything cached: the referrer must come from the cached
    // document's subject, or its blobs would look like garbage.
    let warm = mark(&t.store, &repo, Some(&cold.learned))
        .await
        .expect("warm");
    for d in &sig.subtree {
        assert!(
            warm.reachable.contains(&Digest::parse(d).expect("digest")),
            "referrer blob {d} lost"
        );
    }
    assert_eq!(warm.gets, 0);
}

#[tokio::test]
async fn content_that_does_not_hash_to_its_digest_is_never_cached() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let good = f.image("app", "good").await;
    let honest = f.image("app", "honest").await;
    // The key of `claimed` holds other content (an upload in progress, a mount link).
    let claimed = f.image("app", "claimed").await;
    let other = f.image("app", "other").await;
    let other_body = t
        .store
        .get(&blob_key("app", &other.digest))
        .await
        .expect("get")
        .body;
    f.put(&blob_key("app", &claimed.digest), &other_body).await;
    f.layout(
        "app",
        &[
            (Some("a"), &good),
            (Some("b"), &claimed),
            (Some("c"), &honest),
        ],
    )
    .await;
    let repo = repository(t.store.as_ref(), "app").await;
    let cold = mark(&t.store, &repo, None).await.expect("mark");
    let learned: HashSet<Digest> = cold
        .learned
        .documents
        .iter()
        .map(|d| d.digest.clone())
        .collect();
    assert!(learned.contains(&parse(&good)) && learned.contains(&parse(&honest)));
    assert!(
        !learned.contains(&parse(&claimed)),
        "unverified document cached"
    );
    assert!(
        !cold.learned.not_referrers.contains(&parse(&claimed)),
        "unverified verdict cached"
    );

    // Primed, it is read again (the one GET), and marks the same.
    let warm = mark(&t.store, &repo, Some(&cold.learned))
        .await
        .expect("warm");
    assert_eq!(warm.manifests_fetched, 1);
    assert_eq!(warm.gets, 1);
    assert_eq!(warm.reachable, cold.reachable);
}

#[tokio::test]
async fn a_manifest_rewritten_behind_the_cache_is_read_again() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "img").await;
    let other = f.image("app", "other").await;
    f.layout("app", &[(Some("a"), &img)]).await;
    let repo = repository(t.store.as_ref(), "app").await;
    let cold = mark(&t.store, &repo, None).await.expect("cold");

    // The manifest's key now holds another manifest (not its digest's content): a read
    // follows what is there, and so must a primed mark.
    let body = t
        .store
        .get(&blob_key("app", &other.digest))
        .await
        .expect("get")
        .body;
    f.put(&blob_key("app", &img.digest), &body).await;
    let repo = repository(t.store.as_ref(), "app").await;
    let uncached = mark(&t.store, &repo, None).await.expect("uncached");
    let primed = mark(&t.store, &repo, Some(&cold.learned))
        .await
        .expect("primed");
    assert_eq!(primed.reachable, uncached.reachable);
    for d in &other.subtree[1..] {
        assert!(
            primed
                .reachable
                .contains(&Digest::parse(d).expect("digest")),
            "{d}: what the rewritten key references must be kept"
        );
    }
    assert!(
        primed.gets >= 1,
        "the rewritten manifest was not read again"
    );
}

#[tokio::test]
async fn distribution_units_primed_from_the_cache_make_no_get() {
    let t = dir_store();
    let writer: Arc<dyn Store> = Arc::new(common::dist::DistWriter::new(t.store.clone()));
    let f = Fixture {
        store: writer.as_ref(),
    };
    let amd = f.image("app", "amd64").await;
    let arm = f.image("app", "arm64").await;
    let idx = f.index("app", OCI_INDEX, &[&amd, &arm]).await;
    let old = f.image("app", "old").await;
    let dist = common::dist::DistWriter {
        inner: t.store.clone(),
    };
    dist.tag("app", "1.0", &idx).await;
    dist.untagged("app", &old).await;
    let layout = DistributionLayout {
        delete_untagged: true,
    };
    for name in ["app", GLOBAL_REPOSITORY] {
        let u = unit(t.store.as_ref(), &layout, name).await;
        let cold = mark_with(&t.store, &layout, &u, None).await.expect("cold");
        assert!(cold.gets > 0, "{name}");
        assert!(!cold.learned.documents.is_empty(), "{name}");
        let warm = mark_with(&t.store, &layout, &u, Some(&cold.learned))
            .await
            .expect("warm");
        assert_eq!(warm.gets, 0, "{name}: a primed mark made GETs");
        assert_eq!(warm.manifests_fetched, 0, "{name}");
        assert_eq!(warm.reachable, cold.reachable, "{name}");
        assert!(warm.reachable.contains(&parse(&idx)), "{name}");
    }
}
