//! GC scenarios for the `distribution` layout (SPEC §2), each against the directory store and
//! moto S3: global blobs marked from every repository, untagged manifests only on request,
//! whole-repository deletion, fail-closed, dry run = real run.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::dist::*;
use common::hooked::{Hooked, When};
use common::*;
use ocigc::gc::{delete_repositories, run_gc, DeleteRepoOptions, GcOptions};
use ocigc::layout::{by_name, LayoutOptions, GLOBAL_REPOSITORY};
use ocigc::report::{RepoStatus, Report};
use ocigc::store::Store;

async fn dgc(store: &Arc<dyn Store>, opts: &GcOptions, delete_untagged: bool) -> Report {
    let layout =
        by_name("distribution", LayoutOptions { delete_untagged }).expect("distribution layout");
    run_gc(store.clone(), layout, opts).await.expect("gc run")
}

fn data_keys(desc: &Desc) -> Vec<String> {
    desc.subtree.iter().map(|d| data_key(d)).collect()
}

fn assert_all(k: &BTreeSet<String>, desc: &Desc, present: bool, what: &str) {
    for key in data_keys(desc) {
        assert_eq!(k.contains(&key), present, "{what}: {key}");
    }
}

fn repository_keys(k: &BTreeSet<String>) -> BTreeSet<String> {
    k.iter()
        .filter(|k| k.starts_with(&format!("{V2}/repositories/")))
        .cloned()
        .collect()
}

async fn shared_layers_and_multi_arch(t: TestStore) {
    let w = DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let amd = f.image("a", "amd64").await;
    let arm = f.image("a", "arm64").await;
    let idx = f.index("a", OCI_INDEX, &[&amd, &arm]).await;
    w.tag("a", "1.0", &idx).await;
    // A layer that a pushed-but-never-tagged image of `a` shares with `b`'s tagged image.
    let shared = f.blob("a", OCI_LAYER, b"shared layer").await;
    let cfg = f.blob("a", OCI_CONFIG, b"{\"garbage\":1}").await;
    let garbage = f.manifest("a", &cfg, &[&shared], None).await;
    let b_cfg = f.blob("b", OCI_CONFIG, b"{\"b\":1}").await;
    let b_layer = f.blob("b", OCI_LAYER, b"shared layer").await;
    let b_img = f.manifest("b", &b_cfg, &[&b_layer], None).await;
    w.tag("b", "latest", &b_img).await;
    let before = keys(t.store.as_ref()).await;

    let report = dgc(&t.store, &eager(), false).await;
    let k = keys(t.store.as_ref()).await;
    assert!(dist_dangling(t.store.as_ref()).await.is_empty());
    assert_all(&k, &idx, true, "multi-arch index");
    assert_all(&k, &b_img, true, "image sharing a layer");
    assert!(!k.contains(&data_key(&garbage.digest)), "garbage manifest");
    assert!(!k.contains(&data_key(&cfg.digest)), "garbage config");
    assert_eq!(
        repository_keys(&k),
        repository_keys(&before),
        "links are the registry's"
    );
    let names: Vec<_> = report
        .repositories
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, [GLOBAL_REPOSITORY], "{}", t.kind);
    let g = repo_report(&report, GLOBAL_REPOSITORY);
    assert_eq!(g.status, RepoStatus::Ok, "{g:#?}");
    assert_eq!(g.deleted.len(), 2, "{g:#?}");
    assert_eq!(
        g.reachable.blobs,
        (idx.subtree.len() + b_img.subtree.len()) as u64
    );
}

