//! `ocigc serve` over HTTP: authentication, jobs, metrics, health under load, and shutdown.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .args(["serve", "--listen", "127.0.0.1:0", "--grace", "0s"])
        .arg("--bucket")
        .arg(bucket)
        .arg("--token-file")
        .arg(&token)
        .args(extra)
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
    assert!(
        metrics.contains("ocigc_runs_total{result=\"ok\"} 1"),
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
            sent.elapsed() < Duration::from_secs(15),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = sent.elapsed();
    eprintln!("SIGTERM to exit: {took:?}");
    assert_eq!(status.code(), Some(0));
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
