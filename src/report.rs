//! The JSON run report and the human summary.

use std::io::Write;
use std::time::SystemTime;

use serde::Serialize;

use crate::cost::{Cost, Prices};
use crate::digest::Digest;
use crate::gc::plan::Reason;
use crate::layout::Rejected;
use crate::store::RequestCounts;

/// Outcome of one repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepoStatus {
    /// Collected (or deleted) completely.
    Ok,
    /// Failed closed: nothing more was deleted once the failure was seen.
    Failed,
    /// Not started (e.g. the run time-out passed first).
    Skipped,
    /// Abandoned at its time-out, between delete batches.
    Timeout,
    /// Failed closed because its deletions would exceed the blast-radius budget
    /// (`--max-delete-fraction` of its blob bytes, or the run's `--max-delete-bytes`):
    /// nothing was deleted in it.
    BudgetExceeded,
}

impl RepoStatus {
    /// The name in the report and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RepoStatus::Ok => "ok",
            RepoStatus::Failed => "failed",
            RepoStatus::Skipped => "skipped",
            RepoStatus::Timeout => "timeout",
            RepoStatus::BudgetExceeded => "budget_exceeded",
        }
    }
}

/// A count of blobs and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Number of blobs.
    pub blobs: u64,
    /// Their total size.
    pub bytes: u64,
}

impl Tally {
    /// Adds one blob of `size` bytes.
    pub fn add(&mut self, size: u64) {
        self.blobs += 1;
        self.bytes += size;
    }
}

/// One deleted key (or, in a dry run, one key the real run would delete).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deleted {
    /// The key.
    pub key: String,
    /// The blob's digest, when the key is a blob.
    pub digest: Option<Digest>,
    /// Size in bytes.
    pub size: u64,
    /// Why it was deleted.
    pub reason: Reason,
}

/// Per-repository result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RepoReport {
    /// Repository name.
    pub name: String,
    /// Outcome.
    pub status: RepoStatus,
    /// Objects the repository owns.
    pub objects: u64,
    /// Their total size.
    pub bytes: u64,
    /// Blobs reachable from the roots.
    pub reachable: Tally,
    /// Unreferenced blobs not deleted this run (younger than the grace period, or waiting
    /// for a later observation).
    pub pending: Tally,
    /// Keys that are not blobs of the layout (metadata, unknown files): never swept.
    pub other_keys: u64,
    /// Manifests and other documents read while marking.
    pub manifests_fetched: u64,
    /// Deleted keys (would-be deleted in a dry run).
    pub deleted: Vec<Deleted>,
    /// Candidates that a re-check before their delete batch found referenced again: kept.
    pub rescued: u64,
    /// Digests this run deleted that the verify pass found referenced: must stay empty.
    pub dangling_references: Vec<Digest>,
    /// True when another collector held the repository's lease.
    pub lease_conflict: bool,
    /// Non-fatal findings, e.g. a missing layer.
    pub warnings: Vec<String>,
    /// What made the repository fail or time out.
    pub errors: Vec<String>,
    /// Nothing that could change a decision changed since the run that last collected it: its
    /// figures are that run's (from the incremental cache), and no request was made for it.
    pub unchanged: bool,
    /// What retention decided for each tag, where a `[[retention]]` table applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::retention::RetentionReport>,
    /// Figures only `du` and `explain` ask for (see `GcOptions::detail`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<RepoDetail>,
}

/// What `du` and `explain` need beyond a run's report, for one repository.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RepoDetail {
    /// Roots (tags, and untagged roots the layout keeps) as read.
    pub tags: u64,
    /// Reachable manifests and indexes.
    pub manifests: u64,
    /// The plan's decision on each digest `explain` asked about that the repository lists or
    /// reaches.
    pub explained: Vec<Explained>,
    /// Reachable bytes no other repository needs, where that differs from the reachable bytes
    /// (blobs another repository's placeholders or links read from this one; none for a
    /// global unit, whose blobs are split among the repositories in `shares`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_bytes: Option<u64>,
    /// A global unit's blobs split by the repositories whose roots reach them, where the
    /// layout can tell a root's repository (`du` shows them in those repositories' rows).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<UnitShare>,
}

/// What one repository's roots reach of a global unit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UnitShare {
    /// The repository.
    pub name: String,
    /// Bytes of the unit's blobs its roots reach.
    pub reachable_bytes: u64,
    /// Of those, bytes no other repository's roots reach.
    pub unique_bytes: u64,
    /// Manifests and indexes its roots reach.
    pub manifests: u64,
}

