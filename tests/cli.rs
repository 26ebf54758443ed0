//! The `ocigc` binary: exit codes, flags and their environment fallbacks, reports, and the
//! example bucket on both stores.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use futures::TryStreamExt;
use serde_json::Value;

fn ocigc(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocigc"));
    cmd.args(args).env("OCIGC_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run ocigc")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn copy_example(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bucket");
    let status = Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success());
}

fn read_report(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("report written")).expect("report is JSON")
}

#[test]
fn bad_usage_exits_2_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let cases: &[(&[&str], &str)] = &[
        (&[], "Usage"),
        (&["gc"], "--bucket"),
        (&["gc", "--bucket", "gs://elsewhere"], "unsupported scheme"),
        (
            &["gc", "--bucket", "/nonexistent/ocigc/bucket"],
            "cannot use",
        ),
        (&["gc", "--bucket", d, "--grace", "banana"], "--grace"),
        (
            &["gc", "--bucket", d, "--concurrency", "0"],
            "--concurrency",
        ),
        (&["gc", "--bucket", d, "--layout", "zot"], "--layout"),
        (
            &["gc", "--bucket", d, "--delete-untagged"],
            "--delete-untagged",
        ),
        (&["gc", "--bucket", d, "--repo", "team/[app"], "--repo"),
        (&["delete-repo", "--bucket", d], "NAME"),
        (
            &["gc", "--bucket", d, "--lease-ttl", "1m"],
            "--lease-ttl 1m is too short",
        ),
        (
            &["intent", "--bucket", d, "--repo", "app", "sha256:nope"],
            "invalid digest",
        ),
        (
            &[
                "intent",
                "--bucket",
                d,
                "--repo",
                "App",
                &format!("sha256:{}", "a".repeat(64)),
            ],
            "invalid repository name",
        ),
        (
            &["intent", "--bucket", d, "--release", "app/index.json"],
            "not an intent key",
        ),
        (
            &["delete-repo", "--bucket", d, "Team/App"],
            "invalid repository name",
        ),
    ];
    for (args, needle) in cases {
        let out = ocigc(args, &[]);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn every_layout_runs_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    for (layout, untagged) in [
        ("oci", false),
        ("serverless-registry", true),
        ("distribution", true),
    ] {
        let mut args = vec!["gc", "--bucket", d, "--layout", layout, "--report", "-"];
        if untagged {
            args.push("--delete-untagged");
        }
        let out = ocigc(&args, &[]);
        assert_eq!(code(&out), 0, "{layout}: {}", stderr(&out));
        let report: Value = serde_json::from_slice(&out.stdout).expect("report");
        assert_eq!(report["layout"], layout);
    }
}

