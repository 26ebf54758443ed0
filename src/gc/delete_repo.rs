//! Whole-repository deletion: every key a repository owns, never a key of a neighbour.
//!
//! Only the repository's own prefix is listed, and the layout separates out repositories
//! nested below it, so `team/app` never touches `team/app/tools` or `team/app-edge`. Keys go
//! in the layout's phases (for `oci`: `index.json` first so pulls stop resolving, the
//! `oci-layout` marker last so an interrupted deletion is found again and resumed). The work
//! runs under the repository's lease, so it never interleaves with a collector; ocigc's own
//! state for the repository (pending candidates, intents) goes with it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::lease::{Acquired, Lease, Leases};
use super::stop::Stop;
use super::sweep::Guard;
use super::{finish_report, list_all, new_report, probe_clock, sweep, GcError};
use crate::digest::Digest;
use crate::gc::plan::Reason;
use crate::gc::{cache, intent, state};
use crate::layout::{KeyKind, Layout, Repository};
use crate::metrics::Metrics;
use crate::namespace::Scope;
use crate::report::{timestamp, Deleted, RepoReport, RepoStatus, Report};
use crate::store::{Instrumented, PutCondition, Store};

/// Settings of a `delete-repo` run.
#[derive(Clone, Debug)]
pub struct DeleteRepoOptions {
    /// Report what would be deleted, delete nothing.
    pub dry_run: bool,
    /// Store requests in flight at most.
    pub concurrency: usize,
    /// Time-out of one store request, retries included.
    pub request_timeout: Duration,
    /// Lifetime of the repository lease between renewals.
    pub lease_ttl: Duration,
    /// Added to the bucket clock (tests, drills). Zero in use.
    pub clock_offset: Duration,
    /// Where to record metrics, if anywhere.
    pub metrics: Option<Arc<Metrics>>,
    /// Store requests per second at most, shared with whatever else holds the limiter.
    pub rate_limit: Option<Arc<crate::store::RateLimit>>,
}

/// Deletes the named repositories (names must already be validated). A repository that no
/// longer exists is reported `ok` with a warning, so the command is idempotent.
pub async fn delete_repositories(
    store: Arc<dyn Store>,
    layout: Arc<dyn Layout>,
    names: &[String],
    opts: &DeleteRepoOptions,
) -> Result<Report, GcError> {
    let store = Instrumented::new(store, opts.concurrency, opts.request_timeout)
        .with_rate_limit(opts.rate_limit.clone())
        .with_metrics(opts.metrics.clone());
    let mut report = new_report("delete-repo", &store, layout.as_ref(), opts.dry_run);
    let clock = probe_clock(&store).await?.ahead_by(opts.clock_offset);
    report.started_at = timestamp(clock.now());
    let leases = Leases {
        store: &store,
        clock,
        owner: report.run_id.clone(),
        ttl: opts.lease_ttl,
    };
    for name in names {
        let started = std::time::Instant::now();
        let r = delete_one(&store, layout.as_ref(), &leases, name, opts).await;
        tracing::info!(
            run_id = %report.run_id,
            repo = %name,
            status = ?r.status,
            deleted = r.deleted.len(),
            bytes_deleted = r.bytes_deleted(),
            duration_ms = started.elapsed().as_millis() as u64,
            "repository deletion"
        );
        report.repositories.push(r);
    }
    finish_report(&mut report, &store, &clock);
    if let Some(m) = &opts.metrics {
        m.observe_deletion(&report);
    }
    Ok(report)
}

struct LeaseGuard<'a, 'l> {
    leases: &'a Leases<'l>,
    lease: &'a mut Lease,
}

#[async_trait]
impl Guard for LeaseGuard<'_, '_> {
    async fn before_batch(&mut self, batch: Vec<Deleted>) -> Result<Vec<Deleted>, Stop> {
        self.leases
            .keep(self.lease)
            .await
            .map_err(|e| Stop::LeaseLost(e.to_string()))?;
        Ok(batch)
    }
}

