//! The online safety protocol (SPEC §3), step by step, against a directory, moto and SeaweedFS:
//! two observations, re-check before each batch, verify after the sweep, intents and the batch
//! announcement handshake, leases.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::hooked::{Hooked, When};
use common::*;
use futures::FutureExt;
use ocigc::digest::Digest;
use ocigc::gc::intent::{self, ReuseError};
use ocigc::gc::lease::lease_key;
use ocigc::gc::state::pending_key;
use ocigc::gc::GcOptions;
use ocigc::report::{RepoReport, RepoStatus};
use ocigc::store::{PutCondition, Store};

const HOUR: Duration = Duration::from_secs(3600);

fn at(offset: Duration) -> GcOptions {
    GcOptions {
        delay: HOUR,
        clock_offset: offset,
        ..eager()
    }
}

fn digests(d: &Desc) -> Vec<Digest> {
    d.subtree.iter().filter_map(|s| Digest::parse(s)).collect()
}

async fn two_observations_an_hour_apart(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    let garbage = f.image("app", "garbage").await;
    f.layout("app", &[(Some("v1"), &img)]).await;

    // A dry run plans the same and writes no state.
    let dry = gc(
        &t.store,
        &GcOptions {
            dry_run: true,
            ..at(Duration::ZERO)
        },
    )
    .await;
    assert_eq!(repo_report(&dry, "app").pending.blobs, 3);
    assert!(!keys(t.store.as_ref()).await.contains(&pending_key("app")));

    let first = gc(&t.store, &at(Duration::ZERO)).await;
    assert!(repo_report(&first, "app").deleted.is_empty());
    assert!(
        keys(t.store.as_ref()).await.contains(&pending_key("app")),
        "state not persisted"
    );
    let early = gc(&t.store, &at(HOUR / 2)).await;
    assert!(
        repo_report(&early, "app").deleted.is_empty(),
        "deleted before --delay passed"
    );
    assert_intact(&keys(t.store.as_ref()).await, "app", &garbage, "half-way");

    let late = gc(&t.store, &at(HOUR + Duration::from_secs(60))).await;
    assert_eq!(repo_report(&late, "app").deleted.len(), 3);
    // The batch; the emptied pending state with the batch announcement, in one request; the
    // lease; the cache entry the run superseded.
    assert_eq!(late.requests.delete, 4, "{late:#?}");
    let k = keys(t.store.as_ref()).await;
    assert!(
        !k.iter().any(|k| k.starts_with("_ocigc/deleting/")),
        "announcement left: {k:?}"
    );
    assert_gone(&k, "app", &garbage, "after two observations");
    assert_intact(&k, "app", &img, "reachable");
    assert!(!k.contains(&pending_key("app")), "empty state not removed");
    assert!(
        !k.iter().any(|k| k.starts_with("_ocigc/leases/")),
        "lease not released"
    );
}

async fn referenced_again_starts_over(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    let g = f.image("app", "again").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    gc(&t.store, &at(Duration::ZERO)).await;
    // Tagged between observations: drops out of pending.
    f.layout("app", &[(Some("v1"), &img), (Some("again"), &g)])
        .await;
    let r = gc(&t.store, &at(HOUR * 2)).await;
    assert!(repo_report(&r, "app").deleted.is_empty());
    // Untagged again: the hour starts over from this observation.
    f.layout("app", &[(Some("v1"), &img)]).await;
    let r = gc(&t.store, &at(HOUR * 3)).await;
    assert!(
        repo_report(&r, "app").deleted.is_empty(),
        "first-seen time survived a reference"
    );
    let r = gc(&t.store, &at(HOUR * 4 + Duration::from_secs(60))).await;
    assert_eq!(repo_report(&r, "app").deleted.len(), 3);
    assert_gone(
        &keys(t.store.as_ref()).await,
        "app",
        &g,
        "after starting over",
    );
}

