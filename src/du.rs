//! `ocigc du` and `ocigc explain`: read-only views of what a `gc` run with the same flags
//! would act on, derived from a dry run's report (which makes no write request).

use std::collections::HashMap;
use std::io::Write;

use serde::Serialize;

use crate::cost::{Cost, Prices};
use crate::digest::Digest;
use crate::report::{Explained, RepoStatus, Report, UnitShare};
use crate::store::RequestCounts;

/// One repository's storage, as `gc` sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DuRepo {
    /// Repository name (`_blobs`-like names are a layout's global unit).
    pub name: String,
    /// Outcome of looking at it (`ok` unless it could not be marked).
    pub status: RepoStatus,
    /// Objects it owns.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes of blobs reachable from its roots, its share of a global unit's included.
    pub reachable_bytes: u64,
    /// Bytes of reachable blobs no other repository's images need: what deleting the
    /// repository would free. Copies that other repositories' placeholders or links read are
    /// not; nor is a global blob another repository's roots reach. 0 for a global unit,
    /// whose blobs are counted in the repositories' rows instead.
    pub unique_bytes: u64,
    /// Bytes a `gc` run with the same flags would delete (unreferenced and past grace).
    pub garbage_bytes: u64,
    /// Bytes of unreferenced blobs not deletable yet (grace, or waiting for `--delay`).
    pub pending_bytes: u64,
    /// Tags.
    pub tags: u64,
    /// Reachable manifests and indexes.
    pub manifests: u64,
    /// Why it could not be looked at, if it could not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Sums over every repository.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DuTotals {
    /// Repositories.
    pub repositories: u64,
    /// Objects.
    pub objects: u64,
    /// Bytes.
    pub bytes: u64,
    /// Reachable bytes, each blob once (a global unit's share in a repository's row is not
    /// counted again).
    pub reachable_bytes: u64,
    /// Unique bytes: the sum of the rows'.
    pub unique_bytes: u64,
    /// Garbage bytes: what `gc` would delete.
    pub garbage_bytes: u64,
    /// Pending bytes.
    pub pending_bytes: u64,
    /// Tags.
    pub tags: u64,
    /// Manifests, each once (as `reachable_bytes`).
    pub manifests: u64,
}

/// The report of `ocigc du`.
#[derive(Clone, Debug, Serialize)]
pub struct DuReport {
    /// `du`.
    pub command: &'static str,
    /// The bucket, as a URL.
    pub bucket: String,
    /// The layout name.
    pub layout: &'static str,
    /// When it was looked at (RFC 3339).
    pub at: String,
    /// Repositories, largest first.
    pub repositories: Vec<DuRepo>,
    /// Sums.
    pub totals: DuTotals,
    /// Objects outside any repository.
    pub unowned_objects: u64,
    /// Store requests made (no PUT or DELETE among them).
    pub requests: RequestCounts,
    /// Reclaimable storage in $/month and the requests' cost, with prices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
}

impl DuReport {
    /// The `du` view of a dry run's report (made with `GcOptions::detail`). A global unit's
    /// shares are added to their repositories' rows; the totals count them once, in the
    /// global unit's row.
    pub fn of(report: &Report, prices: Option<&Prices>) -> DuReport {
        let shares: HashMap<&str, &UnitShare> = (report.repositories.iter())
            .filter_map(|r| r.detail.as_ref())
            .flat_map(|d| d.shares.iter().map(|s| (s.name.as_str(), s)))
            .collect();
        let mut t = DuTotals::default();
        let mut repositories = Vec::with_capacity(report.repositories.len());
        for r in &report.repositories {
            let detail = r.detail.clone().unwrap_or_default();
            let own_unique = detail.unique_bytes.unwrap_or(r.reachable.bytes);
            let share = shares.get(r.name.as_str());
            let row = DuRepo {
                name: r.name.clone(),
                status: r.status,
                objects: r.objects,
                bytes: r.bytes,
                reachable_bytes: r.reachable.bytes + share.map_or(0, |s| s.reachable_bytes),
                unique_bytes: own_unique + share.map_or(0, |s| s.unique_bytes),
                garbage_bytes: r.bytes_deleted(),
                pending_bytes: r.pending.bytes,
                tags: detail.tags,
                // The share's, not its own marking's: with `--delete-untagged` a repository
                // marks from its tags too, through the same global documents.
                manifests: share.map_or(detail.manifests, |s| s.manifests),
                errors: r.errors.clone(),
            };
            t.repositories += 1;
            t.objects += row.objects;
            t.bytes += row.bytes;
            t.reachable_bytes += r.reachable.bytes;
            t.unique_bytes += row.unique_bytes;
            t.garbage_bytes += row.garbage_bytes;
            t.pending_bytes += row.pending_bytes;
            t.tags += row.tags;
            if share.is_none() {
                t.manifests += row.manifests;
            }
            repositories.push(row);
        }
        repositories.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
        let cost = prices.map(|p| Cost::of(p, &report.requests, 0, Some(t.garbage_bytes)));
        DuReport {
            command: "du",
            bucket: report.bucket.clone(),
            layout: report.layout,
            at: report.started_at.clone(),
            repositories,
            totals: t,
            unowned_objects: report.unowned_objects,
            requests: report.requests,
            cost,
        }
    }