async fn delete_one(
    store: &Instrumented,
    layout: &dyn Layout,
    leases: &Leases<'_>,
    name: &str,
    opts: &DeleteRepoOptions,
) -> RepoReport {
    let dry_run = opts.dry_run;
    let mut report = RepoReport::new(name, RepoStatus::Ok);
    let (mut repo, linked) = match find_repository(store, layout, name, opts.concurrency).await {
        Ok(Found::Repository(repo, linked)) => (repo, linked),
        Ok(Found::Absent) => {
            report
                .warnings
                .push("repository not found (already deleted, or never existed)".into());
            return report;
        }
        Ok(Found::Rejected(reason)) => {
            report.status = RepoStatus::Failed;
            report
                .errors
                .push(format!("not a repository, nothing deleted: {reason}"));
            return report;
        }
        Err(e) => {
            report.status = RepoStatus::Failed;
            report
                .errors
                .push(format!("listing failed, nothing deleted: {e}"));
            return report;
        }
    };
    // What the store cannot serve (a symlink, a special file) is never deleted through; the
    // repository stays failed until someone looks at it, and its other keys go.
    let (defects, objects): (Vec<_>, Vec<_>) = std::mem::take(&mut repo.objects)
        .into_iter()
        .partition(|o| o.defect.is_some());
    repo.objects = objects;
    for d in &defects {
        report.status = RepoStatus::Failed;
        let defect = d.defect.as_deref().unwrap_or_default();
        report
            .errors
            .push(format!("{} is not an object, left alone: {defect}", d.key));
    }
    report.objects = repo.objects.len() as u64;
    report.bytes = repo.objects.iter().map(|o| o.size).sum();
    // Blobs that other repositories link to (or hold placeholders of) stay until those go;
    // the repository stays as an empty one, so that a later gc collects them then.
    let shell: Vec<(String, bytes::Bytes)> = if linked.is_empty() {
        Vec::new()
    } else {
        report.warnings.push(format!(
            "{} blobs kept: other repositories link to them or hold placeholders of them",
            linked.len()
        ));
        layout.empty_repository(&repo)
    };
    let shell_keys: std::collections::HashSet<&str> =
        shell.iter().map(|(k, _)| k.as_str()).collect();
    let to_delete = |phase: Vec<crate::store::ObjectMeta>| -> Vec<Deleted> {
        phase
            .into_iter()
            .map(|o| Deleted {
                digest: match layout.classify(&repo, &o.key) {
                    KeyKind::Blob(d) => Some(d),
                    KeyKind::Scratch | KeyKind::Other => None,
                },
                key: o.key,
                size: o.size,
                reason: Reason::RepositoryDeleted,
            })
            .filter(|d| d.digest.as_ref().is_none_or(|g| !linked.contains(g)))
            .filter(|d| !shell_keys.contains(d.key.as_str()))
            .collect()
    };
    let phases: Vec<Vec<Deleted>> = layout
        .deletion_phases(&repo)
        .into_iter()
        .map(to_delete)
        .collect();
    if dry_run {
        report.deleted.extend(phases.into_iter().flatten());
        return report;
    }
    let mut lease = match leases.acquire(name).await {
        Ok(Acquired::Ours(l)) => l,
        Ok(Acquired::Held { owner, expires_at }) => {
            report.status = RepoStatus::Skipped;
            report.lease_conflict = true;
            report.errors.push(format!(
                "lease held by {owner} until {expires_at}; nothing deleted, run again later"
            ));
            return report;
        }
        Err(e) => {
            report.status = RepoStatus::Failed;
            report
                .errors
                .push(format!("taking the lease failed, nothing deleted: {e}"));
            return report;
        }
    };
    // An emptied repository's index replaces the old one first: pulls stop resolving, as
    // when the index is deleted.
    for (key, body) in shell {
        if let Err(e) = store.put(&key, body, PutCondition::None).await {
            report.status = RepoStatus::Failed;
            report.errors.push(format!(
                "emptying the repository failed, nothing deleted: {e}"
            ));
            leases.release(lease).await;
            return report;
        }
    }
    let mut guard = LeaseGuard {
        leases,
        lease: &mut lease,
    };
    for (i, phase) in phases.into_iter().enumerate() {
        let swept = sweep::sweep(store, phase, None, 1, &mut guard).await;
        report.deleted.extend(swept.deleted);
        let failed = !swept.errors.is_empty() || swept.stopped.is_some();
        report.errors.extend(swept.errors);
        report.errors.extend(swept.stopped.map(|s| s.message()));
        if failed {
            // Later phases wait: the marker must outlive every other key.
            report.status = RepoStatus::Failed;
            break;
        }
        crate::failpoint::hit(&format!("delete-repo-phase-{i}"));
    }
    if report.status == RepoStatus::Ok {
        // ocigc's own state for the repository goes last: a crash before this point leaves
        // it for the resumed deletion, which removes it then.
        // Its trash and tag record go with it: a repository pushed again under the name must
        // not inherit roots whose manifests are gone.
        let mut keys = vec![
            state::pending_key(name),
            crate::namespace::trash_key(name),
            crate::namespace::tags_seen_key(name),
        ];
        match intent::list_intents(store, Scope::Repository(name)).await {
            Ok(listed) => keys.extend(listed.into_iter().map(|o| o.key)),
            Err(e) => report.warnings.push(format!("listing intents: {e}")),
        }
        // Its cache entries (a nested repository's are under the same prefix: kept).
        match list_all(store, &format!("{}{name}/", cache::CACHE_PREFIX)).await {
            Ok(listed) => keys.extend(
                listed
                    .state
                    .into_iter()
                    .filter(|o| cache::parse_entry_key(&o.key).is_some_and(|e| e.unit == name))
                    .map(|o| o.key),
            ),
            Err(e) => report.warnings.push(format!("listing cache entries: {e}")),
        }
        if let Err(e) = store.delete_batch(&keys).await {
            report.warnings.push(format!("removing state: {e}"));
        }
    }
    leases.release(lease).await;
    report
}

