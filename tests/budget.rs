//! The blast-radius budget (issue 14, part 3): a bucket read with the wrong `--layout` or a
//! prefix one level off would lose most of a repository; the budget stops it before anything
//! is deleted. Every scenario shows first what the run would delete without the budget (a dry
//! run with `max_delete_fraction: 1`, which reports exactly what the real run deletes), then
//! that the real run with the default budget deletes nothing.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::dist::{data_key, DistWriter};
use common::*;
use ocigc::gc::{run_gc, GcOptions, DEFAULT_MAX_DELETE_FRACTION};
use ocigc::layout::{by_name, oci::OciLayout, LayoutOptions};
use ocigc::metrics::Metrics;
use ocigc::report::{RepoStatus, Report};
use ocigc::store::{DirStore, S3Store, Store};

/// The default budget, everything else as eager as the other scenarios.
fn guarded() -> GcOptions {
    GcOptions {
        max_delete_fraction: DEFAULT_MAX_DELETE_FRACTION,
        ..eager()
    }
}

/// Without the budget, in a dry run: what the real run would delete.
fn unguarded_dry_run() -> GcOptions {
    GcOptions {
        max_delete_fraction: 1.0,
        dry_run: true,
        ..eager()
    }
}

/// The same bucket as `t`, seen through a bucket URL whose prefix is `prefix`.
async fn with_prefix(t: &TestStore, prefix: &str) -> Arc<dyn Store> {
    match t.endpoint() {
        None => Arc::new(DirStore::open(Path::new(&t.bucket).join(prefix)).expect("open")),
        Some(endpoint) => {
            Arc::new(S3Store::connect(s3_settings_at(&endpoint, &t.bucket, prefix)).await)
        }
    }
}

fn statuses(report: &Report) -> Vec<(String, RepoStatus)> {
    report
        .repositories
        .iter()
        .map(|r| (r.name.clone(), r.status))
        .collect()
}

/// zot with dedupe: `team/base` pushed the images first and holds their content; the
/// applications hold 0-byte placeholders and tag the images; `team/base` has since untagged
/// everything. Read from the bucket root, nothing of `team/base` may go (the placeholders keep
/// its copies). Read through `s3://bucket/team` (one level off), the placeholders are out of
/// sight, and every layer of every application would be deleted.
async fn wrong_prefix_is_stopped_by_the_budget(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let mut images = Vec::new();
    for app in ["apps/api", "apps/web", "apps/worker"] {
        let image = f.image("team/base", app).await;
        for d in &image.subtree {
            f.put(&blob_key(app, d), b"").await;
        }
        f.layout(app, &[(Some("latest"), &image)]).await;
        images.push(image);
    }
    f.layout("team/base", &[]).await;
    let before = keys(t.store.as_ref()).await;

    // The right prefix: nothing to delete, nothing refused.
    let right = gc(
        &t.store,
        &GcOptions {
            dry_run: true,
            ..guarded()
        },
    )
    .await;
    assert!(right.all_ok(), "{:?}", statuses(&right));
    assert_eq!(right.totals.blobs_deleted, 0, "{right:#?}");

    // The wrong prefix, without the budget: every content copy, i.e. every image.
    let wrong = with_prefix(&t, "team").await;
    let layout = Arc::new(OciLayout);
    let would = run_gc(wrong.clone(), layout.clone(), &unguarded_dry_run())
        .await
        .expect("dry run");
    let would_delete: BTreeSet<String> = all_deleted_keys(&would)
        .into_iter()
        .map(|k| format!("team/{k}"))
        .collect();
    for image in &images {
        for d in &image.subtree {
            assert!(
                would_delete.contains(&blob_key("team/base", d)),
                "without the budget {d} (needed by an application) would be deleted"
            );
        }
    }
    let every_blob: BTreeSet<String> = before
        .iter()
        .filter(|k| k.starts_with("team/base/blobs/"))
        .cloned()
        .collect();
    assert_eq!(would_delete, every_blob, "100% of the repository's blobs");

    // With the default budget: refused, nothing deleted anywhere, exit status 3.
    let metrics = Arc::new(Metrics::new());
    let opts = GcOptions {
        metrics: Some(metrics.clone()),
        ..guarded()
    };
    let report = run_gc(wrong, layout, &opts).await.expect("run");
    let base = repo_report(&report, "base");
    assert_eq!(base.status, RepoStatus::BudgetExceeded, "{base:#?}");
    assert!(base.deleted.is_empty());
    assert!(base
        .errors
        .iter()
        .any(|e| e.contains("--max-delete-fraction")));
    assert!(
        !report.all_ok(),
        "a refused repository makes the run partial (exit 3)"
    );
    assert_eq!(report.totals.budget_exceeded, 1);
    assert_eq!(keys(t.store.as_ref()).await, before, "nothing may change");
    assert!(dangling(t.store.as_ref()).await.is_empty());
    let text = metrics.encode();
    assert!(
        text.contains("ocigc_repos_total{status=\"budget_exceeded\"} 1"),
        "{text}"
    );
}

