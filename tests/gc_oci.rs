//! GC scenarios for the `oci` layout (SPEC §2), each against a directory, moto and SeaweedFS.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use ocigc::gc::plan::Reason;
use ocigc::gc::GcOptions;
use ocigc::report::{RepoStatus, Report};
use serde_json::json;

async fn multi_arch_index_children_survive(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let amd = f.image("app", "amd64").await;
    let arm = f.image("app", "arm64").await;
    let idx = f.index("app", OCI_INDEX, &[&amd, &arm]).await;
    let garbage = f.image("app", "old").await;
    f.layout("app", &[(Some("1.0"), &idx)]).await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &idx, "multi-arch index");
    assert_gone(&k, "app", &garbage, "untagged image");
    let r = repo_report(&report, "app");
    assert_eq!(r.status, RepoStatus::Ok);
    assert_eq!(r.deleted.len(), 3, "{}: {r:#?}", t.kind);
    assert!(r.deleted.iter().all(|d| d.reason == Reason::Unreferenced));
    assert_eq!(r.reachable.blobs, idx.subtree.len() as u64);
}

async fn nested_index(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let leaf = f.image("app", "leaf").await;
    let inner = f.index("app", OCI_INDEX, &[&leaf]).await;
    let outer = f.index("app", OCI_INDEX, &[&inner]).await;
    let garbage_inner = f
        .index("app", OCI_INDEX, &[&f.image("app", "gone").await])
        .await;
    f.layout("app", &[(Some("nested"), &outer)]).await;

    gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &outer, "index in index");
    assert_gone(
        &k,
        "app",
        &garbage_inner,
        "unreferenced index and its image",
    );
}

async fn referrers_listed_unlisted_and_chained(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "signed").await;
    let listed = f.referrer("app", &img, "listed").await;
    let unlisted = f.referrer("app", &img, "unlisted").await;
    let of_referrer = f.referrer("app", &unlisted, "counter-signature").await;
    // A referrer whose subject is itself garbage is garbage too.
    let dead = f.image("app", "dead").await;
    let dead_sig = f.referrer("app", &dead, "dead").await;
    f.layout("app", &[(Some("v1"), &img), (None, &listed)])
        .await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &img, "signed image");
    assert_intact(&k, "app", &listed, "referrer listed in index.json");
    assert_intact(&k, "app", &unlisted, "referrer stored only as a blob");
    assert_intact(&k, "app", &of_referrer, "referrer of a referrer");
    assert_gone(&k, "app", &dead, "garbage image");
    let dead_only: Vec<_> = dead_sig
        .subtree
        .iter()
        .filter(|d| !listed.subtree.contains(d))
        .collect();
    for d in dead_only {
        assert!(
            !k.contains(&blob_key("app", d)),
            "garbage referrer blob {d} kept"
        );
    }
    assert_eq!(repo_report(&report, "app").status, RepoStatus::Ok);
}

async fn untagged_root_is_kept(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let tagged = f.image("app", "tagged").await;
    let untagged = f.image("app", "untagged").await;
    let garbage = f.image("app", "garbage").await;
    f.layout("app", &[(Some("latest"), &tagged), (None, &untagged)])
        .await;

    gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &tagged, "tagged root");
    assert_intact(&k, "app", &untagged, "untagged root");
    assert_gone(&k, "app", &garbage, "garbage");
}

async fn docker_media_types(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let mut children = Vec::new();
    for arch in ["amd64", "arm64"] {
        let config = f
            .blob(
                "app",
                DOCKER_CONFIG,
                format!("{{\"a\":\"{arch}\"}}").as_bytes(),
            )
            .await;
        let layer = f
            .blob(
                "app",
                DOCKER_LAYER,
                format!("docker layer {arch}").as_bytes(),
            )
            .await;
        let m = json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                       "config": config.json(), "layers": [layer.json()]});
        children.push(f.doc("app", DOCKER_MANIFEST, &m, &[&config, &layer]).await);
    }
    let list = f
        .index("app", DOCKER_LIST, &children.iter().collect::<Vec<_>>())
        .await;
    // Docker schema 1 references layers by blobSum.
    let s1_layer = f.blob("app", DOCKER_LAYER, b"schema1 layer").await;
    let s1 = f
        .doc(
            "app",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            &json!({"schemaVersion": 1, "name": "app", "tag": "old",
                    "fsLayers": [{"blobSum": s1_layer.digest}]}),
            &[&s1_layer],
        )
        .await;
    let garbage = f.blob("app", DOCKER_LAYER, b"orphan docker layer").await;
    f.layout("app", &[(Some("list"), &list), (Some("s1"), &s1)])
        .await;

    gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &list, "docker manifest list");
    assert_intact(&k, "app", &s1, "docker schema 1");
    assert_gone(&k, "app", &garbage, "orphan layer");
}

