//! One run (SPEC §3): the bucket clock, the listing, the repositories collected as the
//! listing completes them, the global blob space last, and the report.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use futures::stream::BoxStream;
use futures::{stream, StreamExt};
use tokio::time::Instant;

use super::cache::{self, CacheIndex};
use super::lease::Leases;
use super::plan::PlanPolicy;
use super::repo::{Collected, FirstLook, Leftovers, RepoInputs, RepoRun, UnitCache};
use super::stop::Stop;
use super::streamed::Streamed;
use super::BucketClock;
use super::{
    before_run_deadline, finish_report, intent, lease, new_report, parts, probe_clock, scope,
    state, GcError, GcOptions,
};
use crate::digest::Digest;
use crate::layout::{
    list_prefix, partitioner, ContentCopy, Layout, Partition, Partitioner, Rejected, Repository,
    Roots, RootsVersion, UnitKind, GLOBAL_REPOSITORY, STATE_PREFIX,
};
use crate::namespace::{self, StateKey};
use crate::report::{timestamp, RepoReport, RepoStatus, Report};
use crate::store::{Instrumented, ListingSum, ObjectMeta, Store, StoreError};

/// How old an answer's `Date` may be to set the bucket clock without a request of its own.
const FRESH_ANSWER: std::time::Duration = std::time::Duration::from_secs(60);

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
        .with_rate_limit(opts.rate_limit.clone())
        .with_metrics(opts.metrics.clone());
    let layout = layout.as_ref();
    let mut report = new_report("gc", &store, layout, opts.dry_run);
    report.grace = Some(humantime::format_duration(opts.grace).to_string());
    report.delay = Some(humantime::format_duration(opts.delay).to_string());
    tracing::info!(run_id = %report.run_id, bucket = %report.bucket, dry_run = opts.dry_run, "gc run started");
    let list_error = |source| GcError::List {
        bucket: store.describe(),
        source,
    };

    let key_space = layout.key_space();
    let prefix = scope::objects_prefix(layout, &key_space, opts.only.as_deref());
    let shard = opts.shard.filter(|_| opts.only.is_none());
    // ocigc's own state first (small): every repository's leftovers and intents are known
    // when the listing hands it out. Where the key space holds it and no repository sorts
    // before it, the listing's first page usually holds all of it: no LIST of its own.
    let first = if shard.is_none() && opts.only.is_none() && STATE_PREFIX.starts_with(&prefix) {
        let first = parts::first_page(&store, &prefix);
        Some(
            before_run_deadline(run_deadline, opts, first)
                .await?
                .map_err(list_error)?,
        )
    } else {
        None
    };
    let state = match first.as_ref().and_then(|(page, _)| state_within(page)) {
        Some(state) => state,
        None => {
            let state = scope::list_state(&store, layout, opts.only.as_deref());
            before_run_deadline(run_deadline, opts, state)
                .await?
                .map_err(list_error)?
        }
    };
    // The bucket clock from that answer's `Date` where the store keeps it (no request of its
    // own); nothing before this point looks at a time. Only a fresh answer: a monotonic clock
    // may drift from the store's over hours (a daemon keeps its store between runs).
    let clock = match store.answered_time() {
        Some((date, arrived)) if arrived.elapsed() < FRESH_ANSWER => {
            BucketClock::answered_at(date, arrived)
        }
        _ => probe_clock(&store).await?,
    }
    .ahead_by(opts.clock_offset);
    report.started_at = timestamp(clock.now());
    let mut state_defects: Vec<(String, Box<str>)> = state
        .iter()
        .filter_map(|o| Some((o.key.clone(), o.defect.clone()?)))
        .collect();
    // Pending state and batch announcements by key; a repository with either needs its lease
    // even when nothing is left to delete (to update or clear them).
    let state_keys: HashSet<String> = state
        .iter()
        .filter(|o| {
            matches!(
                namespace::classify(&o.key),
                StateKey::Pending(_) | StateKey::Deleting(_) | StateKey::Lease(_)
            )
        })
        .map(|o| o.key.clone())
        .collect();
    let shared = Shared {
        store: &store,
        layout,
        concurrency: opts.concurrency,
        facts: Mutex::new(Facts::default()),
        tail: Mutex::new(Tail::default()),
        cache: (!opts.no_cache).then(|| CacheIndex::from_listing(&state)),
        context: cache_context(layout, opts),
        trash: state
            .iter()
            .filter_map(|o| match namespace::classify(&o.key) {
                StateKey::Trash(name) => Some((name.to_string(), listed_version(o))),
                _ => None,
            })
            .collect(),
        intents: Mutex::new(HashMap::new()),
        parts_left: std::sync::atomic::AtomicUsize::new(0),
    };
    *lock(&shared.intents) = intent::by_repository(state);
    let intents = &shared.intents;
    let leftovers = |name: &str| Leftovers {
        pending: state_keys.contains(&state::pending_key(name)),
        announcement: state_keys.contains(&intent::deleting_key(name)),
        lease: state_keys.contains(&lease::lease_key(name)),
    };

    let run = RepoRun {
        store: &store,
        layout,
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
        retention: opts.retention.clone(),
        budget: super::budget::Budget::new(opts.max_delete_fraction, opts.max_delete_bytes),
        detail: opts.detail,
        explain: opts.explain.clone(),
        superseded: Mutex::new(Vec::new()),
    };
    // A shard's repositories are those of its own parts (see `parts`); the global unit is the
    // first shard's.
    let wanted = |r: &Repository| {
        opts.repos.matches(&r.name)
            && (!r.is_global() || opts.shard.is_none_or(|s| s.index == 0))
            && opts.only.as_ref().is_none_or(|n| *n == r.name)
    };
    if let Some(p) = &opts.progress {
        p.start(0);
    }
    let found = std::sync::atomic::AtomicU64::new(0);
    let done = |r: &RepoReport| {
        if let Some(p) = &opts.progress {
            p.found(found.load(std::sync::atomic::Ordering::Relaxed));
            p.repository_done(&r.name, r.deleted.len() as u64);
        }
    };
    // Deletions wait for complete facts where keys elsewhere can keep a blob alive: a link or
    // placeholder listed after a repository may be what keeps its blob.
    let links = layout.links_across_repositories();
    // The global unit's roots (or objects) are in every slice; links anywhere keep blobs
    // alive. A shard that needs the other slices only for links lists them when one of its
    // repositories hands its decisions back for want of them (`facts_later`).
    let owns_global = shard.is_none_or(|s| s.index == 0);
    let global_everywhere =
        owns_global && (key_space.global.is_some() || layout.global_in_listing());
    let facts_later = links && shard.is_some() && !global_everywhere;
    let needs_all = links || global_everywhere;
    let now = clock.now();
    let inputs_for = |repo: &Repository, facts_complete: bool, cache: Option<UnitCache>| {
        let name = repo.name.as_str();
        let linked = shared.kept_by_others(repo);
        let facts = lock(&shared.facts);
        let leftover = leftovers(name);
        // Cloned, not taken: a deferred repository needs them again, and the global unit
        // needs every repository's.
        let intents = lock(intents).get(name).cloned().unwrap_or_default();
        let quiet = intents.is_empty() && !leftover.announcement && !leftover.lease;
        let cache = cache.map(|mut c| {
            // Unchanged only while nothing waits on the clock or on ocigc's own state.
            c.unchanged = c.unchanged && quiet && c.entry_current(now);
            // Decided by keys outside its listing: looked at again next run, whatever its
            // listing says then (they may be gone).
            c.volatile = !intents.is_empty() || !linked.is_empty();
            c
        });
        RepoInputs {
            leftovers: leftover,
            intents,
            cache,
            dropped_roots: HashSet::new(),
            linked,
            roots: None,
            placeholders: facts.placeholders.clone(),
            defer_deletions: links && !facts_complete,
            defer_candidates: facts_later && !facts_complete,
            first_look: None,
            streamed: None,
            roots_marked: false,
        }
    };

    // The listing, streamed: each repository is collected as soon as its keys are complete,
    // and dropped when done.
    // Units a layout does not collect one by one are still handed out where retention
    // applies to them (distribution without --delete-untagged: tags only), and for `du` and
    // `explain`, which show every repository (its tags, its share of the global blobs).
    let collects = |r: &Repository| {
        layout.per_repository_gc()
            || (!r.is_global() && (opts.detail || opts.retention.applies_to(&r.name)))
    };
    let retains = !opts.retention.rules.is_empty();
    let listing = if layout.per_repository_gc() || needs_all || retains {
        let request = parts::Request {
            prefix: &prefix,
            exclude: &[STATE_PREFIX],
            parts: parts::parts_for(
                opts.list_parts,
                shared.cache.as_ref().and_then(|c| c.listed_keys()),
                shard.map_or(1, |s| s.count),
            ),
            shard,
            others: needs_all,
            first,
        };
        let planned = parts::plan(&store, layout, request);
        before_run_deadline(run_deadline, opts, planned)
            .await?
            .map_err(list_error)?
    } else {
        // Nothing of this shard's to collect, nothing it must know.
        parts::Listing::Parts(Vec::new())
    };
    let (sequential, mut planned) = match listing {
        parts::Listing::Sequential(pages) => (Some(pages), Vec::new()),
        parts::Listing::Parts(planned) => (None, planned),
    };
    // Other slices held back: listed only if a repository of this shard is deferred for
    // want of their facts, so that a shard that changes nothing lists its slice alone.
    let later: Vec<parts::PlannedPart> = if facts_later {
        let (own, others) = planned.into_iter().partition(|p| p.own);
        planned = own;
        others
    } else {
        Vec::new()
    };
    // Each part's pages come through a driver (see `parts::drive`); the partitioners and
    // the claims run in one producer that never waits for the collection, which takes the
    // completed units from a backlog that holds the drivers back when it grows.
    let backlog: parts::Backlog<Unit> = parts::Backlog::new(BACKLOG_BUDGET);
    let mut drivers = Vec::new();
    let mut feeds: Vec<std::pin::Pin<Box<dyn futures::Stream<Item = Unit> + Send + '_>>> =
        Vec::new();
    let mut feed = |pages, own| {
        let (driver, pages) = parts::drive(pages, &backlog);
        drivers.push(driver);
        feeds.push(Box::pin(shared.units(pages, partitioner(layout), own)));
    };
    if let Some(pages) = sequential {
        feed(pages, true);
    }
    for part in &planned {
        feed(part.pages(&store), part.own);
    }
    // Parts held back count as not through: no unit of this pass sees complete facts.
    shared.parts_left.store(
        feeds.len() + later.len(),
        std::sync::atomic::Ordering::SeqCst,
    );
    let producer = async {
        let listed = stream::select_all(feeds).for_each(|u| {
            if u.own && collects(&u.repo) && wanted(&u.repo) {
                found.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let weight = u.repo.objects.len();
                backlog.push(u, weight);
            }
            futures::future::ready(())
        });
        futures::join!(futures::future::join_all(drivers), listed);
        backlog.close();
    };
    let units = backlog.stream();
    let mut deferred: Vec<Waiting> = Vec::new();
    let (mut held, mut held_documents) = (0usize, 0usize);
    let collected = units
        .map(|u| {
            let complete = u.facts_complete && shared.copies_known();
            let inputs = inputs_for(&u.repo, complete, u.cache);
            run.collect(u.repo, inputs)
        })
        .buffer_unordered(opts.concurrency.max(1));
    let collected = collected.for_each(|c| {
        match c {
            Collected::Done(r) => {
                done(&r);
                report.repositories.push(r);
            }
            // Held while memory allows; beyond that, listed again (and its documents read
            // again) when its turn comes: more requests, never less safety.
            Collected::Deferred(repo, mut look) => {
                let hold = held + repo.objects.len() <= DEFERRED_BUDGET && !look.retained.changed;
                // Its reads came after its listing; with a listing taken later they could
                // miss a root of a blob that listing shows, so they go with the listing.
                if !hold {
                    look.reads = None;
                }
                if held_documents + look.weight() <= DEFERRED_DOCUMENTS {
                    held_documents += look.weight();
                } else {
                    look.learnt = cache::Contents::default();
                    look.reads = None;
                }
                if hold {
                    held += repo.objects.len();
                    deferred.push(Waiting::Held(repo, look));
                } else {
                    deferred.push(Waiting::Named(repo.name, look));
                }
            }
        }
        futures::future::ready(())
    });
    let both = async {
        futures::join!(producer, collected);
    };
    let listed = before_run_deadline(run_deadline, opts, both).await;
    let tail = std::mem::take(&mut *lock(&shared.tail));
    if let Some(e) = tail.error {
        return Err(list_error(e));
    }
    listed?;

    // The other slices, for their facts only, where a deletion waits for them.
    if !later.is_empty() && !deferred.is_empty() {
        let feeds = later
            .iter()
            .map(|p| Box::pin(shared.units(p.pages(&store), partitioner(layout), false)));
        let learnt = stream::select_all(feeds).for_each(|_| futures::future::ready(()));
        before_run_deadline(run_deadline, opts, learnt).await?;
        // Only the error is this shard's: the other slices' rejected keys are reported by
        // their own shards.
        if let Some(e) = std::mem::take(&mut *lock(&shared.tail)).error {
            return Err(list_error(e));
        }
    }

    // Content copies listed before the first placeholder of their digest: one more look.
    if links && !deferred.is_empty() {
        let found = shared.find_copies(store.list(&prefix), partitioner(layout));
        before_run_deadline(run_deadline, opts, found)
            .await?
            .map_err(list_error)?;
    }

    // The second pass: repositories whose deletions waited for every link and placeholder of
    // the bucket, collected with all of them known.
    let (store_ref, run_ref, inputs_ref, shared_ref) = (&store, &run, &inputs_for, &shared);
    let again = stream::iter(deferred)
        .map(|waiting| async move {
            let (store, run, inputs_for) = (store_ref, run_ref, inputs_ref);
            let (name, held, look) = match waiting {
                Waiting::Held(repo, look) => (repo.name.clone(), Some(repo), look),
                Waiting::Named(name, look) => (name, None, look),
            };
            let fresh = match held {
                Some(repo) => Ok(Some(repo)),
                None => list_prefix(store, &layout.repository_prefix(&name))
                    .await
                    .map(|o| {
                        layout
                            .partition(o)
                            .repositories
                            .into_iter()
                            .find(|r| r.name == name)
                    }),
            };
            match fresh {
                Ok(Some(repo)) => {
                    let cache = match shared_ref.claim(&repo).await {
                        Ok(c) => c,
                        Err(e) => {
                            let mut r = RepoReport::new(&repo.name, RepoStatus::Ok);
                            r.stopped(&Stop::Store(format!("reading its links again: {e}")));
                            return Some(r);
                        }
                    };
                    let mut inputs = inputs_for(&repo, true, cache);
                    inputs.first_look = Some(look);
                    match run.collect(repo, inputs).await {
                        Collected::Done(r) => Some(r),
                        Collected::Deferred(..) => None,
                    }
                }
                // Gone since it was listed (deleted): nothing to collect.
                Ok(None) => None,
                Err(e) => {
                    let mut r = RepoReport::new(&name, RepoStatus::Ok);
                    r.stopped(&Stop::Store(format!("listing it again failed: {e}")));
                    Some(r)
                }
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .filter_map(futures::future::ready)
        .for_each(|r| {
            done(&r);
            report.repositories.push(r);
            futures::future::ready(())
        });
    before_run_deadline(run_deadline, opts, again).await?;

    report.rejected = tail.rejected;
    report.unowned_objects = tail.unowned;
    state_defects.extend(tail.defects);
    for (key, defect) in state_defects {
        tracing::warn!(%key, %defect, "not an object, owned by no repository; left alone");
        report.rejected.push(Rejected {
            reason: format!("not an object: {defect}"),
            prefix: key,
            objects: 0,
        });
    }
    for r in &report.rejected {
        tracing::warn!(prefix = %r.prefix, reason = %r.reason, "repository left alone");
    }

    // The global blob space last, so that its roots are read after the repositories dropped
    // what they dropped (untagged manifests), and what only those used goes in this same run.
    // Where its roots are all it needs to be marked, it is listed as it is collected, after
    // marking, and only what could go is held (see `streamed`).
    let placeholders = lock(&shared.facts).placeholders.clone();
    let blob_space = key_space
        .global
        .as_ref()
        .filter(|_| opts.only.is_none() && owns_global);
    let mut global = Repository {
        kind: UnitKind::Global,
        name: GLOBAL_REPOSITORY.into(),
        prefix: (key_space.global.clone())
            .or(tail.global_prefix)
            .unwrap_or_default(),
        objects: tail.global_objects,
    };
    let streamed = blob_space
        .filter(|_| {
            global.objects.is_empty()
                && placeholders.is_empty()
                && !layout.scans_for_referrers(&global)
                && !opts.detail
                && opts.explain.is_none()
        })
        .map(|prefix| Streamed {
            prefix: prefix.clone(),
            list_parts: opts.list_parts,
        });
    if let (Some(g), None) = (blob_space, &streamed) {
        let listed = list_whole(&store, layout, g, opts.list_parts, opts.concurrency);
        global.objects.extend(
            before_run_deadline(run_deadline, opts, listed)
                .await?
                .map_err(list_error)?,
        );
    }
    if (streamed.is_some() || !global.objects.is_empty()) && wanted(&global) {
        // Roots the repositories dropped (a dry run: would have dropped) are not roots here
        // either, so that the dry run reports what the real run does.
        let dropped_roots: HashSet<String> = report
            .repositories
            .iter()
            .flat_map(|r| r.deleted.iter().map(|d| d.key.clone()))
            .collect();
        // Global blobs are shared by every repository: any repository's intent protects them.
        let all_intents: Vec<ObjectMeta> = lock(intents).values().flatten().cloned().collect();
        let roots = merge_roots(tail.global_roots);
        let leftover = leftovers(&global.name);
        // Cached like a repository, with its roots (held by the repositories) as context; an
        // intent anywhere, or roots that must be read, mean a full look. A streamed unit's
        // fingerprint is known once it is listed: until then, `unchanged` says only that
        // nothing else keeps it from being skipped.
        let cache = match (&shared.cache, &roots) {
            (Some(index), Some(roots)) => {
                let context = format!(
                    "{}\nroots {}",
                    shared.context,
                    roots_fingerprint(roots, &dropped_roots)
                );
                let fingerprint = match &streamed {
                    Some(_) => cache::Fingerprint([0; 32]),
                    None => cache::fingerprint(global.objects.iter(), &context),
                };
                let entry = index.entry(&global.name).cloned();
                let quiet = all_intents.is_empty() && !leftover.announcement && !leftover.lease;
                let volatile = !all_intents.is_empty();
                let mut c = UnitCache::new(fingerprint, context, entry, false, volatile);
                c.unchanged = quiet && (streamed.is_some() || c.entry_current(now));
                Some(c)
            }
            _ => None,
        };
        let inputs = RepoInputs {
            leftovers: leftover,
            intents: all_intents,
            dropped_roots,
            linked: Vec::new(),
            roots,
            placeholders,
            defer_deletions: false,
            defer_candidates: false,
            cache,
            first_look: None,
            streamed: streamed.clone(),
            roots_marked: false,
        };
        if let Collected::Done(r) = run.collect(global, inputs).await {
            // A blob space listed empty is no unit, as when it was listed beforehand.
            let empty = streamed.is_some() && r.objects == 0 && r.status == RepoStatus::Ok;
            if !empty {
                done(&r);
                report.repositories.push(r);
            }
        }
    }
    // Entries older runs left twice (collectors racing on a unit) or malformed: the newest
    // stays, the rest only cost listing. With them, the entries this run's units superseded,
    // a thousand to a request rather than one each.
    if let Some(index) = shared.cache.as_ref().filter(|_| !opts.dry_run) {
        let superseded = std::mem::take(&mut *lock(&run.superseded));
        if !index.stale_keys().is_empty() || !superseded.is_empty() {
            if let Err(e) = cache::delete_stale(&store, index, &superseded).await {
                tracing::warn!(error = %e, "removing stale cache entries");
            }
        }
    }
    if let Some(p) = &opts.progress {
        p.finish();
    }
    finish_report(&mut report, &store, &clock);
    report.price(opts.prices.as_ref());
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

/// ocigc's state objects in a first page of the key space, if the page holds all of them:
/// its last key sorts after every state key, so no state object is left for a later page
/// (in byte order, and in the directory store's order by path component alike). A short
/// page is not taken as the end: some stores truncate pages early.
fn state_within(page: &[ObjectMeta]) -> Option<Vec<ObjectMeta>> {
    let complete = page
        .last()
        .is_some_and(|o| o.key.as_str() > STATE_PREFIX && !namespace::is_state(&o.key));
    complete.then(|| {
        page.iter()
            .filter(|o| namespace::is_state(&o.key))
            .cloned()
            .collect()
    })
}

/// Cross-repository facts (placeholders and their content copies, mount links), grown as the
/// listing completes repositories.
#[derive(Default)]
struct Facts {
    placeholders: Arc<HashMap<Digest, Option<ContentCopy>>>,
    linked: HashMap<String, Vec<Digest>>,
}

/// What the listing left over besides repositories.
#[derive(Default)]
struct Tail {
    rejected: Vec<Rejected>,
    unowned: u64,
    global_objects: Vec<ObjectMeta>,
    global_prefix: Option<String>,
    global_roots: Vec<Roots>,
    /// Keys the store cannot serve as objects, until a repository claims them.
    defects: HashMap<String, Box<str>>,
    /// Why the listing stopped early: the run decides nothing that needs it whole.
    error: Option<StoreError>,
}

/// State the listing shares with the run while it streams.
struct Shared<'a> {
    store: &'a Instrumented,
    layout: &'a dyn Layout,
    concurrency: usize,
    facts: Mutex<Facts>,
    tail: Mutex<Tail>,
    /// The incremental cache's entries as listed, unless the run does without it.
    cache: Option<CacheIndex>,
    /// What besides its listing decides a unit (settings, version).
    context: String,
    /// The version of each repository's trash as listed: part of its unit's context, so a
    /// changed trash is observed afresh.
    trash: HashMap<String, String>,
    /// Push intents by repository, as listed.
    intents: Mutex<HashMap<String, Vec<ObjectMeta>>>,
    /// Parts of the listing not yet through: the facts are complete when none is left.
    parts_left: std::sync::atomic::AtomicUsize,
}

/// A repository the listing completed, and whether the cross-repository facts were complete
/// when it was handed out.
struct Unit {
    repo: Repository,
    /// Of the run's own parts (a shard lists others' only for their facts).
    own: bool,
    facts_complete: bool,
    cache: Option<UnitCache>,
}

/// Locks `m`, whatever a panicked holder left.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these half-updated in a way that matters more than
    // stopping the run would.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared<'_> {
    /// Learns the placeholders `repo` holds and the content copies it has for placeholders
    /// seen so far.
    fn learn_placeholders(&self, repo: &Repository) {
        if !self.layout.links_across_repositories() {
            return;
        }
        let new = self.layout.placeholders_in(repo);
        let mut facts = lock(&self.facts);
        if !new.is_empty() {
            let map = Arc::make_mut(&mut facts.placeholders);
            for d in new {
                map.entry(d).or_insert(None);
            }
        }
        if !facts.placeholders.is_empty() {
            let wanted = |d: &Digest| matches!(facts.placeholders.get(d), Some(None));
            let copies = self.layout.content_copies(repo, &wanted);
            if !copies.is_empty() {
                let map = Arc::make_mut(&mut facts.placeholders);
                for (d, c) in copies {
                    map.insert(d, Some(c));
                }
            }
        }
    }

    /// Learns the links `repo` holds that keep other repositories' blobs alive.
    async fn learn_links(
        &self,
        repo: &Repository,
        unit_cache: Option<&mut UnitCache>,
    ) -> Result<(), StoreError> {
        if !self.layout.links_across_repositories() {
            return Ok(());
        }
        let links = match unit_cache {
            Some(c) => {
                c.links = self.links_of(repo, c).await?;
                c.links.clone()
            }
            None => {
                self.layout
                    .links_in(self.store, repo, self.concurrency)
                    .await?
            }
        };
        let mut facts = lock(&self.facts);
        for (target, d) in links {
            facts.linked.entry(target).or_default().push(d);
        }
        Ok(())
    }

    /// Blobs of `repo` that keys elsewhere keep alive, as far as the listing has shown them:
    /// mount links to them, and content copies of digests stored as placeholders.
    fn kept_by_others(&self, repo: &Repository) -> Vec<Digest> {
        let facts = lock(&self.facts);
        let mut kept = facts.linked.get(&repo.name).cloned().unwrap_or_default();
        if !facts.placeholders.is_empty() {
            let wanted = |d: &Digest| facts.placeholders.contains_key(d);
            kept.extend(
                self.layout
                    .content_copies(repo, &wanted)
                    .into_iter()
                    .map(|(d, _)| d),
            );
        }
        kept.sort_unstable();
        kept.dedup();
        kept
    }

    /// Learns the placeholders a partitioner gathered itself (links are learnt per
    /// repository, as each is claimed).
    fn learn_partition(&self, partition: &Partition) {
        if !self.layout.links_across_repositories() {
            return;
        }
        if !partition.placeholders.is_empty() {
            let mut facts = lock(&self.facts);
            let map = Arc::make_mut(&mut facts.placeholders);
            for (d, copy) in &partition.placeholders {
                let slot = map.entry(d.clone()).or_insert(None);
                if slot.is_none() {
                    *slot = copy.clone();
                }
            }
        }
    }

    /// The units of one part's listing, handed out as the partitioner completes them.
    fn units<'s>(
        &'s self,
        pages: BoxStream<'s, Result<Vec<ObjectMeta>, StoreError>>,
        partitioner: Box<dyn Partitioner + 's>,
        own: bool,
    ) -> impl futures::Stream<Item = Unit> + Send + 's {
        struct Feed<'s> {
            pages: Option<BoxStream<'s, Result<Vec<ObjectMeta>, StoreError>>>,
            partitioner: Option<Box<dyn Partitioner + 's>>,
            ready: VecDeque<Unit>,
        }
        let feed = Feed {
            pages: Some(pages),
            partitioner: Some(partitioner),
            ready: VecDeque::new(),
        };
        stream::unfold(feed, move |mut feed| async move {
            loop {
                if let Some(unit) = feed.ready.pop_front() {
                    return Some((unit, feed));
                }
                let pages = feed.pages.as_mut()?;
                match pages.next().await {
                    Some(Ok(page)) => {
                        let page = self.note_defects(page);
                        let part = feed.partitioner.as_mut()?;
                        for repo in part.push(page) {
                            match self.claim(&repo).await {
                                Ok(cache) => feed.ready.push_back(Unit {
                                    repo,
                                    own,
                                    facts_complete: false,
                                    cache,
                                }),
                                Err(e) => {
                                    self.fail(e);
                                    return None;
                                }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        self.fail(e);
                        return None;
                    }
                    None => {
                        feed.pages = None;
                        let partition = feed.partitioner.take()?.finish();
                        // Only the last part through sees every fact before handing out.
                        let last = self
                            .parts_left
                            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
                            == 1;
                        self.learn_partition(&partition);
                        // Every repository is in hand now: learn from all of them before
                        // handing any out, so that each is decided on complete facts.
                        let mut caches = Vec::with_capacity(partition.repositories.len());
                        for repo in &partition.repositories {
                            match self.claim(repo).await {
                                Ok(c) => caches.push(c),
                                Err(e) => {
                                    self.fail(e);
                                    return None;
                                }
                            }
                        }
                        if let Some(g) = &partition.global {
                            if let Err(e) = self.claim(g).await {
                                self.fail(e);
                                return None;
                            }
                        }
                        let mut tail = lock(&self.tail);
                        tail.rejected.extend(partition.rejected);
                        tail.unowned += partition.unowned;
                        if let Some(g) = partition.global {
                            tail.global_prefix.get_or_insert(g.prefix);
                            tail.global_objects.extend(g.objects);
                        }
                        tail.global_roots.extend(partition.global_roots);
                        drop(tail);
                        feed.ready
                            .extend(partition.repositories.into_iter().zip(caches).map(
                                |(repo, cache)| Unit {
                                    repo,
                                    own,
                                    facts_complete: last,
                                    cache,
                                },
                            ));
                    }
                }
            }
        })
    }

    /// The links `repo` holds: from the cache where its listing is what the cache saw (links
    /// are objects of the unit), read otherwise.
    async fn links_of(
        &self,
        repo: &Repository,
        c: &mut UnitCache,
    ) -> Result<Vec<(String, Digest)>, StoreError> {
        if let Some(entry) = c.entry.as_ref().filter(|_| c.unchanged) {
            if !entry.has_links {
                return Ok(Vec::new());
            }
            if let Some(contents) = cache::read(self.store, entry).await {
                let links = contents.links.clone();
                c.contents = Some(contents);
                return Ok(links);
            }
        }
        self.layout
            .links_in(self.store, repo, self.concurrency)
            .await
    }

    /// Sets ocigc's own keys apart (listed on their own, first) and remembers defects.
    fn note_defects(&self, mut page: Vec<ObjectMeta>) -> Vec<ObjectMeta> {
        page.retain(|o| !o.key.starts_with(STATE_PREFIX));
        if page.iter().any(|o| o.defect.is_some()) {
            let mut tail = lock(&self.tail);
            for o in &page {
                if let Some(d) = &o.defect {
                    tail.defects.insert(o.key.clone(), d.clone());
                }
            }
        }
        page
    }

    /// Takes a completed repository's defects off the unowned list, looks it up in the
    /// incremental cache and learns its facts.
    async fn claim(&self, repo: &Repository) -> Result<Option<UnitCache>, StoreError> {
        {
            let mut tail = lock(&self.tail);
            if !tail.defects.is_empty() {
                for o in &repo.objects {
                    tail.defects.remove(&o.key);
                }
            }
        }
        self.learn_placeholders(repo);
        let mut unit_cache = self.cache.as_ref().map(|index| {
            let context = if repo.is_global() {
                // Every trash holds roots of the global unit: any change is a new context.
                let mut all: Vec<(&String, &String)> = self.trash.iter().collect();
                all.sort();
                all.iter().fold(self.context.clone(), |c, (name, v)| {
                    format!("{c} trash {name} {v}")
                })
            } else {
                match self.trash.get(&repo.name) {
                    Some(v) => format!("{} trash {v}", self.context),
                    None => self.context.clone(),
                }
            };
            let fingerprint = cache::fingerprint(repo.objects.iter(), &context);
            let entry = index.entry(&repo.name).cloned();
            let unchanged = entry.as_ref().is_some_and(|e| e.fingerprint == fingerprint);
            UnitCache::new(fingerprint, context, entry, unchanged, false)
        });
        self.learn_links(repo, unit_cache.as_mut()).await?;
        Ok(unit_cache)
    }

    /// Whether every placeholder seen so far has a content copy on record.
    fn copies_known(&self) -> bool {
        lock(&self.facts).placeholders.values().all(Option::is_some)
    }

    /// Lists the key space again for the content copies of placeholders whose copy was
    /// listed before the placeholder itself (nothing else is kept).
    async fn find_copies<'s>(
        &'s self,
        mut pages: BoxStream<'s, Result<Vec<ObjectMeta>, StoreError>>,
        mut part: Box<dyn Partitioner + 's>,
    ) -> Result<(), StoreError> {
        if self.copies_known() {
            return Ok(());
        }
        let record = |repos: Vec<Repository>| {
            let mut facts = lock(&self.facts);
            for repo in &repos {
                let wanted = |d: &Digest| matches!(facts.placeholders.get(d), Some(None));
                let copies = self.layout.content_copies(repo, &wanted);
                if !copies.is_empty() {
                    let map = Arc::make_mut(&mut facts.placeholders);
                    for (d, c) in copies {
                        map.insert(d, Some(c));
                    }
                }
            }
        };
        while let Some(page) = pages.next().await {
            let mut page = page?;
            page.retain(|o| !o.key.starts_with(STATE_PREFIX));
            record(part.push(page));
        }
        record(part.finish().repositories);
        Ok(())
    }

    fn fail(&self, e: StoreError) {
        let mut tail = lock(&self.tail);
        tail.error.get_or_insert(e);
    }
}