/// A registry that keeps blobs in the classic `docker/registry/v2/blobs/` tree but its
/// manifests and tags elsewhere (GitLab's container registry with its metadata database) is
/// not the `distribution` layout. Read as one, no blob has a root: all of them would go.
async fn wrong_layout_is_stopped_by_the_budget(t: TestStore) {
    let writer: Arc<dyn Store> = Arc::new(DistWriter::new(t.store.clone()));
    let f = Fixture {
        store: writer.as_ref(),
    };
    let mut images = Vec::new();
    for repo in ["group/api", "group/web"] {
        images.push(f.image(repo, repo).await);
    }
    let before = keys(t.store.as_ref()).await;
    let layout = by_name("distribution", LayoutOptions::default()).expect("layout");

    let would = run_gc(t.store.clone(), layout.clone(), &unguarded_dry_run())
        .await
        .expect("dry run");
    let would_delete = all_deleted_keys(&would);
    for d in images.iter().flat_map(|i| i.subtree.iter()) {
        assert!(
            would_delete.contains(&data_key(d)),
            "without the budget every blob would go: {d}"
        );
    }

    let report = run_gc(t.store.clone(), layout, &guarded())
        .await
        .expect("run");
    assert!(
        report
            .repositories
            .iter()
            .any(|r| r.status == RepoStatus::BudgetExceeded),
        "{:?}",
        statuses(&report)
    );
    assert_eq!(report.totals.blobs_deleted, 0);
    assert!(!report.all_ok());
    assert_eq!(keys(t.store.as_ref()).await, before, "nothing may change");
}

/// `max_delete_bytes` bounds the run: the repository whose deletions would cross it, and every
/// one after it, delete nothing; what was deleted stays within the bound.
async fn the_run_stops_at_its_byte_bound(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let neighbours = f.neighbours().await;
    let garbage: Vec<u64> = neighbours
        .iter()
        .map(|(_, _, g)| g.subtree.len() as u64)
        .collect();
    assert!(garbage.iter().all(|n| *n == 3));
    let before = keys(t.store.as_ref()).await;
    let all = gc(
        &t.store,
        &GcOptions {
            dry_run: true,
            ..guarded()
        },
    )
    .await;
    let per_repo: Vec<u64> = all.repositories.iter().map(|r| r.bytes_deleted()).collect();
    let (smallest, largest) = (
        per_repo.iter().copied().min().expect("repos"),
        per_repo.iter().copied().max().expect("repos"),
    );
    // Room for any one repository's garbage, never for two.
    let bound = largest;
    assert!(
        bound < 2 * smallest,
        "the fixture's repositories are alike: {per_repo:?}"
    );

    let opts = GcOptions {
        max_delete_bytes: Some(bound),
        ..guarded()
    };
    let report = gc(&t.store, &opts).await;
    let deleted_repos: Vec<_> = report
        .repositories
        .iter()
        .filter(|r| !r.deleted.is_empty())
        .collect();
    assert_eq!(deleted_repos.len(), 1, "{:?}", statuses(&report));
    assert!(report.totals.bytes_deleted <= bound);
    let refused = report
        .repositories
        .iter()
        .filter(|r| r.status == RepoStatus::BudgetExceeded)
        .count();
    assert_eq!(refused, 3, "{:?}", statuses(&report));
    for r in &report.repositories {
        if r.status == RepoStatus::BudgetExceeded {
            assert!(r.deleted.is_empty());
            assert!(
                r.errors.iter().any(|e| e.contains("--max-delete-bytes")),
                "{r:#?}"
            );
        }
    }
    assert!(!report.all_ok());
    let removed: BTreeSet<String> = before
        .difference(&keys(t.store.as_ref()).await)
        .cloned()
        .collect();
    assert_eq!(
        removed,
        all_deleted_keys(&report),
        "the report is the bucket"
    );
    assert!(dangling(t.store.as_ref()).await.is_empty());
}

/// A repository that is garbage as a whole (every tag removed) exceeds any fraction below 1:
/// refused by default, collected with `max_delete_fraction: 1` for the run; whole-repository
/// deletion is never refused.
async fn an_all_garbage_repository_needs_the_override(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let old = f.image("team/old", "old").await;
    f.layout("team/old", &[]).await;
    let kept = f.image("team/kept", "kept").await;
    f.layout("team/kept", &[(Some("v1"), &kept)]).await;
    let garbage = f.image("team/kept", "garbage").await;

    let report = gc(&t.store, &guarded()).await;
    let refused = repo_report(&report, "team/old");
    assert_eq!(refused.status, RepoStatus::BudgetExceeded);
    assert!(refused
        .errors
        .iter()
        .any(|e| e.contains("--max-delete-fraction 1")));
    // Other repositories go on: team/kept loses its garbage (well under 90%).
    assert_eq!(repo_report(&report, "team/kept").status, RepoStatus::Ok);
    let after = keys(t.store.as_ref()).await;
    assert_intact(&after, "team/old", &old, "refused repository");
    assert_gone(
        &after,
        "team/kept",
        &garbage,
        "garbage of an ordinary repository",
    );

    let report = gc(
        &t.store,
        &GcOptions {
            max_delete_fraction: 1.0,
            ..guarded()
        },
    )
    .await;
    assert!(report.all_ok(), "{:?}", statuses(&report));
    assert_gone(
        &keys(t.store.as_ref()).await,
        "team/old",
        &old,
        "with the override",
    );

    // Whole-repository deletion is exempt: it deletes everything by design.
    let deleted = delete(&t.store, &["team/kept"], false).await;
    assert!(deleted.all_ok(), "{:?}", statuses(&deleted));
    assert!(keys(t.store.as_ref())
        .await
        .iter()
        .all(|k| !k.starts_with("team/kept/")));
}

both_stores!(
    wrong_prefix_is_stopped_by_the_budget,
    wrong_layout_is_stopped_by_the_budget,
    the_run_stops_at_its_byte_bound,
    an_all_garbage_repository_needs_the_override,
);
