//! The per-repository spine (SPEC §3.2-§3.7): observe (roots, intents, pending state, mark,
//! plan), then act under the lease (re-check and sweep, state, verify).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::budget::Budget;
use super::cache;
use super::clock::BucketClock;
use super::lease::{Acquired, Leases};
use super::mark::{Deletable, MarkContext, Marker};
use super::plan::{plan, Decision, PlanPolicy, Reason, RepoPlan};
use super::recheck::RepoGuard;
use super::run::lock;
use super::state::{self, Pending};
use super::stop::{Phase, Stop};
use super::streamed::Streamed;
use super::{intent, sweep};
use crate::digest::Digest;
use crate::layout::{ContentCopy, KeyKind, Layout, Repository, Roots, RootsVersion, TagSet};
use crate::manifest::{Descriptor, UNTYPED_MANIFEST};
use crate::report::{Deleted, RepoReport, RepoStatus};
use crate::retention::{self, trash, RetentionOptions, RetentionReport};
use crate::store::{Instrumented, ObjectMeta, Store};

/// What stays the same for every repository of one run.
pub(super) struct RepoRun<'a> {
    pub(super) store: &'a Instrumented,
    pub(super) layout: &'a dyn Layout,
    pub(super) policy: PlanPolicy,
    pub(super) clock: BucketClock,
    pub(super) leases: Leases<'a>,
    pub(super) run_id: String,
    pub(super) dry_run: bool,
    pub(super) concurrency: usize,
    pub(super) run_deadline: Option<Instant>,
    pub(super) repo_timeout: Option<Duration>,
    pub(super) stop: CancellationToken,
    pub(super) retention: Arc<RetentionOptions>,
    /// The blast-radius budget every plan is admitted against before anything is deleted.
    pub(super) budget: Budget,
    /// Record [`crate::report::RepoDetail`] (`du`, `explain`).
    pub(super) detail: bool,
    /// Digests to explain.
    pub(super) explain: Option<Arc<HashSet<Digest>>>,
    /// Cache entries this run's units superseded, deleted together at the run's end.
    pub(super) superseded: std::sync::Mutex<Vec<String>>,
}

/// What the run found for one repository before collecting it.
#[derive(Debug)]
pub(super) struct RepoInputs {
    /// ocigc state of the repository in the listing.
    pub(super) leftovers: Leftovers,
    /// Its push intents in the listing.
    pub(super) intents: Vec<ObjectMeta>,
    /// Keys of roots that repositories collected earlier in this run deleted (or, in a dry
    /// run, would have deleted).
    pub(super) dropped_roots: HashSet<String>,
    /// Its blobs that links in other repositories keep alive.
    pub(super) linked: Vec<Digest>,
    /// Its roots as the bucket listing showed them, where the layout could read them there
    /// (saving a second pass); otherwise they are read when the repository is collected.
    pub(super) roots: Option<Roots>,
    /// Digests stored as placeholders somewhere in the bucket, as far as the listing has
    /// shown them, with a content copy to read each from.
    pub(super) placeholders: Arc<HashMap<Digest, Option<ContentCopy>>>,
    /// Hand the repository back instead of deleting anything (or failing closed): links or
    /// placeholders not listed yet may keep its blobs alive. The run collects it again once
    /// the whole bucket has been listed.
    pub(super) defer_deletions: bool,
    /// With [`RepoInputs::defer_deletions`], hand it back for a new candidate too: a shard
    /// that has not listed the other slices would otherwise record as pending a blob their
    /// links keep, and drop it again once it matures and they are listed, every delay.
    pub(super) defer_candidates: bool,
    /// What the incremental cache knows of the unit, if the run uses it.
    pub(super) cache: Option<UnitCache>,
    /// What a first look at the unit this run already did (a deferred repository): its
    /// documents, its retention (applied once per run) and what it read.
    pub(super) first_look: Option<FirstLook>,
    /// The unit's objects are not listed yet: it is listed after marking, against the
    /// reachable set (the global blob space). With a cache, [`UnitCache::unchanged`] then
    /// says only that nothing outside the listing keeps the unit from being skipped; the
    /// fingerprint is the listing's, known once it has gone by.
    pub(super) streamed: Option<Streamed>,
    /// The roots were marked already (a streamed unit, before its listing): observing marks
    /// only what else keeps blobs, so the reachable set is not walked twice over.
    pub(super) roots_marked: bool,
}

/// Retention as applied to one unit this run.
#[derive(Clone, Debug, Default)]
pub(super) struct Retained {
    /// Its report, where a table applies.
    pub(super) report: Option<RetentionReport>,
    /// Roots were removed: the listing is stale, and the trash holds new roots.
    pub(super) changed: bool,
}

/// What a deferred repository's first look did, so that its second look (with every link
/// and placeholder of the bucket known) does none of it again.
#[derive(Debug, Default)]
pub(super) struct FirstLook {
    /// The documents marking read.
    pub(super) learnt: cache::Contents,
    /// Retention as applied.
    pub(super) retained: Retained,
    /// Roots, trash, intents and pending state as read, where the look got that far. The
    /// second look marks from this snapshot as the first did: what changed since is the
    /// re-check's to find (roots by their version, intents listed again) and the pending
    /// state is read again under the lease, as for any unit.
    pub(super) reads: Option<Box<Reads>>,
}

impl FirstLook {
    /// Roughly how many documents' worth of memory it holds.
    pub(super) fn weight(&self) -> usize {
        self.learnt.documents.len() + self.reads.as_ref().map_or(0, |r| r.weight())
    }
}

