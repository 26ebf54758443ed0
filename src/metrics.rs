//! Prometheus metrics (SPEC §5): one registry for the CLI and the daemon. Names and labels
//! are the contract of the dashboard and alerts; no per-repository labels (cardinality), the
//! per-repository detail lives in the JSON report.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::report::{RepoStatus, Report};
use crate::store::{Op, Outcome, RequestObserver};

/// Outcome labels of `ocigc_runs_total{result}`.
pub const RUN_RESULTS: [&str; 3] = ["ok", "partial", "failed"];
/// Labels of `ocigc_repos_total{status}`.
pub const REPO_STATUSES: [&str; 5] = ["ok", "failed", "skipped", "timeout", "budget_exceeded"];
/// Labels of `ocigc_timeouts_total{scope}`.
pub const TIMEOUT_SCOPES: [&str; 3] = ["request", "repo", "run"];
const OPS: [Op; 5] = [Op::List, Op::Get, Op::Head, Op::Put, Op::Delete];

/// Every metric name of SPEC §5 (the dashboard and alerts rely on them).
pub const NAMES: [&str; 25] = [
    "ocigc_runs_total",
    "ocigc_run_duration_seconds",
    "ocigc_last_run_timestamp_seconds",
    "ocigc_last_success_timestamp_seconds",
    "ocigc_repos_total",
    "ocigc_objects_scanned_total",
    "ocigc_bytes_scanned_total",
    "ocigc_blobs_deleted_total",
    "ocigc_bytes_deleted_total",
    "ocigc_bytes_pending",
    "ocigc_manifests_fetched_total",
    "ocigc_store_requests_total",
    "ocigc_store_request_duration_seconds",
    "ocigc_timeouts_total",
    "ocigc_lease_conflicts_total",
    "ocigc_dangling_references_total",
    "ocigc_repo_deletions_total",
    "ocigc_hook_runs_total",
    "ocigc_hook_run_duration_seconds",
    "ocigc_hook_last_success_timestamp_seconds",
    "ocigc_hook_jobs_rejected_total",
    "ocigc_tags_removed_total",
    "ocigc_tags_restored_total",
    "ocigc_reclaimed_dollars_per_month",
    "ocigc_request_cost_dollars_total",
];

/// Every ocigc metric, registered in one registry.
pub struct Metrics {
    registry: Registry,
    runs: IntCounterVec,
    run_duration: Histogram,
    last_run: Gauge,
    last_success: Gauge,
    repos: IntCounterVec,
    objects_scanned: IntCounter,
    bytes_scanned: IntCounter,
    blobs_deleted: IntCounter,
    bytes_deleted: IntCounter,
    bytes_pending: IntGauge,
    manifests_fetched: IntCounter,
    store_requests: IntCounterVec,
    store_request_duration: HistogramVec,
    timeouts: IntCounterVec,
    lease_conflicts: IntCounter,
    dangling_references: IntCounter,
    repo_deletions: IntCounterVec,
    hook_runs: IntCounterVec,
    hook_run_duration: Histogram,
    hook_last_success: Gauge,
    hook_jobs_rejected: IntCounter,
    tags_removed: IntCounter,
    tags_restored: IntCounter,
    reclaimed_dollars: Gauge,
    request_cost: prometheus::Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Names are unique constants of this module, so registration cannot collide.
    let _ = r.register(Box::new(m.clone()));
    m
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help).expect("valid metric"))
}

fn counter_vec(r: &Registry, name: &str, help: &str, label: &[&str]) -> IntCounterVec {
    register(
        r,
        IntCounterVec::new(Opts::new(name, help), label).expect("valid metric"),
    )
}

