//! One run (SPEC §3): the bucket clock, the listing, the repositories collected as the
//! listing completes them, the global blob space last, and the report.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::{stream, StreamExt};
use tokio::time::Instant;

use super::lease::Leases;
use super::plan::PlanPolicy;
use super::repo::{Leftovers, RepoInputs, RepoRun};
use super::{
    before_run_deadline, finish_report, intent, lease, new_report, probe_clock, scope, state,
    GcError, GcOptions,
};
use crate::layout::{Layout, Repository};
use crate::report::{timestamp, RepoReport, Report};
use crate::store::{Instrumented, ObjectMeta, Store};

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