/// Listed objects of completed repositories waiting for the collection, beyond which the
/// listing pauses: some 20 pages, enough to keep every part's driver busy while the
/// collection catches up. An object costs about 400 bytes here (its key, ETag and the
/// unit's spare capacity), so this is some 8 MiB.
const BACKLOG_BUDGET: usize = 20_000;

/// Listed objects that deferred repositories may hold in memory until the second pass; the
/// rest are listed again then (a LIST page per thousand keys), and read again: reads taken
/// after one listing do not go with another. About 200 bytes each as held: some 4 MiB.
const DEFERRED_BUDGET: usize = 20_000;

/// Documents (and what else a first look read, by [`FirstLook::weight`]) that deferred
/// repositories may keep for the second pass; beyond this they are read again then. Measured
/// at about 1.4 KiB each (an image manifest's references as strings), so some 5.5 MiB: over
/// 1M keys with every tenth repository dirty, 10,000 held 8 MiB more at peak and saved 4.6%
/// of the GETs. Without a bound, such a bucket holds a tenth of its manifests.
const DEFERRED_DOCUMENTS: usize = 4_000;

/// A repository waiting for the second pass, with what its first look did.
enum Waiting {
    /// With its listing, and the reads that came after that listing.
    Held(Repository, FirstLook),
    /// By name: listed again (retention changed it, or memory did not allow), and read again.
    Named(String, FirstLook),
}

