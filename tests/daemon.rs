//! `ocigc serve` over HTTP: authentication, jobs, metrics, health under load, and shutdown.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::sync::Arc;

use common::dist::*;
use common::wrap::{Intercept, Wrapped};
use common::*;
use futures::stream::BoxStream;
use ocigc::daemon::{ServeOptions, MAX_PARALLEL_JOBS};
use ocigc::digest::Digest;
use ocigc::gc::{delete_repositories, run_gc, GcOptions};
use ocigc::layout::oci::OciLayout;
use ocigc::layout::{by_name, LayoutOptions};
use ocigc::report::RepoStatus;
use ocigc::store::{ObjectMeta, Store, StoreResult};
use serde_json::Value;

const TOKEN: &str = "s3cret-token";

/// The busy-run tests measure one busy run each: they must not overlap on a 2-core machine.
static BUSY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Daemon {
    child: Child,
    base: String,
    _lines: mpsc::Receiver<String>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ocigc serve` on a free loopback port and waits for its "serving" line.
fn start(bucket: &Path, extra: &[&str]) -> Daemon {
    let token = bucket.parent().expect("parent").join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token file");
    let token = token.display().to_string();
    let mut args = vec!["--token-file", token.as_str()];
    args.extend_from_slice(extra);
    start_with(bucket, &args, &[])
}

/// Starts `ocigc serve` with these extra flags and variables (no token unless given).
fn start_with(bucket: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .args(["serve", "--listen", "127.0.0.1:0", "--grace", "0s"])
        .arg("--bucket")
        .arg(bucket)
        .args(extra)
        .env_remove("OCIGC_TOKEN")
        .envs(env.iter().copied())
        .env("OCIGC_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ocigc serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("ocigc serve did not start ({e}): {seen:#?}"));
        seen.push(line.clone());
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
    };
    Daemon {
        child,
        base: format!("http://{addr}"),
        _lines: rx,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn call(method: reqwest::Method, url: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = client().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Polls a job until it is no longer queued or running (bounded).
async fn wait_job(d: &Daemon, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, job) = call(
            reqwest::Method::GET,
            &format!("{}/v1/jobs/{id}", d.base),
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, 200, "{job}");
        if job["status"] != "queued" && job["status"] != "running" {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} did not finish: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn example() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = dir.path().join("bucket");
    std::fs::create_dir(&bucket).expect("mkdir");
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bucket");
    let ok = Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", from.display()))
        .arg(&bucket)
        .status()
        .expect("cp");
    assert!(ok.success());
    dir
}

#[tokio::test]
async fn hook_api_authentication_jobs_and_metrics() {
    let dir = example();
    let bucket = dir.path().join("bucket");
    let d = start(&bucket, &["--delay", "0s"]);
    use reqwest::Method;
    let url = |p: &str| format!("{}{p}", d.base);

    let (s, _) = call(Method::DELETE, &url("/v1/repos/team/app"), None).await;
    assert_eq!(s, 401);
    let (s, _) = call(Method::DELETE, &url("/v1/repos/team/app"), Some("wrong")).await;
    assert_eq!(s, 403);
    let (s, _) = call(Method::DELETE, &url("/v1/repos/Team/App"), Some(TOKEN)).await;
    assert_eq!(s, 400);
    let (s, _) = call(Method::POST, &url("/v1/repos/team/app/gc-now"), Some(TOKEN)).await;
    assert_eq!(s, 404);
    let (s, _) = call(Method::GET, &url("/v1/jobs/no-such-job"), Some(TOKEN)).await;
    assert_eq!(s, 404);
    assert!(
        bucket.join("team/app/index.json").exists(),
        "a rejected call did something"
    );

    // Whole-repository deletion, with a slash in the name.
    let (s, body) = call(Method::DELETE, &url("/v1/repos/team/app"), Some(TOKEN)).await;
    assert_eq!(s, 202, "{body}");
    let job = wait_job(&d, body["job"].as_str().expect("job id")).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["kind"], "delete-repo");
    assert_eq!(job["result"]["status"], "ok");
    assert!(!bucket.join("team/app/index.json").exists());
    assert!(!bucket.join("team/app/README").exists());
    assert!(
        bucket.join("team/app/tools/index.json").exists(),
        "nested repository touched"
    );

    // On-demand GC of one repository.
    let (s, body) = call(
        Method::POST,
        &url("/v1/repos/library/alpine/gc"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let job = wait_job(&d, body["job"].as_str().expect("job id")).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["result"]["deleted"].as_array().map(Vec::len),
        Some(3),
        "{job}"
    );

    let metrics = client()
        .get(url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for name in ocigc::metrics::NAMES {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} missing"
        );
    }
    assert!(
        metrics.contains("ocigc_repo_deletions_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    // The hook GC has its own series; the full-run series (and the alert on the last full
    // success) do not move.
    for line in [
        "ocigc_hook_runs_total{result=\"ok\"} 1",
        "ocigc_hook_run_duration_seconds_count 1",
        "ocigc_runs_total{result=\"ok\"} 0",
        "ocigc_runs_total{result=\"partial\"} 0",
        "ocigc_run_duration_seconds_count 0",
        "ocigc_last_success_timestamp_seconds 0",
        "ocigc_last_run_timestamp_seconds 0",
    ] {
        assert!(metrics.contains(line), "{line}:\n{metrics}");
    }
    assert!(
        !metrics.contains("ocigc_hook_last_success_timestamp_seconds 0\n"),
        "{metrics}"
    );
    let (s, _) = call(Method::GET, &url("/readyz"), None).await;
    assert_eq!(s, 200);
}

/// A bucket whose collection takes a while: one repository with many small garbage blobs.
fn busy_bucket(blobs: usize) -> tempfile::TempDir {
    let dir = example();
    let repo = dir.path().join("bucket/busy");
    std::fs::create_dir_all(repo.join("blobs/sha256")).expect("mkdir");
    std::fs::write(
        repo.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("marker");
    std::fs::write(
        repo.join("index.json"),
        br#"{"schemaVersion":2,"manifests":[]}"#,
    )
    .expect("index");
    for i in 0..blobs {
        let data = format!("garbage {i}");
        let d = sha256(data.as_bytes());
        std::fs::write(repo.join("blobs/sha256").join(&d[7..]), data).expect("blob");
    }
    dir
}

#[tokio::test]
async fn healthz_answers_fast_while_a_run_is_busy() {
    let _one_at_a_time = BUSY.lock().await;
    let dir = busy_bucket(20_000);
    let d = start(&dir.path().join("bucket"), &["--delay", "1h"]);
    let (s, body) = call(
        reqwest::Method::POST,
        &format!("{}/v1/repos/busy/gc", d.base),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 202);
    let id = body["job"].as_str().expect("job id").to_string();
    let mut worst = Duration::ZERO;
    let mut probes_while_running = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    // One client, built before timing: only the request is measured.
    let probe = client();
    let healthz = format!("{}/healthz", d.base);
    loop {
        let started = Instant::now();
        let resp = probe.get(&healthz).send().await.expect("healthz");
        let took = started.elapsed();
        assert_eq!(resp.status().as_u16(), 200);
        let (_, job) = call(
            reqwest::Method::GET,
            &format!("{}/v1/jobs/{id}", d.base),
            Some(TOKEN),
        )
        .await;
        if job["status"] == "running" {
            probes_while_running += 1;
            worst = worst.max(took);
        } else if job["status"] != "queued" {
            break;
        }
        assert!(Instant::now() < deadline, "job never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("healthz while busy: {probes_while_running} probes, worst {worst:?}");
    assert!(
        probes_while_running >= 5,
        "the run was too short to measure ({probes_while_running} probes)"
    );
    assert!(
        worst < Duration::from_millis(100),
        "healthz took {worst:?} during a run"
    );
}

#[tokio::test]
async fn sigterm_during_a_run_exits_0_within_the_drain_time() {
    let _one_at_a_time = BUSY.lock().await;
    let dir = busy_bucket(20_000);
    let bucket = dir.path().join("bucket");
    let mut d = start(&bucket, &["--delay", "0s", "--drain-timeout", "5s"]);
    let (s, body) = call(
        reqwest::Method::POST,
        &format!("{}/v1/repos/busy/gc", d.base),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, 202);
    let id = body["job"].as_str().expect("job id").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, job) = call(
            reqwest::Method::GET,
            &format!("{}/v1/jobs/{id}", d.base),
            Some(TOKEN),
        )
        .await;
        if job["status"] == "running" {
            break;
        }
        assert!(
            Instant::now() < deadline && job["status"] == "queued",
            "{job}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = terminate(&mut d, Duration::from_secs(15));
    eprintln!("SIGTERM to exit: {took:?}");
    assert!(
        took < Duration::from_secs(5) + Duration::from_secs(2),
        "{took:?}"
    );
    let store = ocigc::store::DirStore::open(&bucket).expect("bucket");
    assert!(
        dangling(&store).await.is_empty(),
        "bucket inconsistent after SIGTERM"
    );
}

#[test]
fn refuses_to_serve_without_a_token() {
    let dir = example();
    let out = Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .args(["serve", "--listen", "127.0.0.1:0", "--bucket"])
        .arg(dir.path().join("bucket"))
        .env_remove("OCIGC_TOKEN")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without a token"));
}

/// A store that records the prefix of every LIST.
struct ListRecorder {
    inner: Arc<dyn Store>,
    prefixes: std::sync::Mutex<Vec<String>>,
}

impl ListRecorder {
    fn new(inner: Arc<dyn Store>) -> Arc<Wrapped<ListRecorder>> {
        Arc::new(Wrapped(ListRecorder {
            inner,
            prefixes: Default::default(),
        }))
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.prefixes.lock().expect("lock"))
    }
}

impl Intercept for ListRecorder {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.prefixes.lock().expect("lock").push(prefix.to_string());
        self.inner.list(prefix)
    }
}

/// What a hook GC of one repository runs with: that repository only.
fn hook_gc(name: &str) -> GcOptions {
    GcOptions {
        repos: only(&[name]),
        only: Some(name.to_string()),
        ..eager()
    }
}

#[tokio::test]
async fn distribution_hook_gc_lists_only_its_repository_and_keeps_what_it_needs() {
    let t = dir_store();
    let w = DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let tagged = f.image("team/app", "tagged").await;
    w.tag("team/app", "v1", &tagged).await;
    let untagged = f.image("team/app", "untagged").await;
    w.untagged("team/app", &untagged).await;
    // About to be tagged by a pusher: its intent keeps it although no tag reaches it yet.
    let reused = f.image("team/app", "reused").await;
    w.untagged("team/app", &reused).await;
    let digest = Digest::parse(&reused.digest).expect("digest");
    ocigc::gc::intent::begin_reuse(
        t.store.as_ref(),
        "team/app",
        &[digest],
        Duration::from_secs(3600),
        Duration::from_secs(5),
    )
    .await
    .expect("intent");
    // A neighbour nested below it and one beside it, each with an untagged manifest.
    let nested = f.image("team/app/tools", "nested").await;
    w.untagged("team/app/tools", &nested).await;
    let beside = f.image("team/app-edge", "beside").await;
    w.untagged("team/app-edge", &beside).await;

    let rec = ListRecorder::new(t.store.clone());
    let layout = by_name(
        "distribution",
        LayoutOptions {
            delete_untagged: true,
        },
    )
    .expect("layout");
    let store: Arc<dyn Store> = rec.clone();
    let report = run_gc(store, layout.clone(), &hook_gc("team/app"))
        .await
        .expect("hook gc");
    let listed = rec.take();
    let k = keys(t.store.as_ref()).await;

    assert!(
        !k.contains(&revision_key("team/app", &untagged.digest)),
        "{report:#?}"
    );
    for (repo, d, what) in [
        ("team/app", &tagged, "tagged"),
        ("team/app", &reused, "protected by an intent"),
        ("team/app/tools", &nested, "nested repository"),
        ("team/app-edge", &beside, "neighbour"),
    ] {
        assert!(
            k.contains(&revision_key(repo, &d.digest)),
            "{what}: {report:#?}"
        );
    }
    assert!(dist_dangling(t.store.as_ref()).await.is_empty());
    let names: Vec<&str> = report
        .repositories
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["team/app"]);
    assert_eq!(report.repositories[0].status, RepoStatus::Ok);
    // The intent was in the run's listing: its manifest never became a candidate that only
    // the re-check before the batch rescued.
    assert_eq!(report.repositories[0].rescued, 0, "{report:#?}");
    let own = [
        "docker/registry/v2/repositories/team/app/",
        "_ocigc/intents/team/app/",
        "_ocigc/cache/v1/team/app/",
    ];
    assert!(!listed.is_empty());
    for prefix in &listed {
        assert!(
            own.iter().any(|o| prefix.starts_with(o)),
            "listed {prefix:?} outside the repository: {listed:?}"
        );
    }
    eprintln!("hook gc listed: {listed:?}");

    // Its deletion lists only its prefix too, and leaves the neighbours alone.
    let store: Arc<dyn Store> = rec.clone();
    let deletion = delete_repositories(
        store,
        layout,
        &["team/app".to_string()],
        &delete_options(false),
    )
    .await
    .expect("deletion");
    assert_eq!(deletion.repositories[0].status, RepoStatus::Ok);
    let listed = rec.take();
    for prefix in &listed {
        assert!(
            own.iter().any(|o| prefix.starts_with(o)),
            "deletion listed {prefix:?} outside the repository: {listed:?}"
        );
    }
    let k = keys(t.store.as_ref()).await;
    assert!(!k.contains(&revision_key("team/app", &tagged.digest)));
    assert!(k.contains(&revision_key("team/app/tools", &nested.digest)));
    assert!(k.contains(&revision_key("team/app-edge", &beside.digest)));
}

#[tokio::test]
async fn oci_and_serverless_hook_runs_still_list_the_whole_bucket() {
    for name in ["oci", "serverless-registry"] {
        let t = dir_store();
        if name == "oci" {
            let f = Fixture {
                store: t.store.as_ref(),
            };
            let img = f.image("team/app", "kept").await;
            f.layout("team/app", &[(Some("v1"), &img)]).await;
        } else {
            let w = common::serverless::SrWriter::new(t.store.clone());
            let f = Fixture { store: &w };
            let img = f.image("team/app", "kept").await;
            w.tag("team/app", "v1", &img).await;
        }
        let rec = ListRecorder::new(t.store.clone());
        let layout = by_name(name, LayoutOptions::default()).expect("layout");
        let store: Arc<dyn Store> = rec.clone();
        run_gc(store, layout.clone(), &hook_gc("team/app"))
            .await
            .expect("hook gc");
        let listed = rec.take();
        assert!(
            listed.iter().any(String::is_empty),
            "{name}: keys elsewhere can keep this repository's blobs: {listed:?}"
        );
        let store: Arc<dyn Store> = rec.clone();
        delete_repositories(
            store,
            layout,
            &["team/app".to_string()],
            &delete_options(false),
        )
        .await
        .expect("deletion");
        let listed = rec.take();
        assert!(
            listed.iter().any(String::is_empty),
            "{name} deletion: {listed:?}"
        );
    }
}

/// The daemon's address, for raw connections.
/// Sends SIGTERM and waits (at most `limit`) for the daemon to exit 0; how long it took.
fn terminate(d: &mut Daemon, limit: Duration) -> Duration {
    let sent = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &d.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let status = loop {
        if let Some(s) = d.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            sent.elapsed() < limit,
            "still running {limit:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    sent.elapsed()
}

fn addr(d: &Daemon) -> String {
    d.base.trim_start_matches("http://").to_string()
}

/// A connection that sent part of a request head and stops there.
fn half_sent(d: &Daemon) -> TcpStream {
    let mut s = TcpStream::connect(addr(d)).expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: ocigc\r\nX-Slow: ")
        .expect("write");
    s
}

/// Reads until the server closes the connection or `limit` passes; returns what came and
/// whether the connection was closed.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (got, false);
        }
        s.set_read_timeout(Some(left)).expect("read timeout");
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (got, false)
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn a_half_sent_request_head_is_closed_after_the_header_timeout() {
    let dir = example();
    let d = start(&dir.path().join("bucket"), &["--header-read-timeout", "1s"]);
    let started = Instant::now();
    let mut s = half_sent(&d);
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(15));
    let took = started.elapsed();
    eprintln!("half-sent request head closed after {took:?}");
    assert!(closed, "still open after {took:?}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn connections_beyond_the_limit_wait_for_a_free_one() {
    let dir = example();
    let d = start(
        &dir.path().join("bucket"),
        &["--max-connections", "2", "--header-read-timeout", "60s"],
    );
    let first = half_sent(&d);
    let _second = half_sent(&d);
    let mut third = TcpStream::connect(addr(&d)).expect("connect");
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: ocigc\r\nConnection: close\r\n\r\n")
        .expect("write");
    // Both slots are held: the third connection is not served (bounded wait for nothing).
    let (got, closed) = read_until_closed(&mut third, Duration::from_secs(1));
    assert!(
        got.is_empty() && !closed,
        "served beyond the limit: {:?}",
        String::from_utf8_lossy(&got)
    );
    // One slot frees: the third is served.
    drop(first);
    let (got, closed) = read_until_closed(&mut third, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&got);
    assert!(closed && text.starts_with("HTTP/1.1 200"), "{text}");
}

#[test]
fn sigterm_with_a_half_sent_request_open_exits_within_the_drain_timeout() {
    let dir = example();
    let mut d = start(
        &dir.path().join("bucket"),
        &["--drain-timeout", "2s", "--header-read-timeout", "120s"],
    );
    let _held = half_sent(&d);
    // A request on a later connection is answered: the held one has been accepted before it.
    let mut probe = TcpStream::connect(addr(&d)).expect("connect");
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: ocigc\r\nConnection: close\r\n\r\n")
        .expect("write");
    let (got, _) = read_until_closed(&mut probe, Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let took = terminate(&mut d, Duration::from_secs(20));
    eprintln!("SIGTERM to exit with a half-sent request open: {took:?}");
    assert!(
        took < Duration::from_secs(2) + Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test]
async fn token_from_the_environment_is_trimmed_and_bearer_is_case_insensitive() {
    let dir = example();
    let token = format!("{TOKEN}\n");
    let d = start_with(
        &dir.path().join("bucket"),
        &["--delay", "0s"],
        &[("OCIGC_TOKEN", &token)],
    );
    let url = format!("{}/v1/jobs/no-such-job", d.base);
    let status = |auth: String| {
        let url = url.clone();
        async move {
            client()
                .get(&url)
                .header("Authorization", auth)
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    };
    // Past authentication, the unknown job is 404.
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        assert_eq!(status(format!("{scheme} {TOKEN}")).await, 404, "{scheme}");
    }
    assert_eq!(status(format!("Bearer  {TOKEN} ")).await, 404);
    let short = &TOKEN[..TOKEN.len() - 1];
    for wrong in [
        short.to_string(),
        format!("{TOKEN}x"),
        format!("x{TOKEN}"),
        "s".into(),
        TOKEN.repeat(40),
    ] {
        assert_eq!(status(format!("Bearer {wrong}")).await, 403, "{wrong:?}");
    }
    assert_eq!(status("Bearer ".to_string()).await, 401);
    assert_eq!(status(format!("Basic {TOKEN}")).await, 401);
    assert_eq!(status(TOKEN.to_string()).await, 401);
}

/// A store whose listings wait for a permit: the jobs that list stay running until released.
struct Gate {
    inner: Arc<dyn Store>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Intercept for Gate {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        use futures::StreamExt;
        let permits = self.permits.clone();
        futures::stream::once(async move {
            if let Ok(p) = permits.acquire().await {
                p.forget();
            }
            self.inner.list(prefix)
        })
        .flatten()
        .boxed()
    }
}

#[tokio::test]
async fn a_full_job_queue_answers_429_with_retry_after() {
    use reqwest::Method;
    let dir = example();
    let bucket = ocigc::store::DirStore::open(dir.path().join("bucket")).expect("bucket");
    let permits = Arc::new(tokio::sync::Semaphore::new(0));
    let store: Arc<dyn Store> = Arc::new(Wrapped(Gate {
        inner: Arc::new(bucket),
        permits: permits.clone(),
    }));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let opts = ServeOptions {
        listen: listener.local_addr().expect("addr"),
        interval: None,
        token: Some(TOKEN.into()),
        drain_timeout: Duration::from_secs(10),
        gc: eager(),
        delete: delete_options(false),
        pushgateway: None,
        max_queued_jobs: 2,
        max_connections: 16,
        header_read_timeout: Duration::from_secs(10),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ocigc::daemon::serve_on(
        listener,
        store,
        Arc::new(OciLayout),
        Arc::new(ocigc::metrics::Metrics::new()),
        opts,
        async move {
            let _ = stopped.await;
        },
    ));
    let gc = |repo: &str| format!("{base}/v1/repos/{repo}/gc");
    let job_status = |id: String| {
        let url = format!("{base}/v1/jobs/{id}");
        async move { call(Method::GET, &url, Some(TOKEN)).await.1["status"].clone() }
    };
    // Every slot busy: four jobs running, stuck in their listing.
    let mut ids = Vec::new();
    for _ in 0..MAX_PARALLEL_JOBS {
        let (s, body) = call(Method::POST, &gc("library/alpine"), Some(TOKEN)).await;
        assert_eq!(s, 202, "{body}");
        let id = body["job"].as_str().expect("job id").to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        while job_status(id.clone()).await != "running" {
            assert!(Instant::now() < deadline, "job {id} never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ids.push(id);
    }
    // Two more wait in the queue; the next is refused.
    for _ in 0..2 {
        let (s, body) = call(Method::POST, &gc("library/alpine"), Some(TOKEN)).await;
        assert_eq!(s, 202, "{body}");
        ids.push(body["job"].as_str().expect("job id").to_string());
    }
    for method in [Method::POST, Method::DELETE] {
        let url = match method {
            Method::POST => gc("team/app"),
            _ => format!("{base}/v1/repos/team/app"),
        };
        let resp = client()
            .request(method.clone(), &url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), 429, "{method}");
        let retry = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        assert!(
            retry.is_some_and(|s| s > 0),
            "{method}: Retry-After {retry:?}"
        );
    }
    let metrics = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("ocigc_hook_jobs_rejected_total 2"),
        "{metrics}"
    );
    assert!(dir.path().join("bucket/team/app/index.json").exists());

    // Released, every accepted job finishes (those that found the repository leased by
    // another of them fail, as they should) and the queue takes work again.
    permits.add_permits(1_000_000);
    let mut succeeded = 0;
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, job) = call(Method::GET, &format!("{base}/v1/jobs/{id}"), Some(TOKEN)).await;
            if job["status"] == "succeeded" {
                succeeded += 1;
                break;
            }
            if job["status"] == "failed" {
                assert_eq!(job["result"]["lease_conflict"], true, "{job}");
                break;
            }
            assert!(Instant::now() < deadline, "job {id}: {job}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(succeeded >= 1);
    let (s, body) = call(Method::POST, &gc("library/alpine"), Some(TOKEN)).await;
    assert_eq!(s, 202, "{body}");
    let _ = stop.send(());
    server.await.expect("join").expect("serve");
}

#[tokio::test]
async fn distribution_hook_gcs_find_the_pending_state_of_earlier_runs() {
    let t = dir_store();
    let w = DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let tagged = f.image("team/app", "tagged").await;
    w.tag("team/app", "v1", &tagged).await;
    let untagged = f.image("team/app", "untagged").await;
    w.untagged("team/app", &untagged).await;
    let layout = by_name(
        "distribution",
        LayoutOptions {
            delete_untagged: true,
        },
    )
    .expect("layout");
    let waiting = GcOptions {
        delay: Duration::from_secs(3600),
        ..hook_gc("team/app")
    };
    // First observation: recorded as pending, nothing deleted.
    let first = run_gc(t.store.clone(), layout.clone(), &waiting)
        .await
        .expect("first hook gc");
    assert!(first.repositories[0].deleted.is_empty(), "{first:#?}");
    assert!(keys(t.store.as_ref())
        .await
        .contains(&revision_key("team/app", &untagged.digest)));
    // Second observation two hours later: the prefix-only listing found the pending state.
    let later = GcOptions {
        clock_offset: Duration::from_secs(2 * 3600),
        ..waiting
    };
    let second = run_gc(t.store.clone(), layout.clone(), &later)
        .await
        .expect("second hook gc");
    let k = keys(t.store.as_ref()).await;
    assert!(
        !k.contains(&revision_key("team/app", &untagged.digest)),
        "{second:#?}"
    );
    assert!(k.contains(&revision_key("team/app", &tagged.digest)));
    assert_eq!(second.repositories[0].status, RepoStatus::Ok, "{second:#?}");

    // A candidate that is tagged before its second observation leaves the pending state: a
    // hook run with nothing to delete still finds and tidies it, so that a later untagging
    // starts a fresh delay instead of inheriting the stale first observation.
    let late = f.image("team/app", "tagged late").await;
    w.untagged("team/app", &late).await;
    run_gc(t.store.clone(), layout.clone(), &later)
        .await
        .expect("third hook gc");
    let pending = ocigc::gc::state::pending_key("team/app");
    let named = |body: &[u8]| String::from_utf8_lossy(body).contains(&late.digest[7..]);
    let body = t.store.get(&pending).await.expect("pending state").body;
    assert!(named(&body), "the candidate is pending");
    w.tag("team/app", "v2", &late).await;
    let fourth = GcOptions {
        clock_offset: Duration::from_secs(4 * 3600),
        ..later
    };
    let report = run_gc(t.store.clone(), layout, &fourth)
        .await
        .expect("fourth hook gc");
    assert!(report.repositories[0].deleted.is_empty(), "{report:#?}");
    match t.store.get(&pending).await {
        Ok(o) => assert!(!named(&o.body), "stale pending state kept"),
        Err(ocigc::store::StoreError::NotFound { .. }) => {}
        Err(e) => panic!("reading the pending state: {e}"),
    }
}
