//! The GC engine: list → partition by repository → mark → plan → re-check → delete → verify →
//! report, per repository under a lease, with ages on the bucket clock (SPEC §3).
//!
//! Layout- and store-agnostic: everything layout-specific goes through [`Layout`], every request
//! through [`Instrumented`] (concurrency bound, time-out, counts).

pub mod clock;
mod delete_repo;
pub mod intent;
pub mod lease;
pub mod mark;
pub mod plan;
mod scope;
pub mod state;
pub mod sweep;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{stream, StreamExt, TryStreamExt};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::digest::Digest;
use crate::layout::{
    ContentCopy, DeletionProtocol, KeyKind, Layout, ProtocolError, Repository, Roots, RootsError,
    STATE_PREFIX,
};
use crate::manifest::Descriptor;
use crate::metrics::Metrics;
use crate::report::{timestamp, Deleted, RepoReport, RepoStatus, Report};
use crate::store::{Instrumented, ObjectMeta, Store, StoreError};
use clock::BucketClock;
use lease::{Acquired, Lease, Leases};
use mark::{MarkContext, Marker};
use plan::{plan, Decision, PlanPolicy, Reason, RepoPlan};
use state::Pending;

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
    /// Cross-repository links could not be read, so no repository's roots are complete.
    #[error("reading cross-repository links in {bucket} failed")]
    Links {
        bucket: String,
        #[source]
        source: StoreError,
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

/// One shard of a sharded run: this process collects the repositories whose stable hash falls
/// in `index` out of `count`. The union of all shards is every repository exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: u32,
    /// How many shards there are.
    pub count: u32,
}

impl Shard {
    /// Parses `I/N` with `I < N`.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected I/N, e.g. 0/4"))?;
        let index: u32 = i.trim().parse().map_err(|_| format!("{s:?}: bad index"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: bad shard count"))?;
        if count == 0 || index >= count {
            return Err(format!("{s:?}: need 0 <= I < N"));
        }
        Ok(Shard { index, count })
    }

    /// Whether this shard owns `repository`. FNV-1a: fixed forever, so every process and
    /// every version agrees on the split.
    pub fn owns(&self, repository: &str) -> bool {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in repository.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h % u64::from(self.count) == u64::from(self.index)
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
    /// Only this shard's repositories, if set.
    pub shard: Option<Shard>,
    /// Store requests in flight at most (also repositories collected at once).
    pub concurrency: usize,
    /// Time-out of one store request, retries included.
    pub request_timeout: Duration,
    /// Time-out of one repository.
    pub repo_timeout: Option<Duration>,
    /// Time-out of the whole run.
    pub run_timeout: Option<Duration>,
    /// Lifetime of a repository lease between renewals.
    pub lease_ttl: Duration,
    /// Added to the bucket clock: simulates the passage of time (tests, drills). Zero in use.
    pub clock_offset: Duration,
    /// Where to record metrics, if anywhere.
    pub metrics: Option<Arc<Metrics>>,
    /// Cancelled on shutdown: no repository starts after it, marking is abandoned, deleting
    /// stops before the next batch.
    pub stop: CancellationToken,
    /// Progress receiver, if any.
    pub progress: Option<Arc<dyn Progress>>,
    /// A run of this one repository (the daemon's hook): only it is collected, only its
    /// prefix is listed where the layout allows, and metrics count it as a hook run.
    pub only: Option<String>,
}

impl std::fmt::Debug for dyn Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// Receives progress of a run (the CLI draws a progress bar from it on a terminal).
pub trait Progress: Send + Sync {
    /// The run is about to collect `repositories` repositories.
    fn start(&self, repositories: u64);
    /// One repository is done.
    fn repository_done(&self, name: &str, deleted: u64);
    /// The run is over.
    fn finish(&self);
}

/// Why a guard stopped a sweep on shutdown.
const SHUTTING_DOWN: &str = "shutting down";

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(24 * 3600),
            delay: Duration::from_secs(3600),
            dry_run: false,
            repos: RepoFilter::default(),
            shard: None,
            concurrency: 16,
            request_timeout: Duration::from_secs(60),
            repo_timeout: None,
            run_timeout: None,
            lease_ttl: Duration::from_secs(600),
            clock_offset: Duration::ZERO,
            metrics: None,
            stop: CancellationToken::new(),
            progress: None,
            only: None,
        }
    }
}

/// A bucket listing split into repository objects and ocigc's own state objects.
pub(crate) struct Listing {
    pub objects: Vec<ObjectMeta>,
    pub state: Vec<ObjectMeta>,
}