/// What the listing says of the repository to delete.
enum Found {
    /// It exists, with the digests that keys elsewhere in the bucket keep alive.
    Repository(Repository, HashSet<Digest>),
    /// It does not exist (any more).
    Absent,
    /// Its prefix is no repository (e.g. inside another repository's blob space), or the
    /// store cannot serve the path to it (a symlink): why.
    Rejected(String),
}

/// Lists the repository: only its own prefix, or the whole bucket where keys elsewhere can
/// keep its blobs alive (links, placeholders) or make its prefix part of another repository.
async fn find_repository(
    store: &Instrumented,
    layout: &dyn Layout,
    name: &str,
    concurrency: usize,
) -> Result<Found, crate::store::StoreError> {
    let whole_bucket = layout.links_across_repositories();
    let prefix = layout.repository_prefix(name);
    let listing = list_all(store, if whole_bucket { "" } else { &prefix }).await?;
    // A defect at or above the repository's path (its directory is a symlink) hides it.
    if let Some(d) = listing.objects.iter().find(|o| {
        o.defect.is_some() && prefix.starts_with(&format!("{}/", o.key.trim_end_matches('/')))
    }) {
        return Ok(Found::Rejected(format!(
            "{}: {}",
            d.key,
            d.defect.as_deref().unwrap_or_default()
        )));
    }
    let partition = layout.partition(listing.objects);
    if let Some(r) = partition.rejected.iter().find(|r| r.prefix == prefix) {
        return Ok(Found::Rejected(r.reason.clone()));
    }
    let linked = if whole_bucket {
        layout
            .linked_blobs(store, &partition, concurrency)
            .await?
            .remove(name)
            .unwrap_or_default()
            .into_iter()
            .collect()
    } else {
        HashSet::new()
    };
    Ok(partition
        .repositories
        .into_iter()
        .find(|r| r.name == name)
        .map_or(Found::Absent, |r| Found::Repository(r, linked)))
}
