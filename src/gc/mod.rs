//! The GC engine: list → partition by repository → mark → plan → delete → report.
//!
//! Layout- and store-agnostic: everything layout-specific goes through [`Layout`], every request
//! through [`Instrumented`] (concurrency bound, time-out, counts).

pub mod clock;
mod delete_repo;
pub mod mark;
pub mod plan;
pub mod sweep;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{stream, StreamExt, TryStreamExt};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use tokio::time::Instant;

use crate::digest::Digest;
use crate::layout::{KeyKind, Layout, Repository, STATE_PREFIX};
use crate::report::{timestamp, Deleted, RepoReport, RepoStatus, Report};
use crate::store::{Instrumented, ObjectMeta, Store, StoreError};
use mark::{mark, MarkContext};
use plan::{plan, Decision, PlanPolicy, Reason};

pub use delete_repo::{delete_repositories, DeleteRepoOptions};

/// A fatal error: the run could not even start on the repositories.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The bucket listing failed, so no repository can be judged.
    #[error("listing {bucket} failed")]
    List {
        bucket: String,
        #[source]
        source: StoreError,
    },
    /// The store's time could not be read (the first request of every run).
    #[error("cannot use {bucket}")]
    Clock {
        bucket: String,
        #[source]
        source: clock::ClockError,
    },
    /// The run time-out passed while the bucket was still being listed.
    #[error("run time-out of {0:?} reached while listing the bucket")]
    ListTimeout(Duration),
}

/// Which repositories a run collects: all, or those matching any of a set of globs.
///
/// `*` and `?` stay within one path segment, `**` spans segments (`team/**`).
#[derive(Clone, Debug, Default)]
pub struct RepoFilter(Option<GlobSet>);

impl RepoFilter {
    /// A filter from glob patterns; no patterns select every repository.
    pub fn new(patterns: &[String]) -> Result<RepoFilter, globset::Error> {
        if patterns.is_empty() {
            return Ok(RepoFilter(None));
        }
        let mut set = GlobSetBuilder::new();
        for p in patterns {
            set.add(GlobBuilder::new(p).literal_separator(true).build()?);
        }
        Ok(RepoFilter(Some(set.build()?)))
    }

    /// Whether `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        self.0.as_ref().is_none_or(|s| s.is_match(name))
    }
}

/// Settings of a `gc` run.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Unreferenced blobs younger than this are kept.
    pub grace: Duration,
    /// Delay between the two observations required before a delete; zero deletes in this run.
    pub delay: Duration,
    /// Plan and report only.
    pub dry_run: bool,
    /// Repositories to collect.
    pub repos: RepoFilter,
    /// Store requests in flight at most (also repositories collected at once).
    pub concurrency: usize,
    /// Time-out of one store request, retries included.
    pub request_timeout: Duration,
    /// Time-out of one repository.
    pub repo_timeout: Option<Duration>,
    /// Time-out of the whole run.
    pub run_timeout: Option<Duration>,
    /// Added to the bucket clock: simulates the passage of time (tests, drills). Zero in use.
    pub clock_offset: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(24 * 3600),
            delay: Duration::from_secs(3600),
            dry_run: false,
            repos: RepoFilter::default(),
            concurrency: 16,
            request_timeout: Duration::from_secs(60),
            repo_timeout: None,
            run_timeout: None,
            clock_offset: Duration::ZERO,
        }
    }
}

/// Lists every object under `prefix`, leaving out ocigc's own state.
pub(crate) async fn list_all(
    store: &dyn Store,
    prefix: &str,
) -> Result<Vec<ObjectMeta>, StoreError> {
    let pages: Vec<Vec<ObjectMeta>> = store.list(prefix).try_collect().await?;
    Ok(pages
        .into_iter()
        .flatten()
        .filter(|o| !o.key.starts_with(STATE_PREFIX))
        .collect())
}

