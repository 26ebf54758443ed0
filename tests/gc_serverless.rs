//! GC scenarios for the `serverless-registry` layout (SPEC §2), each against the directory
//! store and moto S3: tags and digests as roots, untagged manifests only on request, referrers
//! by content and by key, cross-repository mounts, temp objects of uploads, nested and
//! colliding repositories, whole-repository deletion, fail-closed, dry run = real run, and the
//! registry's own GC/push protocol (`gc/marker`, `insertion/…`).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::hooked::{Hooked, When};
use common::serverless::*;
use common::wrap::{Intercept, Wrapped};
use common::*;
use ocigc::gc::{delete_repositories, run_gc, DeleteRepoOptions, GcOptions};
use ocigc::layout::{by_name, LayoutOptions, GLOBAL_REPOSITORY};
use ocigc::report::{RepoStatus, Report};
use ocigc::store::{Metadata, Op, PutCondition, PutOutcome, Store, StoreError, StoreResult};

async fn srgc(store: &Arc<dyn Store>, opts: &GcOptions, delete_untagged: bool) -> Report {
    let layout = by_name("serverless-registry", LayoutOptions { delete_untagged })
        .expect("serverless-registry layout");
    run_gc(store.clone(), layout, opts).await.expect("gc run")
}

/// Keys of every part of `desc` in `repo`: manifests under `manifests/`, the rest as blobs.
fn sr_keys(k: &BTreeSet<String>, repo: &str, desc: &Desc) -> Vec<(String, bool)> {
    desc.subtree
        .iter()
        .map(|d| {
            let m = sr_manifest(repo, d);
            let key = if k.contains(&m) { m } else { sr_blob(repo, d) };
            let present = k.contains(&key);
            (key, present)
        })
        .collect()
}

fn assert_all(k: &BTreeSet<String>, repo: &str, desc: &Desc, present: bool, what: &str) {
    for (key, there) in sr_keys(k, repo, desc) {
        assert_eq!(there, present, "{what}: {key}");
    }
}

const OPEN: &str = "0f0e0d0c-0b0a-4909-8807-060504030201";
const STALE: &str = "1f0e0d0c-0b0a-4909-8807-060504030201";

async fn tags_and_digests_are_roots(t: TestStore) {
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let amd = f.image("a", "amd64").await;
    let arm = f.image("a", "arm64").await;
    let idx = f.index("a", OCI_INDEX, &[&amd, &arm]).await;
    w.tag("a", "1.0", &idx).await;
    let untagged = f.image("a", "pushed by digest").await;
    let garbage = f.blob("a", OCI_LAYER, b"uploaded, never used").await;
    // A live pusher's `insertion/<uuid>` would hold the sweep off (see
    // `fresh_insertion_marker_holds_the_repository_off`); the stamps are never swept.
    let markers = [
        "a/gc/last_update".to_string(),
        "a/insertion/last_update".to_string(),
    ];
    for m in &markers {
        f.put(m, b"").await;
    }
    let report = srgc(&t.store, &eager(), false).await;
    let k = keys(t.store.as_ref()).await;
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
    assert_all(&k, "a", &idx, true, "multi-arch index");
    assert_all(&k, "a", &untagged, true, "untagged manifest is a root");
    assert_eq!(
        all_deleted_keys(&report),
        BTreeSet::from([sr_blob("a", &garbage.digest)]),
        "{}",
        t.kind
    );
    for m in &markers {
        assert!(k.contains(m), "registry marker {m}");
    }
    let a = repo_report(&report, "a");
    assert_eq!(a.status, RepoStatus::Ok);
    // The tag is read at the start and again by the verify pass; its copy stands in for the
    // index, so only the index's two children and the untagged manifest are read besides.
    assert_eq!(a.manifests_fetched, 2 + 2 + 1, "{a:#?}");
}

