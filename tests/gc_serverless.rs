//! GC scenarios for the `serverless-registry` layout (SPEC §2), each against the directory
//! store and moto S3: tags and digests as roots, untagged manifests only on request, referrers
//! by content and by key, cross-repository mounts, temp objects of uploads, nested and
//! colliding repositories, whole-repository deletion, fail-closed, dry run = real run.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::hooked::{Hooked, When};
use common::serverless::*;
use common::*;
use ocigc::gc::{delete_repositories, run_gc, DeleteRepoOptions, GcOptions};
use ocigc::layout::{by_name, LayoutOptions, GLOBAL_REPOSITORY};
use ocigc::report::{RepoStatus, Report};
use ocigc::store::Store;

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
    let markers = [
        "a/gc/last_update".to_string(),
        "a/insertion/last_update".to_string(),
        format!("a/insertion/{OPEN}"),
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

both_stores!(
    recheck_keeps_an_image_pushed_during_the_run,
    tags_and_digests_are_roots,
    untagged_manifests_only_on_request,
    mounts_nested_repositories_and_delete_repo,
    temp_objects_of_uploads,
    broken_repositories_fail_closed,
    dry_run_lists_exactly_what_the_real_run_deletes,
);