/// A digest of the global unit's roots as listed (their keys and what they name), less those
/// the repositories dropped this run.
fn roots_fingerprint(roots: &Roots, dropped: &HashSet<String>) -> String {
    let mut lines: Vec<String> = if roots.sources.len() == roots.descriptors.len() {
        (roots.sources.iter().zip(&roots.descriptors))
            .filter(|(k, _)| !dropped.contains(*k))
            .map(|(k, d)| format!("{k} {}", d.digest))
            .collect()
    } else {
        roots
            .descriptors
            .iter()
            .map(|d| d.digest.to_string())
            .collect()
    };
    lines.sort_unstable();
    Digest::sha256_of(lines.join("\n").as_bytes()).to_string()
}

/// Joins the global roots the parts of the listing found.
fn merge_roots(mut all: Vec<Roots>) -> Option<Roots> {
    if all.len() <= 1 {
        return all.pop();
    }
    let mut out = Roots::default();
    // Roots that are objects of their own, gathered from the parts of one listing, add up to
    // the version a listing of them all gives: the re-check reads them again only if that
    // changed. Any other version covers its own part only, and then none covers them all.
    let mut sum = Some(ListingSum::default());
    for r in all {
        sum = match (sum, &r.version) {
            (Some(mut s), Some(RootsVersion::Listing(part))) => {
                s.merge(part);
                Some(s)
            }
            _ => None,
        };
        out.descriptors.extend(r.descriptors);
        out.sources.extend(r.sources);
        out.documents.extend(r.documents);
    }
    out.version = sum.map(RootsVersion::Listing);
    Some(out)
}