#[test]
fn unreachable_store_exits_1_without_panicking() {
    let started = std::time::Instant::now();
    let out = ocigc(
        &[
            "gc",
            "--bucket",
            "s3://nowhere-bucket",
            "--timeout-request",
            "2s",
            "--s3-path-style",
        ],
        &[
            // Port 1 on loopback: nothing listens, the connection is refused at once.
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
            ("AWS_ACCESS_KEY_ID", "x"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    let err = stderr(&out);
    assert_eq!(code(&out), 1, "{err}");
    assert!(err.contains("cannot use s3://nowhere-bucket"), "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        started.elapsed().as_secs() < 30,
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn example_bucket_via_environment_and_report_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_example(dir.path());
    let report_path = dir.path().join("report.json");
    let report_path_s = report_path.to_str().expect("utf-8");
    let bucket = dir.path().to_str().expect("utf-8");
    // Flags from the environment only.
    let env = [
        ("OCIGC_BUCKET", bucket),
        ("OCIGC_GRACE", "0s"),
        ("OCIGC_DELAY", "0s"),
        ("OCIGC_REPORT", report_path_s),
    ];
    let out = ocigc(&["gc", "--dry-run"], &env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let dry = read_report(&report_path);
    assert_eq!(dry["dry_run"], Value::Bool(true));
    assert_eq!(dry["totals"]["blobs_deleted"], 6);
    assert!(stderr(&out).contains("would delete"), "{}", stderr(&out));

    let out = ocigc(&["gc"], &env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let real = read_report(&report_path);
    assert_eq!(real["dry_run"], Value::Bool(false));
    assert_eq!(real["totals"], dry["totals"]);
    let repos = real["repositories"].as_array().expect("repositories");
    let names: Vec<&str> = repos.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "library/alpine",
            "library/alpine-edge",
            "team/app",
            "team/app/tools"
        ]
    );
    for r in repos {
        assert_eq!(r["status"], "ok");
        for d in r["deleted"].as_array().expect("deleted") {
            let key = d["key"].as_str().expect("key");
            assert!(!dir.path().join(key).exists(), "{key} still there");
            assert_eq!(d["reason"], "unreferenced");
            assert!(d["digest"].as_str().is_some_and(|s| key.ends_with(&s[7..])));
        }
    }
    let sum: u64 = repos
        .iter()
        .flat_map(|r| r["deleted"].as_array().into_iter().flatten())
        .filter_map(|d| d["size"].as_u64())
        .sum();
    assert_eq!(real["totals"]["bytes_deleted"].as_u64(), Some(sum));
    assert!(dir.path().join("team/app/README").exists());

    // The JSON report can also go to stdout.
    let out = ocigc(&["gc", "--report", "-"], &env[..3]);
    let again: Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON report");
    assert_eq!(again["totals"]["blobs_deleted"], 0);
}

#[test]
fn failed_closed_repository_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_example(dir.path());
    std::fs::write(dir.path().join("team/app/index.json"), "{").expect("corrupt index");
    let report_path = dir.path().join("r.json");
    let out = ocigc(
        &[
            "gc",
            "--bucket",
            dir.path().to_str().expect("utf-8"),
            "--grace",
            "0s",
            "--delay",
            "0s",
            "--report",
            report_path.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let report = read_report(&report_path);
    let app = report["repositories"]
        .as_array()
        .expect("repositories")
        .iter()
        .find(|r| r["name"] == "team/app")
        .expect("team/app");
    assert_eq!(app["status"], "failed");
    assert_eq!(app["deleted"].as_array().map(Vec::len), Some(0));
    assert!(
        dir.path()
            .join("team/app/blobs/sha256")
            .read_dir()
            .expect("blobs")
            .count()
            == 4
    );
    assert_eq!(report["totals"]["repositories_not_ok"], 1);
}

#[tokio::test]
async fn example_bucket_on_s3_request_counts() {
    let t = s3_store().await;
    let example =
        ocigc::store::DirStore::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bucket"))
            .expect("example bucket");
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let pages: Vec<_> = ocigc::store::Store::list(&example, "")
        .try_collect()
        .await
        .expect("list example");
    for o in pages.into_iter().flatten() {
        let body = ocigc::store::Store::get(&example, &o.key)
            .await
            .expect("read example");
        f.put(&o.key, &body.body).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let report_path = dir.path().join("r.json");
    let bucket = format!("s3://{}", t.bucket);
    let args = [
        "gc",
        "--bucket",
        &bucket,
        "--s3-path-style",
        "--grace",
        "0s",
        "--delay",
        "0s",
        "--report",
        report_path.to_str().expect("utf-8"),
    ];
    let endpoint = s3_endpoint();
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ];
    let out = ocigc(&args, &env);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = read_report(&report_path);
    let req = &report["requests"];
    eprintln!("example bucket on moto: requests {req}");
    assert_eq!(report["totals"]["blobs_deleted"], 6);
    // Minimum: one LIST page for 41 objects, 4 index.json + 17 documents read, one delete batch
    // for each of the 4 repositories with garbage. On top: the clock (one HEAD whose `Date`
    // is read; nothing written) and, per repository with something to delete, the protocol: lease create and release,
    // a fresh read of the pending state, the re-check before the batch (HEAD index.json, PUT
    // and later remove the batch announcement, LIST intents) and the verify pass (GET
    // index.json, LIST intents).
    let per_repo = 4;
    assert_eq!(req["list"], 1 + per_repo * 2);
    assert_eq!(req["get"], 21 + per_repo * 2);
    assert_eq!(req["delete"], per_repo * 3);
    assert_eq!(req["put"], per_repo * 2);
    assert_eq!(req["head"], 1 + per_repo);
    let left = keys(t.store.as_ref()).await;
    assert_eq!(left.len(), 41 - 6);
}

#[test]
fn intent_subcommand_protects_and_releases() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_example(dir.path());
    let bucket = dir.path().to_str().expect("utf-8");
    // The garbage layer of team/app, announced for reuse.
    let dry = ocigc(
        &[
            "gc",
            "--bucket",
            bucket,
            "--grace",
            "0s",
            "--delay",
            "0s",
            "--dry-run",
            "--repo",
            "team/app",
            "--report",
            "-",
        ],
        &[],
    );
    let plan: Value = serde_json::from_slice(&dry.stdout).expect("report");
    let digest = plan["repositories"][0]["deleted"][0]["digest"]
        .as_str()
        .expect("a garbage digest")
        .to_string();
    let out = ocigc(
        &[
            "intent", "--bucket", bucket, "--repo", "team/app", "--ttl", "1h", &digest,
        ],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        key.starts_with("_ocigc/intents/team/app/") && key.ends_with(".json"),
        "{key}"
    );
    assert!(dir.path().join(&key).exists());

    let gc = [
        "gc", "--bucket", bucket, "--grace", "0s", "--delay", "0s", "--repo", "team/app",
        "--report", "-",
    ];
    let kept: Value = serde_json::from_slice(&ocigc(&gc, &[]).stdout).expect("report");
    assert_eq!(kept["totals"]["blobs_deleted"], 0, "the intent was ignored");
    let blob = dir
        .path()
        .join("team/app/blobs")
        .join(digest.replacen(':', "/", 1));
    assert!(blob.exists());

    let out = ocigc(&["intent", "--bucket", bucket, "--release", &key], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!dir.path().join(&key).exists());
    let gone: Value = serde_json::from_slice(&ocigc(&gc, &[]).stdout).expect("report");
    assert_eq!(gone["totals"]["blobs_deleted"], 1);
    assert!(!blob.exists());
}

#[test]
fn config_file_sets_flags_and_flags_win() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = dir.path().join("bucket");
    std::fs::create_dir(&bucket).expect("mkdir");
    copy_example(&bucket);
    let cfg = dir.path().join("ocigc.toml");
    std::fs::write(
        &cfg,
        format!(
            "bucket = \"{}\"\ngrace = \"0s\"\ndelay = \"0s\"\nrepos = [\"team/**\"]\ndry_run = true\n",
            bucket.display()
        ),
    )
    .expect("config");
    let cfg_s = cfg.to_str().expect("utf-8");
    // Everything from the file: a dry run over team/app and team/app/tools only.
    let out = ocigc(&["gc", "--config", cfg_s, "--report", "-"], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(r["dry_run"], true);
    assert_eq!(r["repositories"].as_array().map(Vec::len), Some(2));
    assert_eq!(r["totals"]["blobs_deleted"], 2);
    // A flag wins over the file, and so does the environment.
    let out = ocigc(
        &[
            "gc",
            "--config",
            cfg_s,
            "--repo",
            "library/*",
            "--report",
            "-",
        ],
        &[("OCIGC_GRACE", "24h")],
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(r["repositories"].as_array().map(Vec::len), Some(2));
    assert_eq!(r["repositories"][0]["name"], "library/alpine");
    assert_eq!(r["grace"], "1day");
    assert_eq!(
        r["totals"]["blobs_deleted"], 0,
        "grace from the environment ignored"
    );

    std::fs::write(&cfg, "bucket = \"/tmp\"\ngrase = \"1h\"\n").expect("config");
    let out = ocigc(&["gc", "--config", cfg_s], &[]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("grase"), "{}", stderr(&out));
}

#[test]
fn progress_bar_only_on_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_example(dir.path());
    let cmd = format!(
        "OCIGC_LOG=warn {} gc --bucket {} --dry-run --grace 0s --delay 0s",
        env!("CARGO_BIN_EXE_ocigc"),
        dir.path().display()
    );
    // `script` runs the command in a pseudo-terminal and records what it draws.
    let tty = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script (util-linux)");
    let drawn = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{drawn}");
    assert!(
        drawn.contains("/4 repositories"),
        "no progress bar on a terminal: {drawn}"
    );
    let plain = ocigc(
        &[
            "gc",
            "--bucket",
            dir.path().to_str().expect("utf-8"),
            "--dry-run",
            "--grace",
            "0s",
            "--delay",
            "0s",
        ],
        &[],
    );
    assert!(
        !stderr(&plain).contains("/4 repositories"),
        "progress bar drawn off a terminal"
    );
}

#[test]
fn shards_split_the_repositories() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_example(dir.path());
    let bucket = dir.path().to_str().expect("utf-8");
    let mut seen = Vec::new();
    for shard in ["0/3", "1/3", "2/3"] {
        let out = ocigc(
            &[
                "gc",
                "--bucket",
                bucket,
                "--dry-run",
                "--shard",
                shard,
                "--report",
                "-",
            ],
            &[],
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let r: Value = serde_json::from_slice(&out.stdout).expect("report");
        for repo in r["repositories"].as_array().expect("repositories") {
            seen.push(repo["name"].as_str().expect("name").to_string());
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "library/alpine",
            "library/alpine-edge",
            "team/app",
            "team/app/tools"
        ]
    );
    let bad = ocigc(&["gc", "--bucket", bucket, "--shard", "3/3"], &[]);
    assert_eq!(code(&bad), 2);
}