async fn untagged_manifests_only_on_request(t: TestStore) {
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let img = f.image("a", "v1").await;
    w.tag("a", "v1", &img).await;
    let c1 = f.image("a", "child 1").await;
    let c2 = f.image("a", "child 2").await;
    let idx = f.index("a", OCI_INDEX, &[&c1, &c2]).await;
    w.tag("a", "multi", &idx).await;
    let sig = f.referrer("a", &img, "by subject").await;
    // A referrer that only the `_referrers/` record ties to its subject.
    let cfg = f.blob("a", OCI_CONFIG, b"{\"sbom\":1}").await;
    let payload = f.blob("a", OCI_LAYER, b"sbom payload").await;
    let sbom = f.manifest("a", &cfg, &[&payload], None).await;
    w.referrer_link("a", &img, &sbom).await;
    let old = f.image("a", "old").await;
    let old_sig = f.referrer("a", &old, "of old").await;
    let older = f.image("a", "older").await;
    w.tag("a", "moving", &older).await;
    let newer = f.image("a", "newer").await;
    w.tag("a", "moving", &newer).await;

    let kept = srgc(&t.store, &eager(), false).await;
    assert!(all_deleted_keys(&kept).is_empty(), "{kept:#?}");

    let report = srgc(&t.store, &eager(), true).await;
    let k = keys(t.store.as_ref()).await;
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
    for (d, what) in [
        (&img, "tagged"),
        (&idx, "index children"),
        (&sig, "referrer by subject"),
        (&sbom, "referrer by record"),
        (&newer, "moved tag"),
    ] {
        assert_all(&k, "a", d, true, what);
    }
    for (d, what) in [(&old, "untagged"), (&older, "tag moved away")] {
        assert_all(&k, "a", d, false, what);
    }
    assert!(!k.contains(&sr_manifest("a", &old_sig.digest)));
    assert!(
        !k.contains(&sr_blob("a", &old_sig.subtree[2])),
        "its payload"
    );
    assert_eq!(repo_report(&report, "a").status, RepoStatus::Ok);
}

async fn mounts_nested_repositories_and_delete_repo(t: TestStore) {
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let mut own = Vec::new();
    for repo in NEIGHBOURS {
        let img = f.image(repo, repo).await;
        w.tag(repo, "latest", &img).await;
        own.push((repo, img));
    }
    // `team/app/tools` mounted a layer of `team/app` that no manifest of `team/app` uses.
    let base = f.blob("team/app", OCI_LAYER, b"mounted base layer").await;
    w.mount("team/app", "team/app/tools", &base.digest).await;
    let cfg = f
        .blob("team/app/tools", OCI_CONFIG, b"{\"mounted\":1}")
        .await;
    let mounted = f.manifest("team/app/tools", &cfg, &[&base], None).await;
    w.tag("team/app/tools", "mounted", &mounted).await;
    let target = sr_blob("team/app", &base.digest);
    let link = sr_blob("team/app/tools", &base.digest);

    let report = srgc(&t.store, &eager(), false).await;
    assert!(all_deleted_keys(&report).is_empty(), "{report:#?}");
    let k = keys(t.store.as_ref()).await;
    assert!(k.contains(&target) && k.contains(&link));
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());

    let before = keys(t.store.as_ref()).await;
    let opts = DeleteRepoOptions {
        dry_run: false,
        concurrency: 8,
        request_timeout: Duration::from_secs(60),
        lease_ttl: Duration::from_secs(600),
        clock_offset: Duration::ZERO,
        metrics: None,
        rate_limit: None,
    };
    let layout = by_name("serverless-registry", LayoutOptions::default()).expect("layout");
    let del = delete_repositories(t.store.clone(), layout, &["team/app".into()], &opts)
        .await
        .expect("delete-repo");
    let r = &del.repositories[0];
    assert_eq!(r.status, RepoStatus::Ok, "{r:#?}");
    assert!(
        r.warnings.iter().any(|w| w.contains("1 blobs kept")),
        "{r:#?}"
    );
    let k = keys(t.store.as_ref()).await;
    let removed: BTreeSet<_> = before.difference(&k).cloned().collect();
    let app_keys: BTreeSet<String> = before
        .iter()
        .filter(|k| k.starts_with("team/app/") && !k.starts_with("team/app/tools/"))
        .cloned()
        .collect();
    assert_eq!(
        removed,
        &app_keys - &BTreeSet::from([target.clone()]),
        "only team/app, and not its linked blob"
    );
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());

    // Once the mounting image is gone, its link goes, and the run after that frees the target.
    t.store
        .delete_batch(&[
            sr_manifest("team/app/tools", "mounted"),
            sr_manifest("team/app/tools", &mounted.digest),
        ])
        .await
        .expect("untag");
    let first = srgc(&t.store, &eager(), false).await;
    assert!(all_deleted_keys(&first).contains(&link));
    assert!(keys(t.store.as_ref()).await.contains(&target));
    let second = srgc(&t.store, &eager(), false).await;
    assert_eq!(all_deleted_keys(&second), BTreeSet::from([target.clone()]));
    let k = keys(t.store.as_ref()).await;
    for (repo, img) in &own {
        if *repo != "team/app" {
            assert_all(&k, repo, img, true, repo);
        }
    }
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
}