/// Repository `app` with a tagged image and an untagged one (garbage until tagged).
async fn tagged_and_untagged(t: &TestStore) -> (Desc, Desc) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    let g = f.image("app", "untagged").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    (img, g)
}

/// A pusher's action for a hook: tag `g` next to `img`.
fn tag_later(t: &TestStore, img: &Desc, g: &Desc) -> futures::future::BoxFuture<'static, ()> {
    let inner = t.store.clone();
    let (img, g) = (img.clone(), g.clone());
    async move {
        let f = Fixture {
            store: inner.as_ref(),
        };
        f.layout("app", &[(Some("v1"), &img), (Some("late"), &g)])
            .await;
    }
    .boxed()
}

async fn recheck_keeps_a_blob_tagged_before_the_batch(t: TestStore) {
    let (img, g) = tagged_and_untagged(&t).await;
    // A pusher tags the "garbage" image after the plan, just before the re-check.
    let push = tag_later(&t, &img, &g);
    let hooked = Arc::new(Hooked::new(
        t.store.clone(),
        When::BeforeHead("app/index.json"),
        push,
    ));
    let store: Arc<dyn Store> = hooked.clone();
    let report = gc(&store, &eager()).await;
    assert!(hooked.fired());
    let r = repo_report(&report, "app");
    assert_eq!(r.rescued, 3, "{r:#?}");
    assert!(r.deleted.is_empty());
    assert!(r.dangling_references.is_empty());
    assert_intact(
        &keys(t.store.as_ref()).await,
        "app",
        &g,
        "tagged before the batch",
    );
}

async fn verify_reports_a_reference_to_a_deleted_blob(t: TestStore) {
    let (img, g) = tagged_and_untagged(&t).await;
    // A (non-cooperating) pusher tags the image right after its blobs were deleted.
    let push = tag_later(&t, &img, &g);
    let store: Arc<dyn Store> = Arc::new(Hooked::new(
        t.store.clone(),
        When::AfterDelete("/blobs/"),
        push,
    ));
    let report = gc(&store, &eager()).await;
    let r = repo_report(&report, "app");
    assert_eq!(r.status, RepoStatus::Failed);
    let mut found: Vec<String> = r
        .dangling_references
        .iter()
        .map(|d| d.to_string())
        .collect();
    found.sort();
    let mut want = g.subtree.clone();
    want.sort();
    assert_eq!(found, want);
    assert_eq!(report.totals.dangling_references, 3);
    assert!(!report.all_ok());
}

/// A pusher that finds the blobs it wants deleted uploads them again and then tags: the image
/// is whole, so verify reports no dangling reference (only a warning), and the run is ok.
async fn verify_ignores_blobs_uploaded_again(t: TestStore) {
    let (img, g) = tagged_and_untagged(&t).await;
    let inner = t.store.clone();
    let (img2, g2) = (img.clone(), g.clone());
    let push = async move {
        let f = Fixture {
            store: inner.as_ref(),
        };
        let again = f.image("app", "untagged").await;
        assert_eq!(again.digest, g2.digest);
        f.layout("app", &[(Some("v1"), &img2), (Some("late"), &again)])
            .await;
    }
    .boxed();
    let store: Arc<dyn Store> = Arc::new(Hooked::new(
        t.store.clone(),
        When::AfterDelete("/blobs/"),
        push,
    ));
    let report = gc(&store, &eager()).await;
    let r = repo_report(&report, "app");
    assert_eq!(r.deleted.len(), 3, "{r:#?}");
    assert!(r.dangling_references.is_empty(), "{r:#?}");
    assert_eq!(r.status, RepoStatus::Ok, "{r:#?}");
    assert!(
        r.warnings.iter().any(|w| w.contains("uploaded again")),
        "{r:#?}"
    );
    assert_intact(&keys(t.store.as_ref()).await, "app", &g, "uploaded again");
    assert!(dangling(t.store.as_ref()).await.is_empty());
}