    /// Whether every repository could be looked at.
    pub fn all_ok(&self) -> bool {
        self.repositories.iter().all(|r| r.status == RepoStatus::Ok)
    }

    /// The human table.
    pub fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let header = [
            "REPOSITORY",
            "OBJECTS",
            "BYTES",
            "REACHABLE",
            "UNIQUE",
            "GARBAGE",
            "PENDING",
            "TAGS",
            "MANIFESTS",
        ];
        let row = |r: &DuRepo| -> Vec<String> {
            let mut name = r.name.clone();
            if r.status != RepoStatus::Ok {
                name.push_str(&format!(" ({})", r.status.as_str()));
            }
            vec![
                name,
                r.objects.to_string(),
                human(r.bytes),
                human(r.reachable_bytes),
                human(r.unique_bytes),
                human(r.garbage_bytes),
                human(r.pending_bytes),
                r.tags.to_string(),
                r.manifests.to_string(),
            ]
        };
        let t = &self.totals;
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        rows.extend(self.repositories.iter().map(row));
        rows.push(vec![
            format!("TOTAL ({} repositories)", t.repositories),
            t.objects.to_string(),
            human(t.bytes),
            human(t.reachable_bytes),
            human(t.unique_bytes),
            human(t.garbage_bytes),
            human(t.pending_bytes),
            t.tags.to_string(),
            t.manifests.to_string(),
        ]);
        let widths: Vec<usize> = (0..header.len())
            .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let mut line = format!("{:<w$}", r[0], w = widths[0]);
            for (cell, w) in r.iter().zip(&widths).skip(1) {
                line.push_str(&format!("  {cell:>w$}", w = *w));
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        if let Some(c) = &self.cost {
            writeln!(
                out,
                "reclaimable: {} for {:.6} $/month at {} prices",
                human(c.reclaimable_bytes.unwrap_or(0)),
                c.reclaimable_dollars_per_month.unwrap_or(0.0),
                c.prices.name
            )?;
        }
        Ok(())
    }
}

/// Bytes with a binary unit, e.g. `1.5 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One digest `explain` was asked about.
#[derive(Clone, Debug, Serialize)]
pub struct ExplainEntry {
    /// The digest.
    pub digest: Digest,
    /// The unit whose plan decided it (the repository, or the layout's global unit).
    pub unit: Option<String>,
    /// Neither listed nor reachable in the repository (or the global unit).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub not_found: bool,
    /// The plan's decision and reason.
    #[serde(flatten)]
    pub explained: Option<Explained>,
}

/// The report of `ocigc explain`.
#[derive(Clone, Debug, Serialize)]
pub struct ExplainReport {
    /// `explain`.
    pub command: &'static str,
    /// The bucket, as a URL.
    pub bucket: String,
    /// The layout name.
    pub layout: &'static str,
    /// The repository asked about.
    pub repository: String,
    /// One entry per digest, in the order asked.
    pub digests: Vec<ExplainEntry>,
    /// Why the repository (or its global unit) could not be looked at, if it could not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl ExplainReport {
    /// The `explain` view of a dry run's report (made with `GcOptions::explain`) for `repo`.
    /// A digest is looked up in `repo`'s plan first, then in the global unit's.
    pub fn of(report: &Report, repo: &str, digests: &[Digest]) -> ExplainReport {
        let units: Vec<_> = (report.repositories.iter())
            .filter(|r| r.name == repo)
            .chain(report.repositories.iter().filter(|r| r.name != repo))
            .collect();
        let errors = (units.iter())
            .flat_map(|r| r.errors.iter().map(|e| format!("{}: {e}", r.name)))
            .collect();
        let entries = digests
            .iter()
            .map(|d| {
                let found = units.iter().find_map(|r| {
                    let e = r
                        .detail
                        .as_ref()?
                        .explained
                        .iter()
                        .find(|e| e.digest == *d)?;
                    Some((r.name.clone(), e.clone()))
                });
                ExplainEntry {
                    digest: d.clone(),
                    unit: found.as_ref().map(|(n, _)| n.clone()),
                    not_found: found.is_none(),
                    explained: found.map(|(_, e)| e),
                }
            })
            .collect();
        ExplainReport {
            command: "explain",
            bucket: report.bucket.clone(),
            layout: report.layout,
            repository: repo.to_string(),
            digests: entries,
            errors,
        }
    }

    /// The human form: one paragraph per digest.
    pub fn write_text(&self, out: &mut impl Write) -> std::io::Result<()> {
        for e in &self.digests {
            match &e.explained {
                None => writeln!(
                    out,
                    "{}: not found (neither stored in nor reachable from {})",
                    e.digest, self.repository
                )?,
                Some(x) => {
                    let reason = serde_json::to_value(x.reason)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    writeln!(out, "{}: {} ({reason})", e.digest, x.decision)?;
                    if !x.path.is_empty() {
                        writeln!(out, "  path: {}", x.path.join(" → "))?;
                    }
                    if let Some(f) = &x.first_seen {
                        writeln!(out, "  first seen unreferenced: {f}")?;
                    }
                    if let Some(at) = &x.deletable_at {
                        writeln!(out, "  deletable from: {at}")?;
                    }
                }
            }
        }
        for err in &self.errors {
            writeln!(out, "error: {err}")?;
        }
        Ok(())
    }
}