/// Lists every object under `prefix`, setting ocigc's own state apart.
pub(crate) async fn list_all(store: &dyn Store, prefix: &str) -> Result<Listing, StoreError> {
    let pages: Vec<Vec<ObjectMeta>> = store.list(prefix).try_collect().await?;
    let (state, objects) = pages
        .into_iter()
        .flatten()
        .partition(|o| o.key.starts_with(STATE_PREFIX));
    Ok(Listing { objects, state })
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
        started_at: String::new(),
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

/// Runs one of the whole-bucket reads that precede any repository's work, failing the run
/// with [`GcError::ListTimeout`] if it outlasts the run's deadline.
async fn before_run_deadline<T>(
    deadline: Option<tokio::time::Instant>,
    opts: &GcOptions,
    read: impl std::future::Future<Output = T>,
) -> Result<T, GcError> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, read)
            .await
            .map_err(|_| GcError::ListTimeout(opts.run_timeout.unwrap_or_default())),
        None => Ok(read.await),
    }
}

pub(crate) async fn probe_clock(store: &Instrumented) -> Result<BucketClock, GcError> {
    BucketClock::probe(store)
        .await
        .map_err(|source| GcError::Clock {
            bucket: store.describe(),
            source,
        })
}

pub(crate) fn finish_report(report: &mut Report, store: &Instrumented, clock: &BucketClock) {
    report.repositories.sort_by(|a, b| a.name.cmp(&b.name));
    report.finished_at = timestamp(clock.now());
    report.requests = store.counts();
    report.compute_totals();
}

/// Runs garbage collection over every selected repository of the bucket, recording the run in
/// `opts.metrics` whatever its outcome.
pub async fn run_gc(
    store: Arc<dyn Store>,
    layout: Arc<dyn Layout>,
    opts: &GcOptions,
) -> Result<Report, GcError> {
    let started = Instant::now();
    let run_deadline = opts.run_timeout.map(|t| started + t);
    let result = collect_all(store, layout, opts, run_deadline).await;
    if let Some(m) = &opts.metrics {
        let timed_out = run_deadline.is_some_and(|d| Instant::now() >= d);
        let report = result.as_ref().ok();
        match opts.only {
            Some(_) => m.observe_hook_gc(report, started.elapsed(), timed_out),
            None => m.observe_gc(report, started.elapsed(), timed_out),
        }
    }
    result
}