pub(crate) fn new_report(
    command: &'static str,
    store: &Instrumented,
    layout: &dyn Layout,
    dry_run: bool,
) -> Report {
    Report {
        run_id: uuid::Uuid::new_v4().to_string(),
        command,
        bucket: store.describe(),
        layout: layout.name(),
        started_at: timestamp(SystemTime::now()),
        finished_at: String::new(),
        dry_run,
        grace: None,
        delay: None,
        repositories: Vec::new(),
        rejected: Vec::new(),
        unowned_objects: 0,
        totals: Default::default(),
        requests: Default::default(),
    }
}

pub(crate) fn finish_report(report: &mut Report, store: &Instrumented, clock: &clock::BucketClock) {
    report.repositories.sort_by(|a, b| a.name.cmp(&b.name));
    report.finished_at = timestamp(clock.now());
    report.requests = store.counts();
    report.compute_totals();
}

/// Runs garbage collection over every selected repository of the bucket.
pub async fn run_gc(
    store: Arc<dyn Store>,
    layout: Arc<dyn Layout>,
    opts: &GcOptions,
) -> Result<Report, GcError> {
    let store = Instrumented::new(store, opts.concurrency, opts.request_timeout);
    let mut report = new_report("gc", &store, layout.as_ref(), opts.dry_run);
    report.grace = Some(humantime::format_duration(opts.grace).to_string());
    report.delay = Some(humantime::format_duration(opts.delay).to_string());
    let run_deadline = opts.run_timeout.map(|t| Instant::now() + t);
    tracing::info!(run_id = %report.run_id, bucket = %report.bucket, dry_run = opts.dry_run, "gc run started");

    let clock = clock::BucketClock::probe(&store, &report.run_id)
        .await
        .map_err(|source| GcError::Clock {
            bucket: store.describe(),
            source,
        })?
        .ahead_by(opts.clock_offset);
    report.started_at = timestamp(clock.now());
    let listing = list_all(&store, "");
    let objects = match run_deadline {
        Some(d) => tokio::time::timeout_at(d, listing)
            .await
            .map_err(|_| GcError::ListTimeout(opts.run_timeout.unwrap_or_default()))?,
        None => listing.await,
    }
    .map_err(|source| GcError::List {
        bucket: store.describe(),
        source,
    })?;

    let partition = layout.partition(objects);
    report.rejected = partition.rejected;
    report.unowned_objects = partition.unowned;
    for r in &report.rejected {
        tracing::warn!(prefix = %r.prefix, reason = %r.reason, "repository left alone");
    }
    let policy = PlanPolicy {
        now: clock.now(),
        grace: opts.grace,
        delay: opts.delay,
    };
    let selected: Vec<Repository> = partition
        .repositories
        .into_iter()
        .filter(|r| opts.repos.matches(&r.name))
        .collect();
    let ctx = RepoRun {
        store: &store,
        layout: layout.as_ref(),
        policy,
        dry_run: opts.dry_run,
        concurrency: opts.concurrency,
        run_deadline,
        repo_timeout: opts.repo_timeout,
    };
    report.repositories = stream::iter(selected)
        .map(|repo| ctx.collect(repo))
        .buffer_unordered(opts.concurrency.max(1))
        .collect()
        .await;
    finish_report(&mut report, &store, &clock);
    tracing::info!(
        run_id = %report.run_id,
        repositories = report.totals.repositories,
        not_ok = report.totals.repositories_not_ok,
        deleted = report.totals.blobs_deleted,
        bytes_deleted = report.totals.bytes_deleted,
        "gc run finished"
    );
    Ok(report)
}

/// What stays the same for every repository of one run.
struct RepoRun<'a> {
    store: &'a Instrumented,
    layout: &'a dyn Layout,
    policy: PlanPolicy,
    dry_run: bool,
    concurrency: usize,
    run_deadline: Option<Instant>,
    repo_timeout: Option<Duration>,
}

