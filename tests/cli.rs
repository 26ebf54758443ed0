//! The `ocigc` binary: exit codes, flags and their environment fallbacks, reports, and the
//! example bucket on both stores.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

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
        (
            &["gc", "--bucket", d, "--max-delete-fraction", "0"],
            "--max-delete-fraction",
        ),
        (
            &["gc", "--bucket", d, "--max-delete-fraction", "1.5"],
            "--max-delete-fraction",
        ),
        (
            &["gc", "--bucket", d, "--max-delete-fraction", "NaN"],
            "--max-delete-fraction",
        ),
        (
            &["gc", "--bucket", d, "--max-delete-bytes", "0"],
            "--max-delete-bytes",
        ),
        (
            &["gc", "--bucket", d, "--max-delete-bytes", "5XB"],
            "--max-delete-bytes",
        ),
        (
            &["gc", "--bucket", d, "--max-requests-per-second", "0"],
            "--max-requests-per-second",
        ),
        (&["gc", "--bucket", d, "--pricing", "gcs"], "--pricing"),
        (
            &["gc", "--bucket", d, "--price-gb-month=-1"],
            "--price-gb-month",
        ),
        (
            &[
                "delete-repo",
                "--bucket",
                d,
                "--max-requests-per-second",
                "x",
                "app",
            ],
            "--max-requests-per-second",
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
    // The first request (the listing of ocigc's own state) names the bucket and the cause.
    assert!(err.contains("s3://nowhere-bucket"), "{err}");
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
    // Minimum: one LIST page for 41 objects (ocigc's own state among them, sorting before
    // every repository, so that every repository's leftovers are known when the listing
    // completes it), 4 index.json + 17 documents read, one delete batch
    // for each of the 4 repositories with garbage. The clock is the first LIST answer's
    // `Date`. On top: each look at a repository reads its trash (none here: a 404; another
    // collector's retention may have written one since the state was listed) and, per
    // repository with something to delete, the protocol: lease create and release,
    // a fresh read of the pending state, the re-check before the batch (HEAD index.json, PUT
    // and later remove the batch announcement, LIST intents) and the verify pass (GET
    // index.json, LIST intents), and one PUT of the repository's incremental-cache entry
    // (nothing to read: the bucket is new to ocigc). The two `library/` repositories are
    // complete before the listing is, so their deletions wait for its end (a placeholder listed
    // later could keep their blobs); their second look reads nothing again: neither the
    // documents nor the roots and trash the first look read after the same listing.
    let per_repo = 4;
    assert_eq!(req["list"], 1 + per_repo * 2);
    let trash_reads = per_repo;
    assert_eq!(req["get"], 21 + per_repo * 2 + trash_reads);
    assert_eq!(req["delete"], per_repo * 3);
    assert_eq!(req["put"], per_repo * 3);
    assert_eq!(req["head"], per_repo);
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

/// Runs ocigc, killed if it has not exited after `limit` (a daemon that accepted a value it
/// should have refused); returns its exit code (`None` when killed) and stderr.
fn ocigc_bounded(args: &[String], env: &[(&str, &str)], limit: Duration) -> (Option<i32>, String) {
    let err_file = tempfile::NamedTempFile::new().expect("stderr file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .args(args)
        .env("OCIGC_LOG", "warn")
        .env_remove("OCIGC_TOKEN")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(err_file.reopen().expect("reopen"))
        .spawn()
        .expect("spawn ocigc");
    let started = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(err_file.path()).expect("stderr");
    (code, err)
}

#[test]
fn absurd_durations_and_numbers_exit_2_naming_the_setting_without_panicking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path").to_string();
    // Longer than 100 years; the second overflows `Instant` arithmetic, the last `u64`.
    let huge = ["101y", "400000000000y", "99999999999999999999999s"];
    let token = [("OCIGC_TOKEN", "t0ken")];
    let mut cases: Vec<(Vec<String>, String)> = Vec::new();
    let args = |cmd: &str, flag: &str, v: &str| -> Vec<String> {
        let mut a = vec![cmd.to_string(), "--bucket".into(), d.clone()];
        if cmd == "serve" {
            a.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        a.push(format!("{flag}={v}"));
        match cmd {
            "intent" => a.extend([
                "--repo".into(),
                "app".into(),
                format!("sha256:{}", "a".repeat(64)),
            ]),
            "delete-repo" => a.push("app".into()),
            _ => {}
        }
        a
    };
    let store_durations = ["--timeout-request", "--lease-ttl", "--clock-offset"];
    let gc_durations = ["--grace", "--delay", "--timeout-repo", "--timeout-run"];
    let serve_durations = ["--interval", "--drain-timeout", "--header-read-timeout"];
    for v in huge {
        for flag in store_durations {
            for cmd in ["gc", "delete-repo", "serve"] {
                cases.push((args(cmd, flag, v), flag.into()));
            }
        }
        for flag in gc_durations {
            for cmd in ["gc", "serve"] {
                cases.push((args(cmd, flag, v), flag.into()));
            }
        }
        for flag in serve_durations {
            cases.push((args("serve", flag, v), flag.into()));
        }
        for flag in ["--ttl", "--wait"] {
            cases.push((args("intent", flag, v), flag.into()));
        }
    }
    cases.push((args("intent", "--ttl", "8d"), "--ttl".into()));
    cases.push((
        args("serve", "--header-read-timeout", "0s"),
        "--header-read-timeout".into(),
    ));
    for v in ["0", "-1", "1025", "99999999999999999999"] {
        cases.push((args("gc", "--concurrency", v), "--concurrency".into()));
        cases.push((args("gc", "--list-parts", v), "--list-parts".into()));
    }
    for flag in ["--max-queued-jobs", "--max-connections"] {
        for v in ["0", "-1", "4294967297", "99999999999999999999", "many"] {
            cases.push((args("serve", flag, v), flag.into()));
        }
    }
    for v in [
        "18446744073709551616/2",
        "0/0",
        "5/4",
        "4294967296/4294967297",
    ] {
        cases.push((args("gc", "--shard", v), "--shard".into()));
    }
    // The same through the configuration file.
    let cfg = dir.path().join("ocigc.toml");
    let cfg_s = cfg.to_str().expect("utf-8").to_string();
    let config_cases = [
        "grace = \"9000y\"",
        "delay = \"400000000000y\"",
        "timeout_request = \"101y\"",
        "timeout_repo = \"9000y\"",
        "timeout_run = \"400000000000y\"",
        "lease_ttl = \"9000y\"",
        "interval = \"9000y\"",
        "drain_timeout = \"400000000000y\"",
        "header_read_timeout = \"0s\"",
        "concurrency = 99999999999",
        "max_queued_jobs = 0",
        "max_connections = 99999999999999",
        "max_connections = -5",
    ];
    let mut checked = 0;
    for (args, flag) in &cases {
        let (code, err) = ocigc_bounded(args, &token, Duration::from_secs(10));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(flag.as_str()),
            "{args:?}: {flag} not named in {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        checked += 1;
    }
    for line in config_cases {
        std::fs::write(&cfg, format!("{line}\n")).expect("config");
        let key = line.split(' ').next().expect("key");
        let args: Vec<String> = [
            "serve",
            "--bucket",
            &d,
            "--listen",
            "127.0.0.1:0",
            "--config",
            &cfg_s,
        ]
        .map(String::from)
        .to_vec();
        let (code, err) = ocigc_bounded(&args, &token, Duration::from_secs(10));
        assert_eq!(code, Some(2), "{line}: {err}");
        assert!(err.contains(key), "{line}: {key} not named in {err}");
        assert!(!err.contains("panicked"), "{line}: {err}");
        checked += 1;
    }
    eprintln!("{checked} absurd settings refused");
}

#[test]
fn pushgateway_credentials_and_config_secrets_never_reach_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    // Port 1 on loopback: nothing listens, so the push fails and its error is logged.
    let gateway = "http://user:hunter2@127.0.0.1:1";
    for (args, env, want_code, want) in [
        (
            vec!["gc", "--bucket", d, "--pushgateway", gateway],
            vec![],
            0,
            "***@127.0.0.1:1",
        ),
        (
            vec!["gc", "--bucket", d],
            vec![("OCIGC_PUSHGATEWAY", gateway)],
            0,
            "***@127.0.0.1:1",
        ),
        (
            vec![
                "delete-repo",
                "--bucket",
                d,
                "--pushgateway",
                gateway,
                "app",
            ],
            vec![],
            0,
            "***@127.0.0.1:1",
        ),
        (
            vec![
                "gc",
                "--bucket",
                d,
                "--pushgateway",
                "http://user:hunter2@[::1",
            ],
            vec![],
            2,
            "--pushgateway",
        ),
        (
            vec![
                "gc",
                "--bucket",
                d,
                "--pushgateway",
                "ftp://user:hunter2@gw",
            ],
            vec![],
            2,
            "--pushgateway",
        ),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocigc"));
        cmd.args(&args).env("OCIGC_LOG", "debug").envs(env);
        let out = cmd.output().expect("run ocigc");
        let err = stderr(&out);
        assert_eq!(code(&out), want_code, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {want:?} not in {err}");
        assert!(
            !err.contains("hunter2"),
            "{args:?}: the password is in {err}"
        );
    }
    let cfg = dir.path().join("ocigc.toml");
    let cfg_s = cfg.to_str().expect("utf-8");
    for text in [
        "pushgateway = \"http://u:hunter2@gw\" oops\n",
        "pushgateway = \"http://u:hunter2@gw\n",
        "token = \"hunter2\"\n",
        "concurrency = \"hunter2\"\n",
        "bucket = \"/tmp\"\ngrace = [\"hunter2\"]\n",
    ] {
        std::fs::write(&cfg, text).expect("config");
        let out = ocigc(&["gc", "--config", cfg_s], &[]);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{text}: {err}");
        assert!(err.contains("line "), "{text}: {err}");
        assert!(!err.contains("hunter2"), "{text}: the secret is in {err}");
    }
}

#[test]
fn the_largest_accepted_durations_run_without_panicking() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_example(dir.path());
    let d = dir.path().to_str().expect("utf-8 path");
    let out = ocigc(
        &[
            "gc",
            "--bucket",
            d,
            "--timeout-run=100y",
            "--timeout-repo=100y",
            "--timeout-request=25y",
            "--lease-ttl=100y",
            "--clock-offset=100y",
            "--grace=0s",
            "--delay=0s",
            "--report=-",
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(code(&out), 0, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(report["totals"]["blobs_deleted"], 6, "{report}");
    let (code, err) = ocigc_bounded(
        &[
            "intent",
            "--bucket",
            d,
            "--repo",
            "app",
            "--ttl=7d",
            "--wait=100y",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("sha256:{}", "a".repeat(64))])
        .collect::<Vec<_>>(),
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{err}");
}

/// `--pricing` adds a `cost` object priced from the run's own figures; a repository whose
/// tags were all removed exceeds the default blast-radius budget (exit 3, nothing deleted in
/// it, named in the report) until a run passes `--max-delete-fraction 1`; budget and prices
/// come from the config file too, and a bad value there exits 2 naming the key.
#[test]
fn cost_and_budget_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = dir.path().join("bucket");
    std::fs::create_dir(&bucket).expect("mkdir");
    copy_example(&bucket);
    let b = bucket.to_str().expect("utf-8");
    let base = [
        "gc", "--bucket", b, "--grace", "0s", "--delay", "0s", "--report", "-",
    ];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let out = ocigc(&args, &[]);
        let report: Value = serde_json::from_slice(&out.stdout).expect("report on stdout");
        (code(&out), report, stderr(&out))
    };

    let (c, dry, err) = run(&["--dry-run", "--pricing", "r2"]);
    assert_eq!(c, 0, "{err}");
    let cost = &dry["cost"];
    assert_eq!(cost["prices"]["name"], "r2");
    assert_eq!(cost["prices"]["gb_month"], 0.015);
    let reclaimed = dry["totals"]["bytes_deleted"].as_u64().expect("bytes");
    assert!(reclaimed > 0);
    assert_eq!(cost["reclaimed_bytes"].as_u64(), Some(reclaimed));
    let per_month = cost["reclaimed_dollars_per_month"]
        .as_f64()
        .expect("dollars");
    assert!((per_month - reclaimed as f64 / 1e9 * 0.015).abs() < 1e-15);
    let req = &dry["requests"];
    let class_a = req["list"].as_u64().unwrap_or(0) + req["put"].as_u64().unwrap_or(0);
    let class_b = req["get"].as_u64().unwrap_or(0) + req["head"].as_u64().unwrap_or(0);
    assert_eq!(cost["class_a_requests"].as_u64(), Some(class_a));
    assert_eq!(cost["class_b_requests"].as_u64(), Some(class_b));
    let dollars = cost["request_dollars"].as_f64().expect("dollars");
    assert!((dollars - (class_a as f64 * 4.5 + class_b as f64 * 0.36) / 1e6).abs() < 1e-12);
    assert!(err.contains("cost (r2)"), "{err}");
    // Without prices there is no cost object.
    let (_, plain, _) = run(&["--dry-run"]);
    assert!(plain.get("cost").is_none(), "{plain}");
    // Explicit prices stand alone.
    let (_, custom, _) = run(&["--dry-run", "--price-gb-month", "1"]);
    assert_eq!(custom["cost"]["prices"]["name"], "custom");
    assert_eq!(custom["cost"]["prices"]["class_a_per_million"], 0.0);

    // Every tag of team/app/tools removed: all of its blobs would go.
    std::fs::write(
        bucket.join("team/app/tools/index.json"),
        r#"{"schemaVersion":2,"manifests":[]}"#,
    )
    .expect("untag");
    let tools_blobs = bucket.join("team/app/tools/blobs/sha256");
    // The directory store removes directories it emptied.
    let count = || tools_blobs.read_dir().map_or(0, Iterator::count);
    let before = count();
    let (c, report, err) = run(&[]);
    assert_eq!(c, 3, "{err}");
    let tools = report["repositories"]
        .as_array()
        .expect("repositories")
        .iter()
        .find(|r| r["name"] == "team/app/tools")
        .expect("team/app/tools");
    assert_eq!(tools["status"], "budget_exceeded");
    assert_eq!(tools["deleted"].as_array().map(Vec::len), Some(0));
    assert_eq!(report["totals"]["budget_exceeded"], 1);
    assert_eq!(count(), before, "nothing of it deleted");
    assert!(err.contains("--max-delete-fraction 1"), "{err}");

    // The same limit from the config file; a bad value there is named.
    let cfg = dir.path().join("ocigc.toml");
    std::fs::write(&cfg, "max_delete_fraction = 1\npricing = \"s3-standard\"\n").expect("config");
    let (c, report, err) = run(&["--config", cfg.to_str().expect("utf-8")]);
    assert_eq!(c, 0, "{err}");
    assert_eq!(count(), 0, "collected with the override");
    assert_eq!(report["cost"]["prices"]["name"], "s3-standard");
    std::fs::write(&cfg, "max_delete_fraction = 2\n").expect("config");
    let out = ocigc(
        &[
            "gc",
            "--bucket",
            b,
            "--config",
            cfg.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("max_delete_fraction"),
        "{}",
        stderr(&out)
    );

    // Whole-repository deletion is never refused by the budget, and is priced too.
    let out = ocigc(
        &[
            "delete-repo",
            "--bucket",
            b,
            "--pricing",
            "r2",
            "--report",
            "-",
            "library/alpine-edge",
        ],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("report");
    let freed = report["totals"]["bytes_deleted"].as_u64().expect("bytes");
    assert!(freed > 0);
    assert_eq!(report["cost"]["reclaimed_bytes"].as_u64(), Some(freed));
    assert!(!bucket.join("library/alpine-edge").exists());
}