/// Untagged manifests: roots by default; with `--delete-untagged`, swept unless an index or a
/// kept manifest's referrer needs them (the classic GC's `-m` deletes both).
async fn untagged_manifests_only_on_request(t: TestStore) {
    let w = DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let img = f.image("a", "v1").await;
    w.tag("a", "v1", &img).await;
    let c1 = f.image("a", "child 1").await;
    let c2 = f.image("a", "child 2").await;
    let idx = f.index("a", OCI_INDEX, &[&c1, &c2]).await;
    w.tag("a", "multi", &idx).await;
    // The registry records a revision for every manifest pushed, children included.
    w.untagged("a", &c1).await;
    w.untagged("a", &c2).await;
    let sig = f.referrer("a", &img, "kept").await;
    w.untagged("a", &sig).await;
    let old = f.image("a", "old").await;
    w.untagged("a", &old).await;
    let old_sig = f.referrer("a", &old, "of old").await;
    w.untagged("a", &old_sig).await;
    // A tag moved away from `older` leaves only its tag index entry behind.
    let older = f.image("a", "older").await;
    w.tag("a", "moving", &older).await;
    let newer = f.image("a", "newer").await;
    w.tag("a", "moving", &newer).await;

    let kept = dgc(&t.store, &eager(), false).await;
    assert_eq!(kept.totals.blobs_deleted, 0, "{kept:#?}");

    let report = dgc(&t.store, &eager(), true).await;
    let k = keys(t.store.as_ref()).await;
    assert!(dist_dangling(t.store.as_ref()).await.is_empty());
    for (d, what) in [
        (&img, "tagged"),
        (&idx, "tagged index"),
        (&sig, "referrer of a kept manifest"),
        (&newer, "moved tag"),
    ] {
        assert_all(&k, d, true, what);
    }
    for (d, what) in [(&old, "untagged"), (&older, "tag moved away")] {
        assert!(!k.contains(&revision_key("a", &d.digest)), "{what}");
        assert!(!k.contains(&data_key(&d.digest)), "{what}");
    }
    assert!(!k.contains(&revision_key("a", &old_sig.digest)));
    assert!(
        !k.contains(&data_key(&old_sig.subtree[2])),
        "payload of a dropped referrer"
    );
    for d in [&c1, &c2, &sig] {
        assert!(k.contains(&revision_key("a", &d.digest)));
    }
    let a = repo_report(&report, "a");
    assert_eq!(a.status, RepoStatus::Ok, "{a:#?}");
    assert_eq!(a.deleted.len(), 3, "{a:#?}");
    assert_eq!(
        repo_report(&report, GLOBAL_REPOSITORY).status,
        RepoStatus::Ok
    );
}

async fn nested_and_colliding_repositories_and_delete_repo(t: TestStore) {
    let w = DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let mut own = Vec::new();
    let mut base = None;
    for repo in NEIGHBOURS {
        let img = f.image(repo, repo).await;
        w.tag(repo, "latest", &img).await;
        // Built the same everywhere: one set of global blobs, linked from every repository.
        let b = f.image(repo, "base").await;
        w.tag(repo, "base", &b).await;
        own.push((repo, img));
        base = Some(b);
    }
    let base = base.expect("base image");
    let before = keys(t.store.as_ref()).await;
    let layout = by_name("distribution", LayoutOptions::default()).expect("layout");
    let opts = DeleteRepoOptions {
        dry_run: false,
        concurrency: 8,
        request_timeout: Duration::from_secs(60),
        lease_ttl: Duration::from_secs(600),
        clock_offset: Duration::ZERO,
        metrics: None,
        rate_limit: None,
    };
    let deleted = delete_repositories(t.store.clone(), layout, &["team/app".into()], &opts)
        .await
        .expect("delete-repo");
    assert_eq!(deleted.repositories[0].status, RepoStatus::Ok);
    let k = keys(t.store.as_ref()).await;
    let app = format!("{V2}/repositories/team/app/");
    let tools = format!("{V2}/repositories/team/app/tools/");
    let removed: BTreeSet<_> = before.difference(&k).cloned().collect();
    assert!(!removed.is_empty());
    assert!(
        removed
            .iter()
            .all(|key| key.starts_with(&app) && !key.starts_with(&tools)),
        "{removed:#?}"
    );
    assert!(
        !k.iter()
            .any(|key| key.starts_with(&app) && !key.starts_with(&tools)),
        "team/app left keys behind"
    );

    let report = dgc(&t.store, &eager(), false).await;
    let k = keys(t.store.as_ref()).await;
    assert!(dist_dangling(t.store.as_ref()).await.is_empty());
    for (repo, img) in &own {
        assert_all(&k, img, *repo != "team/app", repo);
    }
    assert_all(&k, &base, true, "shared base image");
    assert_eq!(
        repo_report(&report, GLOBAL_REPOSITORY).deleted.len(),
        own[2].1.subtree.len()
    );
}

