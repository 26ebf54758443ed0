//! A directory bucket with symlinks, special files and names that are not UTF-8: nothing
//! outside the bucket is read, written or deleted, nothing hangs, and only the repository that
//! owns the oddity fails closed (SPEC §3 "Bounded and read-only where it should be").

mod common;

use std::collections::BTreeSet;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ocigc::gc::delete_repositories;
use ocigc::layout::oci::OciLayout;
use ocigc::report::{RepoStatus, Report};
use ocigc::store::{DirStore, Store, StoreError};
use rustix::fs::{FileType, Mode, CWD};

/// Longest any run here may take; a run that hangs on a FIFO fails the test instead. Below
/// the 60 s request time-out of [`eager`], so that a read blocked on a FIFO is not rescued by
/// the time-out (which would also leak the blocked thread).
const BOUND: Duration = Duration::from_secs(30);

/// Runs a scenario on a runtime of its own that is abandoned once the time bound passes, so
/// that a worker thread stuck opening a FIFO fails the test instead of hanging it.
fn bounded<T>(scenario: impl std::future::Future<Output = T>) -> T {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let out = rt.block_on(async { tokio::time::timeout(BOUND, scenario).await });
    rt.shutdown_timeout(Duration::from_secs(1));
    out.expect("the scenario finishes within its bound")
}

async fn bounded_gc(store: &Arc<dyn Store>) -> Report {
    tokio::time::timeout(BOUND, gc(store, &eager()))
        .await
        .expect("the gc run finishes")
}

async fn delete_repo(store: &Arc<dyn Store>, name: &str) -> Report {
    let names = [name.to_string()];
    let opts = delete_options(false);
    let run = delete_repositories(store.clone(), Arc::new(OciLayout), &names, &opts);
    tokio::time::timeout(BOUND, run)
        .await
        .expect("the delete-repo run finishes")
        .expect("delete-repo run")
}

/// Every entry below `dir` (symlinks not followed) with the content of each regular file.
fn snapshot(dir: &Path) -> BTreeSet<(String, Vec<u8>)> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            let name = path.strip_prefix(dir).expect("below").display().to_string();
            let meta = std::fs::symlink_metadata(&path).expect("lstat");
            if meta.is_dir() {
                out.insert((format!("{name}/"), Vec::new()));
                stack.push(path);
            } else if meta.is_file() {
                out.insert((name, std::fs::read(&path).expect("read")));
            } else {
                out.insert((format!("{name} (special)"), Vec::new()));
            }
        }
    }
    out
}

/// A directory outside the bucket holding a complete OCI repository with garbage in it, which
/// a collector that followed a link into it would collect.
async fn outside_repository() -> (tempfile::TempDir, BTreeSet<(String, Vec<u8>)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = DirStore::open(dir.path()).expect("open");
    let f = Fixture { store: &store };
    let img = f.image("ext", "outside").await;
    f.layout("ext", &[(Some("v1"), &img)]).await;
    f.image("ext", "outside garbage").await;
    let before = snapshot(dir.path());
    (dir, before)
}

/// Repository `b`: one tagged image and one garbage image, to show the run went on.
async fn bystander(f: &Fixture<'_>) -> (Desc, Desc) {
    let kept = f.image("b", "kept").await;
    f.layout("b", &[(Some("v1"), &kept)]).await;
    let garbage = f.image("b", "garbage").await;
    (kept, garbage)
}

/// Asserts that `b` was collected: its garbage gone, its image whole.
fn assert_bystander_collected(report: &Report, k: &BTreeSet<String>, b: &(Desc, Desc)) {
    assert_eq!(
        repo_report(report, "b").status,
        RepoStatus::Ok,
        "{report:#?}"
    );
    assert_intact(k, "b", &b.0, "bystander image");
    assert_gone(k, "b", &b.1, "bystander garbage");
}

/// Repository `a` with a tagged image and a garbage image; returns them.
async fn victim(f: &Fixture<'_>) -> (Desc, Desc) {
    let kept = f.image("a", "kept").await;
    f.layout("a", &[(Some("v1"), &kept)]).await;
    let garbage = f.image("a", "garbage").await;
    (kept, garbage)
}

/// Asserts that `a` failed closed: status failed, reason naming `needle`, nothing deleted.
fn assert_failed_closed(report: &Report, k: &BTreeSet<String>, a: &(Desc, Desc), needle: &str) {
    let r = repo_report(report, "a");
    assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
    assert!(r.deleted.is_empty(), "{r:#?}");
    assert!(
        r.errors.iter().any(|e| e.contains(needle)),
        "no error naming {needle:?}: {r:#?}"
    );
    assert_intact(k, "a", &a.0, "image of the failed repository");
    assert_intact(k, "a", &a.1, "garbage of the failed repository");
    assert!(
        !report.all_ok(),
        "a failed repository makes the run partial"
    );
}