/// Runs `gc` with `after` done right after the first batch delete of `app`'s blobs.
async fn gc_then(t: &TestStore, after: futures::future::BoxFuture<'static, ()>) -> RepoReport {
    let store: Arc<dyn Store> = Arc::new(Hooked::new(
        t.store.clone(),
        When::AfterDelete("/blobs/"),
        after,
    ));
    let report = gc(&store, &eager()).await;
    repo_report(&report, "app").clone()
}

/// A cooperating pusher whose intent came after the batch's re-check waits for the batch,
/// then finds the blobs missing and uploads them: an intent naming a deleted blob is not a
/// dangling reference (this was the false alarm of the concurrency suite).
async fn verify_trusts_an_intent_to_upload_what_it_names(t: TestStore) {
    let (_, g) = tagged_and_untagged(&t).await;
    let inner = t.store.clone();
    let named: Vec<Digest> = digests(&g);
    let pusher = async move {
        intent::write_intent(inner.as_ref(), "app", &named, HOUR)
            .await
            .expect("intent");
    }
    .boxed();
    let r = gc_then(&t, pusher).await;
    assert_eq!(r.deleted.len(), 3, "{r:#?}");
    assert!(r.dangling_references.is_empty(), "{r:#?}");
    assert_eq!(r.status, RepoStatus::Ok, "{r:#?}");
    let warned = r
        .warnings
        .iter()
        .filter(|w| w.contains("named by a push intent"))
        .count();
    assert_eq!(warned, 3, "{r:#?}");
}

/// What an intent reaches only through a manifest it names is not covered by the pusher's
/// own look, and what a tag references is dangling whatever intents name.
async fn verify_reports_what_an_intent_does_not_name(t: TestStore) {
    let (img, g) = tagged_and_untagged(&t).await;
    let manifest = t
        .store
        .get(&blob_key("app", &g.digest))
        .await
        .expect("manifest")
        .body;
    let inner = t.store.clone();
    let only_manifest = vec![Digest::parse(&g.digest).expect("digest")];
    // The pusher names the manifest alone and uploads it again, not its config and layer.
    let pusher = async move {
        intent::write_intent(inner.as_ref(), "app", &only_manifest, HOUR)
            .await
            .expect("intent");
        let key = blob_key("app", &only_manifest[0].to_string());
        inner
            .put(&key, manifest, PutCondition::None)
            .await
            .expect("manifest again");
    }
    .boxed();
    let r = gc_then(&t, pusher).await;
    let config_and_layer = g.subtree.iter().filter(|d| **d != g.digest).cloned();
    assert_dangling(&r, config_and_layer.collect());

    // Tagged and named by an intent: the tag is a reference, the intent excuses nothing.
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let g = f.image("app", "second").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    let inner = t.store.clone();
    let named = digests(&g);
    let tag = tag_later(&t, &img, &g);
    let pusher = async move {
        intent::write_intent(inner.as_ref(), "app", &named, HOUR)
            .await
            .expect("intent");
        tag.await;
    }
    .boxed();
    let r = gc_then(&t, pusher).await;
    assert_dangling(&r, g.subtree.clone());
}

/// The repository failed with exactly `want` as its dangling references.
fn assert_dangling(r: &RepoReport, mut want: Vec<String>) {
    assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
    let mut found: Vec<String> = r
        .dangling_references
        .iter()
        .map(|d| d.to_string())
        .collect();
    found.sort();
    want.sort();
    assert_eq!(found, want, "{r:#?}");
}

