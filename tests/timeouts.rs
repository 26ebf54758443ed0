//! Time-outs at three levels (request, repository, run) against stalling stores, and the
//! metrics they leave.

mod common;

use common::wrap::{Intercept, Wrapped};

use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::*;
use futures::stream::BoxStream;
use ocigc::gc::GcOptions;
use ocigc::metrics::Metrics;
use ocigc::report::RepoStatus;
use ocigc::store::{Level, Object, ObjectMeta, Store, StoreResult};

/// Reads of keys under `prefix` never answer.
struct Stall {
    inner: Arc<dyn Store>,
    prefix: &'static str,
}

#[async_trait]
impl Intercept for Stall {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object> {
        if key.starts_with(self.prefix) && !key.ends_with("index.json") {
            futures::future::pending::<()>().await;
        }
        self.inner.get_capped(key, limit).await
    }
}

async fn populate(t: &TestStore, repos: &[&str]) -> Vec<Desc> {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let mut garbage = Vec::new();
    for repo in repos {
        let img = f.image(repo, "v1").await;
        f.layout(repo, &[(Some("v1"), &img)]).await;
        garbage.push(f.image(repo, "garbage").await);
    }
    garbage
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} not in metrics"))
}

async fn repo_timeout_abandons_only_the_stalled_repository(t: TestStore) {
    let garbage = populate(&t, &["fast", "slow"]).await;
    let stalled: Arc<dyn Store> = Arc::new(Wrapped(Stall {
        inner: t.store.clone(),
        prefix: "slow/",
    }));
    let metrics = Arc::new(Metrics::new());
    let opts = GcOptions {
        repo_timeout: Some(Duration::from_millis(500)),
        metrics: Some(metrics.clone()),
        ..eager()
    };
    let started = Instant::now();
    let report = gc(&stalled, &opts).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let slow = repo_report(&report, "slow");
    assert_eq!(slow.status, RepoStatus::Timeout, "{slow:#?}");
    assert!(slow.deleted.is_empty());
    assert_eq!(repo_report(&report, "fast").status, RepoStatus::Ok);
    assert!(
        !report.all_ok(),
        "a timed-out repository makes the run partial (exit 3)"
    );
    let k = keys(t.store.as_ref()).await;
    assert_gone(&k, "fast", &garbage[0], "healthy repository");
    assert_intact(&k, "slow", &garbage[1], "stalled repository");
    let text = metrics.encode();
    assert_eq!(metric(&text, "ocigc_timeouts_total{scope=\"repo\"}"), 1.0);
    assert_eq!(metric(&text, "ocigc_repos_total{status=\"timeout\"}"), 1.0);
    assert_eq!(metric(&text, "ocigc_runs_total{result=\"partial\"}"), 1.0);
    assert_eq!(metric(&text, "ocigc_last_success_timestamp_seconds"), 0.0);
}

async fn run_timeout_stops_new_work(t: TestStore) {
    let garbage = populate(&t, &["a-slow", "b", "c"]).await;
    let stalled: Arc<dyn Store> = Arc::new(Wrapped(Stall {
        inner: t.store.clone(),
        prefix: "a-slow/",
    }));
    let metrics = Arc::new(Metrics::new());
    // One repository at a time, in name order: the stalled one holds the run until its end.
    let opts = GcOptions {
        run_timeout: Some(Duration::from_millis(800)),
        concurrency: 1,
        metrics: Some(metrics.clone()),
        ..eager()
    };
    let report = gc(&stalled, &opts).await;
    assert_eq!(repo_report(&report, "a-slow").status, RepoStatus::Timeout);
    for repo in ["b", "c"] {
        let r = repo_report(&report, repo);
        assert_eq!(r.status, RepoStatus::Skipped, "{r:#?}");
        assert!(r.deleted.is_empty());
    }
    let k = keys(t.store.as_ref()).await;
    for (repo, g) in ["a-slow", "b", "c"].iter().zip(&garbage) {
        assert_intact(&k, repo, g, "after the run time-out");
    }
    let text = metrics.encode();
    assert_eq!(metric(&text, "ocigc_timeouts_total{scope=\"run\"}"), 1.0);
    assert_eq!(metric(&text, "ocigc_repos_total{status=\"skipped\"}"), 2.0);
}

async fn request_timeout_fails_the_repository_closed(t: TestStore) {
    let garbage = populate(&t, &["fast", "slow"]).await;
    let stalled: Arc<dyn Store> = Arc::new(Wrapped(Stall {
        inner: t.store.clone(),
        prefix: "slow/",
    }));
    let metrics = Arc::new(Metrics::new());
    let opts = GcOptions {
        request_timeout: Duration::from_millis(300),
        metrics: Some(metrics.clone()),
        ..eager()
    };
    let report = gc(&stalled, &opts).await;
    let slow = repo_report(&report, "slow");
    assert_eq!(slow.status, RepoStatus::Failed);
    assert!(slow.errors[0].contains("timed out"), "{:?}", slow.errors);
    assert_intact(
        &keys(t.store.as_ref()).await,
        "slow",
        &garbage[1],
        "stalled reads",
    );
    let text = metrics.encode();
    assert!(metric(&text, "ocigc_timeouts_total{scope=\"request\"}") >= 1.0);
    assert!(
        metric(
            &text,
            "ocigc_store_requests_total{op=\"get\",result=\"timeout\"}"
        ) >= 1.0
    );
}

