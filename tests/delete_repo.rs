//! Whole-repository deletion, against the directory store, moto and SeaweedFS.

mod common;

use common::*;
use ocigc::report::RepoStatus;

async fn populate(f: &Fixture<'_>) {
    f.neighbours().await;
    f.put("team/app/README", b"docs").await;
    f.put("_ocigc/unrelated", b"state").await;
}

async fn deletes_only_the_named_repositories(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    populate(&f).await;
    let before = keys(t.store.as_ref()).await;
    let report = delete(&t.store, &["library/alpine", "team/app"], false).await;
    let after = keys(t.store.as_ref()).await;

    for repo in ["library/alpine", "team/app"] {
        let r = repo_report(&report, repo);
        assert_eq!(r.status, RepoStatus::Ok, "{r:#?}");
        // index.json goes first so pulls stop resolving; the marker goes last.
        assert_eq!(
            r.deleted.first().map(|d| d.key.clone()),
            Some(format!("{repo}/index.json"))
        );
        assert_eq!(
            r.deleted.last().map(|d| d.key.clone()),
            Some(format!("{repo}/oci-layout"))
        );
    }
    let owned_by = |k: &String, repo: &str| {
        k.starts_with(&format!("{repo}/")) && !k.starts_with("team/app/tools/")
    };
    for k in &before {
        let doomed = owned_by(k, "library/alpine") || owned_by(k, "team/app");
        assert_eq!(after.contains(k), !doomed, "{}: key {k}", t.kind);
    }
    assert!(after.contains("team/app/tools/index.json"));
    assert!(after.contains("library/alpine-edge/index.json"));
    assert!(after.contains("_ocigc/unrelated"));
    let removed = before.len() - after.len();
    assert_eq!(report.totals.blobs_deleted as usize, removed);
}

async fn resumes_and_is_idempotent(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    populate(&f).await;
    // An earlier deletion died after removing index.json and one blob.
    let some_blob = keys(t.store.as_ref())
        .await
        .into_iter()
        .find(|k| k.starts_with("team/app/blobs/"))
        .expect("a blob");
    t.store
        .delete_batch(&["team/app/index.json".into(), some_blob])
        .await
        .expect("partial delete");
    let report = delete(&t.store, &["team/app"], false).await;
    assert_eq!(repo_report(&report, "team/app").status, RepoStatus::Ok);
    let k = keys(t.store.as_ref()).await;
    assert!(!k
        .iter()
        .any(|k| k.starts_with("team/app/") && !k.starts_with("team/app/tools/")));
    assert!(k.contains("team/app/tools/oci-layout"));

    let again = delete(&t.store, &["team/app"], false).await;
    let r = repo_report(&again, "team/app");
    assert_eq!(r.status, RepoStatus::Ok);
    assert!(r.deleted.is_empty());
    assert!(r.warnings.iter().any(|w| w.contains("not found")), "{r:#?}");
    assert_eq!(keys(t.store.as_ref()).await, k);
}

async fn dry_run_deletes_nothing(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    populate(&f).await;
    let before = keys(t.store.as_ref()).await;
    let dry = delete(&t.store, &["library/alpine"], true).await;
    assert_eq!(keys(t.store.as_ref()).await, before);
    let planned = deleted_keys(&dry, "library/alpine");
    let expected: std::collections::BTreeSet<String> = before
        .iter()
        .filter(|k| k.starts_with("library/alpine/"))
        .cloned()
        .collect();
    assert_eq!(planned, expected);
    let real = delete(&t.store, &["library/alpine"], false).await;
    assert_eq!(deleted_keys(&real, "library/alpine"), planned);
}

both_stores!(
    deletes_only_the_named_repositories,
    resumes_and_is_idempotent,
    dry_run_deletes_nothing,
);