/// A repository complete before the listing is waits with its deletions for the listing's
/// end, and its second look marks from what its first look read after its listing. A tag
/// written in between is not in that snapshot: the re-check before the batch must find it.
async fn tag_written_while_a_repository_waits_for_the_second_pass(t: TestStore) {
    let (img, g) = tagged_and_untagged(&t).await;
    let f = Fixture {
        store: t.store.as_ref(),
    };
    // A repository after `app`, so that `app` is complete before the listing ends.
    let other = f.image("zz", "v1").await;
    f.layout("zz", &[(Some("v1"), &other)]).await;
    // The second look reads nothing, so the tag lands just before the lease is taken: after
    // the snapshot the second look decides on, before the re-check.
    let hooked = Arc::new(Hooked::new(
        t.store.clone(),
        When::BeforePut("_ocigc/leases/"),
        tag_later(&t, &img, &g),
    ));
    let store: Arc<dyn Store> = hooked.clone();
    let report = gc(&store, &eager()).await;
    assert!(hooked.fired(), "no lease taken: {report:#?}");
    let r = repo_report(&report, "app");
    assert!(r.deleted.is_empty(), "{r:#?}");
    assert_eq!(r.rescued, 3, "{r:#?}");
    assert!(r.dangling_references.is_empty(), "{r:#?}");
    assert_intact(
        &keys(t.store.as_ref()).await,
        "app",
        &g,
        "tagged while waiting for the second pass",
    );
}

async fn intents_protect_until_they_expire(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    let g = f.image("app", "reused").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    let key = intent::write_intent(t.store.as_ref(), "app", &digests(&g)[..1], HOUR)
        .await
        .expect("intent");
    let r = gc(&t.store, &eager()).await;
    assert!(repo_report(&r, "app").deleted.is_empty(), "intent ignored");
    assert_intact(&keys(t.store.as_ref()).await, "app", &g, "under an intent");
    let later = GcOptions {
        clock_offset: HOUR * 2,
        ..eager()
    };
    let r = gc(&t.store, &later).await;
    assert_eq!(repo_report(&r, "app").deleted.len(), 3);
    let k = keys(t.store.as_ref()).await;
    assert!(!k.contains(&key), "expired intent not removed");
    assert_gone(&k, "app", &g, "after the intent expired");
}

/// ocigc's state (`_ocigc/`) sorts inside the key space, after repositories whose names
/// start with a digit. A run takes it from the listing's first page only where that page
/// holds all of it; where the page ends before the state, or inside it, the state is listed
/// on its own, and an intent that lies beyond the first page still protects its image.
async fn the_state_is_read_whole_wherever_the_first_page_ends(
    t: &TestStore,
    before_state: usize,
    other_intents: usize,
) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    let g = f.image("app", "reused").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    let early = f.image("0ld/app", "v1").await;
    f.layout("0ld/app", &[(Some("v1"), &early)]).await;
    // Unreferenced blobs of `0ld/app` until `before_state` keys sort before the state.
    let listed = all_keys(t.store.as_ref()).await;
    let now = listed.iter().filter(|k| k.as_str() < "_ocigc/").count();
    let filler: Vec<usize> = (now..before_state).collect();
    futures::stream::iter(filler)
        .for_each_concurrent(16, |i| {
            let f = &f;
            async move {
                f.blob(
                    "0ld/app",
                    "application/octet-stream",
                    format!("filler {i}").as_bytes(),
                )
                .await;
            }
        })
        .await;
    // Intents of another repository sort before `app`'s (`_ocigc/intents/aaa/…`).
    for _ in 0..other_intents {
        intent::write_intent(t.store.as_ref(), "aaa", &digests(&img)[..1], HOUR)
            .await
            .expect("intent");
    }
    intent::write_intent(t.store.as_ref(), "app", &digests(&g)[..1], HOUR)
        .await
        .expect("intent");
    let listed = all_keys(t.store.as_ref()).await;
    let position = listed
        .iter()
        .position(|k| k.starts_with("_ocigc/intents/app/"))
        .expect("the intent is listed");
    assert!(
        position >= 1000,
        "the intent lies beyond the first page: {position}"
    );
    let r = gc(&t.store, &eager()).await;
    assert!(r.all_ok(), "{r:#?}");
    let app = repo_report(&r, "app");
    assert!(app.deleted.is_empty(), "intent ignored: {app:#?}");
    // Known from the state as listed, not only from the re-check's last look.
    assert_eq!(app.rescued, 0, "{app:#?}");
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &g, "under an intent beyond the first page");
    assert_intact(&k, "0ld/app", &early, "tagged");
    assert_eq!(
        repo_report(&r, "0ld/app").deleted.len(),
        before_state - now,
        "the filler is garbage"
    );
}