/// Listings of the `distribution` blob space never answer (the repositories' do).
struct StallBlobListing(Arc<dyn Store>);

const BLOB_SPACE: &str = "docker/registry/v2/blobs";

#[async_trait]
impl Intercept for StallBlobListing {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.0
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.list_after(prefix, None)
    }
    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        if prefix.starts_with(BLOB_SPACE) {
            return Box::pin(futures::stream::pending());
        }
        self.0.list_after(prefix, start_after)
    }
    fn list_level_pages<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Level>> {
        if prefix.starts_with(BLOB_SPACE) {
            return Box::pin(futures::stream::pending());
        }
        self.0.list_level_pages(prefix)
    }
}

/// The `distribution` blob space is marked first and then listed against its marks: a
/// time-out there says so, and nothing is deleted.
async fn repo_timeout_while_listing_the_blob_space(t: TestStore) {
    let w = common::dist::DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let img = f.image("a", "v1").await;
    w.tag("a", "v1", &img).await;
    let garbage = f.image("a", "untagged").await;
    let stalled: Arc<dyn Store> = Arc::new(Wrapped(StallBlobListing(t.store.clone())));
    let opts = GcOptions {
        repo_timeout: Some(Duration::from_millis(500)),
        ..eager()
    };
    let layout = ocigc::layout::by_name("distribution", Default::default()).expect("layout");
    let report = ocigc::gc::run_gc(stalled, layout, &opts)
        .await
        .expect("gc run");
    let global = repo_report(&report, ocigc::layout::GLOBAL_REPOSITORY);
    assert_eq!(global.status, RepoStatus::Timeout, "{global:#?}");
    assert_eq!(
        global.errors,
        vec!["timed out while listing the blob space against its marks; nothing deleted"],
        "{global:#?}"
    );
    assert!(global.deleted.is_empty());
    let k = keys(t.store.as_ref()).await;
    for d in &garbage.subtree {
        assert!(k.contains(&common::dist::data_key(d)), "{d} deleted");
    }
}

async fn metrics_match_the_report(t: TestStore) {
    populate(&t, &["a", "b/c"]).await;
    let metrics = Arc::new(Metrics::new());
    let opts = GcOptions {
        metrics: Some(metrics.clone()),
        ..eager()
    };
    let report = gc(&t.store, &opts).await;
    let text = metrics.encode();
    let tot = &report.totals;
    assert_eq!(
        metric(&text, "ocigc_blobs_deleted_total") as u64,
        tot.blobs_deleted
    );
    assert_eq!(
        metric(&text, "ocigc_bytes_deleted_total") as u64,
        tot.bytes_deleted
    );
    assert_eq!(
        metric(&text, "ocigc_objects_scanned_total") as u64,
        tot.objects
    );
    assert_eq!(
        metric(&text, "ocigc_manifests_fetched_total") as u64,
        tot.manifests_fetched
    );
    assert_eq!(metric(&text, "ocigc_repos_total{status=\"ok\"}"), 2.0);
    assert_eq!(metric(&text, "ocigc_runs_total{result=\"ok\"}"), 1.0);
    assert_eq!(
        metric(
            &text,
            "ocigc_store_requests_total{op=\"list\",result=\"ok\"}"
        ) as u64,
        report.requests.list
    );
    assert!(metric(&text, "ocigc_last_success_timestamp_seconds") > 1.7e9);
    assert_eq!(metric(&text, "ocigc_run_duration_seconds_count"), 1.0);
}

both_stores!(
    repo_timeout_abandons_only_the_stalled_repository,
    repo_timeout_while_listing_the_blob_space,
    run_timeout_stops_new_work,
    request_timeout_fails_the_repository_closed,
    metrics_match_the_report,
);

#[test]
fn silent_s3_endpoint_times_out_and_exits_1() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(8).flatten() {
            held.push(conn);
        }
        held
    });
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .args([
            "gc",
            "--bucket",
            "s3://silent-bucket",
            "--s3-path-style",
            "--timeout-request",
            "1s",
        ])
        .env("AWS_ENDPOINT_URL", format!("http://{addr}"))
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "x")
        .env("AWS_REGION", "us-east-1")
        .env("OCIGC_LOG", "warn")
        .output()
        .expect("run ocigc");
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("timed out"), "{err}");
    // Three attempts of 1 s each plus back-off, well inside the 8 s outer bound.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    drop(hold);
}