/// The decision on one digest, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explained {
    /// The digest (in `explain`'s entry, not repeated here).
    #[serde(skip)]
    pub digest: Digest,
    /// Its key in the repository, where listed there.
    pub key: Option<String>,
    /// Its size, where listed.
    pub size: Option<u64>,
    /// `keep` or `delete`.
    pub decision: &'static str,
    /// The plan's reason.
    pub reason: Reason,
    /// For a reachable digest: one path from a root, root first, this digest last.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<String>,
    /// For an unreferenced blob: when this collector first saw it unreferenced (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    /// For an unreferenced blob: when a run would delete it at the earliest, if it stays
    /// unreferenced and runs observe it when it leaves its grace period (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletable_at: Option<String>,
}

impl RepoReport {
    /// An empty report for `name` with `status`.
    pub fn new(name: &str, status: RepoStatus) -> RepoReport {
        RepoReport {
            name: name.to_string(),
            status,
            objects: 0,
            bytes: 0,
            reachable: Tally::default(),
            pending: Tally::default(),
            other_keys: 0,
            manifests_fetched: 0,
            deleted: Vec::new(),
            rescued: 0,
            dangling_references: Vec::new(),
            lease_conflict: false,
            warnings: Vec::new(),
            errors: Vec::new(),
            unchanged: false,
            retention: None,
            detail: None,
        }
    }

    /// Bytes deleted (or to be deleted in a dry run).
    pub fn bytes_deleted(&self) -> u64 {
        self.deleted.iter().map(|d| d.size).sum()
    }
}

/// Sums over all repositories.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Repositories in the report.
    pub repositories: u64,
    /// Repositories that ended `ok`.
    pub repositories_ok: u64,
    /// Repositories that ended `failed`, `timeout` or `skipped`.
    pub repositories_not_ok: u64,
    /// Objects seen in the listing.
    pub objects: u64,
    /// Bytes seen in the listing.
    pub bytes: u64,
    /// Reachable blobs.
    pub reachable_blobs: u64,
    /// Bytes of reachable blobs.
    pub reachable_bytes: u64,
    /// Pending (unreferenced, not yet deletable) blobs.
    pub pending_blobs: u64,
    /// Their bytes.
    pub bytes_pending: u64,
    /// Keys deleted (or to be deleted in a dry run).
    pub blobs_deleted: u64,
    /// Bytes deleted (or to be deleted in a dry run).
    pub bytes_deleted: u64,
    /// Manifests read.
    pub manifests_fetched: u64,
    /// Candidates kept because a re-check found them referenced again.
    pub rescued: u64,
    /// Deleted blobs found referenced afterwards (must be 0).
    pub dangling_references: u64,
    /// Repositories skipped because another collector held the lease.
    pub lease_conflicts: u64,
    /// Tags (and untagged roots) retention removed (would remove, in a dry run).
    pub tags_removed: u64,
    /// Tags retention kept, where a table applied.
    pub tags_kept: u64,
    /// Repositories that failed closed on the blast-radius budget.
    pub budget_exceeded: u64,
}

/// The report of one `gc` or `delete-repo` run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Unique id of the run, also in every log line.
    pub run_id: String,
    /// `gc` or `delete-repo`.
    pub command: &'static str,
    /// The bucket, as a URL.
    pub bucket: String,
    /// The layout name.
    pub layout: &'static str,
    /// Start time (RFC 3339).
    pub started_at: String,
    /// End time (RFC 3339).
    pub finished_at: String,
    /// Whether this was a dry run: `deleted` then lists what a real run would delete.
    pub dry_run: bool,
    /// Grace period of a `gc` run, e.g. `24h`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
    /// Delay between observations of a `gc` run, e.g. `1h`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<String>,
    /// Per-repository results, sorted by name.
    pub repositories: Vec<RepoReport>,
    /// Repository-like prefixes left alone, and why.
    pub rejected: Vec<Rejected>,
    /// Objects outside any repository (left alone).
    pub unowned_objects: u64,
    /// Sums.
    pub totals: Totals,
    /// Store requests by operation.
    pub requests: RequestCounts,
    /// What the run's requests cost and what its deletions save, with `--pricing` or
    /// explicit prices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
}

/// RFC 3339 in UTC with second precision (a time before 1970 is written as the epoch).
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t.max(SystemTime::UNIX_EPOCH)).to_string()
}

