//! End to end with real Prometheus components (Debian's `prometheus` and
//! `prometheus-pushgateway`, installed by scripts/test.sh): a one-shot run pushes to a
//! Pushgateway, a daemon is scraped, and Prometheus' HTTP API must return the values the runs
//! reported.

mod common;

use common::copy_example;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn spawn(program: &str, args: &[String]) -> Proc {
    Proc(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program}: {e} (scripts/test.sh installs Debian's prometheus packages)")
            }),
    )
}

async fn get_json(url: &str) -> Option<Value> {
    let resp = reqwest::get(url).await.ok()?;
    serde_json::from_str(&resp.text().await.ok()?).ok()
}

async fn json(resp: reqwest::Response) -> Value {
    serde_json::from_str(&resp.text().await.expect("body")).expect("json body")
}

/// Polls Prometheus until `query` returns data (bounded), and returns the first sample's value
/// (NaN is a value too: a quantile over all-zero rates). A query Prometheus rejects fails at once.
async fn query(prom: &str, q: &str) -> f64 {
    let url = format!("{prom}/api/v1/query?query={}", urlencode(q));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = get_json(&url).await {
            assert_ne!(v["status"], "error", "{q}: {v}");
            if let Some(s) = v["data"]["result"][0]["value"][1].as_str() {
                return s.parse().unwrap_or(f64::NAN);
            }
        }
        assert!(Instant::now() < deadline, "Prometheus never returned {q}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn pushgateway_and_scrape_reach_prometheus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pg_port, prom_port) = (free_port(), free_port());
    let _pushgateway = spawn(
        "prometheus-pushgateway",
        &[format!("--web.listen-address=127.0.0.1:{pg_port}")],
    );
    let pushgateway = format!("http://127.0.0.1:{pg_port}");

    // The daemon, hook-only, with an on-demand run on its own copy of the example.
    let served = dir.path().join("served");
    copy_example(&served);
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--grace",
            "0s",
            "--delay",
            "0s",
            "--insecure-no-auth",
            "--bucket",
        ])
        .arg(&served)
        .env("OCIGC_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ocigc serve");
    let stderr = daemon.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let daemon_addr = loop {
        let line = lines.next().expect("daemon exited").expect("line");
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let _daemon = Proc(daemon);
    let client = reqwest::Client::new();
    let job = client
        .post(format!("http://{daemon_addr}/v1/repos/library/alpine/gc"))
        .send()
        .await
        .expect("hook");
    let job = json(job).await;
    let job_id = job["job"].as_str().expect("job id").to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let daemon_bytes = loop {
        let j = json(
            client
                .get(format!("http://{daemon_addr}/v1/jobs/{job_id}"))
                .send()
                .await
                .expect("job"),
        )
        .await;
        if j["status"] == "succeeded" {
            break j["result"]["deleted"]
                .as_array()
                .map(|d| d.iter().filter_map(|x| x["size"].as_u64()).sum::<u64>())
                .unwrap_or(0);
        }
        assert!(Instant::now() < deadline && j["status"] != "failed", "{j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // A one-shot run that pushes.
    let oneshot = dir.path().join("oneshot");
    copy_example(&oneshot);
    let report_path = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .args([
            "gc",
            "--grace",
            "0s",
            "--delay",
            "0s",
            "--pushgateway",
            &pushgateway,
            "--bucket",
        ])
        .arg(&oneshot)
        .arg("--report")
        .arg(&report_path)
        .env("OCIGC_LOG", "info")
        .output()
        .expect("ocigc gc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics pushed"));
    let report: Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report")).expect("json");
    let bytes_deleted = report["totals"]["bytes_deleted"]
        .as_f64()
        .expect("bytes_deleted");
    let finished = humantime::parse_rfc3339(report["finished_at"].as_str().expect("finished_at"))
        .expect("timestamp")
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();

    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pushgateway\n    honor_labels: true\n    static_configs: [{{targets: ['127.0.0.1:{pg_port}']}}]\n  - job_name: ocigc-daemon\n    static_configs: [{{targets: ['{daemon_addr}']}}]\n"
        ),
    )
    .expect("config");
    let _prometheus = spawn(
        "prometheus",
        &[
            format!("--config.file={}", cfg.display()),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
    );
    let prom = format!("http://127.0.0.1:{prom_port}");

    // Pushed by the one-shot run (job "ocigc", grouped by bucket).
    let pushed = query(&prom, "ocigc_bytes_deleted_total{job=\"ocigc\"}").await;
    assert_eq!(pushed, bytes_deleted);
    let last_success = query(&prom, "ocigc_last_success_timestamp_seconds{job=\"ocigc\"}").await;
    assert!(
        (last_success - finished).abs() < 5.0,
        "{last_success} vs {finished}"
    );
    // Scraped from the daemon.
    let scraped = query(&prom, "ocigc_bytes_deleted_total{job=\"ocigc-daemon\"}").await;
    assert_eq!(scraped as u64, daemon_bytes);
    // The daemon's hook GC has its own series; no full run happened there.
    let hook_success = query(
        &prom,
        "ocigc_hook_last_success_timestamp_seconds{job=\"ocigc-daemon\"}",
    )
    .await;
    assert!(hook_success > 1.7e9);
    let daemon_success = query(
        &prom,
        "ocigc_last_success_timestamp_seconds{job=\"ocigc-daemon\"}",
    )
    .await;
    assert_eq!(daemon_success, 0.0);
    eprintln!(
        "prometheus: pushed bytes_deleted {pushed} (report {bytes_deleted}), scraped {scraped} (job {daemon_bytes})"
    );

    // Every query of the Grafana dashboard in deploy/ runs and returns data.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/dashboard.json"),
        )
        .expect("dashboard.json"),
    )
    .expect("dashboard JSON");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            query(&prom, expr).await;
            queries += 1;
        }
    }
    assert!(queries >= 12, "{queries} dashboard queries");
    eprintln!("prometheus: {queries} dashboard queries returned data");
}