/// Store requests feed `ocigc_store_requests_total`, `ocigc_store_request_duration_seconds`
/// and, on a time-out, `ocigc_timeouts_total{scope="request"}`.
impl RequestObserver for Metrics {
    fn observe(&self, op: Op, outcome: Outcome, elapsed: Duration) {
        self.store_requests
            .with_label_values(&[op.as_str(), outcome.as_str()])
            .inc();
        self.store_request_duration
            .with_label_values(&[op.as_str()])
            .observe(elapsed.as_secs_f64());
        if outcome == Outcome::Timeout {
            self.timeouts.with_label_values(&["request"]).inc();
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric, labelled series initialised to zero.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let m = Metrics {
            runs: counter_vec(
                &r,
                "ocigc_runs_total",
                "GC runs by result (ok, partial, failed).",
                &["result"],
            ),
            run_duration: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("ocigc_run_duration_seconds", "Duration of GC runs.")
                        .buckets(vec![
                            1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0,
                        ]),
                )
                .expect("valid metric"),
            ),
            last_run: register(
                &r,
                Gauge::new(
                    "ocigc_last_run_timestamp_seconds",
                    "End of the last GC run (Unix time).",
                )
                .expect("valid metric"),
            ),
            last_success: register(
                &r,
                Gauge::new(
                    "ocigc_last_success_timestamp_seconds",
                    "End of the last GC run in which every repository was ok (Unix time).",
                )
                .expect("valid metric"),
            ),
            repos: counter_vec(
                &r,
                "ocigc_repos_total",
                "Repositories processed, by final status.",
                &["status"],
            ),
            objects_scanned: counter(
                &r,
                "ocigc_objects_scanned_total",
                "Objects seen in repositories.",
            ),
            bytes_scanned: counter(
                &r,
                "ocigc_bytes_scanned_total",
                "Bytes of objects seen in repositories.",
            ),
            blobs_deleted: counter(
                &r,
                "ocigc_blobs_deleted_total",
                "Keys deleted (GC and repository deletion).",
            ),
            bytes_deleted: counter(
                &r,
                "ocigc_bytes_deleted_total",
                "Bytes deleted (GC and repository deletion).",
            ),
            bytes_pending: register(
                &r,
                IntGauge::new(
                    "ocigc_bytes_pending",
                    "Bytes of unreferenced blobs not yet deletable, at the last run.",
                )
                .expect("valid metric"),
            ),
            manifests_fetched: counter(
                &r,
                "ocigc_manifests_fetched_total",
                "Manifests and other documents read while marking.",
            ),
            store_requests: counter_vec(
                &r,
                "ocigc_store_requests_total",
                "Store requests by operation and result.",
                &["op", "result"],
            ),
            store_request_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "ocigc_store_request_duration_seconds",
                        "Store request latency.",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ]),
                    &["op"],
                )
                .expect("valid metric"),
            ),
            timeouts: counter_vec(
                &r,
                "ocigc_timeouts_total",
                "Time-outs by scope (request, repo, run).",
                &["scope"],
            ),
            lease_conflicts: counter(
                &r,
                "ocigc_lease_conflicts_total",
                "Repositories skipped because another collector held the lease.",
            ),
            dangling_references: counter(
                &r,
                "ocigc_dangling_references_total",
                "Deleted blobs found referenced by the verify step.",
            ),
            repo_deletions: counter_vec(
                &r,
                "ocigc_repo_deletions_total",
                "Whole-repository deletions by result.",
                &["result"],
            ),
            hook_runs: counter_vec(
                &r,
                "ocigc_hook_runs_total",
                "On-demand GCs of one repository (hook) by result; never in ocigc_runs_total.",
                &["result"],
            ),
            hook_run_duration: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "ocigc_hook_run_duration_seconds",
                        "Duration of on-demand GCs of one repository.",
                    )
                    .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0]),
                )
                .expect("valid metric"),
            ),
            hook_last_success: register(
                &r,
                Gauge::new(
                    "ocigc_hook_last_success_timestamp_seconds",
                    "End of the last on-demand GC of one repository that was ok (Unix time).",
                )
                .expect("valid metric"),
            ),
            hook_jobs_rejected: counter(
                &r,
                "ocigc_hook_jobs_rejected_total",
                "Hook requests refused with 429 because the job queue was full.",
            ),
            tags_removed: counter(
                &r,
                "ocigc_tags_removed_total",
                "Tags (and untagged roots) retention removed to the trash.",
            ),
            tags_restored: counter(
                &r,
                "ocigc_tags_restored_total",
                "Tags `ocigc restore` put back from the trash.",
            ),
            reclaimed_dollars: register(
                &r,
                Gauge::new(
                    "ocigc_reclaimed_dollars_per_month",
                    "Storage cost per month that the last full run's deletions removed \
                     (with --pricing or explicit prices; 0 without).",
                )
                .expect("valid metric"),
            ),
            request_cost: register(
                &r,
                prometheus::Counter::new(
                    "ocigc_request_cost_dollars_total",
                    "Dollars of store requests made by runs (with --pricing or explicit \
                     prices; 0 without).",
                )
                .expect("valid metric"),
            ),
            registry: r,
        };
        for l in RUN_RESULTS {
            m.runs.with_label_values(&[l]);
            m.hook_runs.with_label_values(&[l]);
        }
        for l in REPO_STATUSES {
            m.repos.with_label_values(&[l]);
            m.repo_deletions.with_label_values(&[l]);
        }
        for l in TIMEOUT_SCOPES {
            m.timeouts.with_label_values(&[l]);
        }
        for op in OPS {
            for res in Outcome::ALL {
                m.store_requests
                    .with_label_values(&[op.as_str(), res.as_str()]);
            }
            m.store_request_duration.with_label_values(&[op.as_str()]);
        }
        m
    }

    fn repo_figures(&self, report: &Report) {
        if let Some(c) = &report.cost {
            self.request_cost.inc_by(c.request_dollars);
        }
        for r in &report.repositories {
            self.objects_scanned.inc_by(r.objects);
            self.bytes_scanned.inc_by(r.bytes);
            if !report.dry_run {
                self.blobs_deleted.inc_by(r.deleted.len() as u64);
                self.bytes_deleted.inc_by(r.bytes_deleted());
                if let Some(ret) = &r.retention {
                    self.tags_removed.inc_by(ret.removed);
                }
            }
            self.manifests_fetched.inc_by(r.manifests_fetched);
            self.lease_conflicts.inc_by(u64::from(r.lease_conflict));
            self.dangling_references
                .inc_by(r.dangling_references.len() as u64);
        }
    }

    /// Records a finished `gc` run (`None`: it failed before reaching the repositories).
    pub fn observe_gc(&self, report: Option<&Report>, took: Duration, run_timed_out: bool) {
        let now = unix_now();
        self.run_duration.observe(took.as_secs_f64());
        self.last_run.set(now);
        let result = run_result(report);
        self.runs.with_label_values(&[result]).inc();
        if result == "ok" {
            self.last_success.set(now);
        }
        self.observe_repositories(report, run_timed_out);
        if let Some(report) = report {
            self.bytes_pending.set(report.totals.bytes_pending as i64);
            if let Some(c) = report.cost.as_ref().filter(|_| !report.dry_run) {
                self.reclaimed_dollars.set(c.reclaimed_dollars_per_month);
            }
        }
    }

    /// Records a finished on-demand GC of one repository: its own series, so that the full
    /// run's (and the alert on its last success) stay about full runs. The pending gauge is
    /// left alone: one repository's figure is not the bucket's.
    pub fn observe_hook_gc(&self, report: Option<&Report>, took: Duration, run_timed_out: bool) {
        self.hook_run_duration.observe(took.as_secs_f64());
        let result = run_result(report);
        self.hook_runs.with_label_values(&[result]).inc();
        if result == "ok" {
            self.hook_last_success.set(unix_now());
        }
        self.observe_repositories(report, run_timed_out);
    }

    /// Records tags `ocigc restore` put back.
    pub fn tags_restored(&self, n: u64) {
        self.tags_restored.inc_by(n);
    }

    /// Records a hook request refused because the job queue was full.
    pub fn hook_job_rejected(&self) {
        self.hook_jobs_rejected.inc();
    }

    /// The per-repository figures and time-outs of a finished run, full or hook.
    fn observe_repositories(&self, report: Option<&Report>, run_timed_out: bool) {
        if run_timed_out {
            self.timeouts.with_label_values(&["run"]).inc();
        }
        let Some(report) = report else {
            return;
        };
        for r in &report.repositories {
            self.repos
                .with_label_values(&[status_label(r.status)])
                .inc();
            if r.status == RepoStatus::Timeout {
                self.timeouts.with_label_values(&["repo"]).inc();
            }
        }
        self.repo_figures(report);
    }

    /// Records a finished `delete-repo` run.
    pub fn observe_deletion(&self, report: &Report) {
        for r in &report.repositories {
            self.repo_deletions
                .with_label_values(&[status_label(r.status)])
                .inc();
        }
        self.repo_figures(report);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        // Encoding in-memory families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Pushes every metric to a Pushgateway (job `ocigc`, grouped by bucket), replacing the
    /// group's previous push.
    pub async fn push(
        &self,
        gateway: &str,
        bucket: &str,
        timeout: Duration,
    ) -> Result<(), PushError> {
        self.push_as("ocigc", gateway, bucket, timeout).await
    }

    /// Pushes every metric as job `job` (grouped by bucket), replacing that group only: a
    /// `restore` pushes as `ocigc-restore`, so the last run's group stays as it was.
    pub async fn push_as(
        &self,
        job: &str,
        gateway: &str,
        bucket: &str,
        timeout: Duration,
    ) -> Result<(), PushError> {
        use base64::Engine;
        let group = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bucket);
        let url = format!(
            "{}/metrics/job/{job}/bucket@base64/{group}",
            gateway.trim_end_matches('/')
        );
        // Credentials in the URL (user:password@) go out as basic auth; no error shows them.
        let shown = redact_url(&url);
        let failed = |e: reqwest::Error| PushError(shown.clone(), e.without_url().to_string());
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(failed)?;
        let response = client
            .put(&url)
            .header("Content-Type", "text/plain; version=0.0.4")
            .body(self.encode())
            .send()
            .await
            .map_err(failed)?;
        if !response.status().is_success() {
            return Err(PushError(shown, format!("HTTP {}", response.status())));
        }
        Ok(())
    }
}