fn root(t: &TestStore) -> PathBuf {
    PathBuf::from(&t.bucket)
}

fn blob_path(t: &TestStore, repo: &str, d: &Desc) -> PathBuf {
    root(t).join(blob_key(repo, &d.digest))
}

#[tokio::test]
async fn symlinked_repository_directory_is_never_entered() {
    let (outside, before) = outside_repository().await;
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let b = bystander(&f).await;
    std::fs::create_dir_all(root(&t).join("team")).expect("mkdir");
    symlink(outside.path().join("ext"), root(&t).join("team/app")).expect("symlink");

    let report = bounded_gc(&t.store).await;
    assert_eq!(snapshot(outside.path()), before, "gc changed files outside");
    let k = keys(t.store.as_ref()).await;
    assert_bystander_collected(&report, &k, &b);
    let warned = report
        .rejected
        .iter()
        .find(|r| r.prefix == "team/app")
        .unwrap_or_else(|| panic!("the link is not reported: {report:#?}"));
    assert!(warned.reason.contains("symbolic link"), "{warned:?}");

    let deleted = delete_repo(&t.store, "team/app").await;
    assert_eq!(
        snapshot(outside.path()),
        before,
        "delete-repo changed files outside"
    );
    let r = repo_report(&deleted, "team/app");
    assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
    assert!(r.deleted.is_empty(), "{r:#?}");
    assert!(
        r.errors.iter().any(|e| e.contains("symbolic link")),
        "{r:#?}"
    );
    assert!(
        root(&t).join("team/app").is_symlink(),
        "the link itself stays"
    );
}

#[tokio::test]
async fn symlink_inside_a_repository_fails_it_closed() {
    let (outside, before) = outside_repository().await;
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let a = victim(&f).await;
    let b = bystander(&f).await;
    let target = outside.path().join("ext/index.json");
    let link = root(&t).join("a/blobs/sha256/linked");
    symlink(&target, &link).expect("symlink");

    let report = bounded_gc(&t.store).await;
    let k = keys(t.store.as_ref()).await;
    assert_failed_closed(&report, &k, &a, "a/blobs/sha256/linked");
    assert_bystander_collected(&report, &k, &b);
    assert_eq!(snapshot(outside.path()), before, "gc changed files outside");

    // delete-repo removes what it can and reports the link, which it leaves alone.
    let deleted = delete_repo(&t.store, "a").await;
    let r = repo_report(&deleted, "a");
    assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
    assert!(
        r.errors.iter().any(|e| e.contains("a/blobs/sha256/linked")),
        "{r:#?}"
    );
    assert!(link.is_symlink(), "the link itself stays");
    assert_eq!(
        snapshot(outside.path()),
        before,
        "delete-repo changed files outside"
    );
    let left: Vec<String> = keys(t.store.as_ref())
        .await
        .into_iter()
        .filter(|k| k.starts_with("a/"))
        .collect();
    assert_eq!(
        left,
        ["a/blobs/sha256/linked"],
        "the rest of `a` is deleted"
    );
}

/// `_ocigc` (or only `_ocigc/deleting`) links outside: leases, announcements and pending state
/// are never written through it, and no blob goes without them.
#[tokio::test]
async fn symlinked_state_directory_is_never_written_through() {
    for linked in ["_ocigc", "_ocigc/deleting"] {
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("keep"), b"outside").expect("write");
        let before = snapshot(outside.path());
        let t = dir_store();
        let f = Fixture {
            store: t.store.as_ref(),
        };
        let a = victim(&f).await;
        let link = root(&t).join(linked);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("mkdir");
        symlink(outside.path(), &link).expect("symlink");

        let report = bounded_gc(&t.store).await;
        assert_eq!(
            snapshot(outside.path()),
            before,
            "{linked}: gc wrote outside the bucket"
        );
        let k = keys(t.store.as_ref()).await;
        assert_intact(&k, "a", &a.0, linked);
        assert!(dangling(t.store.as_ref()).await.is_empty(), "{linked}");
        // `a` has garbage, so it needs its lease and then an announcement: both refused.
        let r = repo_report(&report, "a");
        assert_eq!(r.status, RepoStatus::Failed, "{linked}: {r:#?}");
        assert!(
            r.deleted.is_empty(),
            "{linked}: deleted without state: {r:#?}"
        );
        assert!(
            r.errors.iter().any(|e| e.contains("symbolic link")),
            "{linked}: {r:#?}"
        );
        assert_intact(
            &k,
            "a",
            &a.1,
            "garbage kept while the state cannot be written",
        );
        assert!(link.is_symlink(), "{linked}: the link itself stays");
    }
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        CWD,
        path,
        FileType::Fifo,
        Mode::from_bits_truncate(0o644),
        0,
    )
    .expect("mkfifo");
}