async fn unreadable_manifests_fail_closed(t: TestStore) {
    let w = DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let img = f.image("a", "v1").await;
    w.tag("a", "v1", &img).await;
    let garbage = f.image("a", "garbage").await;
    // A revision whose manifest is not JSON, then one whose manifest is gone.
    let broken = f.blob("b", OCI_MANIFEST, b"{ not json").await;
    w.tag("b", "broken", &broken).await;
    let before = keys(t.store.as_ref()).await;
    let report = dgc(&t.store, &eager(), false).await;
    let g = repo_report(&report, GLOBAL_REPOSITORY);
    assert_eq!(g.status, RepoStatus::Failed, "{g:#?}");
    assert!(g.deleted.is_empty());
    assert!(
        g.errors.iter().any(|e| e.contains(&broken.digest)),
        "{g:#?}"
    );
    assert_eq!(keys(t.store.as_ref()).await, before);

    t.store
        .delete_batch(&[data_key(&broken.digest)])
        .await
        .expect("delete");
    let report = dgc(&t.store, &eager(), false).await;
    let g = repo_report(&report, GLOBAL_REPOSITORY);
    assert_eq!(g.status, RepoStatus::Failed, "{g:#?}");
    assert!(g.deleted.is_empty());
    assert_all(&keys(t.store.as_ref()).await, &garbage, true, "fail closed");

    // Once the broken revision is gone, collection resumes.
    t.store
        .delete_batch(&[
            revision_key("b", &broken.digest),
            format!("{V2}/repositories/b/_manifests/tags/broken/current/link"),
        ])
        .await
        .expect("delete");
    let report = dgc(&t.store, &eager(), false).await;
    assert_eq!(
        repo_report(&report, GLOBAL_REPOSITORY).status,
        RepoStatus::Ok
    );
    assert_all(&keys(t.store.as_ref()).await, &garbage, false, "collected");
}

async fn other_keys_young_blobs_and_dry_run(t: TestStore) {
    let w = DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    for repo in ["a", "b/c"] {
        let img = f.image(repo, "v1").await;
        w.tag(repo, "v1", &img).await;
        let old = f.image(repo, "old").await;
        w.untagged(repo, &old).await;
        f.image(repo, "never tagged").await;
        f.blob(repo, OCI_LAYER, b"lonely layer").await;
    }
    let hex = "ab".repeat(32);
    for other in [
        format!("{V2}/repositories/a/_uploads/u-1/data"),
        format!("{V2}/repositories/a/_uploads/u-1/startedat"),
        format!("{V2}/blobs/sha256/cd/{hex}/data"),
        format!("{V2}/blobs/sha256/ab/{hex}/data.tmp"),
        format!("{V2}/README"),
        "outside/registry".to_string(),
    ] {
        f.put(&other, b"x").await;
    }
    let before = keys(t.store.as_ref()).await;
    let young = GcOptions {
        grace: Duration::from_secs(3600),
        ..eager()
    };
    let r = dgc(&t.store, &young, true).await;
    assert_eq!(r.totals.blobs_deleted, 0);
    assert_eq!(keys(t.store.as_ref()).await, before, "grace");

    let store = &t.store;
    let removed = dry_run_equals_real(
        store.as_ref(),
        |o| async move { dgc(store, &o, true).await },
    )
    .await;
    let after = keys(t.store.as_ref()).await;
    // Per repository: 1 untagged revision. Globally, where both repositories' identical
    // content is stored once: 3 blobs of the never tagged image, 1 lonely layer, 3 blobs of
    // the untagged image.
    assert_eq!(removed.len(), 2 + (3 + 1 + 3), "{removed:#?}");
    for other in [
        format!("{V2}/repositories/a/_uploads/u-1/data"),
        format!("{V2}/blobs/sha256/cd/{hex}/data"),
        format!("{V2}/README"),
    ] {
        assert!(after.contains(&other), "{other}");
    }
    assert!(dist_dangling(t.store.as_ref()).await.is_empty());
    let again = dgc(&t.store, &eager(), true).await;
    assert_eq!(again.totals.blobs_deleted, 0);
}