/// What observing a unit reads before it marks.
#[derive(Clone, Debug)]
pub(super) struct Reads {
    roots: Roots,
    trashed: Vec<Digest>,
    trash_expiry: Option<std::time::SystemTime>,
    /// Manifests the trash keeps the content of (deleted with their root).
    trashed_documents: Vec<(Digest, crate::manifest::References)>,
    /// Trashed roots by repository (a global unit, for `du`).
    trashed_by_owner: Vec<(String, Digest)>,
    intents: intent::Intents,
    pending: Pending,
    /// Said while reading the pending state.
    warnings: Vec<String>,
}

impl Reads {
    fn weight(&self) -> usize {
        // Documents and descriptors weigh alike; a pending candidate about a third as much.
        self.roots.descriptors.len()
            + self.roots.documents.len()
            + self.trashed.len()
            + self.trashed_documents.len()
            + self.trashed_by_owner.len()
            + self.intents.roots.len()
            + self.pending.first_seen.len() / 3
    }
}

/// The incremental cache's view of one unit.
#[derive(Clone, Debug)]
pub(super) struct UnitCache {
    /// The fingerprint of the unit as listed now.
    pub(super) fingerprint: cache::Fingerprint,
    /// What went into it besides the listing (settings, roots held elsewhere).
    pub(super) context: String,
    /// The unit's entry as the last run that collected it left it.
    pub(super) entry: Option<cache::IndexEntry>,
    /// Nothing that could change a decision has changed since that run: the summary is the
    /// report, and no request is needed.
    pub(super) unchanged: bool,
    /// Its contents, where already read (for the links it records).
    pub(super) contents: Option<cache::Contents>,
    /// Links the unit holds that keep other repositories' blobs alive, as found this run.
    pub(super) links: Vec<(String, Digest)>,
    /// This run's decisions depend on keys outside the unit's listing (push intents, links or
    /// placeholders elsewhere): its entry must not let the next run skip it.
    pub(super) volatile: bool,
    /// A streamed unit's listing as summed up (see [`cache::StreamedFingerprint`]): what it
    /// deletes is taken out of it for the entry written after.
    pub(super) streamed: Option<cache::StreamedFingerprint>,
}

impl UnitCache {
    /// The cache's view of a unit listed as `fingerprint` under `context`, with its entry.
    pub(super) fn new(
        fingerprint: cache::Fingerprint,
        context: String,
        entry: Option<cache::IndexEntry>,
        unchanged: bool,
        volatile: bool,
    ) -> UnitCache {
        UnitCache {
            fingerprint,
            context,
            entry,
            unchanged,
            contents: None,
            links: Vec::new(),
            volatile,
            streamed: None,
        }
    }

    /// The unit's entry was written for the unit as it is now listed, and no decision of it
    /// has come due since (`now`, on the bucket clock).
    pub(super) fn entry_current(&self, now: std::time::SystemTime) -> bool {
        (self.entry.as_ref())
            .is_some_and(|e| e.fingerprint == self.fingerprint && e.wake_at.is_none_or(|w| now < w))
    }
}

/// ocigc state of a repository seen in the listing.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Leftovers {
    /// Pending candidates are stored.
    pub(super) pending: bool,
    /// A batch announcement is stored (its run died mid-batch).
    pub(super) announcement: bool,
    /// A lease is stored: held by a live collector, or left by a dead one.
    pub(super) lease: bool,
}

/// Why a repository's lease is taken.

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
    roots_version: Option<RootsVersion>,
    intents_seen: HashSet<String>,
    expired_intents: Vec<String>,
    pending: Pending,
    plan: RepoPlan,
    /// When the next trash entry expires and a decision may change.
    trash_expiry: Option<std::time::SystemTime>,
    /// Bytes of the plan the budget admitted.
    admitted: u64,
    /// Labels of the roots by digest, with their media types (only when explaining).
    root_labels: HashMap<Digest, (String, Option<crate::manifest::MediaType>)>,
    /// Blobs kept by links or placeholders in other repositories (only for `du`, `explain`).
    linked: HashSet<Digest>,
    /// A global unit's blobs split by the repositories whose roots reach them (only for
    /// `du`, `explain`).
    shares: Vec<crate::report::UnitShare>,
    /// What was read, kept where the unit may be deferred.
    reads: Option<Box<Reads>>,
}

/// Why a unit fails closed for keys the store cannot serve as objects, if it has any: what
/// cannot be read may be a manifest or a blob some image needs.
pub(super) fn not_objects(objects: &[ObjectMeta]) -> Option<String> {
    let defects: Vec<String> = (objects.iter())
        .filter_map(|o| Some(format!("{} ({})", o.key, o.defect.as_deref()?)))
        .collect();
    (!defects.is_empty()).then(|| format!("not objects: {}", defects.join("; ")))
}

/// `roots` less those repositories collected earlier in this run deleted.
pub(super) fn without_dropped(mut roots: Roots, dropped: &HashSet<String>) -> Roots {
    if !dropped.is_empty() && roots.sources.len() == roots.descriptors.len() {
        // Both together: the sources name the descriptors (explain's labels, du's shares).
        (roots.sources, roots.descriptors) = std::mem::take(&mut roots.sources)
            .into_iter()
            .zip(std::mem::take(&mut roots.descriptors))
            .filter(|(k, _)| !dropped.contains(k))
            .unzip();
    }
    roots
}

/// What an observing step came to: its value, or `None` with the unit stopped in `report`,
/// failed closed where it could not read or decide (what it missed may be what an image
/// needs), or out of time.
fn settled<T>(
    repo: &Repository,
    report: &mut RepoReport,
    marker: &Marker<'_>,
    outcome: Result<Result<T, String>, Stop>,
) -> Option<T> {
    match outcome {
        Ok(Ok(value)) => Some(value),
        Ok(Err(reason)) => {
            tracing::error!(repo = %repo.name, %reason, "repository failed closed");
            report.stopped(&Stop::FailedClosed(reason));
            report.warnings.extend(marker.warnings.iter().cloned());
            None
        }
        Err(stop) => {
            report.stopped(&stop);
            None
        }
    }
}