async fn artifact_and_unknown_media_types(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let a = f
        .blob("app", "application/vnd.example.data", b"artifact blob a")
        .await;
    let b = f
        .blob("app", "application/octet-stream", b"artifact blob b")
        .await;
    let artifact = f
        .doc(
            "app",
            "application/vnd.oci.artifact.manifest.v1+json",
            &json!({"mediaType": "application/vnd.oci.artifact.manifest.v1+json",
                    "artifactType": "application/vnd.example", "blobs": [a.json(), b.json()]}),
            &[&a, &b],
        )
        .await;
    // An unknown JSON media type that carries descriptors is followed.
    let inner = f.image("app", "bundled").await;
    let bundle = f
        .doc(
            "app",
            "application/vnd.example.bundle+json",
            &json!({"manifests": [inner.json()]}),
            &[&inner],
        )
        .await;
    let garbage = f.image("app", "garbage").await;
    f.layout(
        "app",
        &[(Some("artifact"), &artifact), (Some("bundle"), &bundle)],
    )
    .await;

    gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &artifact, "artifact manifest");
    assert_intact(&k, "app", &bundle, "unknown media type with descriptors");
    assert_gone(&k, "app", &garbage, "garbage");
}

async fn missing_layer_warns_but_collects(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let config = f.blob("app", OCI_CONFIG, b"{\"c\":1}").await;
    let absent = Desc {
        media_type: OCI_LAYER.into(),
        digest: sha256(b"never uploaded"),
        size: 14,
        subtree: vec![],
    };
    let img = f.manifest("app", &config, &[&absent], None).await;
    let garbage = f.image("app", "garbage").await;
    f.layout("app", &[(Some("v1"), &img)]).await;

    let report = gc(&t.store, &eager()).await;
    let r = repo_report(&report, "app");
    assert_eq!(r.status, RepoStatus::Ok);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains(&absent.digest) && w.contains("missing")),
        "warnings: {:?}",
        r.warnings
    );
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &img, "image with a missing layer");
    assert_gone(&k, "app", &garbage, "garbage");
}