#[test]
fn fifo_as_index_json_fails_only_its_repository() {
    bounded(async {
        let t = dir_store();
        let f = Fixture {
            store: t.store.as_ref(),
        };
        let a = victim(&f).await;
        let b = bystander(&f).await;
        let index = root(&t).join("a/index.json");
        std::fs::remove_file(&index).expect("remove index.json");
        mkfifo(&index);

        let report = bounded_gc(&t.store).await;
        let k = keys(t.store.as_ref()).await;
        assert_failed_closed(&report, &k, &a, "a/index.json");
        assert_bystander_collected(&report, &k, &b);
    })
}

/// A FIFO, a character device (where this process may make one) and a symlink to /dev/zero in
/// the place of blobs: never opened for reading, the repository fails closed.
#[test]
fn special_files_as_blobs_are_refused() {
    bounded(async {
        let t = dir_store();
        let f = Fixture {
            store: t.store.as_ref(),
        };
        let a = victim(&f).await;
        let b = bystander(&f).await;
        let fifo = blob_path(&t, "a", &a.1);
        std::fs::remove_file(&fifo).expect("remove");
        mkfifo(&fifo);
        let mut special = vec![blob_key("a", &a.1.digest)];
        let zero_link = root(&t).join("a/blobs/sha256/zero-link");
        symlink("/dev/zero", &zero_link).expect("symlink");
        special.push("a/blobs/sha256/zero-link".into());
        // A device node needs CAP_MKNOD; where it is missing the link to /dev/zero stands in.
        let device = root(&t).join("a/blobs/sha256/zero");
        let made = rustix::fs::mknodat(
            CWD,
            &device,
            FileType::CharacterDevice,
            Mode::from_bits_truncate(0o644),
            rustix::fs::makedev(1, 5),
        );
        if made.is_ok() {
            special.push("a/blobs/sha256/zero".into());
        }
        for key in &special {
            let got = tokio::time::timeout(BOUND, t.store.get(key))
                .await
                .expect("get returns");
            assert!(
                matches!(&got, Err(StoreError::Request { .. })),
                "{key}: {got:?}"
            );
        }

        let report = bounded_gc(&t.store).await;
        let k = keys(t.store.as_ref()).await;
        // The FIFO stands where a garbage blob was: that blob is "gone" from the listing's point of
        // view, so only the image is checked whole, and the special files stay.
        let r = repo_report(&report, "a");
        assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
        assert!(r.deleted.is_empty(), "{r:#?}");
        for key in &special {
            assert!(
                r.errors.iter().any(|e| e.contains(key.as_str())),
                "{key} not named: {r:#?}"
            );
        }
        assert_intact(&k, "a", &a.0, "image of the failed repository");
        assert!(std::fs::symlink_metadata(&fifo).is_ok(), "the FIFO stays");
        assert_bystander_collected(&report, &k, &b);
        assert!(!report.all_ok());
    })
}

#[tokio::test]
async fn name_that_is_not_utf8_fails_only_its_repository() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let a = victim(&f).await;
    let b = bystander(&f).await;
    let name = std::ffi::OsStr::from_bytes(b"not-\xffutf8");
    let odd = root(&t).join("a/blobs/sha256").join(name);
    std::fs::write(&odd, b"odd").expect("write");

    let report = bounded_gc(&t.store).await;
    let k = keys(t.store.as_ref()).await;
    assert_failed_closed(&report, &k, &a, "UTF-8");
    assert_bystander_collected(&report, &k, &b);
    assert!(odd.exists());

    // From the command line the partial run exits 3.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .args([
            "gc", "--bucket", &t.bucket, "--grace", "0s", "--delay", "0s",
        ])
        .env("OCIGC_LOG", "warn")
        .output()
        .expect("run ocigc");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let deleted = delete_repo(&t.store, "a").await;
    let r = repo_report(&deleted, "a");
    assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
    assert!(odd.exists(), "the file with the odd name stays");
    assert!(
        !root(&t).join("a/index.json").exists(),
        "the rest of `a` is deleted"
    );
}

/// An oversized root is refused from its size without being read; its repository fails closed.
#[tokio::test]
async fn oversized_index_json_is_refused_unread() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let a = victim(&f).await;
    let b = bystander(&f).await;
    let index = std::fs::OpenOptions::new()
        .write(true)
        .open(root(&t).join("a/index.json"))
        .expect("open");
    // Sparse: costs nothing to make; reading it whole would take a gibibyte of memory.
    index.set_len(1 << 30).expect("set_len");
    let got = t.store.get_capped("a/index.json", 1 << 20).await;
    assert!(
        matches!(got, Err(StoreError::TooLarge { limit, .. }) if limit == 1 << 20),
        "{got:?}"
    );

    let report = bounded_gc(&t.store).await;
    let k = keys(t.store.as_ref()).await;
    assert_failed_closed(&report, &k, &a, "");
    assert_bystander_collected(&report, &k, &b);
}