/// A pusher finishes an image (revision and tag links) after the plan, just before the first
/// delete batch: the re-check must see the new revision and keep every blob of the image; a
/// pusher that does so after the batch is caught by the verify pass.
async fn recheck_and_verify_see_a_manifest_pushed_during_the_run(t: TestStore) {
    for (when, expect_dangling) in [
        // The global unit's roots come from the run's listing; the re-check lists every
        // repository's links again (a delimiter listing of `repositories/`, then each part).
        (
            When::BeforeNthLevel("docker/registry/v2/repositories/", 1),
            false,
        ),
        (When::AfterDelete("/data"), true),
    ] {
        let repo = if expect_dangling { "late" } else { "early" };
        let w = DistWriter::new(t.store.clone());
        let f = Fixture { store: &w };
        let img = f.image("a", "v1").await;
        w.tag("a", "v1", &img).await;
        let pushed = f.image(repo, &format!("pushed to {repo}")).await;
        let push = {
            let w = DistWriter::new(t.store.clone());
            let pushed = pushed.clone();
            Box::pin(async move { w.tag(repo, "new", &pushed).await })
        };
        let hooked = Arc::new(Hooked::new(t.store.clone(), when, push));
        let store: Arc<dyn Store> = hooked.clone();
        let report = dgc(&store, &eager(), false).await;
        assert!(hooked.fired(), "{repo}");
        let g = repo_report(&report, GLOBAL_REPOSITORY);
        if expect_dangling {
            assert_eq!(g.status, RepoStatus::Failed, "{g:#?}");
            // The manifest itself went in the batch, so what it referenced is unknowable;
            // the manifest is the dangling reference the verify pass reports.
            let found: Vec<String> = g
                .dangling_references
                .iter()
                .map(|d| d.to_string())
                .collect();
            assert_eq!(found, std::slice::from_ref(&pushed.digest));
        } else {
            assert_eq!(g.rescued, 3, "{g:#?}");
            assert!(g.deleted.is_empty(), "{g:#?}");
            assert_all(&keys(t.store.as_ref()).await, &pushed, true, "pushed");
            assert!(dist_dangling(t.store.as_ref()).await.is_empty());
        }
    }
}

/// Roots gathered from a listing in parts carry one version, the sum of the parts' versions,
/// so an unchanged bucket's re-check lists the links once instead of reading them again. An
/// image pushed after that listing and before the first batch changes the sum: the re-check
/// reads the roots again and keeps every blob of the image.
async fn recheck_sees_a_push_when_the_roots_came_from_parts(t: TestStore) {
    use futures::StreamExt as _;
    let w = DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    // Repositories over several parts, and unreferenced blobs for more than a page.
    let tagged: Vec<Desc> = futures::stream::iter(0..24)
        .map(|i| {
            let (f, w) = (&f, &w);
            async move {
                let repo = format!("r{i:02}");
                let img = f.image(&repo, &format!("image {i}")).await;
                w.tag(&repo, "v1", &img).await;
                img
            }
        })
        .buffered(8)
        .collect()
        .await;
    let junk: Vec<Desc> = futures::stream::iter(0..1000)
        .map(|i| {
            let f = &f;
            async move {
                f.blob("junk", OCI_LAYER, format!("junk {i}").as_bytes())
                    .await
            }
        })
        .buffered(16)
        .collect()
        .await;
    let pushed = f.image("late", "pushed after the listing").await;
    let push = {
        let w = DistWriter::new(t.store.clone());
        let pushed = pushed.clone();
        Box::pin(async move { w.tag("late", "new", &pushed).await })
    };
    // The global unit's lease is taken after its marking and listing, before its first batch.
    let hooked = Arc::new(Hooked::new(
        t.store.clone(),
        When::BeforePut("_ocigc/leases/"),
        push,
    ));
    let store: Arc<dyn Store> = hooked.clone();
    let opts = GcOptions {
        list_parts: 8,
        ..eager()
    };
    let report = dgc(&store, &opts, false).await;
    assert!(hooked.fired());
    let g = repo_report(&report, GLOBAL_REPOSITORY);
    assert_eq!(g.status, RepoStatus::Ok, "{g:#?}");
    assert_eq!(g.rescued, 3, "{g:#?}");
    let deleted: BTreeSet<String> = g.deleted.iter().map(|d| d.key.clone()).collect();
    let expected: BTreeSet<String> = junk.iter().flat_map(data_keys).collect();
    assert_eq!(deleted, expected);
    let k = keys(t.store.as_ref()).await;
    assert_all(&k, &pushed, true, "pushed");
    for img in &tagged {
        assert_all(&k, img, true, "tagged");
    }
    assert!(dist_dangling(t.store.as_ref()).await.is_empty());
}