async fn temp_objects_of_uploads(t: TestStore) {
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let img = f.image("a", "v1").await;
    w.tag("a", "v1", &img).await;
    for key in [
        OPEN.to_string(),
        format!("{OPEN}-helper"),
        format!("a/uploads/{OPEN}"),
        STALE.to_string(),
        format!("{STALE}-helper"),
        "not-an-upload".to_string(),
    ] {
        f.put(&key, b"chunk").await;
    }
    let before = keys(t.store.as_ref()).await;
    let young = GcOptions {
        grace: Duration::from_secs(3600),
        ..eager()
    };
    assert!(all_deleted_keys(&srgc(&t.store, &young, false).await).is_empty());
    assert_eq!(keys(t.store.as_ref()).await, before, "grace");

    let report = srgc(&t.store, &eager(), false).await;
    assert_eq!(
        all_deleted_keys(&report),
        BTreeSet::from([
            STALE.to_string(),
            format!("{STALE}-helper"),
            format!("a/uploads/{OPEN}"),
        ]),
        "{report:#?}"
    );
    assert_eq!(
        repo_report(&report, GLOBAL_REPOSITORY).status,
        RepoStatus::Ok
    );
    // The upload's state was there when the bucket was listed; the next run frees its parts.
    let next = srgc(&t.store, &eager(), false).await;
    assert_eq!(
        all_deleted_keys(&next),
        BTreeSet::from([OPEN.to_string(), format!("{OPEN}-helper")])
    );
    assert!(keys(t.store.as_ref()).await.contains("not-an-upload"));
}

async fn broken_repositories_fail_closed(t: TestStore) {
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    for repo in ["a", "b", "c"] {
        let img = f.image(repo, "v1").await;
        w.tag(repo, "v1", &img).await;
        f.blob(repo, OCI_LAYER, format!("garbage of {repo}").as_bytes())
            .await;
    }
    f.put("a/manifests/bad", b"not json").await;
    let child = f.image("c", "child").await;
    let idx = f.index("c", OCI_INDEX, &[&child]).await;
    w.tag("c", "multi", &idx).await;
    t.store
        .delete_batch(&[sr_manifest("c", &child.digest)])
        .await
        .expect("delete child");
    let report = srgc(&t.store, &eager(), true).await;
    for repo in ["a", "c"] {
        let r = repo_report(&report, repo);
        assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
        assert!(r.deleted.is_empty());
    }
    assert!(repo_report(&report, "a")
        .errors
        .iter()
        .any(|e| e.contains("a/manifests/bad")));
    let b = repo_report(&report, "b");
    assert_eq!((b.status, b.deleted.len()), (RepoStatus::Ok, 1));
}

async fn dry_run_lists_exactly_what_the_real_run_deletes(t: TestStore) {
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    for repo in ["a", "b/c"] {
        let img = f.image(repo, "v1").await;
        w.tag(repo, "v1", &img).await;
        f.image(repo, "untagged").await;
        f.blob(repo, OCI_LAYER, b"lonely layer").await;
    }
    f.put(STALE, b"chunk").await;
    let store = &t.store;
    let removed = dry_run_equals_real(
        store.as_ref(),
        |o| async move { srgc(store, &o, true).await },
    )
    .await;
    // Per repository: the untagged manifest, its config and layer, the lonely layer; and
    // the stale temp object.
    assert_eq!(removed.len(), 2 * 4 + 1, "{removed:#?}");
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
    assert!(all_deleted_keys(&srgc(&t.store, &eager(), true).await).is_empty());
}

/// A pusher writes an image's manifest and tag after the plan, just before the first delete
/// batch: the re-check (a LIST of `manifests/`) must see it and keep every blob of the image.
async fn recheck_keeps_an_image_pushed_during_the_run(t: TestStore) {
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let img = f.image("a", "v1").await;
    w.tag("a", "v1", &img).await;
    // The pusher has uploaded the blobs; its manifest lands later.
    let pushed = f.image("a", "pushed during the run").await;
    let key = sr_manifest("a", &pushed.digest);
    let body = t.store.get(&key).await.expect("manifest").body;
    t.store
        .delete_batch(std::slice::from_ref(&key))
        .await
        .expect("delete");
    let push = {
        let store = t.store.clone();
        Box::pin(async move {
            for k in [key, sr_manifest("a", "new")] {
                store
                    .put(&k, body.clone(), ocigc::store::PutCondition::None)
                    .await
                    .expect("push");
            }
        })
    };
    let hooked = Arc::new(Hooked::new(
        t.store.clone(),
        When::BeforeNthList("a/manifests/", 2),
        push,
    ));
    let store: Arc<dyn Store> = hooked.clone();
    let report = srgc(&store, &eager(), false).await;
    assert!(hooked.fired());
    let a = repo_report(&report, "a");
    assert_eq!(a.rescued, 2, "{a:#?}");
    assert!(a.deleted.is_empty(), "{a:#?}");
    assert_all(&keys(t.store.as_ref()).await, "a", &pushed, true, "pushed");
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
}