async fn broken_repositories_fail_closed(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    // bad-manifest: a tagged manifest that is not JSON.
    let bad = f.blob("bad-manifest", OCI_MANIFEST, b"{not json").await;
    let g1 = f.image("bad-manifest", "garbage").await;
    f.layout("bad-manifest", &[(Some("v1"), &bad)]).await;
    // missing-manifest: an index child that is not in the bucket.
    let present = f.image("missing-manifest", "present").await;
    let ghost = Desc {
        media_type: OCI_MANIFEST.into(),
        digest: sha256(b"ghost manifest"),
        size: 14,
        subtree: vec![],
    };
    let idx = f
        .index("missing-manifest", OCI_INDEX, &[&present, &ghost])
        .await;
    let g2 = f.image("missing-manifest", "garbage").await;
    f.layout("missing-manifest", &[(Some("v1"), &idx)]).await;
    // bad-index: index.json is not JSON.
    let g3 = f.image("bad-index", "garbage").await;
    f.layout("bad-index", &[]).await;
    f.put("bad-index/index.json", b"]]").await;
    // no-index: index.json is absent.
    let g4 = f.image("no-index", "garbage").await;
    f.put("no-index/oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .await;
    // healthy: collected as usual.
    let keep = f.image("healthy", "keep").await;
    let g5 = f.image("healthy", "garbage").await;
    f.layout("healthy", &[(Some("v1"), &keep)]).await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    for (repo, garbage) in [
        ("bad-manifest", &g1),
        ("missing-manifest", &g2),
        ("bad-index", &g3),
        ("no-index", &g4),
    ] {
        let r = repo_report(&report, repo);
        assert_eq!(r.status, RepoStatus::Failed, "{repo}: {r:#?}");
        assert!(r.deleted.is_empty(), "{repo} deleted {:?}", r.deleted);
        assert!(!r.errors.is_empty(), "{repo} reports no error");
        assert_intact(&k, repo, garbage, "garbage of a failed-closed repository");
    }
    assert_eq!(repo_report(&report, "healthy").status, RepoStatus::Ok);
    assert_gone(&k, "healthy", &g5, "garbage of the healthy repository");
    assert!(!report.all_ok());
}

async fn unknown_keys_are_never_deleted(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    let hex = "ab".repeat(32);
    let odd = [
        "app/README".to_string(),
        "app/blobs/sha256/not-a-digest".into(),
        format!("app/blobs/md5/{hex}"),
        format!("app/blobs/sha256/{}", hex.to_uppercase()),
        format!("app/blobs/sha256/{hex}/data"),
        format!("app/other/blobs/sha256/{hex}"),
        "_ocigc/state/app.json".into(),
        "loose-file-at-root".into(),
    ];
    for key in &odd {
        f.put(key, b"x").await;
    }
    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    for key in &odd {
        assert!(k.contains(key), "{} deleted unknown key {key}", t.kind);
    }
    assert!(repo_report(&report, "app").deleted.is_empty());
    assert_eq!(
        report.unowned_objects, 1,
        "loose file is outside every repository"
    );
}

async fn grace_keeps_young_garbage(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    let garbage = f.image("app", "garbage").await;
    f.layout("app", &[(Some("v1"), &img)]).await;

    let young = ocigc::gc::GcOptions {
        grace: Duration::from_secs(3600),
        ..eager()
    };
    let report = gc(&t.store, &young).await;
    let r = repo_report(&report, "app");
    assert!(r.deleted.is_empty(), "young garbage deleted");
    assert_eq!(r.pending.blobs, 3);
    assert_intact(
        &keys(t.store.as_ref()).await,
        "app",
        &garbage,
        "young garbage",
    );

    // The same blobs two hours later are past the grace period.
    let later = ocigc::gc::GcOptions {
        clock_offset: Duration::from_secs(7200),
        ..young
    };
    let report = gc(&t.store, &later).await;
    assert_eq!(repo_report(&report, "app").deleted.len(), 3);
    let k = keys(t.store.as_ref()).await;
    assert_gone(&k, "app", &garbage, "old garbage");
    assert_intact(&k, "app", &img, "reachable image");
}

async fn nonzero_delay_defers_deletion(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    let garbage = f.image("app", "garbage").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    let opts = ocigc::gc::GcOptions {
        delay: Duration::from_secs(3600),
        ..eager()
    };
    let report = gc(&t.store, &opts).await;
    let r = repo_report(&report, "app");
    assert!(r.deleted.is_empty());
    assert_eq!(r.pending.blobs, 3);
    assert_intact(
        &keys(t.store.as_ref()).await,
        "app",
        &garbage,
        "first observation",
    );
}

async fn nested_and_colliding_repositories(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let repos = f.neighbours().await;
    // Only team/app: its nested repository and the neighbours are untouched.
    let report = gc(
        &t.store,
        &ocigc::gc::GcOptions {
            repos: only(&["team/app"]),
            ..eager()
        },
    )
    .await;
    assert_eq!(report.repositories.len(), 1);
    let k = keys(t.store.as_ref()).await;
    for (repo, _, g) in &repos {
        if *repo == "team/app" {
            assert_gone(&k, repo, g, "selected repository");
        } else {
            assert_intact(&k, repo, g, "unselected repository");
        }
    }
    // Everything: blobs of nested repositories are never garbage of their parent.
    gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    for (repo, img, g) in &repos {
        assert_intact(&k, repo, img, "reachable image");
        assert_gone(&k, repo, g, "garbage");
    }
}

async fn invalid_repository_names_are_left_alone(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("Team/App", "v1").await;
    f.layout("Team/App", &[(Some("v1"), &img)]).await;
    let garbage = f.image("Team/App", "garbage").await;
    let report = gc(&t.store, &eager()).await;
    assert!(report.repositories.is_empty());
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].prefix, "Team/App/");
    assert_intact(
        &keys(t.store.as_ref()).await,
        "Team/App",
        &garbage,
        "invalid name",
    );
}