async fn the_first_page_ends_before_the_state(t: TestStore) {
    the_state_is_read_whole_wherever_the_first_page_ends(&t, 1010, 0).await
}

async fn the_first_page_ends_inside_the_state(t: TestStore) {
    the_state_is_read_whole_wherever_the_first_page_ends(&t, 990, 19).await
}

async fn intent_written_during_the_sweep_is_honoured(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    let g = f.image("app", "reused").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    let inner = t.store.clone();
    let wanted = digests(&g)[..1].to_vec();
    let announce = async move {
        intent::write_intent(inner.as_ref(), "app", &wanted, HOUR)
            .await
            .expect("intent");
    };
    let store: Arc<dyn Store> = Arc::new(Hooked::new(
        t.store.clone(),
        When::BeforeList("_ocigc/intents/app/"),
        announce.boxed(),
    ));
    let r = gc(&store, &eager()).await;
    let rr = repo_report(&r, "app");
    assert_eq!(rr.rescued, 3, "{rr:#?}");
    assert_intact(
        &keys(t.store.as_ref()).await,
        "app",
        &g,
        "intent just before the batch",
    );
}

async fn reuse_waits_for_a_batch_in_flight(t: TestStore) {
    let s = t.store.as_ref();
    let d = Digest::parse(&sha256(b"layer")).expect("digest");
    let soon = std::time::SystemTime::now() + HOUR;
    intent::announce_deletion(s, "app", "run-1", &[&d], soon)
        .await
        .expect("announce");
    let err = intent::begin_reuse(
        s,
        "app",
        std::slice::from_ref(&d),
        HOUR,
        Duration::from_millis(300),
    )
    .await
    .expect_err("must wait while the digest is being deleted");
    assert!(matches!(err, ReuseError::Busy(..)), "{err}");
    // Other digests are not held up, nor is anything once the batch is done.
    let other = Digest::parse(&sha256(b"other")).expect("digest");
    intent::begin_reuse(s, "app", &[other], HOUR, Duration::ZERO)
        .await
        .expect("other digest");
    intent::clear_deletion(s, "app").await.expect("clear");
    intent::begin_reuse(s, "app", std::slice::from_ref(&d), HOUR, Duration::ZERO)
        .await
        .expect("after the batch");
    // The global sweep of shared blobs (distribution layout) holds up every repository.
    intent::announce_deletion(s, ocigc::layout::GLOBAL_REPOSITORY, "run-2", &[&d], soon)
        .await
        .expect("announce");
    let err = intent::begin_reuse(s, "app", std::slice::from_ref(&d), HOUR, Duration::ZERO)
        .await
        .expect_err("must wait while the global sweep deletes the digest");
    assert!(matches!(err, ReuseError::Busy(..)), "{err}");
    intent::clear_deletion(s, ocigc::layout::GLOBAL_REPOSITORY)
        .await
        .expect("clear");
    // An announcement whose writer died is stale after its expiry.
    let past = std::time::SystemTime::now() - HOUR;
    intent::announce_deletion(s, "app", "dead-run", &[&d], past)
        .await
        .expect("announce");
    intent::begin_reuse(s, "app", &[d], HOUR, Duration::ZERO)
        .await
        .expect("stale announcement");
}

async fn put_lease(store: &dyn Store, repo: &str, owner: &str, expires: std::time::SystemTime) {
    let body = serde_json::json!({
        "owner": owner, "repository": repo,
        "acquired_at": ocigc::report::timestamp(expires - HOUR),
        "expires_at": ocigc::report::timestamp(expires),
    });
    store
        .put(
            &lease_key(repo),
            Bytes::from(body.to_string()),
            PutCondition::None,
        )
        .await
        .expect("put lease");
}

