//! Buckets shaped the way real registries and hostile pushers shape them: zot's dedupe
//! placeholders, layouts inside another repository's blob space, oversize documents, and
//! read-only dry runs. Every scenario runs on each test store.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use common::wrap::{Intercept, Wrapped};
use common::*;
use ocigc::gc::GcOptions;
use ocigc::report::RepoStatus;
use ocigc::store::{DeleteFailure, Metadata, PutCondition, PutOutcome, Store, StoreResult};
use serde_json::json;

/// Writes a 0-byte placeholder for each digest of `desc` into `repo`, as zot with dedupe
/// does for a repository whose content lives elsewhere.
async fn placeholders(f: &Fixture<'_>, repo: &str, desc: &Desc) {
    for d in &desc.subtree {
        f.put(&blob_key(repo, d), b"").await;
    }
}

/// `a` holds the content of an image it no longer references; `b` tags that image through
/// placeholders only (and one layer of its own). Neither repository may lose anything the
/// image needs until `b` stops referencing it; then `b`'s placeholders go, and `a`'s copies in
/// the run after.
async fn placeholders_keep_content_copies_alive(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let shared = f.image("a", "shared").await;
    let own = f.image("a", "own").await;
    f.layout("a", &[(Some("v1"), &own)]).await;
    // b: placeholders for the manifest and config, real content for the layer.
    let layer = sha256(b"layer of shared");
    assert!(shared.subtree.contains(&layer));
    placeholders(&f, "b", &shared).await;
    f.put(&blob_key("b", &layer), b"layer of shared").await;
    // What b holds only as placeholders: a's copies of these must stay.
    let via_placeholders = Desc {
        subtree: shared
            .subtree
            .iter()
            .filter(|d| **d != layer)
            .cloned()
            .collect(),
        ..shared.clone()
    };
    let b_garbage = f.image("b", "garbage").await;
    f.layout("b", &[(Some("latest"), &shared)]).await;

    let report = gc(&t.store, &eager()).await;
    assert!(report.all_ok(), "{report:#?}");
    let after = keys(t.store.as_ref()).await;
    assert_intact(
        &after,
        "a",
        &via_placeholders,
        "content copies of b's placeholders",
    );
    assert!(
        !after.contains(&blob_key("a", &layer)),
        "a's copy of a layer b holds itself is garbage"
    );
    assert_intact(&after, "a", &own, "a's tagged image");
    assert_intact(&after, "b", &shared, "b's tagged image (placeholders)");
    assert_gone(&after, "b", &b_garbage, "b's garbage");
    assert!(dangling(t.store.as_ref()).await.is_empty());

    // b drops the image: its placeholders are garbage now; a's copies stay this run (the
    // listing still shows the placeholders) and go in the next.
    f.layout("b", &[]).await;
    gc(&t.store, &eager()).await;
    let after = keys(t.store.as_ref()).await;
    assert_gone(&after, "b", &shared, "b's unreferenced placeholders");
    assert_intact(
        &after,
        "a",
        &via_placeholders,
        "copies while the placeholders were listed",
    );
    gc(&t.store, &eager()).await;
    let after = keys(t.store.as_ref()).await;
    assert_gone(&after, "a", &shared, "copies no placeholder needs any more");
    assert_intact(&after, "a", &own, "a's tagged image");
}