/// Reports a unit the cache tells unchanged from its entry's summary, reading nothing.
fn unchanged(report: &mut RepoReport, entry: &cache::IndexEntry) {
    let sm = &entry.summary;
    report.unchanged = true;
    report.reachable = crate::report::Tally {
        blobs: sm.reachable_blobs,
        bytes: sm.reachable_bytes,
    };
    report.pending = crate::report::Tally {
        blobs: sm.pending_blobs,
        bytes: sm.pending_bytes,
    };
    report.other_keys = sm.other_keys;
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

/// The earliest time at which `plan` could decide differently on the same listing: when a
/// blob leaves its grace period or a candidate has waited the delay. `None`: never.
fn wake_at(
    plan: &RepoPlan,
    first_seen: &HashMap<Digest, std::time::SystemTime>,
    policy: PlanPolicy,
) -> Option<std::time::SystemTime> {
    plan.items
        .iter()
        .filter_map(|i| match i.decision {
            Decision::Keep(Reason::WithinGrace) => Some(i.last_modified + policy.grace),
            Decision::Keep(Reason::AwaitingSecondObservation) => {
                let seen = i.digest.as_ref().and_then(|d| first_seen.get(d)).copied();
                Some(seen.unwrap_or(policy.now) + policy.delay)
            }
            _ => None,
        })
        .min()
}

/// What a media type names, for a path step.
fn kind_of(media_type: Option<&str>) -> &'static str {
    match media_type {
        Some(m) if m.contains("index") || m.contains("manifest.list") => "index",
        Some(m) if m.contains("manifest") => "manifest",
        Some(m) if m.contains("config") => "config",
        Some(m) if m.contains("layer") || m.contains("rootfs") => "layer",
        _ => "blob",
    }
}

/// One path from a root to `digest` as the marker first reached it, root first: e.g.
/// `tag v1 → index sha256:… → manifest sha256:… (linux/arm64) → layer sha256:…`. The
/// platform of a step an index entry leads to is read again from that index (`platforms`
/// keeps each index read, for the other digests asked about).
async fn path_to(
    layout: &dyn Layout,
    marker: &Marker<'_>,
    obs: &Observation,
    digest: &Digest,
    platforms: &mut HashMap<Digest, HashMap<Digest, String>>,
) -> Vec<String> {
    let mut steps = Vec::new();
    for (step, from) in steps_to(layout, marker, obs, digest) {
        let platform = match from {
            Some((parent, child)) => {
                if !platforms.contains_key(&parent) {
                    let read = marker.platforms(&parent).await;
                    platforms.insert(parent.clone(), read);
                }
                platforms.get(&parent).and_then(|p| p.get(&child))
            }
            None => None,
        };
        steps.push(match platform {
            Some(p) => format!("{step} ({p})"),
            None => step,
        });
    }
    steps
}

/// The steps of [`path_to`], each with the (parent, digest) of the reference that leads to
/// it, where one does.
fn steps_to(
    layout: &dyn Layout,
    marker: &Marker<'_>,
    obs: &Observation,
    digest: &Digest,
) -> Vec<(String, Option<(Digest, Digest)>)> {
    let mut steps = Vec::new();
    let mut seen = HashSet::from([digest.clone()]);
    let mut at = digest.clone();
    loop {
        if let Some((label, media_type)) = obs.root_labels.get(&at) {
            steps.push((format!("{} {at}", kind_of(media_type.as_deref())), None));
            steps.push((label.clone(), None));
            break;
        }
        match marker.parents.as_ref().and_then(|p| p.get(&at)) {
            Some(p) if seen.insert(p.digest.clone()) => {
                let (kind, from) = match p.via {
                    super::mark::Via::Subject => ("referrer", None),
                    super::mark::Via::Reference => (
                        kind_of(p.media_type.as_deref()),
                        Some((p.digest.clone(), at.clone())),
                    ),
                };
                steps.push((format!("{kind} {at}"), from));
                at = p.digest.clone();
            }
            _ if obs.linked.contains(&at) => {
                steps.push((format!("blob {at}"), None));
                steps.push((layout.kept_from_elsewhere().to_string(), None));
                break;
            }
            _ => {
                steps.push((format!("blob {at}"), None));
                steps.push(("reachable (root not recorded)".to_string(), None));
                break;
            }
        }
    }
    steps.reverse();
    steps
}

/// What collecting one repository gave.
pub(super) enum Collected {
    /// Its report.
    Done(RepoReport),
    /// Handed back unobserved-for-good: the run collects it again once every repository has
    /// been listed (see [`RepoInputs::defer_deletions`]), with what its first look did.
    Deferred(Repository, FirstLook),
}

/// The repository must wait for the second pass, with what its first look did.
struct Deferral(FirstLook);

/// Runs `work` until `deadline`; `None` if the deadline came first.
async fn within<T>(
    deadline: Option<Instant>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, work).await.ok(),
        None => Some(work.await),
    }
}