async fn held_lease_skips_the_repository(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    let g = f.image("app", "garbage").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    put_lease(
        t.store.as_ref(),
        "app",
        "other-run",
        std::time::SystemTime::now() + HOUR,
    )
    .await;
    let r = gc(&t.store, &eager()).await;
    let rr = repo_report(&r, "app");
    assert_eq!(rr.status, RepoStatus::Skipped);
    assert!(rr.lease_conflict);
    assert!(rr.errors[0].contains("other-run"), "{:?}", rr.errors);
    assert_eq!(r.totals.lease_conflicts, 1);
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &g, "under another collector's lease");
    let lease = t.store.get(&lease_key("app")).await.expect("lease kept");
    assert!(String::from_utf8_lossy(&lease.body).contains("other-run"));
}

async fn expired_lease_is_taken_over(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    let g = f.image("app", "garbage").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    put_lease(
        t.store.as_ref(),
        "app",
        "crashed-run",
        std::time::SystemTime::now() - HOUR,
    )
    .await;
    let r = gc(&t.store, &eager()).await;
    assert_eq!(repo_report(&r, "app").status, RepoStatus::Ok);
    let k = keys(t.store.as_ref()).await;
    assert_gone(&k, "app", &g, "after taking the lease over");
    assert!(!k.contains(&lease_key("app")), "lease not released");
}

async fn lost_lease_stops_before_the_next_batch(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    let garbage: Vec<String> = (0..1003).map(|i| format!("orphan {i}")).collect();
    futures::stream::iter(garbage.iter())
        .for_each_concurrent(32, |g| {
            let f = &f;
            async move {
                f.blob("app", OCI_LAYER, g.as_bytes()).await;
            }
        })
        .await;
    // After the first batch, another collector takes the lease over (it expires at once: the
    // TTL is a millisecond, so every batch must renew it).
    let inner = t.store.clone();
    let steal = async move {
        put_lease(
            inner.as_ref(),
            "app",
            "thief",
            std::time::SystemTime::now() + HOUR,
        )
        .await;
    };
    let store: Arc<dyn Store> = Arc::new(Hooked::new(
        t.store.clone(),
        When::AfterDelete("/blobs/"),
        steal.boxed(),
    ));
    let opts = GcOptions {
        lease_ttl: Duration::from_millis(1),
        ..eager()
    };
    let r = gc(&store, &opts).await;
    let rr = repo_report(&r, "app");
    assert_eq!(rr.status, RepoStatus::Failed, "{:?}", rr.errors);
    assert_eq!(
        rr.deleted.len(),
        1000,
        "work went on after the lease was lost"
    );
    assert!(
        rr.errors.iter().any(|e| e.contains("taken over")),
        "{:?}",
        rr.errors
    );
    let left = keys(t.store.as_ref())
        .await
        .into_iter()
        .filter(|k| k.starts_with("app/blobs/"))
        .count();
    assert_eq!(
        left,
        3 + 3,
        "reachable image plus the garbage of the second batch"
    );
    let lease = t.store.get(&lease_key("app")).await.expect("thief's lease");
    assert!(
        String::from_utf8_lossy(&lease.body).contains("thief"),
        "thief's lease released"
    );
}

use futures::StreamExt;

both_stores!(
    two_observations_an_hour_apart,
    referenced_again_starts_over,
    recheck_keeps_a_blob_tagged_before_the_batch,
    verify_reports_a_reference_to_a_deleted_blob,
    verify_ignores_blobs_uploaded_again,
    verify_trusts_an_intent_to_upload_what_it_names,
    verify_reports_what_an_intent_does_not_name,
    tag_written_while_a_repository_waits_for_the_second_pass,
    intents_protect_until_they_expire,
    the_first_page_ends_before_the_state,
    the_first_page_ends_inside_the_state,
    intent_written_during_the_sweep_is_honoured,
    reuse_waits_for_a_batch_in_flight,
    held_lease_skips_the_repository,
    expired_lease_is_taken_over,
    lost_lease_stops_before_the_next_batch,
);
