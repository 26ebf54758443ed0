//! Whole-repository deletion: every key a repository owns, never a key of a neighbour.
//!
//! Only the repository's own prefix is listed, and the layout separates out repositories
//! nested below it, so `team/app` never touches `team/app/tools` or `team/app-edge`. Keys go
//! in the layout's phases (for `oci`: `index.json` first so pulls stop resolving, the
//! `oci-layout` marker last so an interrupted deletion is found again and resumed).

use std::sync::Arc;
use std::time::Duration;

use super::clock::BucketClock;
use super::{finish_report, list_all, new_report, sweep, GcError};
use crate::gc::plan::Reason;
use crate::layout::{KeyKind, Layout};
use crate::report::{timestamp, Deleted, RepoReport, RepoStatus, Report};
use crate::store::{Instrumented, Store};

/// Settings of a `delete-repo` run.
#[derive(Clone, Debug)]
pub struct DeleteRepoOptions {
    /// Report what would be deleted, delete nothing.
    pub dry_run: bool,
    /// Store requests in flight at most.
    pub concurrency: usize,
    /// Time-out of one store request, retries included.
    pub request_timeout: Duration,
}

/// Deletes the named repositories (names must already be validated). A repository that no
/// longer exists is reported `ok` with a warning, so the command is idempotent.
pub async fn delete_repositories(
    store: Arc<dyn Store>,
    layout: Arc<dyn Layout>,
    names: &[String],
    opts: &DeleteRepoOptions,
) -> Result<Report, GcError> {
    let store = Instrumented::new(store, opts.concurrency, opts.request_timeout);
    let mut report = new_report("delete-repo", &store, layout.as_ref(), opts.dry_run);
    let clock = BucketClock::probe(&store, &report.run_id)
        .await
        .map_err(|source| GcError::Clock {
            bucket: store.describe(),
            source,
        })?;
    report.started_at = timestamp(clock.now());
    for name in names {
        let r = delete_one(&store, layout.as_ref(), name, opts.dry_run).await;
        tracing::info!(run_id = %report.run_id, repo = %name, status = ?r.status, deleted = r.deleted.len(), "repository deletion");
        report.repositories.push(r);
    }
    finish_report(&mut report, &store, &clock);
    Ok(report)
}

async fn delete_one(
    store: &Instrumented,
    layout: &dyn Layout,
    name: &str,
    dry_run: bool,
) -> RepoReport {
    let mut report = RepoReport::new(name, RepoStatus::Ok);
    let objects = match list_all(store, &layout.repository_prefix(name)).await {
        Ok(o) => o,
        Err(e) => {
            report.status = RepoStatus::Failed;
            report
                .errors
                .push(format!("listing failed, nothing deleted: {e}"));
            return report;
        }
    };
    let Some(repo) = layout
        .partition(objects)
        .repositories
        .into_iter()
        .find(|r| r.name == name)
    else {
        report
            .warnings
            .push("repository not found (already deleted, or never existed)".into());
        return report;
    };
    report.objects = repo.objects.len() as u64;
    report.bytes = repo.objects.iter().map(|o| o.size).sum();
    for phase in layout.deletion_phases(&repo) {
        let items: Vec<Deleted> = phase
            .into_iter()
            .map(|o| Deleted {
                digest: match layout.classify(&repo, &o.key) {
                    KeyKind::Blob(d) => Some(d),
                    KeyKind::Other => None,
                },
                key: o.key,
                size: o.size,
                reason: Reason::RepositoryDeleted,
            })
            .collect();
        if dry_run {
            report.deleted.extend(items);
            continue;
        }
        let swept = sweep::sweep(store, items, None).await;
        report.deleted.extend(swept.deleted);
        if !swept.errors.is_empty() {
            // Later phases wait: the marker must outlive every other key.
            report.status = RepoStatus::Failed;
            report.errors.extend(swept.errors);
            break;
        }
    }
    report
}