/// A blob space longer than a page, listed in parts. The global unit is marked before it is
/// listed and the listing streamed against the reachable set (reachable blobs are counted and
/// dropped as their page goes by): exactly the unreferenced blobs go, and the report is the
/// one a run that lists the blob space whole (`du`'s detail) makes of the same bucket.
async fn a_blob_space_of_many_pages_streams_in_parts(t: TestStore) {
    use futures::StreamExt as _;
    let w = DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let layers: Vec<Desc> = futures::stream::iter(0..1050)
        .map(|i| {
            let f = &f;
            async move {
                f.blob("a", OCI_LAYER, format!("layer {i}").as_bytes())
                    .await
            }
        })
        .buffered(16)
        .collect()
        .await;
    let (kept, gone) = layers.split_at(600);
    let cfg = f.blob("a", OCI_CONFIG, b"{\"kept\":1}").await;
    let tagged = f
        .manifest("a", &cfg, &kept.iter().collect::<Vec<_>>(), None)
        .await;
    w.tag("a", "1.0", &tagged).await;
    let cfg = f.blob("a", OCI_CONFIG, b"{\"gone\":1}").await;
    let untagged = f
        .manifest("a", &cfg, &gone.iter().collect::<Vec<_>>(), None)
        .await;
    let blob_keys = (keys(t.store.as_ref()).await.into_iter())
        .filter(|k| k.starts_with(&format!("{V2}/blobs/")))
        .count() as u64;
    assert!(blob_keys > 1000, "more than a page: {blob_keys}");
    let opts = GcOptions {
        list_parts: 4,
        ..eager()
    };
    let whole = GcOptions {
        dry_run: true,
        detail: true,
        ..opts.clone()
    };
    let whole = dgc(&t.store, &whole, true).await;
    let preview = dgc(
        &t.store,
        &GcOptions {
            dry_run: true,
            ..opts.clone()
        },
        true,
    )
    .await;
    let report = dgc(&t.store, &opts, true).await;
    let expected: BTreeSet<String> = (untagged.subtree.iter())
        .filter(|d| !tagged.subtree.contains(d))
        .map(|d| data_key(d))
        .collect();
    for r in [&whole, &preview, &report] {
        let g = repo_report(r, GLOBAL_REPOSITORY);
        assert_eq!(g.status, RepoStatus::Ok, "{g:#?}");
        let deleted: BTreeSet<String> = g.deleted.iter().map(|d| d.key.clone()).collect();
        assert_eq!(deleted, expected, "{}", t.kind);
        assert_eq!(g.reachable.blobs, tagged.subtree.len() as u64);
        assert_eq!(g.objects, blob_keys);
    }
    let (g, w) = (
        repo_report(&report, GLOBAL_REPOSITORY),
        repo_report(&whole, GLOBAL_REPOSITORY),
    );
    assert_eq!(
        (g.bytes, g.reachable, g.pending),
        (w.bytes, w.reachable, w.pending)
    );
    let k = keys(t.store.as_ref()).await;
    assert_all(&k, &tagged, true, "tagged image");
    assert!(expected.is_disjoint(&k));
    assert!(dist_dangling(t.store.as_ref()).await.is_empty());
}

both_stores!(
    a_blob_space_of_many_pages_streams_in_parts,
    recheck_sees_a_push_when_the_roots_came_from_parts,
    recheck_and_verify_see_a_manifest_pushed_during_the_run,
    shared_layers_and_multi_arch,
    untagged_manifests_only_on_request,
    nested_and_colliding_repositories_and_delete_repo,
    unreadable_manifests_fail_closed,
    other_keys_young_blobs_and_dry_run,
);