/// A reachable placeholder whose content is nowhere in the bucket: the repository fails
/// closed (its garbage stays), the others are collected.
async fn placeholder_without_content_fails_closed(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    // a holds the manifest and config; the layer's content is nowhere.
    let gone = f.image("a", "lost").await;
    f.layout("a", &[]).await;
    let layer = sha256(b"layer of lost");
    t.store
        .delete_batch(&[blob_key("a", &layer)])
        .await
        .expect("delete");
    placeholders(&f, "b", &gone).await;
    let garbage = f.image("b", "garbage").await;
    f.layout("b", &[(Some("latest"), &gone)]).await;
    let other = f.image("c", "kept").await;
    let other_garbage = f.image("c", "garbage").await;
    f.layout("c", &[(Some("v1"), &other)]).await;
    let report = gc(&t.store, &eager()).await;
    let r = repo_report(&report, "b");
    assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
    assert!(r.deleted.is_empty());
    assert!(
        r.errors
            .iter()
            .any(|e| e.contains("placeholder") && e.contains(&layer)),
        "{r:#?}"
    );
    let after = keys(t.store.as_ref()).await;
    assert_intact(
        &after,
        "b",
        &garbage,
        "garbage of a failed-closed repository",
    );
    assert_gone(&after, "c", &other_garbage, "other repositories go on");
    assert!(!report.all_ok());
}

/// Deleting a repository that holds content copies for other repositories' placeholders keeps
/// those copies (and an empty repository around them), and the image behind the placeholders
/// stays whole.
async fn delete_repo_keeps_content_for_placeholders(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let shared = f.image("a", "shared").await;
    let unique = f.image("a", "unique").await;
    f.layout("a", &[(Some("v1"), &shared), (Some("v2"), &unique)])
        .await;
    placeholders(&f, "b", &shared).await;
    f.layout("b", &[(Some("latest"), &shared)]).await;

    let report = delete(&t.store, &["a"], false).await;
    let r = repo_report(&report, "a");
    assert_eq!(r.status, RepoStatus::Ok, "{r:#?}");
    assert!(r.warnings.iter().any(|w| w.contains("kept")), "{r:#?}");
    let after = keys(t.store.as_ref()).await;
    assert_intact(&after, "a", &shared, "content copies b needs");
    assert_gone(&after, "a", &unique, "blobs only a used");
    assert!(
        after.contains("a/oci-layout"),
        "the emptied repository stays"
    );
    let index = t.store.get("a/index.json").await.expect("empty index");
    let doc: serde_json::Value = serde_json::from_slice(&index.body).expect("json");
    assert_eq!(doc["manifests"], json!([]), "a no longer resolves any tag");

    // A gc keeps the copies while b's placeholders exist, then collects them.
    gc(&t.store, &eager()).await;
    assert_intact(&keys(t.store.as_ref()).await, "a", &shared, "still needed");
    f.layout("b", &[]).await;
    gc(&t.store, &eager()).await;
    gc(&t.store, &eager()).await;
    assert_gone(
        &keys(t.store.as_ref()).await,
        "a",
        &shared,
        "needed by nobody",
    );
}