impl RepoRun<'_> {
    /// The verify pass, bounded by the repository's deadline.
    async fn verify_within(
        &self,
        deadline: Option<Instant>,
        repo: &Repository,
        marker: &mut Marker<'_>,
        report: &mut RepoReport,
    ) {
        if report.deleted.is_empty() {
            return;
        }
        let verified = self.verify(repo, marker, report);
        if within(deadline, verified).await.is_none() {
            report.stopped(&Stop::Timeout(Phase::Verify));
        }
    }

    /// Collects one repository; returns its report, or hands it back for the second pass of a
    /// run whose cross-repository facts were incomplete when it was observed (see
    /// [`RepoInputs::defer_deletions`]).
    pub(super) async fn collect(&self, repo: Repository, inputs: RepoInputs) -> Collected {
        let mut report = RepoReport::new(&repo.name, RepoStatus::Ok);
        report.objects = repo.objects.len() as u64;
        report.bytes = repo.objects.iter().map(|o| o.size).sum();
        let defer = inputs.defer_deletions;
        match self.collect_inner(&repo, inputs, &mut report).await {
            Ok(()) => {}
            Err(Deferral(look)) if defer => return Collected::Deferred(repo, look),
            // Only a run that asked for deferral gets one.
            Err(Deferral(..)) => {}
        }
        tracing::info!(
            run_id = %self.run_id,
            repo = %repo.name,
            status = ?report.status,
            deleted = report.deleted.len(),
            pending = report.pending.blobs,
            rescued = report.rescued,
            "repository collected"
        );
        Collected::Done(report)
    }

    async fn collect_inner(
        &self,
        repo: &Repository,
        mut inputs: RepoInputs,
        report: &mut RepoReport,
    ) -> Result<(), Deferral> {
        let leftovers = inputs.leftovers;
        let defer = inputs.defer_deletions;
        let defer_candidates = inputs.defer_candidates;
        if let Some(reason) = not_objects(&repo.objects) {
            tracing::error!(repo = %repo.name, %reason, "repository failed closed");
            report.stopped(&Stop::FailedClosed(reason));
            return Ok(());
        }
        let now = Instant::now();
        if self.run_deadline.is_some_and(|d| now >= d) {
            report.stopped(&Stop::Timeout(Phase::Start));
            return Ok(());
        }
        if self.stop.is_cancelled() {
            report.stopped(&Stop::Shutdown(Phase::Start));
            return Ok(());
        }
        let deadline = match (self.run_deadline, self.repo_timeout.map(|t| now + t)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Retention first (before the cache may skip the unit): time alone can change what
        // it decides, so a unit a table applies to always has its tags read.
        let first_look = inputs.first_look.take();
        let retained = match first_look.as_ref().map(|l| l.retained.clone()) {
            Some(r) => r,
            None => match self.retain(repo, deadline, report).await {
                Some(r) => r,
                None => return Ok(()),
            },
        };
        report.retention = retained.report.clone();
        // Read once for `du`'s count and `explain`'s root labels.
        let mut tag_set = None;
        if self.detail && !repo.is_global() {
            match within(deadline, self.layout.read_tags(self.store, repo)).await {
                Some(Ok(t)) => tag_set = Some(t),
                Some(Err(e)) => report.warnings.push(format!("reading the tags: {e}")),
                None => {}
            }
            report.detail = Some(crate::report::RepoDetail {
                tags: tag_set.as_ref().map_or(0, |t| t.tags.len() as u64),
                ..Default::default()
            });
        }
        if !self.layout.per_repository_gc() && !repo.is_global() {
            // Collected only for retention (distribution without --delete-untagged): its
            // blobs are global and swept by the global unit.
            return Ok(());
        }
        // A unit with a trash is skipped only while its trash is as when its entry was
        // written (its version is in the unit's context) and no entry of it has expired.
        // `du` and `explain` need the plan itself: the cache primes the marker, no more.
        let skip = |c: &&UnitCache| c.unchanged && !retained.changed && !self.detail;
        let streamed = inputs.streamed.is_some();
        if let Some(c) = inputs.cache.as_ref().filter(skip).filter(|_| !streamed) {
            if let Some(e) = &c.entry {
                unchanged(report, e);
                return Ok(());
            }
        }
        let placeholders = inputs.placeholders.clone();
        let mut unit_cache = inputs.cache.clone();
        let (primed, first_reads) = match first_look {
            Some(l) => (Some(l.learnt), l.reads),
            None => (None, None),
        };
        let blobs: HashMap<Digest, &ObjectMeta> = repo
            .objects
            .iter()
            .filter_map(|o| match self.layout.classify(repo, &o.key) {
                KeyKind::Blob(d) => Some((d, o)),
                KeyKind::Scratch | KeyKind::Other => None,
            })
            .collect();
        let mut marker = Marker::new(MarkContext {
            store: self.store,
            layout: self.layout,
            repo,
            blobs: &blobs,
            placeholders: &placeholders,
            concurrency: self.concurrency,
            listed_later: inputs.streamed.is_some(),
        });
        if self.explain.is_some() {
            marker.parents = Some(HashMap::new());
        }

        if let Some(c) = &unit_cache {
            let contents = match (&c.contents, &c.entry) {
                (Some(contents), _) => Some(contents.clone()),
                (None, Some(entry)) => within(deadline, cache::read(self.store, entry))
                    .await
                    .flatten(),
                (None, None) => None,
            };
            // Content-addressed documents stay true whatever else changed in the unit.
            if let Some(contents) = contents {
                marker.prime_cached(contents.documents, contents.not_referrers);
            }
        }
        if let Some(p) = primed {
            marker.prime_cached(p.documents, p.not_referrers);
        }

        // Observing has no side effects, so a time-out may cancel it anywhere.
        let mut inputs = inputs;
        if let Some(roots) = inputs.roots.take() {
            inputs.roots = Some(without_dropped(roots, &inputs.dropped_roots));
        }
        // A streamed unit is marked from its roots, then listed against what they reach
        // (see `streamed`): only then are its size and fingerprint known (so only now can the
        // cache tell it unchanged), and the objects it kept are the unit from here on.
        let kept_unit;
        let mut streamed_reachable = crate::report::Tally::default();
        let repo = match inputs.streamed.take() {
            Some(s) => {
                let dropped = &inputs.dropped_roots;
                let listed = self.mark_and_list(repo, &s, &mut marker, &mut inputs.roots, dropped);
                let listed = self.bounded(deadline, Phase::Listing, listed).await;
                let Some((unit, listing)) = settled(repo, report, &marker, listed) else {
                    return Ok(());
                };
                report.objects = listing.listed.blobs;
                report.bytes = listing.listed.bytes;
                streamed_reachable = listing.reachable;
                if let Some(c) = unit_cache.as_mut() {
                    c.fingerprint = listing.fingerprint.finish(&c.context);
                    // Skipped only where the entry's documents did all the marking: one whose
                    // body could not be read is collected (and its manifests read) in full.
                    c.unchanged = c.unchanged
                        && !retained.changed
                        && marker.manifests_fetched == 0
                        && c.entry_current(self.clock.now());
                    c.streamed = Some(listing.fingerprint);
                    if let Some(e) = c.entry.as_ref().filter(|_| c.unchanged) {
                        unchanged(report, e);
                        return Ok(());
                    }
                }
                inputs.roots_marked = true;
                kept_unit = unit;
                &kept_unit
            }
            None => repo,
        };
        let observed = self.observe(
            repo,
            &mut marker,
            leftovers.pending,
            tag_set,
            inputs,
            first_reads,
        );
        let observed = match self.bounded(deadline, Phase::Marking, observed).await {
            // Facts other repositories hold (a content copy listed later) may be what was
            // missing: the second pass decides with all of them.
            Ok(Err(_)) if defer => {
                return Err(Deferral(FirstLook {
                    learnt: cache::Contents::learned(&marker, Vec::new()),
                    retained,
                    reads: None,
                }))
            }
            observed => observed,
        };
        let Some(mut obs) = settled(repo, report, &marker, observed) else {
            return Ok(());
        };
        obs.plan.streamed_reachable = streamed_reachable;
        // A deletion may remove what a link or placeholder listed later keeps alive; `du`'s
        // unique bytes (and `explain`'s paths) need every such link too.
        // New candidates only: one pending since an earlier run was recorded on complete
        // facts, and waits for them again only once it matures (as a deletion).
        let new_candidates = || {
            obs.plan.items.iter().any(|i| {
                i.decision == Decision::Keep(Reason::AwaitingSecondObservation)
                    && i.digest
                        .as_ref()
                        .is_some_and(|d| !obs.pending.first_seen.contains_key(d))
            })
        };
        if defer
            && (self.detail
                || obs.plan.deletions().next().is_some()
                || (defer_candidates && new_candidates()))
        {
            return Err(Deferral(FirstLook {
                learnt: cache::Contents::learned(&marker, Vec::new()),
                retained,
                reads: obs.reads.take(),
            }));
        }
        obs.deadline = deadline;
        obs.leftovers = leftovers;
        self.summarise(report, &obs.plan);
        // The blast-radius budget is part of deciding: a plan over it is not carried out at
        // all, in a dry run as in a real one (which then reports what the real run does).
        match self.budget.admit(obs.plan.exposure(), 0) {
            Ok(admitted) => obs.admitted = admitted,
            Err(stop) => {
                tracing::error!(repo = %repo.name, reason = %stop.message(), "repository over the delete budget");
                report.stopped(&stop);
                report.manifests_fetched = marker.manifests_fetched;
                report.warnings.extend(marker.warnings.iter().cloned());
                return Ok(());
            }
        }
        if self.dry_run {
            if self.detail {
                self.describe(repo, &marker, &obs, report).await;
            }
            report.deleted = deletions_of(&obs.plan);
            report.manifests_fetched = marker.manifests_fetched;
            report.warnings.extend(marker.warnings.iter().cloned());
            return Ok(());
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
            self.act(repo, &mut marker, &mut obs, mode, report).await;
        }
        report.manifests_fetched = marker.manifests_fetched;
        report.warnings.extend(marker.warnings.iter().cloned());
        if let Some(c) = unit_cache {
            if report.status == RepoStatus::Ok {
                let remember = self.remember(repo, &marker, &obs, c, report);
                if within(deadline, remember).await.is_none() {
                    report
                        .warnings
                        .push("timed out writing the incremental cache".into());
                }
            }
        }
        Ok(())
    }

    /// Writes the unit's cache entry after a complete collection: what its listing looks
    /// like now, when its decisions can next change, and what its documents reference.
    async fn remember(
        &self,
        repo: &Repository,
        marker: &Marker<'_>,
        obs: &Observation,
        c: UnitCache,
        report: &mut RepoReport,
    ) {
        let deleted: HashSet<&str> = report.deleted.iter().map(|d| d.key.as_str()).collect();
        let fingerprint = if deleted.is_empty() {
            c.fingerprint
        } else if let Some(sum) = &c.streamed {
            let mut sum = sum.clone();
            for o in (repo.objects.iter()).filter(|o| deleted.contains(o.key.as_str())) {
                sum.remove(o);
            }
            sum.finish(&c.context)
        } else {
            cache::fingerprint(
                repo.objects
                    .iter()
                    .filter(|o| !deleted.contains(o.key.as_str())),
                &c.context,
            )
        };
        // A candidate rescued by a push must be looked at again next run, and so must a unit
        // that keys outside its listing decided; otherwise when the first clock runs out.
        // (The epoch, not now: entry times are rounded up to the second, and a run within
        // the same second must not take the entry as current.)
        let wake_at = if report.rescued > 0 || c.volatile {
            Some(std::time::UNIX_EPOCH)
        } else {
            let plan = wake_at(&obs.plan, &obs.pending.first_seen, self.policy);
            match (plan, obs.trash_expiry) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        let summary = cache::Summary {
            reachable_blobs: report.reachable.blobs,
            reachable_bytes: report.reachable.bytes,
            pending_blobs: report.pending.blobs,
            pending_bytes: report.pending.bytes,
            other_keys: report.other_keys,
        };
        let has_links = !c.links.is_empty();
        let contents = cache::Contents::learned(marker, c.links);
        let written = cache::write(
            self.store,
            &repo.name,
            &fingerprint,
            wake_at,
            has_links,
            &summary,
            &contents,
            c.entry.as_ref(),
        )
        .await;
        match (written, c.entry) {
            (Ok(key), Some(previous)) if cache::superseded(&previous, &repo.name, &key) => {
                lock(&self.superseded).push(previous.key)
            }
            (Ok(_), _) => {}
            (Err(e), _) => report
                .warnings
                .push(format!("writing the incremental cache: {e}")),
        }
    }

    /// Fills `report.detail` from the plan: counts, and the digests `explain` asked about.
    async fn describe(
        &self,
        repo: &Repository,
        marker: &Marker<'_>,
        obs: &Observation,
        report: &mut RepoReport,
    ) {
        let reachable = report.reachable.bytes;
        let detail = report.detail.get_or_insert_with(Default::default);
        detail.manifests = marker.reachable_documents();
        detail.shares = obs.shares.clone();
        detail.unique_bytes = if repo.is_global() {
            // Only repositories have images: a global unit's blobs are theirs (`shares`).
            Some(0)
        } else if obs.linked.is_empty() {
            None
        } else {
            // Copies other repositories' placeholders (or links) read are theirs too.
            let shared: u64 = (obs.plan.items.iter())
                .filter(|i| i.decision == Decision::Keep(Reason::Reachable))
                .filter(|i| i.digest.as_ref().is_some_and(|d| obs.linked.contains(d)))
                .map(|i| i.size)
                .sum();
            Some(reachable.saturating_sub(shared))
        };
        let Some(wanted) = &self.explain else {
            return;
        };
        let mut platforms = HashMap::new();
        let stamp = crate::report::timestamp;
        for item in &obs.plan.items {
            let Some(d) = item.digest.as_ref().filter(|d| wanted.contains(*d)) else {
                continue;
            };
            let (decision, reason) = match item.decision {
                Decision::Keep(r) => ("keep", r),
                Decision::Delete(r) => ("delete", r),
            };
            let first_seen = obs.pending.first_seen.get(d).copied();
            let deletable_at = match reason {
                // Seen unreferenced first by a run after its grace (unless already recorded),
                // then deletable by one `--delay` later.
                Reason::WithinGrace => {
                    let out_of_grace = item.last_modified + self.policy.grace;
                    Some(match (self.policy.delay.is_zero(), first_seen) {
                        (true, _) => out_of_grace,
                        (false, Some(f)) => out_of_grace.max(f + self.policy.delay),
                        (false, None) => out_of_grace + self.policy.delay,
                    })
                }
                Reason::AwaitingSecondObservation => {
                    Some(first_seen.unwrap_or(self.policy.now) + self.policy.delay)
                }
                _ => None,
            };
            detail.explained.push(crate::report::Explained {
                digest: d.clone(),
                key: Some(item.key.clone()),
                size: Some(item.size),
                decision,
                reason,
                path: if reason == Reason::Reachable {
                    path_to(self.layout, marker, obs, d, &mut platforms).await
                } else {
                    Vec::new()
                },
                first_seen: first_seen.map(stamp),
                deletable_at: deletable_at.map(stamp),
            });
        }
        // Reachable but not stored in this unit (a global blob space, a placeholder's copy).
        for d in wanted.iter() {
            if marker.reachable.contains(d) && !detail.explained.iter().any(|e| e.digest == *d) {
                detail.explained.push(crate::report::Explained {
                    digest: d.clone(),
                    key: None,
                    size: None,
                    decision: "keep",
                    reason: Reason::Reachable,
                    path: path_to(self.layout, marker, obs, d, &mut platforms).await,
                    first_seen: None,
                    deletable_at: None,
                });
            }
        }
        detail.explained.sort_by(|a, b| a.digest.cmp(&b.digest));
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

    /// Applies retention to `repo` (a repository a table matches), bounded by `deadline`;
    /// `None` if it failed or timed out (`report` says which, and nothing more is done).
    async fn retain(
        &self,
        repo: &Repository,
        deadline: Option<Instant>,
        report: &mut RepoReport,
    ) -> Option<Retained> {
        if repo.is_global() {
            return Some(Retained::default());
        }
        let run = retention::Run {
            store: self.store,
            layout: self.layout,
            options: &self.retention,
            now: self.policy.now,
            grace: self.policy.grace,
            dry_run: self.dry_run,
        };
        let applied = match within(deadline, run.apply(repo)).await {
            Some(a) => a,
            None => {
                report.stopped(&Stop::Timeout(Phase::Retention));
                return None;
            }
        };
        match applied {
            None => Some(Retained::default()),
            Some(Ok(outcome)) => {
                report.warnings.extend(outcome.warnings);
                Some(Retained {
                    report: Some(outcome.report),
                    changed: outcome.changed,
                })
            }
            Some(Err(e)) => {
                tracing::error!(repo = %repo.name, error = %e, "repository failed closed");
                report.stopped(&Stop::FailedClosed(e.to_string()));
                None
            }
        }
    }

    /// Runs `fut` (the unit's `phase`) until the unit's deadline or the run's shutdown,
    /// whichever comes first.
    async fn bounded<T>(
        &self,
        deadline: Option<Instant>,
        phase: Phase,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, Stop> {
        let limit = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = fut => Ok(r),
            () = limit => Err(Stop::Timeout(phase)),
            () = self.stop.cancelled() => Err(Stop::Shutdown(phase)),
        }
    }

    /// Reads what marking a unit starts from: its roots (unless the listing gave them), its
    /// trash, its push intents and its pending state.
    async fn read_unit(
        &self,
        repo: &Repository,
        roots: Option<Roots>,
        dropped_roots: &HashSet<String>,
        intents: &[ObjectMeta],
        has_pending: bool,
    ) -> Result<Reads, String> {
        let roots = match roots {
            Some(r) => r,
            None => without_dropped(
                (self.layout.read_roots(self.store, repo).await).map_err(|e| e.to_string())?,
                dropped_roots,
            ),
        };
        // After the roots: retention writes the trash before it removes a root, so a root
        // missing from them is in the trash read now.
        let mut trashed_documents = Vec::new();
        // Trashed roots by repository, where the trash is read for a global unit (`du`).
        let mut trashed_by_owner: Vec<(String, Digest)> = Vec::new();
        let (trashed, trash_expiry) =
            if repo.is_global() && !self.layout.global_roots_include_trash() {
                (Vec::new(), None)
            } else if repo.is_global() {
                // Blobs every repository shares: every repository's trashed manifests are roots
                // (an untagged root's revision link is gone while it is in the trash).
                let (all, expiry) = trash::read_all(self.store, self.policy.now)
                    .await
                    .map_err(|e| format!("reading the trash: {e}"))?;
                let mut digests: Vec<Digest> = all.iter().map(|(_, d)| d.clone()).collect();
                digests.sort();
                digests.dedup();
                if self.detail {
                    trashed_by_owner = all;
                }
                (digests, expiry)
            } else if !repo.is_global() {
                // Read even where the state listing showed none: another collector's retention
                // may have written this repository's first trash since (removing a root from the
                // roots read above), and on `serverless-registry` the trash alone then holds the
                // manifest.
                let t = trash::read(self.store, &repo.name)
                    .await
                    .map_err(|e| format!("reading the trash: {e}"))?;
                // Manifests deleted with their root (serverless-registry's untagged roots) are
                // read from the content their entries keep: the store has them no more.
                for (digest, body) in t.documents(self.policy.now) {
                    let refs = crate::manifest::references(&body)
                        .map_err(|e| format!("trashed manifest {digest}: {e}"))?;
                    trashed_documents.push((digest, refs));
                }
                (t.roots(self.policy.now), t.next_expiry(self.policy.now))
            } else {
                (Vec::new(), None)
            };
        let read = intent::read_intents(self.store, intents, self.clock.now()).await?;
        let mut warnings = Vec::new();
        let pending = if has_pending {
            state::read_pending(self.store, &repo.name, &mut warnings)
                .await
                .map_err(|e| format!("reading pending state: {e}"))?
        } else {
            Pending::default()
        };
        Ok(Reads {
            roots,
            trashed,
            trash_expiry,
            trashed_documents,
            trashed_by_owner,
            intents: read,
            pending,
            warnings,
        })
    }

    /// Reads roots, intents, the trash and pending state (unless a first look read them),
    /// marks, and plans.
    async fn observe(
        &self,
        repo: &Repository,
        marker: &mut Marker<'_>,
        has_pending: bool,
        tag_set: Option<TagSet>,
        inputs: RepoInputs,
        first_reads: Option<Box<Reads>>,
    ) -> Result<Observation, String> {
        let keep_reads = inputs.defer_deletions;
        let RepoInputs {
            intents,
            dropped_roots,
            linked,
            roots,
            roots_marked,
            ..
        } = inputs;
        let intents = intents.as_slice();
        let reads = match first_reads {
            Some(r) => Reads {
                roots: without_dropped(r.roots, &dropped_roots),
                ..*r
            },
            None => {
                self.read_unit(repo, roots, &dropped_roots, intents, has_pending)
                    .await?
            }
        };
        let kept_reads = keep_reads.then(|| Box::new(reads.clone()));
        let Reads {
            roots,
            trashed,
            trash_expiry,
            trashed_documents,
            trashed_by_owner,
            intents: read,
            pending,
            warnings,
        } = reads;
        marker.warnings.extend(warnings);
        marker.assume_not_referrers(pending.not_referrers.iter().cloned());
        // A preview persists no verdict: where it would delete nothing, the real run's scan
        // is the only one (`du` and `explain` need the scan's reachability in full).
        if self.dry_run && !self.detail && self.explain.is_none() {
            marker.scan_only_if_deletable = Some(Deletable {
                policy: self.policy,
                first_seen: pending.first_seen.clone(),
            });
        }
        marker.prime(roots.documents);
        marker.prime(trashed_documents);
        let mut root_labels = HashMap::new();
        if self.explain.is_some() {
            let mut sources = roots.sources.iter();
            for d in &roots.descriptors {
                let label = match sources.next() {
                    Some(k) => format!("root {k}"),
                    None => "untagged root".to_string(),
                };
                root_labels
                    .entry(d.digest.clone())
                    .or_insert((label, d.media_type.clone()));
            }
            for t in tag_set.into_iter().flat_map(|s| s.tags) {
                let media_type = root_labels.get(&t.digest).and_then(|l| l.1.clone());
                root_labels.insert(t.digest, (format!("tag {}", t.name), media_type));
            }
            for d in &read.roots {
                let label = ("push intent".to_string(), d.media_type.clone());
                root_labels.insert(d.digest.clone(), label);
            }
            for d in &trashed {
                let label = ("trash entry (retention)".to_string(), None);
                root_labels.entry(d.clone()).or_insert(label);
            }
        }
        // Roots by the repository they belong to, for `du`'s split of a global unit: its
        // revisions and its trash (push intents name none: what only they keep is in no
        // repository's share).
        let mut owned: Vec<(String, Vec<Digest>)> = Vec::new();
        if self.detail && repo.is_global() && roots.sources.len() == roots.descriptors.len() {
            let mut by_owner: std::collections::BTreeMap<&str, Vec<Digest>> = Default::default();
            for (k, d) in roots.sources.iter().zip(&roots.descriptors) {
                if let Some(owner) = self.layout.root_owner(k) {
                    by_owner.entry(owner).or_default().push(d.digest.clone());
                }
            }
            for (owner, d) in &trashed_by_owner {
                by_owner.entry(owner.as_str()).or_default().push(d.clone());
            }
            owned = (by_owner.into_iter())
                .map(|(o, ds)| (o.to_string(), ds))
                .collect();
        }
        let mut descriptors = if roots_marked {
            Vec::new()
        } else {
            roots.descriptors
        };
        descriptors.extend(read.roots);
        descriptors.extend(trashed.into_iter().map(|digest| Descriptor {
            media_type: Some(crate::manifest::media_type(UNTYPED_MANIFEST)),
            digest,
            size: None,
        }));
        marker.mark(&descriptors).await.map_err(|e| e.0)?;
        let shares = marker.shares(&owned);
        // Linked blobs are kept, not marked from: as unread roots they would hide what they
        // are (a manifest an index lists, an unlisted referrer) from the walk and the scan.
        marker.reachable.extend(linked.iter().cloned());
        let linked: HashSet<Digest> = if self.detail || self.explain.is_some() {
            linked.into_iter().collect()
        } else {
            HashSet::new()
        };
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
            trash_expiry,
            admitted: 0,
            root_labels,
            linked,
            shares,
            reads: kept_reads,
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
                report.stopped(&Stop::LeaseHeld {
                    owner,
                    expires_at: expires_at.to_string(),
                });
                return;
            }
            Err(e) => {
                report.stopped(&Stop::Store(format!(
                    "taking the lease failed, nothing deleted: {e}"
                )));
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
                    let streamed_reachable = obs.plan.streamed_reachable;
                    obs.plan = plan(
                        self.layout,
                        repo,
                        &marker.reachable,
                        &fresh.first_seen,
                        self.policy,
                    );
                    obs.plan.streamed_reachable = streamed_reachable;
                    self.summarise(report, &obs.plan);
                    // A new plan is a new decision: admitted against the budget again.
                    match self.budget.admit(obs.plan.exposure(), obs.admitted) {
                        Ok(admitted) => obs.admitted = admitted,
                        Err(stop) => {
                            report.stopped(&stop);
                            self.leases.release(lease).await;
                            return;
                        }
                    }
                }
                obs.pending = fresh;
            }
            Err(e) => {
                report.stopped(&Stop::Store(format!(
                    "reading pending state failed, nothing deleted: {e}"
                )));
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
            announced,
            ..
        } = guard;
        report.rescued = rescued;
        report.deleted = swept.deleted;
        if let Some(stop) = swept.stopped {
            report.stopped(&stop);
        }
        if !swept.errors.is_empty() {
            report.stopped(&Stop::Store(swept.errors.join("; ")));
        }
        // Not bounded by the deadline: the registry's pushers refuse manifests while its GC
        // marker stands, so ending it must not be abandoned (each request has its time-out).
        if let Some((mut p, true)) = protocol {
            if let Err(e) = p.end(self.store, self.clock.now()).await {
                report.stopped(&Stop::Store(format!(
                    "ending the registry's GC protocol (pushes fail until it is ended): {e}"
                )));
            }
        }

        if lease.is_lost() {
            // The repository is another collector's now: its state is not ours to write.
            if announced {
                self.clear_announcement(repo, report).await;
            }
            self.verify_within(obs.deadline, repo, marker, report).await;
            return;
        }
        crate::failpoint::hit("before-state-write");
        // Bounded like every phase: an unwritten state only delays later deletions.
        let wrote = self.write_state(repo, marker, obs, announced, report);
        let cleared = match within(obs.deadline, wrote).await {
            Some(cleared) => cleared,
            None => {
                report.stopped(&Stop::Timeout(Phase::State));
                false
            }
        };
        // The batch announcement, where it did not go with the state (and a stale one a run
        // that died mid-batch left: that batch is long over).
        if (announced || obs.leftovers.announcement) && !cleared {
            self.clear_announcement(repo, report).await;
        }
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
        self.verify_within(obs.deadline, repo, marker, report).await;
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

    /// Persists the candidates still pending after the sweep, keeping first-seen times.
    /// Removes the repository's batch announcement; pushers treat one left behind as stale
    /// once its expiry passes.
    async fn clear_announcement(&self, repo: &Repository, report: &mut RepoReport) {
        if let Err(e) = intent::clear_deletion(self.store, &repo.name).await {
            report
                .warnings
                .push(format!("removing the batch announcement: {e}"));
        }
    }

    /// Writes the pending state after the sweep. Where the state goes, the batch announcement
    /// (`announced`, or one a dead run left) goes in the same request: returns whether it did.
    async fn write_state(
        &self,
        repo: &Repository,
        marker: &Marker<'_>,
        obs: &Observation,
        announced: bool,
        report: &mut RepoReport,
    ) -> bool {
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
        let along = (announced || obs.leftovers.announcement)
            && candidates.is_empty()
            && obs.pending.etag.is_some();
        let announcement = along.then(|| intent::deleting_key(&repo.name));
        match state::write_pending(
            self.store,
            &repo.name,
            &self.run_id,
            now,
            &obs.pending,
            &candidates,
            announcement.as_slice(),
        )
        .await
        {
            Ok(true) => along,
            Ok(false) => {
                report.stopped(&Stop::LeaseLost(
                    "pending state changed underneath this run".into(),
                ));
                along
            }
            Err(e) => {
                report.stopped(&Stop::Store(format!("writing pending state: {e}")));
                false
            }
        }
    }
}