async fn collect_all(
    store: Arc<dyn Store>,
    layout: Arc<dyn Layout>,
    opts: &GcOptions,
    run_deadline: Option<Instant>,
) -> Result<Report, GcError> {
    let run_started = Instant::now();
    let store = Instrumented::new(store, opts.concurrency, opts.request_timeout)
        .with_metrics(opts.metrics.clone());
    let mut report = new_report("gc", &store, layout.as_ref(), opts.dry_run);
    report.grace = Some(humantime::format_duration(opts.grace).to_string());
    report.delay = Some(humantime::format_duration(opts.delay).to_string());
    let clock = probe_clock(&store).await?.ahead_by(opts.clock_offset);
    report.started_at = timestamp(clock.now());
    tracing::info!(run_id = %report.run_id, bucket = %report.bucket, dry_run = opts.dry_run, "gc run started");

    let listing = scope::list_for_run(&store, layout.as_ref(), opts.only.as_deref());
    let listing = before_run_deadline(run_deadline, opts, listing)
        .await?
        .map_err(|source| GcError::List {
            bucket: store.describe(),
            source,
        })?;

    // What the store cannot serve as an object (a directory store's symlinks, special files):
    // whichever repository owns one fails closed in `collect`; the rest are warned about below.
    let defects: Vec<(String, Box<str>)> = (listing.objects.iter().chain(&listing.state))
        .filter_map(|o| Some((o.key.clone(), o.defect.clone()?)))
        .collect();
    // Pending state and batch announcements by key; a repository with either needs its lease
    // even when nothing is left to delete (to update or clear them).
    let state_keys: HashSet<String> = listing
        .state
        .iter()
        .filter(|o| {
            o.key.starts_with(state::PENDING_PREFIX)
                || o.key.starts_with(intent::DELETING_PREFIX)
                || o.key.starts_with(lease::LEASE_PREFIX)
        })
        .map(|o| o.key.clone())
        .collect();
    let mut intents = intent::by_repository(listing.state);
    let partition = layout.partition(listing.objects);
    let mut linked = if layout.links_across_repositories() {
        let links = layout.linked_blobs(&store, &partition, opts.concurrency);
        before_run_deadline(run_deadline, opts, links)
            .await?
            .map_err(|source| GcError::Links {
                bucket: store.describe(),
                source,
            })?
    } else {
        HashMap::new()
    };
    report.rejected = partition.rejected;
    if !defects.is_empty() {
        let owned: HashSet<&str> = (partition.repositories.iter().chain(&partition.global))
            .flat_map(|r| r.objects.iter().map(|o| o.key.as_str()))
            .collect();
        for (key, defect) in defects
            .into_iter()
            .filter(|(k, _)| !owned.contains(k.as_str()))
        {
            tracing::warn!(%key, %defect, "not an object, owned by no repository; left alone");
            report.rejected.push(crate::layout::Rejected {
                reason: format!("not an object: {defect}"),
                prefix: key,
                objects: 0,
            });
        }
    }
    report.unowned_objects = partition.unowned;
    for r in &report.rejected {
        tracing::warn!(prefix = %r.prefix, reason = %r.reason, "repository left alone");
    }
    let wanted = |r: &Repository| {
        opts.repos.matches(&r.name)
            && opts.shard.is_none_or(|s| s.owns(&r.name))
            && opts.only.as_ref().is_none_or(|n| *n == r.name)
    };
    let selected: Vec<Repository> = partition
        .repositories
        .into_iter()
        .filter(|_| layout.per_repository_gc())
        .filter(|r| wanted(r))
        .collect();
    // Global blobs are shared by every repository: any repository's intent protects them.
    let global_roots = partition.global_roots;
    let placeholders = partition.placeholders;
    let global = partition.global.filter(|g| wanted(g)).map(|g| {
        let all_intents: Vec<ObjectMeta> = intents.values().flatten().cloned().collect();
        (g, all_intents)
    });
    let run = RepoRun {
        store: &store,
        layout: layout.as_ref(),
        placeholders: &placeholders,
        policy: PlanPolicy {
            now: clock.now(),
            grace: opts.grace,
            delay: opts.delay,
        },
        clock,
        leases: Leases {
            store: &store,
            clock,
            owner: report.run_id.clone(),
            ttl: opts.lease_ttl,
        },
        run_id: report.run_id.clone(),
        dry_run: opts.dry_run,
        concurrency: opts.concurrency,
        run_deadline,
        repo_timeout: opts.repo_timeout,
        stop: opts.stop.clone(),
    };
    if let Some(p) = &opts.progress {
        p.start((selected.len() + usize::from(global.is_some())) as u64);
    }
    let leftovers = |name: &str| Leftovers {
        pending: state_keys.contains(&state::pending_key(name)),
        announcement: state_keys.contains(&intent::deleting_key(name)),
        lease: state_keys.contains(&lease::lease_key(name)),
    };
    let done = |r: &RepoReport| {
        if let Some(p) = &opts.progress {
            p.repository_done(&r.name, r.deleted.len() as u64);
        }
    };
    report.repositories = stream::iter(selected)
        .map(|repo| {
            let inputs = RepoInputs {
                leftovers: leftovers(&repo.name),
                intents: intents.remove(&repo.name).unwrap_or_default(),
                dropped_roots: HashSet::new(),
                linked: linked.remove(&repo.name).unwrap_or_default(),
                roots: None,
            };
            run.collect(repo, inputs)
        })
        .buffer_unordered(opts.concurrency.max(1))
        .inspect(done)
        .collect()
        .await;
    // Last, so that its roots are read after the repositories dropped what they dropped
    // (untagged manifests), and what only those used goes in this same run.
    if let Some((repo, all_intents)) = global {
        // Roots the repositories dropped (a dry run: would have dropped) are not roots here
        // either, so that the dry run reports what the real run does.
        let dropped_roots: HashSet<String> = report
            .repositories
            .iter()
            .flat_map(|r| r.deleted.iter().map(|d| d.key.clone()))
            .collect();
        let inputs = RepoInputs {
            leftovers: leftovers(&repo.name),
            intents: all_intents,
            dropped_roots,
            linked: Vec::new(),
            roots: global_roots,
        };
        let r = run.collect(repo, inputs).await;
        done(&r);
        report.repositories.push(r);
    }
    if let Some(p) = &opts.progress {
        p.finish();
    }
    finish_report(&mut report, &store, &clock);
    tracing::info!(
        run_id = %report.run_id,
        repositories = report.totals.repositories,
        not_ok = report.totals.repositories_not_ok,
        objects = report.totals.objects,
        bytes = report.totals.bytes,
        deleted = report.totals.blobs_deleted,
        bytes_deleted = report.totals.bytes_deleted,
        bytes_pending = report.totals.bytes_pending,
        dangling = report.totals.dangling_references,
        duration_ms = run_started.elapsed().as_millis() as u64,
        "gc run finished"
    );
    Ok(report)
}

/// What stays the same for every repository of one run.
struct RepoRun<'a> {
    store: &'a Instrumented,
    layout: &'a dyn Layout,
    placeholders: &'a HashMap<Digest, Option<ContentCopy>>,
    policy: PlanPolicy,
    clock: BucketClock,
    leases: Leases<'a>,
    run_id: String,
    dry_run: bool,
    concurrency: usize,
    run_deadline: Option<Instant>,
    repo_timeout: Option<Duration>,
    stop: CancellationToken,
}