async fn dry_run_lists_exactly_what_the_real_run_deletes(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    for repo in ["a", "b/c"] {
        let img = f.image(repo, "v1").await;
        let idx = f.index(repo, OCI_INDEX, &[&img]).await;
        f.layout(repo, &[(Some("v1"), &idx)]).await;
        f.image(repo, "garbage").await;
        f.blob(repo, OCI_LAYER, b"lonely layer").await;
    }
    let before = keys(t.store.as_ref()).await;
    let dry = gc(
        &t.store,
        &ocigc::gc::GcOptions {
            dry_run: true,
            ..eager()
        },
    )
    .await;
    assert!(dry.dry_run);
    assert_eq!(
        keys(t.store.as_ref()).await,
        before,
        "dry run changed the bucket"
    );
    let real = gc(&t.store, &eager()).await;
    let after = keys(t.store.as_ref()).await;
    for repo in ["a", "b/c"] {
        let planned = deleted_keys(&dry, repo);
        assert_eq!(planned.len(), 4, "{repo}");
        assert_eq!(
            planned,
            deleted_keys(&real, repo),
            "{repo}: dry run differs from real run"
        );
        let removed: std::collections::BTreeSet<_> = before
            .difference(&after)
            .filter(|k| k.starts_with(&format!("{repo}/")))
            .cloned()
            .collect();
        assert_eq!(planned, removed, "{repo}: report differs from the bucket");
    }
    assert_eq!(dry.totals.bytes_deleted, real.totals.bytes_deleted);
    assert_eq!(dry.totals.blobs_deleted, 8);

    // A second run finds nothing more to delete.
    let again = gc(&t.store, &eager()).await;
    assert_eq!(again.totals.blobs_deleted, 0);
    assert_eq!(keys(t.store.as_ref()).await, after);
}

async fn request_counts_are_close_to_the_minimum(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    let big = vec![7u8; 5 * 1024 * 1024];
    f.blob("app", OCI_LAYER, &big).await;
    let report = gc(&t.store, &eager()).await;
    // Minimum: one LIST page of the bucket (ocigc's state sorts first in it), index.json +
    // one manifest, one delete batch; the 5 MiB garbage
    // layer is too large to be a manifest and is never read. The clock is the first LIST's
    // `Date`. On top: the repository's trash (a 404: another collector's retention may have
    // written one), the protocol for a repository with something to delete (lease PUT and
    // release, pending-state GET, re-check HEAD + batch announcement PUT and removal + intents
    // LIST, verify GET + intents LIST), and the PUT of the repository's incremental-cache entry.
    let r = report.requests;
    assert_eq!(
        (r.list, r.get, r.delete),
        (1 + 2, 2 + 1 + 2, 1 + 2),
        "{r:?}"
    );
    assert_eq!((r.put, r.head), (3, 1), "{r:?}");
}

/// The referrer scan reads each small garbage blob once: its pending entry remembers that it
/// is content-addressed and no referrer. A blob whose content does not (yet) hash to its digest
/// is read again on every run, so a referrer whose upload completes later is still found and
/// kept.
async fn pending_state_spares_rereading_garbage(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    let garbage = f.image("app", "garbage").await;
    let lonely = f.blob("app", OCI_LAYER, b"lonely layer").await;
    let sig = f.referrer("app", &img, "late signature").await;
    let sig_key = blob_key("app", &sig.digest);
    let sig_body = t.store.get(&sig_key).await.expect("signature").body;
    f.put(&sig_key, b"upload in progress").await;

    // Without the incremental cache, which would skip the unchanged second run altogether
    // (asserted below): this is the pending state's own memory.
    let wait = GcOptions {
        delay: Duration::from_secs(3600),
        no_cache: true,
        ..eager()
    };
    let first = gc(&t.store, &wait).await;
    let second = gc(&t.store, &wait).await;
    let fetched = |r: &Report| repo_report(r, "app").manifests_fetched;
    // Read once and remembered: every garbage blob but the unfinished signature (its content
    // does not match its digest).
    let remembered: BTreeSet<&String> = garbage
        .subtree
        .iter()
        .chain(&lonely.subtree)
        .chain(&sig.subtree)
        .filter(|d| **d != sig.digest && !img.subtree.contains(d))
        .collect();
    assert_eq!(
        fetched(&first) - fetched(&second),
        remembered.len() as u64,
        "first {}, second {}",
        fetched(&first),
        fetched(&second)
    );
    assert!(all_deleted_keys(&second).is_empty());
    // With the cache: the first such run remembers, the next finds the repository unchanged
    // (nothing matures before the delay) and reads nothing at all.
    let cached = GcOptions {
        no_cache: false,
        ..wait.clone()
    };
    gc(&t.store, &cached).await;
    let quiet = gc(&t.store, &cached).await;
    assert!(repo_report(&quiet, "app").unchanged, "{quiet:#?}");
    assert_eq!(fetched(&quiet), 0);
    assert_eq!(
        (quiet.requests.get, quiet.requests.put),
        (0, 0),
        "{:?}",
        quiet.requests
    );

    // The upload completes; the next run is past the delay.
    f.put(&sig_key, &sig_body).await;
    let later = GcOptions {
        clock_offset: Duration::from_secs(7200),
        ..wait
    };
    let third = gc(&t.store, &later).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &img, "tagged image");
    assert_intact(&k, "app", &sig, "referrer completed after the first run");
    assert_gone(&k, "app", &garbage, "garbage image");
    assert_gone(&k, "app", &lonely, "lonely layer");
    assert_eq!(repo_report(&third, "app").status, RepoStatus::Ok);
    assert!(dangling(t.store.as_ref()).await.is_empty());
}