impl Report {
    /// Recomputes `totals` from the repositories.
    pub fn compute_totals(&mut self) {
        let mut t = Totals::default();
        for r in &self.repositories {
            t.repositories += 1;
            if r.status == RepoStatus::Ok {
                t.repositories_ok += 1;
            } else {
                t.repositories_not_ok += 1;
            }
            t.objects += r.objects;
            t.bytes += r.bytes;
            t.reachable_blobs += r.reachable.blobs;
            t.reachable_bytes += r.reachable.bytes;
            t.pending_blobs += r.pending.blobs;
            t.bytes_pending += r.pending.bytes;
            t.blobs_deleted += r.deleted.len() as u64;
            t.bytes_deleted += r.bytes_deleted();
            t.manifests_fetched += r.manifests_fetched;
            t.rescued += r.rescued;
            t.dangling_references += r.dangling_references.len() as u64;
            t.lease_conflicts += u64::from(r.lease_conflict);
            if let Some(ret) = &r.retention {
                t.tags_removed += ret.removed;
                t.tags_kept += ret.kept;
            }
            t.budget_exceeded += u64::from(r.status == RepoStatus::BudgetExceeded);
        }
        self.totals = t;
    }

    /// Prices the run with `prices` (none: no `cost`): its requests, and the bytes it deleted
    /// (a dry run: would delete). Call after [`Report::compute_totals`].
    pub fn price(&mut self, prices: Option<&Prices>) {
        self.cost = prices.map(|p| Cost::of(p, &self.requests, self.totals.bytes_deleted, None));
    }

    /// True when every repository ended `ok`.
    pub fn all_ok(&self) -> bool {
        self.repositories.iter().all(|r| r.status == RepoStatus::Ok)
    }

    /// Writes the short human summary (one line per repository, then totals).
    pub fn write_summary(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        writeln!(
            out,
            "ocigc {} run {} on {} (layout {}){}",
            self.command,
            self.run_id,
            self.bucket,
            self.layout,
            if self.dry_run { " [dry run]" } else { "" }
        )?;
        for r in &self.repositories {
            writeln!(
                out,
                "  {:<40} {:<8} reachable {:>6} blobs, pending {:>5}, {verb} {:>5} ({})",
                r.name,
                r.status.as_str(),
                r.reachable.blobs,
                r.pending.blobs,
                r.deleted.len(),
                human_bytes(r.bytes_deleted()),
            )?;
            if let Some(ret) = &r.retention {
                let verb = if self.dry_run {
                    "would remove"
                } else {
                    "removed"
                };
                writeln!(
                    out,
                    "      retention ({}): {verb} {} tags, kept {}{}",
                    ret.table,
                    ret.removed,
                    ret.kept,
                    if ret.moved > 0 {
                        format!(" ({} moved by a push meanwhile, left alone)", ret.moved)
                    } else {
                        String::new()
                    }
                )?;
            }
            for e in &r.errors {
                writeln!(out, "      error: {e}")?;
            }
        }
        for r in &self.rejected {
            writeln!(out, "  {:<40} left alone: {}", r.prefix, r.reason)?;
        }
        let t = &self.totals;
        if t.tags_removed + t.tags_kept > 0 {
            let verb = if self.dry_run {
                "would remove"
            } else {
                "removed"
            };
            writeln!(
                out,
                "retention: {verb} {} tags, kept {}",
                t.tags_removed, t.tags_kept
            )?;
        }
        writeln!(
            out,
            "total: {} repositories ({} not ok), {} objects ({}), {verb} {} ({}), pending {} ({}); \
             requests: list {} get {} head {} put {} delete {}",
            t.repositories,
            t.repositories_not_ok,
            t.objects,
            human_bytes(t.bytes),
            t.blobs_deleted,
            human_bytes(t.bytes_deleted),
            t.pending_blobs,
            human_bytes(t.bytes_pending),
            self.requests.list,
            self.requests.get,
            self.requests.head,
            self.requests.put,
            self.requests.delete,
        )?;
        if let Some(c) = &self.cost {
            let reclaimed = if self.dry_run {
                "storage a real run would reclaim"
            } else {
                "storage reclaimed"
            };
            writeln!(
                out,
                "cost ({}): {reclaimed} {}/month; requests {} ({} class A, {} class B, {} free)",
                c.prices.name,
                dollars(c.reclaimed_dollars_per_month),
                dollars(c.request_dollars),
                c.class_a_requests,
                c.class_b_requests,
                c.free_requests,
            )?;
        }
        Ok(())
    }
}

/// Dollars with as many decimals as make small amounts (a test bucket's) readable.
fn dollars(x: f64) -> String {
    if x >= 100.0 {
        format!("${x:.0}")
    } else if x >= 1.0 {
        format!("${x:.2}")
    } else {
        format!("${x:.6}")
    }
}

/// `n` bytes in binary units, e.g. `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