/// What besides a unit's listing decides what a run does with it: the settings, and the
/// version of ocigc (a new version decides afresh once).
/// A listed object's version as text (ETag, size and modification time).
fn listed_version(o: &ObjectMeta) -> String {
    let modified = o
        .last_modified
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{} {} {modified}", o.etag.as_deref().unwrap_or(""), o.size)
}

fn cache_context(layout: &dyn Layout, opts: &GcOptions) -> String {
    format!(
        "ocigc {} layout {} {} grace {} delay {}",
        env!("CARGO_PKG_VERSION"),
        layout.name(),
        layout.settings(),
        opts.grace.as_nanos(),
        opts.delay.as_nanos()
    )
}

/// Every object under `prefix`, listed in parts at once where it is long, in key order.
async fn list_whole(
    store: &dyn Store,
    layout: &dyn Layout,
    prefix: &str,
    list_parts: usize,
    concurrency: usize,
) -> Result<Vec<ObjectMeta>, StoreError> {
    let mut objects = Vec::new();
    parts::each_page(store, layout, prefix, list_parts, concurrency, |p| {
        objects.extend(p)
    })
    .await?;
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::listing_version;
    use std::time::{Duration, UNIX_EPOCH};

    fn link(i: u64) -> ObjectMeta {
        ObjectMeta::new(
            format!("links/{i}"),
            71,
            UNIX_EPOCH + Duration::from_secs(i),
            Some(format!("\"e{i}\"")),
        )
    }

    fn part(links: &[ObjectMeta]) -> Roots {
        Roots {
            version: Some(RootsVersion::Listing(listing_version(links.iter()))),
            sources: links.iter().map(|o| o.key.clone()).collect(),
            ..Roots::default()
        }
    }

    #[test]
    fn roots_from_parts_have_the_version_of_one_listing_of_them_all() {
        let links: Vec<ObjectMeta> = (0..7).map(link).collect();
        let whole = Some(RootsVersion::Listing(listing_version(links.iter())));
        let parts = vec![part(&links[4..]), part(&links[..1]), part(&links[1..4])];
        let merged = merge_roots(parts).expect("roots");
        assert_eq!(merged.version, whole);
        assert_eq!(merged.sources.len(), 7);
        // A link more, or one rewritten: another version, so the re-check reads them again.
        let more: Vec<ObjectMeta> = (0..8).map(link).collect();
        assert_ne!(
            merged.version,
            Some(RootsVersion::Listing(listing_version(more.iter())))
        );
        let mut rewritten = links.clone();
        rewritten[2].etag = Some("\"other\"".into());
        assert_ne!(
            merged.version,
            Some(RootsVersion::Listing(listing_version(rewritten.iter())))
        );
        // A part versioned otherwise, or not at all: no version covers them all.
        let etag = Roots {
            version: Some(RootsVersion::Etag("\"x\"".into())),
            ..Roots::default()
        };
        let merged = merge_roots(vec![part(&links[..3]), etag]).expect("roots");
        assert_eq!(merged.version, None);
        let merged = merge_roots(vec![part(&links[..3]), Roots::default()]).expect("roots");
        assert_eq!(merged.version, None);
    }
}