/// What the run found for one repository before collecting it.
#[derive(Debug)]
struct RepoInputs {
    /// ocigc state of the repository in the listing.
    leftovers: Leftovers,
    /// Its push intents in the listing.
    intents: Vec<ObjectMeta>,
    /// Keys of roots that repositories collected earlier in this run deleted (or, in a dry
    /// run, would have deleted).
    dropped_roots: HashSet<String>,
    /// Its blobs that links in other repositories keep alive.
    linked: Vec<Digest>,
    /// Its roots as the bucket listing showed them, where the layout could read them there
    /// (saving a second pass); otherwise they are read when the repository is collected.
    roots: Option<Roots>,
}

/// ocigc state of a repository seen in the listing.
#[derive(Clone, Copy, Debug, Default)]
struct Leftovers {
    /// Pending candidates are stored.
    pending: bool,
    /// A batch announcement is stored (its run died mid-batch).
    announcement: bool,
    /// A lease is stored: held by a live collector, or left by a dead one.
    lease: bool,
}

/// Why a repository's lease is taken.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_repository_exactly_once() {
        let names: Vec<String> = (0..5000)
            .map(|i| format!("team-{}/app-{i}", i % 37))
            .collect();
        for count in [1u32, 2, 3, 7, 16] {
            let shards: Vec<Shard> = (0..count).map(|index| Shard { index, count }).collect();
            let mut sizes = vec![0usize; count as usize];
            for n in &names {
                let owners: Vec<_> = shards.iter().filter(|s| s.owns(n)).collect();
                assert_eq!(owners.len(), 1, "{n} with {count} shards");
                sizes[owners[0].index as usize] += 1;
            }
            // Balanced within 20% of the mean.
            let mean = names.len() / count as usize;
            assert!(
                sizes
                    .iter()
                    .all(|&s| s * 5 >= mean * 4 && s * 5 <= mean * 6),
                "{sizes:?}"
            );
        }
    }

    #[test]
    fn shard_syntax() {
        assert_eq!(Shard::parse("2/4"), Ok(Shard { index: 2, count: 4 }));
        for bad in ["4/4", "1/0", "x/2", "3", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// To delete, or to update ocigc's state.
    Work,
    /// Only to remove a lease a dead run left behind.
    TidyLease,
}

/// What one observation of a repository found, and the limits it is acted on under.
struct Observation {
    deadline: Option<Instant>,
    leftovers: Leftovers,
    roots_version: Option<String>,
    intents_seen: HashSet<String>,
    expired_intents: Vec<String>,
    pending: Pending,
    plan: RepoPlan,
}

fn deletions_of(plan: &RepoPlan) -> Vec<Deleted> {
    let mut out: Vec<Deleted> = plan
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
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

impl RepoRun<'_> {
    async fn collect(&self, repo: Repository, inputs: RepoInputs) -> RepoReport {
        let leftovers = inputs.leftovers;
        let mut report = RepoReport::new(&repo.name, RepoStatus::Ok);
        report.objects = repo.objects.len() as u64;
        report.bytes = repo.objects.iter().map(|o| o.size).sum();
        let defects: Vec<String> = (repo.objects.iter())
            .filter_map(|o| Some(format!("{} ({})", o.key, o.defect.as_deref()?)))
            .collect();
        if !defects.is_empty() {
            // What cannot be read may be a manifest or a blob some image needs.
            tracing::error!(repo = %repo.name, ?defects, "repository failed closed");
            report.status = RepoStatus::Failed;
            report.errors.push(format!(
                "failed closed, nothing deleted: not objects: {}",
                defects.join("; ")
            ));
            return report;
        }
        let now = Instant::now();
        if self.run_deadline.is_some_and(|d| now >= d) {
            report.status = RepoStatus::Skipped;
            report
                .errors
                .push("run time-out reached before this repository started".into());
            return report;
        }
        if self.stop.is_cancelled() {
            report.status = RepoStatus::Skipped;
            report.errors.push("shutting down; not started".into());
            return report;
        }
        let deadline = match (self.run_deadline, self.repo_timeout.map(|t| now + t)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let blobs: HashMap<Digest, &ObjectMeta> = repo
            .objects
            .iter()
            .filter_map(|o| match self.layout.classify(&repo, &o.key) {
                KeyKind::Blob(d) => Some((d, o)),
                KeyKind::Scratch | KeyKind::Other => None,
            })
            .collect();
        let mut marker = Marker::new(MarkContext {
            store: self.store,
            layout: self.layout,
            repo: &repo,
            blobs: &blobs,
            placeholders: self.placeholders,
            concurrency: self.concurrency,
        });

        // Observing has no side effects, so a time-out may cancel it anywhere.
        let observed = self.observe(&repo, &mut marker, leftovers.pending, inputs);
        let limit = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let observed = tokio::select! {
            r = observed => r,
            () = limit => {
                report.status = RepoStatus::Timeout;
                report
                    .errors
                    .push("timed out while marking; nothing deleted".into());
                return report;
            }
            () = self.stop.cancelled() => {
                report.status = RepoStatus::Skipped;
                report.errors.push("shutting down while marking; nothing deleted".into());
                return report;
            }
        };
        let mut obs = match observed {
            Ok(o) => o,
            Err(reason) => {
                tracing::error!(repo = %repo.name, %reason, "repository failed closed");
                report.status = RepoStatus::Failed;
                report
                    .errors
                    .push(format!("failed closed, nothing deleted: {reason}"));
                report.warnings.extend(marker.warnings.iter().cloned());
                return report;
            }
        };
        obs.deadline = deadline;
        obs.leftovers = leftovers;
        self.summarise(&mut report, &obs.plan);
        if self.dry_run {
            report.deleted = deletions_of(&obs.plan);
            report.manifests_fetched = marker.manifests_fetched;
            report.warnings.extend(marker.warnings.iter().cloned());
            return report;
        }
        let has_candidates = obs.plan.items.iter().any(|i| {
            matches!(
                i.decision,
                Decision::Delete(_) | Decision::Keep(Reason::AwaitingSecondObservation)
            )
        });
        let work = has_candidates
            || obs.pending.etag.is_some()
            || !obs.expired_intents.is_empty()
            || leftovers.announcement;
        if work || leftovers.lease {
            // With nothing else to do, the lease is only taken to tidy one a dead run left;
            // one a live collector holds is none of this run's business then.
            let mode = if work { Mode::Work } else { Mode::TidyLease };
            self.act(&repo, &mut marker, &mut obs, mode, &mut report)
                .await;
        }
        report.manifests_fetched = marker.manifests_fetched;
        report.warnings.extend(marker.warnings.iter().cloned());
        tracing::info!(
            run_id = %self.run_id,
            repo = %repo.name,
            status = ?report.status,
            deleted = report.deleted.len(),
            pending = report.pending.blobs,
            rescued = report.rescued,
            "repository collected"
        );
        report
    }

    fn summarise(&self, report: &mut RepoReport, plan: &RepoPlan) {
        report.reachable = plan.tally(&[Reason::Reachable]);
        report.pending = plan.tally(&[Reason::WithinGrace, Reason::AwaitingSecondObservation]);
        report.other_keys = plan
            .items
            .iter()
            .filter(|i| i.decision == Decision::Keep(Reason::NotABlob))
            .count() as u64;
    }

    /// Reads roots, intents and pending state, marks, and plans.
    async fn observe(
        &self,
        repo: &Repository,
        marker: &mut Marker<'_>,
        has_pending: bool,
        inputs: RepoInputs,
    ) -> Result<Observation, String> {
        let RepoInputs {
            intents,
            dropped_roots,
            linked,
            roots,
            ..
        } = inputs;
        let intents = intents.as_slice();
        let mut roots = match roots {
            Some(r) => r,
            None => self
                .layout
                .read_roots(self.store, repo)
                .await
                .map_err(|e| e.to_string())?,
        };
        if !dropped_roots.is_empty() && roots.sources.len() == roots.descriptors.len() {
            let mut sources = roots.sources.iter();
            roots
                .descriptors
                .retain(|_| sources.next().is_some_and(|k| !dropped_roots.contains(k)));
        }
        let read = intent::read_intents(self.store, intents, self.clock.now()).await?;
        let mut warnings = Vec::new();
        let pending = if has_pending {
            state::read_pending(self.store, &repo.name, &mut warnings)
                .await
                .map_err(|e| format!("reading pending state: {e}"))?
        } else {
            Pending::default()
        };
        marker.warnings.extend(warnings);
        marker.assume_not_referrers(pending.not_referrers.iter().cloned());
        marker.prime(roots.documents);
        let mut descriptors = roots.descriptors;
        descriptors.extend(read.roots);
        marker.mark(&descriptors).await.map_err(|e| e.0)?;
        // Linked blobs are kept, not marked from: as unread roots they would hide what they
        // are (a manifest an index lists, an unlisted referrer) from the walk and the scan.
        marker.reachable.extend(linked.iter().cloned());
        marker.check_placeholders().map_err(|e| e.0)?;
        let plan = plan(
            self.layout,
            repo,
            &marker.reachable,
            &pending.first_seen,
            self.policy,
        );
        Ok(Observation {
            deadline: None,
            leftovers: Leftovers::default(),
            roots_version: roots.version,
            intents_seen: intents.iter().map(|o| o.key.clone()).collect(),
            expired_intents: read.expired,
            pending,
            plan,
        })
    }

    /// Everything with side effects, under the repository's lease.
    async fn act(
        &self,
        repo: &Repository,
        marker: &mut Marker<'_>,
        obs: &mut Observation,
        mode: Mode,
        report: &mut RepoReport,
    ) {
        let lease = match self.leases.acquire(&repo.name).await {
            Ok(Acquired::Ours(l)) => l,
            Ok(Acquired::Held { .. }) if mode == Mode::TidyLease => return,
            Ok(Acquired::Held { owner, expires_at }) => {
                tracing::warn!(repo = %repo.name, %owner, %expires_at, "lease held by another collector");
                report.status = RepoStatus::Skipped;
                report.lease_conflict = true;
                report.errors.push(format!(
                    "lease held by {owner} until {expires_at}; nothing deleted"
                ));
                return;
            }
            Err(e) => {
                report.status = RepoStatus::Failed;
                report
                    .errors
                    .push(format!("taking the lease failed, nothing deleted: {e}"));
                return;
            }
        };
        crate::failpoint::hit("lease-acquired");
        if let Some(dead) = lease.taken_over_from.clone() {
            self.recover_protocol(repo, &dead, report).await;
        }
        // The state may have moved on since the listing (a collector that held the lease
        // until just now): plan again with what is stored now.
        let mut warnings = Vec::new();
        match state::read_pending(self.store, &repo.name, &mut warnings).await {
            Ok(fresh) => {
                if fresh.etag != obs.pending.etag {
                    obs.plan = plan(
                        self.layout,
                        repo,
                        &marker.reachable,
                        &fresh.first_seen,
                        self.policy,
                    );
                    self.summarise(report, &obs.plan);
                }
                obs.pending = fresh;
            }
            Err(e) => {
                report.status = RepoStatus::Failed;
                report.errors.push(format!(
                    "reading pending state failed, nothing deleted: {e}"
                ));
                self.leases.release(lease).await;
                return;
            }
        }
        report.warnings.extend(warnings);

        let mut guard = RepoGuard {
            run: self,
            repo,
            marker,
            lease,
            roots_version: obs.roots_version.clone(),
            intents_seen: std::mem::take(&mut obs.intents_seen),
            rescued: 0,
            announced: false,
            protocol: self
                .layout
                .deletion_protocol(repo, &self.run_id)
                .map(|p| (p, false)),
            refused: false,
        };
        let swept = sweep::sweep(
            self.store,
            deletions_of(&obs.plan),
            obs.deadline,
            self.layout.batches_per_recheck(repo),
            &mut guard,
        )
        .await;
        let RepoGuard {
            marker,
            rescued,
            lease,
            protocol,
            refused,
            ..
        } = guard;
        report.rescued = rescued;
        report.deleted = swept.deleted;
        if swept.timed_out {
            report.status = RepoStatus::Timeout;
            report
                .errors
                .push("timed out between delete batches".into());
        }
        if let Some(why) = swept.stopped {
            report.status = if why == SHUTTING_DOWN || refused {
                RepoStatus::Skipped
            } else {
                RepoStatus::Failed
            };
            report
                .errors
                .push(format!("stopped before a delete batch: {why}"));
        }
        if !swept.errors.is_empty() {
            report.status = RepoStatus::Failed;
            report.errors.extend(swept.errors);
        }
        if let Some((mut p, true)) = protocol {
            if let Err(e) = p.end(self.store, self.clock.now()).await {
                // The registry's pushers refuse manifests while its GC marker stands.
                report.status = RepoStatus::Failed;
                report.errors.push(format!(
                    "ending the registry's GC protocol (pushes fail until it is ended): {e}"
                ));
            }
        }

        if lease.is_lost() {
            // The repository is another collector's now: its state is not ours to write.
            self.verify_if_deleted(repo, marker, report).await;
            return;
        }
        crate::failpoint::hit("before-state-write");
        self.write_state(repo, marker, obs, report).await;
        crate::failpoint::hit("after-state-write");
        if !obs.expired_intents.is_empty() {
            match self.store.delete_batch(&obs.expired_intents).await {
                Ok(f) if f.is_empty() => {}
                Ok(f) => report
                    .warnings
                    .push(format!("{} expired intents not removed", f.len())),
                Err(e) => report
                    .warnings
                    .push(format!("removing expired intents: {e}")),
            }
        }
        // An announcement left by a run that died mid-batch: that batch is long over.
        if obs.leftovers.announcement {
            if let Err(e) = intent::clear_deletion(self.store, &repo.name).await {
                report
                    .warnings
                    .push(format!("removing a stale batch announcement: {e}"));
            }
        }
        self.verify_if_deleted(repo, marker, report).await;
        self.leases.release(lease).await;
    }

    /// Withdraws the registry-protocol announcement a collector that died holding this
    /// repository's lease left behind: the registry's pushers refuse manifests while it stands.
    async fn recover_protocol(&self, repo: &Repository, dead: &str, report: &mut RepoReport) {
        let Some(mut p) = self.layout.deletion_protocol(repo, &self.run_id) else {
            return;
        };
        match p.recover(self.store, self.clock.now(), dead).await {
            Ok(true) => report.warnings.push(format!(
                "withdrew the registry GC marker that run {dead} left when it died"
            )),
            Ok(false) => {}
            Err(e) => report.warnings.push(format!(
                "could not withdraw the registry GC marker that run {dead} left: {e}"
            )),
        }
    }

    async fn verify_if_deleted(
        &self,
        repo: &Repository,
        marker: &mut Marker<'_>,
        report: &mut RepoReport,
    ) {
        if !report.deleted.is_empty() {
            self.verify(repo, marker, report).await;
        }
    }

    /// Persists the candidates still pending after the sweep, keeping first-seen times.
    async fn write_state(
        &self,
        repo: &Repository,
        marker: &Marker<'_>,
        obs: &Observation,
        report: &mut RepoReport,
    ) {
        let deleted: HashSet<&str> = report.deleted.iter().map(|d| d.key.as_str()).collect();
        let now = self.clock.now();
        let candidates: Vec<state::Candidate> = obs
            .plan
            .items
            .iter()
            .filter(|i| match i.decision {
                Decision::Keep(Reason::AwaitingSecondObservation) => true,
                Decision::Delete(_) => !deleted.contains(i.key.as_str()),
                Decision::Keep(_) => false,
            })
            .filter_map(|i| {
                let d = i.digest.clone()?;
                // Referenced again since the plan was made: no longer a candidate.
                if marker.reachable.contains(&d) {
                    return None;
                }
                let first_seen = obs.pending.first_seen.get(&d).copied().unwrap_or(now);
                Some(state::Candidate {
                    not_a_referrer: marker.is_not_a_referrer(&d),
                    digest: d,
                    first_seen,
                    size: i.size,
                })
            })
            .collect();
        match state::write_pending(
            self.store,
            &repo.name,
            &self.run_id,
            now,
            &obs.pending,
            &candidates,
        )
        .await
        {
            Ok(true) => {}
            Ok(false) => {
                report.status = RepoStatus::Failed;
                report
                    .errors
                    .push("pending state changed underneath this run (lease lost?)".into());
            }
            Err(e) => {
                report.status = RepoStatus::Failed;
                report.errors.push(format!("writing pending state: {e}"));
            }
        }
    }

    /// Re-reads the roots after the sweep: a deleted blob that is now reachable is a dangling
    /// reference, logged, counted and failing the repository.
    async fn verify(&self, repo: &Repository, marker: &mut Marker<'_>, report: &mut RepoReport) {
        crate::failpoint::hit("before-verify");
        let roots = match self.layout.read_roots(self.store, repo).await {
            Ok(r) => r,
            Err(RootsError::Missing(_)) => {
                report.warnings.push(
                    "roots vanished after the sweep (repository deleted?); not verified".into(),
                );
                return;
            }
            Err(e) => {
                report
                    .warnings
                    .push(format!("verify could not read roots: {e}"));
                return;
            }
        };
        marker.prime(roots.documents);
        let mut descriptors = roots.descriptors;
        match self.fresh_intents(repo).await {
            Ok(read) => descriptors.extend(read.roots),
            Err(e) => report
                .warnings
                .push(format!("verify could not read intents: {e}")),
        }
        let reachable = match marker.closure_allowing_missing(&descriptors).await {
            Ok(r) => r,
            Err(e) => {
                report.warnings.push(format!("verify could not mark: {e}"));
                return;
            }
        };
        // A deleted blob that a pusher uploaded again (it found it missing) is whole: only
        // one still missing is a dangling reference. A failed look counts as missing.
        let referenced: Vec<(String, Digest)> = report
            .deleted
            .iter()
            .filter_map(|d| d.digest.clone().map(|g| (d.key.clone(), g)))
            .filter(|(_, g)| reachable.contains(g))
            .collect();
        let looks = stream::iter(referenced)
            .map(|(key, digest)| async move {
                let back = matches!(self.store.head(&key).await, Ok(Some(_)));
                (digest, back)
            })
            .buffer_unordered(self.concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        let mut dangling = Vec::new();
        for (digest, back) in looks {
            if back {
                report.warnings.push(format!(
                    "{digest} was deleted, referenced again and uploaded again during the run"
                ));
            } else {
                dangling.push(digest);
            }
        }
        dangling.sort();
        for d in &dangling {
            tracing::error!(repo = %repo.name, digest = %d, "dangling reference: a deleted blob is referenced");
        }
        if !dangling.is_empty() {
            report.status = RepoStatus::Failed;
            report.errors.push(format!(
                "{} deleted blobs are referenced: dangling references",
                dangling.len()
            ));
            report.dangling_references = dangling;
        }
    }

    async fn fresh_intents(&self, repo: &Repository) -> Result<intent::Intents, String> {
        let listed = intent::list_intents(self.store, &repo.name)
            .await
            .map_err(|e| e.to_string())?;
        intent::read_intents(self.store, &listed, self.clock.now()).await
    }
}

/// The re-check before each delete batch (SPEC §3.5) and the lease renewal (§3.7).
struct RepoGuard<'g, 'm, 'r> {
    run: &'g RepoRun<'r>,
    repo: &'g Repository,
    marker: &'g mut Marker<'m>,
    lease: Lease,
    roots_version: Option<String>,
    intents_seen: HashSet<String>,
    rescued: u64,
    announced: bool,
    /// The layout's registry protocol, and whether it was begun.
    protocol: Option<(Box<dyn DeletionProtocol>, bool)>,
    /// The protocol refused a batch: the repository is left for a later run.
    refused: bool,
}

#[async_trait]
impl sweep::Guard for RepoGuard<'_, '_, '_> {
    async fn before_batch(&mut self, batch: Vec<Deleted>) -> Result<Vec<Deleted>, String> {
        let run = self.run;
        if run.stop.is_cancelled() {
            return Err(SHUTTING_DOWN.into());
        }
        run.leases
            .keep(&mut self.lease)
            .await
            .map_err(|e| e.to_string())?;
        // Before the roots are re-read: a push that finished before the protocol let this
        // batch through has its manifest in that re-read.
        if let Some((p, begun)) = &mut self.protocol {
            let now = run.clock.now();
            let first = !std::mem::replace(begun, true);
            let asked = async {
                if first {
                    p.begin(run.store, now).await?;
                }
                p.before_batch(run.store, now).await
            };
            if let Err(e) = asked.await {
                self.refused = matches!(e, ProtocolError::Refused(_));
                return Err(format!("the registry's GC protocol: {e}"));
            }
        }
        let version = run
            .layout
            .roots_version(run.store, self.repo)
            .await
            .map_err(|e| format!("re-reading roots: {e}"))?;
        let mut more: Vec<Descriptor> = Vec::new();
        if version.is_none() || version != self.roots_version {
            let roots = run
                .layout
                .read_roots(run.store, self.repo)
                .await
                .map_err(|e| format!("re-reading roots: {e}"))?;
            self.roots_version = roots.version;
            self.marker.prime(roots.documents);
            more.extend(roots.descriptors);
        }
        // Announce the batch before the last look at intents: a pusher that writes its
        // intent after that look will see the announcement and wait (the handshake of
        // `intent::begin_reuse`).
        let candidates: Vec<&Digest> = batch
            .iter()
            .filter_map(|d| d.digest.as_ref())
            .filter(|d| !self.marker.reachable.contains(*d))
            .collect();
        if !candidates.is_empty() {
            intent::announce_deletion(
                run.store,
                &self.repo.name,
                &run.run_id,
                &candidates,
                run.clock.now() + run.leases.ttl,
            )
            .await
            .map_err(|e| format!("announcing the batch: {e}"))?;
            self.announced = true;
        }
        let listed = intent::list_intents(run.store, &self.repo.name)
            .await
            .map_err(|e| format!("re-listing intents: {e}"))?;
        let new: Vec<ObjectMeta> = listed
            .into_iter()
            .filter(|o| !self.intents_seen.contains(&o.key))
            .collect();
        let read = intent::read_intents(run.store, &new, run.clock.now()).await?;
        self.intents_seen.extend(new.into_iter().map(|o| o.key));
        more.extend(read.roots);
        if !more.is_empty() {
            self.marker.mark(&more).await.map_err(|e| e.0)?;
        }
        let before = batch.len();
        let safe: Vec<Deleted> = batch
            .into_iter()
            .filter(|d| {
                d.digest
                    .as_ref()
                    .is_none_or(|g| !self.marker.reachable.contains(g))
            })
            .collect();
        self.rescued += (before - safe.len()) as u64;
        Ok(safe)
    }

    async fn after_batch(&mut self) {
        if std::mem::take(&mut self.announced) {
            if let Err(e) = intent::clear_deletion(self.run.store, &self.repo.name).await {
                // Pushers treat it as stale once its expiry passes.
                tracing::warn!(repo = %self.repo.name, error = %e, "could not remove the batch announcement");
            }
        }
    }
}