/// Repositories `a` and `b`, each with a tagged image and one garbage layer; returns the keys
/// of the garbage layers.
async fn two_repositories_with_garbage(store: &Arc<dyn Store>) -> [String; 2] {
    let w = SrWriter::new(store.clone());
    let f = Fixture { store: &w };
    let mut garbage = Vec::new();
    for repo in ["a", "b"] {
        let img = f.image(repo, "v1").await;
        w.tag(repo, "v1", &img).await;
        let g = f
            .blob(repo, OCI_LAYER, format!("garbage of {repo}").as_bytes())
            .await;
        garbage.push(sr_blob(repo, &g.digest));
    }
    [garbage[0].clone(), garbage[1].clone()]
}

/// What the registry's pusher writes to `insertion/last_update` (and the GC to
/// `gc/last_update`): an empty object stamped `<ms>-<uuid>`.
async fn stamp(store: &dyn Store, key: &str, value: &str) {
    let metadata = Metadata::from([("timestamp".to_string(), value.to_string())]);
    store
        .put_with_metadata(key, bytes::Bytes::new(), PutCondition::None, metadata)
        .await
        .unwrap_or_else(|e| panic!("stamp {key}: {e}"));
}

fn is_registry_stamp(v: &str) -> bool {
    let Some((ms, id)) = v.split_once('-') else {
        return false;
    };
    ms.len() == 13
        && ms.bytes().all(|b| b.is_ascii_digit())
        && uuid::Uuid::parse_str(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

/// A pusher's `insertion/<uuid>` younger than 60 s holds the repository's sweep off: nothing
/// is deleted there, it is reported skipped with the marker named, other repositories go on,
/// the announcement is withdrawn, and once the push is over the next run deletes the garbage.
async fn fresh_insertion_marker_holds_the_repository_off(t: TestStore) {
    let [ga, gb] = two_repositories_with_garbage(&t.store).await;
    let marker = format!("a/insertion/{OPEN}");
    Fixture {
        store: t.store.as_ref(),
    }
    .put(&marker, OPEN.as_bytes())
    .await;
    let report = srgc(&t.store, &eager(), false).await;
    let a = repo_report(&report, "a");
    assert_eq!(a.status, RepoStatus::Skipped, "{a:#?}");
    assert!(a.deleted.is_empty(), "{a:#?}");
    assert!(
        a.errors
            .iter()
            .any(|e| e.contains(&marker) && e.contains("push is in progress")),
        "{a:#?}"
    );
    assert!(!report.all_ok(), "exit 3");
    assert_eq!(deleted_keys(&report, "b"), BTreeSet::from([gb.clone()]));
    let k = keys(t.store.as_ref()).await;
    assert!(k.contains(&ga) && k.contains(&marker), "{k:#?}");
    assert!(!k.contains("a/gc/marker"), "announcement withdrawn");
    assert!(k.contains("a/gc/last_update"));

    // The pusher is done (`cleanInsertion`: stamp, then remove its marker).
    stamp(t.store.as_ref(), "a/insertion/last_update", "1-done").await;
    t.store
        .delete_batch(std::slice::from_ref(&marker))
        .await
        .expect("remove marker");
    let next = srgc(&t.store, &eager(), false).await;
    assert_eq!(deleted_keys(&next, "a"), BTreeSet::from([ga]), "{next:#?}");
    assert!(next.all_ok());
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
}

/// A marker older than 60 s is a dead pusher's: the registry's GC removes it and deletes, and
/// so does ocigc. Keys under `insertion/` that are not direct children (a repository nested
/// as `a/insertion`) and keys of a neighbour `a/insertion-x` are not markers.
async fn stale_insertion_marker_is_removed_and_deletes_go_ahead(t: TestStore) {
    let [ga, _] = two_repositories_with_garbage(&t.store).await;
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let mut neighbours = Vec::new();
    for repo in ["a/insertion", "a/insertion-x"] {
        let img = f.image(repo, repo).await;
        w.tag(repo, "v1", &img).await;
        neighbours.push((repo, img));
    }
    let marker = format!("a/insertion/{STALE}");
    f.put(&marker, STALE.as_bytes()).await;
    f.put("a/insertion/notes", b"not a pusher's").await;
    // Two minutes on: the marker is older than 60 s by the bucket clock.
    let later = GcOptions {
        clock_offset: Duration::from_secs(120),
        ..eager()
    };
    let report = srgc(&t.store, &later, false).await;
    let a = repo_report(&report, "a");
    assert_eq!(a.status, RepoStatus::Ok, "{a:#?}");
    assert_eq!(deleted_keys(&report, "a"), BTreeSet::from([ga]));
    let k = keys(t.store.as_ref()).await;
    assert!(!k.contains(&marker), "stale marker removed: {k:#?}");
    assert!(
        k.contains("a/insertion/notes"),
        "only UUID markers are removed"
    );
    for (repo, img) in &neighbours {
        assert_all(&k, repo, img, true, repo);
    }
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
}

/// A push that starts and ends between ocigc's announcement and its batch leaves no marker,
/// only a new `insertion/last_update` stamp: the batch is refused.
async fn insertion_stamp_changed_by_a_push_refuses_the_batch(t: TestStore) {
    let [ga, gb] = two_repositories_with_garbage(&t.store).await;
    stamp(
        t.store.as_ref(),
        "a/insertion/last_update",
        "1700000000000-before",
    )
    .await;
    let push = {
        let store = t.store.clone();
        Box::pin(async move {
            stamp(
                store.as_ref(),
                "a/insertion/last_update",
                "1700000000001-during",
            )
            .await;
        })
    };
    let hooked = Arc::new(Hooked::new(
        t.store.clone(),
        When::BeforeList("a/insertion/"),
        push,
    ));
    let store: Arc<dyn Store> = hooked.clone();
    let report = srgc(&store, &eager(), false).await;
    assert!(hooked.fired());
    let a = repo_report(&report, "a");
    assert_eq!(a.status, RepoStatus::Skipped, "{a:#?}");
    assert!(a.deleted.is_empty(), "{a:#?}");
    assert!(
        a.errors
            .iter()
            .any(|e| e.contains("a/insertion/last_update changed")),
        "{a:#?}"
    );
    assert_eq!(deleted_keys(&report, "b"), BTreeSet::from([gb]));
    let k = keys(t.store.as_ref()).await;
    assert!(k.contains(&ga) && !k.contains("a/gc/marker"), "{k:#?}");
}

/// The order of writes: `gc/marker`, then a `gc/last_update` stamp, before the first delete;
/// after the last delete a new stamp, then the marker removed — as the registry's GC does.
async fn gc_marker_and_stamps_surround_the_deletes(t: TestStore) {
    let [ga, gb] = two_repositories_with_garbage(&t.store).await;
    let rec = Arc::new(Recorder::new(t.store.clone()));
    let store: Arc<dyn Store> = rec.clone();
    let report = srgc(&store, &eager(), false).await;
    assert!(report.all_ok(), "{report:#?}");
    assert_eq!(all_deleted_keys(&report), BTreeSet::from([ga.clone(), gb]));
    let writes = rec.writes();
    let put = |key: &str| {
        writes
            .iter()
            .enumerate()
            .filter(|(_, w)| matches!(w, Write::Put { key: k, .. } if k == key))
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    let deleted = |key: &str| {
        writes
            .iter()
            .position(|w| matches!(w, Write::Delete { key: k } if k == key))
            .unwrap_or_else(|| panic!("{key} not deleted: {writes:#?}"))
    };
    let stamp_of = |i: usize| match &writes[i] {
        Write::Put { metadata, .. } => metadata.get("timestamp").cloned().unwrap_or_default(),
        Write::Delete { .. } => String::new(),
    };
    let marker = put("a/gc/marker");
    let stamps = put("a/gc/last_update");
    assert_eq!((marker.len(), stamps.len()), (1, 2), "{writes:#?}");
    let blob = deleted(&ga);
    let unmark = deleted("a/gc/marker");
    assert!(
        marker[0] < stamps[0] && stamps[0] < blob && blob < stamps[1] && stamps[1] < unmark,
        "{writes:#?}"
    );
    let (first, last) = (stamp_of(stamps[0]), stamp_of(stamps[1]));
    assert!(
        is_registry_stamp(&first) && is_registry_stamp(&last),
        "{writes:#?}"
    );
    assert_ne!(first, last);
    // Milliseconds on the bucket clock.
    let ms: u128 = first.split('-').next().unwrap_or("").parse().expect("ms");
    let now = t
        .store
        .server_time()
        .await
        .expect("time")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis();
    assert!(ms <= now + 5_000 && ms + 600_000 >= now, "{ms} vs {now}");
    // The stamp reached the store as user metadata, where pushers read it.
    let (_, meta) = t
        .store
        .head_with_metadata("a/gc/last_update")
        .await
        .expect("head")
        .expect("stamp stored");
    assert_eq!(meta.get("timestamp"), Some(&last));
    assert!(!keys(t.store.as_ref()).await.contains("a/gc/marker"));
}

/// A dry run takes no part: it writes nothing at all; the real run after it does.
async fn dry_run_takes_no_part_in_the_protocol(t: TestStore) {
    two_repositories_with_garbage(&t.store).await;
    let rec = Arc::new(Recorder::new(t.store.clone()));
    let store: Arc<dyn Store> = rec.clone();
    let dry = srgc(
        &store,
        &GcOptions {
            dry_run: true,
            ..eager()
        },
        false,
    )
    .await;
    assert_eq!(all_deleted_keys(&dry).len(), 2, "{dry:#?}");
    assert_eq!(rec.writes(), Vec::new());
    srgc(&store, &eager(), false).await;
    let announced = |w: &Write| matches!(w, Write::Put { key, .. } if key.ends_with("/gc/marker"));
    assert_eq!(rec.writes().iter().filter(|w| announced(w)).count(), 2);
}

/// Fails the n-th PUT of one key, as a store that errs at that instant.
struct FailNthPut {
    inner: Arc<dyn Store>,
    key: &'static str,
    n: usize,
    seen: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Intercept for FailNthPut {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    async fn put_with_metadata(
        &self,
        key: &str,
        body: bytes::Bytes,
        cond: PutCondition,
        meta: Metadata,
    ) -> StoreResult<PutOutcome> {
        if key == self.key && 1 + self.seen.fetch_add(1, Ordering::SeqCst) == self.n {
            return Err(StoreError::Request {
                op: Op::Put,
                key: key.to_string(),
                message: "injected failure".into(),
            });
        }
        self.inner.put_with_metadata(key, body, cond, meta).await
    }
}

/// When the announcement cannot be withdrawn the registry refuses pushes to the repository:
/// that fails it (exit 3, reason in the report) even when a push had already put it off.
async fn announcement_not_withdrawn_fails_the_repository(t: TestStore) {
    let [ga, _] = two_repositories_with_garbage(&t.store).await;
    let marker = format!("a/insertion/{OPEN}");
    Fixture {
        store: t.store.as_ref(),
    }
    .put(&marker, OPEN.as_bytes())
    .await;
    let store: Arc<dyn Store> = Arc::new(Wrapped(FailNthPut {
        inner: t.store.clone(),
        key: "a/gc/last_update",
        n: 2,
        seen: Default::default(),
    }));
    let report = srgc(&store, &eager(), false).await;
    let a = repo_report(&report, "a");
    assert_eq!(a.status, RepoStatus::Failed, "{a:#?}");
    assert!(a.deleted.is_empty(), "{a:#?}");
    assert!(
        a.errors.iter().any(|e| e.contains("pushes fail until")),
        "{a:#?}"
    );
    let k = keys(t.store.as_ref()).await;
    assert!(k.contains(&ga) && k.contains("a/gc/marker"), "{k:#?}");
}

/// A collector that died between announcing its collection and withdrawing it leaves the
/// registry's `gc/marker`, and the registry's pushers refuse manifests while it stands. The
/// run that takes over the dead collector's expired lease withdraws it (stamping
/// `gc/last_update` first), but only a marker that collector wrote: a marker of anyone else
/// (the registry's own GC) stays.
async fn marker_of_a_dead_collector_is_withdrawn(t: TestStore) {
    two_repositories_with_garbage(&t.store).await;
    // c has nothing to delete: only the leftover lease brings the run there.
    let w = SrWriter::new(t.store.clone());
    let img = Fixture { store: &w }.image("c", "v1").await;
    w.tag("c", "v1", &img).await;
    let dead = uuid::Uuid::new_v4().to_string();
    let registry_gc = uuid::Uuid::new_v4().to_string();
    let expired = t.store.server_time().await.expect("time") - Duration::from_secs(3600);
    for (repo, owner, marker) in [("a", &dead, &dead), ("c", &dead, &registry_gc)] {
        let lease = serde_json::json!({
            "owner": owner, "repository": repo,
            "acquired_at": ocigc::report::timestamp(expired - Duration::from_secs(600)),
            "expires_at": ocigc::report::timestamp(expired),
        });
        t.store
            .put(
                &format!("_ocigc/leases/{repo}.json"),
                bytes::Bytes::from(lease.to_string()),
                PutCondition::None,
            )
            .await
            .expect("lease");
        t.store
            .put(
                &format!("{repo}/gc/marker"),
                bytes::Bytes::from(marker.to_string()),
                PutCondition::None,
            )
            .await
            .expect("marker");
    }
    // A dry run takes over nothing.
    srgc(
        &t.store,
        &GcOptions {
            dry_run: true,
            ..eager()
        },
        false,
    )
    .await;
    assert!(keys(t.store.as_ref()).await.contains("a/gc/marker"));
    let report = srgc(&t.store, &eager(), false).await;
    let after = keys(t.store.as_ref()).await;
    assert!(
        !after.contains("a/gc/marker"),
        "the dead run's marker stays"
    );
    let a = repo_report(&report, "a");
    assert!(a.warnings.iter().any(|w| w.contains(&dead)), "{a:#?}");
    let (_, meta) = t
        .store
        .head_with_metadata("a/gc/last_update")
        .await
        .expect("head")
        .expect("stamped");
    assert!(meta.get("timestamp").is_some_and(|v| is_registry_stamp(v)));
    let body = t.store.get("c/gc/marker").await.expect("c's marker stays");
    assert_eq!(body.body.as_ref(), registry_gc.as_bytes());
}

both_stores!(
    marker_of_a_dead_collector_is_withdrawn,
    announcement_not_withdrawn_fails_the_repository,
    fresh_insertion_marker_holds_the_repository_off,
    stale_insertion_marker_is_removed_and_deletes_go_ahead,
    insertion_stamp_changed_by_a_push_refuses_the_batch,
    gc_marker_and_stamps_surround_the_deletes,
    dry_run_takes_no_part_in_the_protocol,
    recheck_keeps_an_image_pushed_during_the_run,
    tags_and_digests_are_roots,
    untagged_manifests_only_on_request,
    mounts_nested_repositories_and_delete_repo,
    temp_objects_of_uploads,
    broken_repositories_fail_closed,
    dry_run_lists_exactly_what_the_real_run_deletes,
);

/// Mount links whose holder and target fall in different shards' slices: `aa-holder` (first
/// slice) mounts a layer of `zz-target` (last slice) that no manifest of `zz-target` uses,
/// and `zy-holder` (last slice) one of `ab-target` (first slice). Each shard runs alone,
/// the last ones first (shard 0 lists every slice anyway): no shard may delete a mounted
/// layer, whatever it listed.
async fn shards_keep_blobs_mounted_from_other_slices(t: TestStore) {
    use ocigc::gc::Shard;
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let mut garbage = Vec::new();
    let mut own = Vec::new();
    let fillers: Vec<String> = (0..8).map(|i| format!("m{i:02}/app")).collect();
    let mut repos: Vec<&str> = vec!["aa-holder", "ab-target", "zy-holder", "zz-target"];
    repos.extend(fillers.iter().map(String::as_str));
    for repo in &repos {
        let img = f.image(repo, repo).await;
        w.tag(repo, "latest", &img).await;
        own.push((repo.to_string(), img));
        let g = f
            .blob(repo, OCI_LAYER, format!("garbage of {repo}").as_bytes())
            .await;
        garbage.push(sr_blob(repo, &g.digest));
    }
    let mut mounted = Vec::new();
    for (target, holder) in [("zz-target", "aa-holder"), ("ab-target", "zy-holder")] {
        let base = f
            .blob(
                target,
                OCI_LAYER,
                format!("{target} base, mounted").as_bytes(),
            )
            .await;
        w.mount(target, holder, &base.digest).await;
        let cfg = f
            .blob(
                holder,
                OCI_CONFIG,
                format!("{{\"holder\":\"{holder}\"}}").as_bytes(),
            )
            .await;
        let img = f.manifest(holder, &cfg, &[&base], None).await;
        w.tag(holder, "mounted", &img).await;
        mounted.push((target, holder, sr_blob(target, &base.digest)));
    }
    let mut split = false;
    for count in [2u32, 3, 4] {
        let mut owner: std::collections::BTreeMap<String, u32> = Default::default();
        for index in (0..count).rev() {
            let opts = GcOptions {
                shard: Some(Shard { index, count }),
                ..eager()
            };
            let r = srgc(&t.store, &opts, false).await;
            assert!(r.all_ok(), "{count} shards, shard {index}: {r:#?}");
            for rr in &r.repositories {
                owner.insert(rr.name.clone(), index);
            }
            let k = keys(t.store.as_ref()).await;
            for (target, holder, key) in &mounted {
                assert!(
                    k.contains(key),
                    "{count} shards, shard {index} deleted {key} ({target}'s layer that \
                     {holder} mounts): {r:#?}"
                );
            }
        }
        for (target, holder, _) in &mounted {
            split |= owner.get(*target) != owner.get(*holder);
        }
    }
    assert!(split, "some target and its holder fall in different shards");
    let k = keys(t.store.as_ref()).await;
    for g in &garbage {
        assert!(!k.contains(g), "garbage collected: {g}");
    }
    for (repo, img) in &own {
        assert_all(&k, repo, img, true, "tagged");
    }
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
}

/// The same with `--delay`, for a shard that does not list the other slices at first: a
/// mounted layer that looks unreferenced in its own slice is never recorded as pending (which
/// would wake the repository a delay later, only to find the layer kept again, every delay),
/// and once settled the shard writes nothing.
async fn a_shard_never_holds_a_mounted_layer_pending(t: TestStore) {
    use ocigc::gc::Shard;
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    for repo in ["aa-holder", "m00/app", "m01/app", "m02/app", "zz-target"] {
        let img = f.image(repo, repo).await;
        w.tag(repo, "latest", &img).await;
    }
    let base = f.blob("zz-target", OCI_LAYER, b"zz base, mounted").await;
    w.mount("zz-target", "aa-holder", &base.digest).await;
    let cfg = f.blob("aa-holder", OCI_CONFIG, b"{\"holder\":1}").await;
    let img = f.manifest("aa-holder", &cfg, &[&base], None).await;
    w.tag("aa-holder", "mounted", &img).await;
    let key = sr_blob("zz-target", &base.digest);
    let hour = std::time::Duration::from_secs(3600);
    let mut puts = Vec::new();
    for round in 0..4u32 {
        let opts = GcOptions {
            shard: Some(Shard { index: 1, count: 2 }),
            delay: hour,
            clock_offset: hour * 2 * round,
            ..eager()
        };
        let r = srgc(&t.store, &opts, false).await;
        assert!(r.all_ok(), "round {round}: {r:#?}");
        let z = repo_report(&r, "zz-target");
        assert_eq!(z.pending.blobs, 0, "round {round}: {z:#?}");
        assert!(
            keys(t.store.as_ref()).await.contains(&key),
            "round {round}: {r:#?}"
        );
        puts.push(r.requests.put);
    }
    assert_eq!(puts[3], 0, "settled: no write ({puts:?})");
}

both_stores!(
    shards_keep_blobs_mounted_from_other_slices,
    a_shard_never_holds_a_mounted_layer_pending
);

/// A preview that would delete an abandoned upload scans for referrers as the real run does,
/// even where no blob could go yet (first observation, `--delay 1h`): here the scan finds an
/// untagged referrer (its subject tagged) that lists a missing manifest, which fails the
/// repository closed, so neither run deletes the upload. (With `--delete-untagged`.)
async fn a_preview_with_an_upload_to_delete_scans(t: TestStore) {
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let img = f.image("a", "v1").await;
    w.tag("a", "v1", &img).await;
    let ghost = Desc {
        media_type: OCI_MANIFEST.into(),
        digest: sha256(b"ghost manifest"),
        size: 14,
        subtree: vec![],
    };
    let doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [ghost.json()],
        "subject": img.json(),
        "artifactType": "application/vnd.example.sbom",
    });
    f.doc("a", OCI_INDEX, &doc, &[]).await;
    f.put(&format!("a/uploads/{OPEN}"), b"chunk").await;
    let (wait, dry) = (first_observation(false), first_observation(true));
    let preview = srgc(&t.store, &dry, true).await;
    let real = srgc(&t.store, &wait, true).await;
    let (p, r) = (repo_report(&preview, "a"), repo_report(&real, "a"));
    assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
    assert_eq!(p.status, r.status, "preview {p:#?}");
    assert!(all_deleted_keys(&real).is_empty(), "{real:#?}");
    assert_eq!(all_deleted_keys(&preview), all_deleted_keys(&real));
}

both_stores!(a_preview_with_an_upload_to_delete_scans);
