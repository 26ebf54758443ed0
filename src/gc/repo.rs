//! The per-repository spine (SPEC §3.2-§3.7): observe (roots, intents, pending state, mark,
//! plan), then act under the lease (re-check and sweep, state, verify).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::clock::BucketClock;
use super::lease::{Acquired, Leases};
use super::mark::{MarkContext, Marker};
use super::plan::{plan, Decision, PlanPolicy, Reason, RepoPlan};
use super::recheck::RepoGuard;
use super::state::{self, Pending};
use super::{intent, sweep, SHUTTING_DOWN};
use crate::digest::Digest;
use crate::layout::{ContentCopy, KeyKind, Layout, Repository, Roots};
use crate::report::{Deleted, RepoReport, RepoStatus};
use crate::store::{Instrumented, ObjectMeta, Store};

/// What stays the same for every repository of one run.
pub(super) struct RepoRun<'a> {
    pub(super) store: &'a Instrumented,
    pub(super) layout: &'a dyn Layout,
    pub(super) placeholders: &'a HashMap<Digest, Option<ContentCopy>>,
    pub(super) policy: PlanPolicy,
    pub(super) clock: BucketClock,
    pub(super) leases: Leases<'a>,
    pub(super) run_id: String,
    pub(super) dry_run: bool,
    pub(super) concurrency: usize,
    pub(super) run_deadline: Option<Instant>,
    pub(super) repo_timeout: Option<Duration>,
    pub(super) stop: CancellationToken,
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
    pub(super) async fn collect(&self, repo: Repository, inputs: RepoInputs) -> RepoReport {
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
}