impl RepoRun<'_> {
    async fn collect(&self, repo: Repository) -> RepoReport {
        let mut report = RepoReport::new(&repo.name, RepoStatus::Ok);
        report.objects = repo.objects.len() as u64;
        report.bytes = repo.objects.iter().map(|o| o.size).sum();
        let now = Instant::now();
        if self.run_deadline.is_some_and(|d| now >= d) {
            report.status = RepoStatus::Skipped;
            report
                .errors
                .push("run time-out reached before this repository started".into());
            return report;
        }
        let deadline = match (self.run_deadline, self.repo_timeout.map(|t| now + t)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };

        // Marking and planning have no side effects, so a time-out may cancel them anywhere.
        let planned = match deadline {
            Some(d) => match tokio::time::timeout_at(d, self.mark_and_plan(&repo)).await {
                Ok(r) => r,
                Err(_) => {
                    report.status = RepoStatus::Timeout;
                    report
                        .errors
                        .push("timed out while marking; nothing deleted".into());
                    return report;
                }
            },
            None => self.mark_and_plan(&repo).await,
        };
        let (repo_plan, marked) = match planned {
            Ok(p) => p,
            Err(reason) => {
                tracing::error!(repo = %repo.name, %reason, "repository failed closed");
                report.status = RepoStatus::Failed;
                report
                    .errors
                    .push(format!("failed closed, nothing deleted: {reason}"));
                return report;
            }
        };
        report.manifests_fetched = marked.manifests_fetched;
        report.warnings = marked.warnings;
        report.reachable = repo_plan.tally(&[Reason::Reachable]);
        report.pending = repo_plan.tally(&[Reason::WithinGrace, Reason::AwaitingSecondObservation]);
        report.other_keys = repo_plan
            .items
            .iter()
            .filter(|i| i.decision == Decision::Keep(Reason::NotABlob))
            .count() as u64;
        let mut deletions: Vec<Deleted> = repo_plan
            .deletions()
            .map(|i| Deleted {
                key: i.key.clone(),
                digest: i.digest.clone(),
                size: i.size,
                reason: match i.decision {
                    Decision::Delete(r) | Decision::Keep(r) => r,
                },
            })
            .collect();
        deletions.sort_by(|a, b| a.key.cmp(&b.key));
        if self.dry_run {
            report.deleted = deletions;
            return report;
        }
        let swept = sweep::sweep(self.store, deletions, deadline).await;
        report.deleted = swept.deleted;
        if swept.timed_out {
            report.status = RepoStatus::Timeout;
            report
                .errors
                .push("timed out between delete batches".into());
        }
        if !swept.errors.is_empty() {
            report.status = RepoStatus::Failed;
            report.errors.extend(swept.errors);
        }
        tracing::info!(
            repo = %repo.name,
            status = ?report.status,
            deleted = report.deleted.len(),
            pending = report.pending.blobs,
            "repository collected"
        );
        report
    }

    async fn mark_and_plan(
        &self,
        repo: &Repository,
    ) -> Result<(plan::RepoPlan, mark::Marked), String> {
        let blobs: HashMap<Digest, &ObjectMeta> = repo
            .objects
            .iter()
            .filter_map(|o| match self.layout.classify(repo, &o.key) {
                KeyKind::Blob(d) => Some((d, o)),
                KeyKind::Other => None,
            })
            .collect();
        let roots = self
            .layout
            .read_roots(self.store, repo)
            .await
            .map_err(|e| e.to_string())?;
        let ctx = MarkContext {
            store: self.store,
            layout: self.layout,
            repo,
            blobs: &blobs,
            concurrency: self.concurrency,
        };
        let marked = mark(&ctx, &roots).await.map_err(|e| e.0)?;
        let repo_plan = plan(self.layout, repo, &marked.reachable, self.policy);
        Ok((repo_plan, marked))
    }
}