/// `oci-layout` files inside a repository's blob space (`team/app/blobs/`,
/// `team/app/blobs/sha256/`) are content of that repository, never repositories: `gc` reports
/// them rejected and `delete-repo` of them fails and deletes nothing.
async fn layouts_inside_blobs_are_no_repositories(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("team/app", "v1").await;
    f.layout("team/app", &[(Some("v1"), &img)]).await;
    for inner in ["team/app/blobs", "team/app/blobs/sha256"] {
        f.put(
            &format!("{inner}/oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .await;
        f.put(
            &format!("{inner}/index.json"),
            br#"{"schemaVersion":2,"manifests":[]}"#,
        )
        .await;
    }
    let before = keys(t.store.as_ref()).await;

    for name in ["team/app/blobs/sha256", "team/app/blobs"] {
        let report = delete(&t.store, &[name], false).await;
        let r = repo_report(&report, name);
        assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
        assert!(r.deleted.is_empty());
        assert!(r.errors.iter().any(|e| e.contains("blobs/")), "{r:#?}");
    }
    assert_eq!(
        keys(t.store.as_ref()).await,
        before,
        "delete-repo deleted keys"
    );

    let report = gc(&t.store, &eager()).await;
    let rejected: Vec<&str> = report.rejected.iter().map(|r| r.prefix.as_str()).collect();
    assert_eq!(rejected, ["team/app/blobs/", "team/app/blobs/sha256/"]);
    assert!(report
        .repositories
        .iter()
        .all(|r| !r.name.starts_with("team/app/blobs")));
    assert_eq!(keys(t.store.as_ref()).await, before, "gc deleted keys");
    assert_intact(&before, "team/app", &img, "the real repository");
}

/// An `index.json` over the index cap, or a reachable manifest over the manifest cap, fails
/// its repository closed; nothing is deleted there.
async fn oversize_documents_fail_closed(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    // A root index padded past 16 MiB.
    let img = f.image("big-index", "v1").await;
    let garbage_a = f.image("big-index", "garbage").await;
    f.put("big-index/oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .await;
    let mut entry = img.json();
    entry["annotations"] = json!({ "pad": "x".repeat(17 * 1024 * 1024) });
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]});
    f.put(
        "big-index/index.json",
        &serde_json::to_vec(&index).expect("json"),
    )
    .await;
    // A tagged "manifest" of 5 MiB.
    let config = f.blob("big-manifest", OCI_CONFIG, b"{}").await;
    let padded = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.json(),
        "layers": [],
        "annotations": {"pad": "y".repeat(5 * 1024 * 1024)},
    });
    let big = f
        .doc("big-manifest", OCI_MANIFEST, &padded, &[&config])
        .await;
    let garbage_b = f.image("big-manifest", "garbage").await;
    f.layout("big-manifest", &[(Some("v1"), &big)]).await;

    let report = gc(&t.store, &eager()).await;
    let after = keys(t.store.as_ref()).await;
    for (repo, garbage) in [("big-index", &garbage_a), ("big-manifest", &garbage_b)] {
        let r = repo_report(&report, repo);
        assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
        assert!(r.deleted.is_empty());
        assert!(
            r.errors.iter().any(|e| e.contains("read limit")),
            "{repo}: {r:#?}"
        );
        assert_intact(&after, repo, garbage, "failed closed");
    }
}

