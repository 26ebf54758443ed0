//! Crash safety (SPEC §3.8): the binary is stopped at named points of a run and killed with
//! SIGKILL. Afterwards no image may miss a blob, and a follow-up run (its clock moved past the
//! dead run's lease) must finish the work.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// `ocigc SUBCOMMAND <target store> REST...`, quiet.
fn ocigc(t: &TestStore, args: &[&str]) -> Command {
    let (target, env) = cli_target(t);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocigc"));
    cmd.args(&args[..1])
        .args(&target)
        .args(&args[1..])
        .envs(env)
        .env("OCIGC_LOG", "warn");
    cmd
}

/// Runs `ocigc ARGS` until it reaches `failpoint`, then SIGKILLs it.
fn kill_at(t: &TestStore, args: &[&str], failpoint: &str) {
    let mut cmd = ocigc(t, args);
    cmd.env("OCIGC_FAILPOINT", failpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ocigc");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wanted = format!(
        "failpoint {} reached",
        failpoint.split(':').next().unwrap_or("")
    );
    let mut seen = Vec::new();
    let reached = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains(&wanted) => break true,
            Ok(line) => seen.push(line),
            // Exited (stderr closed) or stuck: either way the point was never reached.
            Err(_) => break false,
        }
    };
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert!(reached, "{}: never reached {failpoint}: {seen:?}", t.kind);
}

fn run(t: &TestStore, args: &[&str]) -> i32 {
    let out = ocigc(t, args).output().expect("run ocigc");
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.code().unwrap_or(-1)
}

const GC: &[&str] = &["gc", "--grace", "0s", "--delay", "0s"];
/// Past any lease a killed run left behind (10 minutes by default).
const GC_LATER: &[&str] = &[
    "gc",
    "--grace",
    "0s",
    "--delay",
    "0s",
    "--clock-offset",
    "1h",
];

async fn gc_killed_at(t: TestStore, failpoint: &str) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let repos = f.neighbours().await;
    kill_at(&t, GC, failpoint);
    let broken = dangling(t.store.as_ref()).await;
    assert!(
        broken.is_empty(),
        "{} killed at {failpoint}: {broken:?}",
        t.kind
    );

    assert_eq!(
        run(&t, GC_LATER),
        0,
        "{}: follow-up after {failpoint}",
        t.kind
    );
    let k = keys(t.store.as_ref()).await;
    for (repo, img, garbage) in &repos {
        assert_intact(&k, repo, img, failpoint);
        assert_gone(&k, repo, garbage, failpoint);
    }
    // The incremental cache is meant to stay; everything else of ocigc's must be gone.
    let state: Vec<_> = k
        .iter()
        .filter(|k| k.starts_with("_ocigc/") && !k.starts_with("_ocigc/cache/"))
        .collect();
    assert!(
        state.is_empty(),
        "{} after {failpoint}: state left {state:?}",
        t.kind
    );
    assert!(dangling(t.store.as_ref()).await.is_empty());
}

async fn observation_killed_at(t: TestStore, failpoint: &str) {
    // With a delay, a killed first observation must neither delete nor lose the second one.
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let repos = f.neighbours().await;
    let observe = ["gc", "--grace", "0s", "--delay", "1h"];
    kill_at(&t, &observe, failpoint);
    assert!(dangling(t.store.as_ref()).await.is_empty());
    let k = keys(t.store.as_ref()).await;
    for (repo, _, garbage) in &repos {
        assert_intact(
            &k,
            repo,
            garbage,
            "killed first observation deleted something",
        );
    }
    let later = [
        "gc",
        "--grace",
        "0s",
        "--delay",
        "1h",
        "--clock-offset",
        "1h",
    ];
    assert_eq!(run(&t, &later), 0);
    let much_later = [
        "gc",
        "--grace",
        "0s",
        "--delay",
        "1h",
        "--clock-offset",
        "3h",
    ];
    assert_eq!(run(&t, &much_later), 0);
    let k = keys(t.store.as_ref()).await;
    for (repo, img, garbage) in &repos {
        assert_intact(&k, repo, img, failpoint);
        assert_gone(&k, repo, garbage, failpoint);
    }
}

async fn delete_repo_killed_at(t: TestStore, failpoint: &str) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    f.neighbours().await;
    let before = keys(t.store.as_ref()).await;
    kill_at(&t, &["delete-repo", "team/app"], failpoint);
    assert!(dangling(t.store.as_ref()).await.is_empty(), "{failpoint}");
    // A gc in between leaves the half-deleted repository alone (its index.json is gone).
    assert_eq!(
        run(
            &t,
            &[
                "gc",
                "--grace",
                "0s",
                "--delay",
                "0s",
                "--clock-offset",
                "1h",
                "--repo",
                "team/app"
            ]
        ),
        3
    );
    assert_eq!(
        run(&t, &["delete-repo", "--clock-offset", "1h", "team/app"]),
        0,
        "{failpoint}"
    );
    let after = keys(t.store.as_ref()).await;
    for k in &before {
        let owned = k.starts_with("team/app/") && !k.starts_with("team/app/tools/");
        assert_eq!(
            after.contains(k),
            !owned,
            "{} after {failpoint}: {k}",
            t.kind
        );
    }
    assert!(!after.iter().any(|k| k.starts_with("_ocigc/")), "{after:?}");
}

macro_rules! crash_cases {
    ($($name:ident: $scenario:ident($point:expr);)*) => {$(
        mod $name {
            #[tokio::test]
            async fn dir() {
                super::$scenario($crate::common::dir_store(), $point).await
            }
            #[tokio::test]
            async fn s3() {
                super::$scenario($crate::common::s3_store().await, $point).await
            }
            #[tokio::test]
            async fn seaweed() {
                super::$scenario($crate::common::seaweed_store().await, $point).await
            }
        }
    )*};
}

crash_cases! {
    gc_after_lease: gc_killed_at("lease-acquired");
    gc_before_first_batch: gc_killed_at("before-delete-batch");
    gc_between_batches: gc_killed_at("after-delete-batch:2");
    gc_before_state_write: gc_killed_at("before-state-write");
    gc_after_state_write: gc_killed_at("after-state-write:3");
    gc_before_verify: gc_killed_at("before-verify");
    observe_before_state_write: observation_killed_at("before-state-write:2");
    observe_after_state_write: observation_killed_at("after-state-write");
    delete_repo_after_index: delete_repo_killed_at("delete-repo-phase-0");
    delete_repo_before_marker: delete_repo_killed_at("delete-repo-phase-1");
    delete_repo_mid_batch: delete_repo_killed_at("before-delete-batch:2");
}