/// A dry run that would delete nothing (a first observation) skips the referrer scan: the
/// real first run is the only one to read each small garbage blob. A dry run that would delete
/// something scans as the real run does, and reports exactly its deletions: an unlisted
/// referrer that keeps a blob pending since before the referrer was pushed keeps it in both.
async fn a_preview_that_deletes_nothing_reads_no_garbage(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "v1").await;
    f.layout("app", &[(Some("v1"), &img)]).await;
    let garbage = f.image("app", "garbage").await;
    let sig = f.referrer("app", &img, "signature").await;
    let reused = f.blob("app", OCI_LAYER, b"layer reused later").await;
    let (wait, dry) = (first_observation(false), first_observation(true));
    let fetched = |r: &Report| repo_report(r, "app").manifests_fetched;
    let preview = gc(&t.store, &dry).await;
    assert!(all_deleted_keys(&preview).is_empty());
    assert_eq!(
        fetched(&preview),
        1,
        "the preview reads the tagged manifest, no garbage: {:#?}",
        repo_report(&preview, "app")
    );
    // The real first observation reads the small unreferenced blobs once, finds the
    // signature, and records the rest pending.
    let first = gc(&t.store, &wait).await;
    assert!(fetched(&first) > 1, "{first:#?}");
    let small_garbage = garbage.subtree.len() as u64 + 1;
    assert_eq!(
        repo_report(&first, "app").pending.blobs,
        small_garbage,
        "the garbage image and the lone layer, not the signature: {first:#?}"
    );
    // A second referrer, pushed now, names the pending layer: at the second observation the
    // layer is deletable by its pending age, but the scan finds it reachable, in the preview
    // as in the real run.
    let late = f
        .manifest(
            "app",
            &f.blob("app", "application/vnd.oci.empty.v1+json", b"{}")
                .await,
            &[&reused],
            Some(&img),
        )
        .await;
    let later = |dry_run| GcOptions {
        dry_run,
        clock_offset: Duration::from_secs(7200),
        ..wait.clone()
    };
    let preview = gc(&t.store, &later(true)).await;
    let real = gc(&t.store, &later(false)).await;
    assert_eq!(all_deleted_keys(&preview), all_deleted_keys(&real));
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &img, "tagged image");
    assert_intact(&k, "app", &sig, "unlisted referrer");
    assert_intact(&k, "app", &late, "referrer pushed between the observations");
    assert_intact(&k, "app", &reused, "named by the late referrer");
    assert_gone(&k, "app", &garbage, "garbage image");
    assert!(dangling(t.store.as_ref()).await.is_empty());
}

both_stores!(
    a_preview_that_deletes_nothing_reads_no_garbage,
    multi_arch_index_children_survive,
    nested_index,
    referrers_listed_unlisted_and_chained,
    untagged_root_is_kept,
    docker_media_types,
    artifact_and_unknown_media_types,
    missing_layer_warns_but_collects,
    broken_repositories_fail_closed,
    unknown_keys_are_never_deleted,
    grace_keeps_young_garbage,
    nonzero_delay_defers_deletion,
    nested_and_colliding_repositories,
    invalid_repository_names_are_left_alone,
    dry_run_lists_exactly_what_the_real_run_deletes,
    request_counts_are_close_to_the_minimum,
    pending_state_spares_rereading_garbage,
);