/// The Pushgateway did not take the metrics (the URL shown without its credentials).
#[derive(Debug, thiserror::Error)]
#[error("pushing metrics to {0}: {1}")]
pub struct PushError(String, String);

/// `url` with the userinfo of its authority (`user:password@`) replaced by `***@`, for logs
/// and errors. Works on text that does not parse as a URL too.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        // Without a scheme the authority is the text up to the first '/'.
        return redact_authority(url, 0);
    };
    redact_authority(url, scheme_end)
}

fn redact_authority(url: &str, start: usize) -> String {
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &rest[at..]),
        None => url.to_string(),
    }
}

fn run_result(report: Option<&Report>) -> &'static str {
    match report {
        None => "failed",
        Some(r) if r.all_ok() => "ok",
        Some(_) => "partial",
    }
}

fn status_label(s: RepoStatus) -> &'static str {
    s.as_str()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_name_is_exposed_from_the_start() {
        let text = Metrics::new().encode();
        for name in NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
        assert!(text.contains("ocigc_runs_total{result=\"failed\"} 0"));
        assert!(text.contains("ocigc_timeouts_total{scope=\"repo\"} 0"));
        assert!(!text.contains("repo=\""), "no per-repository labels");
    }

    #[test]
    fn userinfo_is_redacted() {
        for (url, shown) in [
            ("https://u:p@gw:9091/x", "https://***@gw:9091/x"),
            ("http://tok@gw", "http://***@gw"),
            ("http://a:b@c@gw/p@q", "http://***@gw/p@q"),
            ("u:p@gw:9091", "***@gw:9091"),
            ("http://gw:9091/a@b", "http://gw:9091/a@b"),
            ("http://gw:9091", "http://gw:9091"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
    }

    #[test]
    fn hook_runs_have_their_own_series() {
        let m = Metrics::new();
        m.observe_hook_gc(None, Duration::from_secs(1), false);
        let text = m.encode();
        assert!(text.contains("ocigc_hook_runs_total{result=\"failed\"} 1"));
        assert!(text.contains("ocigc_runs_total{result=\"failed\"} 0"));
        assert!(text.contains("ocigc_run_duration_seconds_count 0"));
    }

    #[test]
    fn request_timeouts_count_in_scope_request() {
        let m = Metrics::new();
        m.observe(Op::Get, Outcome::Timeout, Duration::from_secs(1));
        m.observe(Op::Get, Outcome::Ok, Duration::from_millis(3));
        let text = m.encode();
        assert!(text.contains("ocigc_timeouts_total{scope=\"request\"} 1"));
        assert!(text.contains("ocigc_store_requests_total{op=\"get\",result=\"ok\"} 1"));
    }
}