/// `index.json` is read as Go reads it: `"manifests": null` (what `umoci rm` of the last tag
/// writes) is an empty list, `"Manifests"` is the same field; an object without the field is
/// no index, and its repository fails closed.
async fn index_json_is_read_as_go_reads_it(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let marker = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let gone = f.image("emptied", "old").await;
    f.put("emptied/oci-layout", marker).await;
    f.put(
        "emptied/index.json",
        br#"{"schemaVersion":2,"manifests":null}"#,
    )
    .await;
    let kept = f.image("capital", "v1").await;
    f.put("capital/oci-layout", marker).await;
    let index = json!({"schemaVersion": 2, "Manifests": [kept.json()]});
    f.put(
        "capital/index.json",
        &serde_json::to_vec(&index).expect("json"),
    )
    .await;
    let stays = f.image("not-an-index", "v1").await;
    f.put("not-an-index/oci-layout", marker).await;
    f.put("not-an-index/index.json", br#"{"schemaVersion":2}"#)
        .await;

    let report = gc(&t.store, &eager()).await;
    let after = keys(t.store.as_ref()).await;
    assert_eq!(repo_report(&report, "emptied").status, RepoStatus::Ok);
    assert_gone(&after, "emptied", &gone, "a repository without images");
    assert_eq!(repo_report(&report, "capital").status, RepoStatus::Ok);
    assert_intact(&after, "capital", &kept, "\"Manifests\" is manifests");
    let r = repo_report(&report, "not-an-index");
    assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
    assert_intact(&after, "not-an-index", &stays, "failed closed");
}

/// Entries of `index.json` (and of any index) are manifests whatever type they declare: one
/// without a media type, or one calling itself `application/octet-stream`, is read and
/// followed; one that cannot be read as a manifest (over the cap) fails the repository closed.
async fn index_entries_are_manifests_whatever_they_declare(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let marker = br#"{"imageLayoutVersion":"1.0.0"}"#;
    // An odd declared type: followed.
    let config = f.blob("odd", OCI_CONFIG, br#"{"c":2}"#).await;
    let layer = f.blob("odd", OCI_LAYER, b"layer bytes 2").await;
    let m = f.manifest("odd", &config, &[&layer], None).await;
    let odd = Desc {
        media_type: "application/octet-stream".into(),
        ..m.clone()
    };
    f.layout("odd", &[(Some("v1"), &odd)]).await;
    // No declared type, and over the manifest cap: fails closed.
    let config = f.blob("untyped", OCI_CONFIG, br#"{"c":1}"#).await;
    let layer = f.blob("untyped", OCI_LAYER, b"layer bytes").await;
    let mut body = serde_json::to_string(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": config.json(), "layers": [layer.json()],
    }))
    .expect("json");
    body.push_str(&" ".repeat(5 * 1024 * 1024));
    let digest = sha256(body.as_bytes());
    f.put(&blob_key("untyped", &digest), body.as_bytes()).await;
    f.put("untyped/oci-layout", marker).await;
    let index = json!({"schemaVersion": 2, "manifests": [{
        "digest": digest, "size": body.len(),
        "annotations": {"org.opencontainers.image.ref.name": "v1"},
    }]});
    f.put(
        "untyped/index.json",
        &serde_json::to_vec(&index).expect("json"),
    )
    .await;

    let report = gc(&t.store, &eager()).await;
    let after = keys(t.store.as_ref()).await;
    assert_eq!(repo_report(&report, "odd").status, RepoStatus::Ok);
    assert_intact(&after, "odd", &m, "an index entry of odd declared type");
    let r = repo_report(&report, "untyped");
    assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
    assert!(r.deleted.is_empty(), "{r:#?}");
    for d in [&config, &layer] {
        assert!(after.contains(&blob_key("untyped", &d.digest)));
    }
}

/// A store that refuses every write: what read-only credentials give.
struct ReadOnly(Arc<dyn Store>);

#[async_trait]
impl Intercept for ReadOnly {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.0
    }
    async fn put_with_metadata(
        &self,
        key: &str,
        _body: Bytes,
        _c: PutCondition,
        _m: Metadata,
    ) -> StoreResult<PutOutcome> {
        panic!("dry run wrote {key}")
    }
    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        panic!("dry run deleted {keys:?}")
    }
}

/// Dry runs of `gc` and `delete-repo` work with read-only credentials: no PUT, no DELETE,
/// and still the full plan.
async fn dry_runs_write_nothing(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let garbage = f.neighbours().await;
    let ro: Arc<dyn Store> = Arc::new(Wrapped(ReadOnly(t.store.clone())));
    let report = gc(
        &ro,
        &GcOptions {
            dry_run: true,
            ..eager()
        },
    )
    .await;
    assert!(report.all_ok(), "{report:#?}");
    assert_eq!((report.requests.put, report.requests.delete), (0, 0));
    for (repo, _, g) in &garbage {
        let planned = deleted_keys(&report, repo);
        for d in &g.subtree {
            assert!(
                planned.contains(&blob_key(repo, d)),
                "{repo}: {d} not planned"
            );
        }
    }
    let report = delete(&ro, &["team/app"], true).await;
    assert_eq!((report.requests.put, report.requests.delete), (0, 0));
    assert!(!repo_report(&report, "team/app").deleted.is_empty());
}

both_stores!(
    placeholders_keep_content_copies_alive,
    placeholder_without_content_fails_closed,
    delete_repo_keeps_content_for_placeholders,
    layouts_inside_blobs_are_no_repositories,
    oversize_documents_fail_closed,
    dry_runs_write_nothing,
    index_json_is_read_as_go_reads_it,
    index_entries_are_manifests_whatever_they_declare,
);
