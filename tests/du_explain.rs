//! `du` and `explain`: read-only (no PUT, no DELETE), `du`'s garbage is what `gc --dry-run`
//! deletes, `explain` gives a path for a reachable layer and the reason for garbage; and the
//! binary's table and usage errors.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ocigc::digest::Digest;
use ocigc::du::{DuReport, ExplainReport};
use ocigc::gc::plan::Reason;
use ocigc::gc::GcOptions;
use ocigc::report::Report;
use ocigc::store::{PutCondition, Store};

/// `du` with `explain` asking for `asked`, on `layout`: it writes nothing and leaves the bucket
/// as it was, and its garbage is what `gc --dry-run` deletes. Its report and `du` view.
async fn read_only_du(t: &TestStore, layout: &str, asked: &[Digest]) -> (Report, DuReport) {
    let layout = || ocigc::layout::by_name(layout, Default::default()).expect("layout");
    let before = all_keys(t.store.as_ref()).await;
    let opts = GcOptions {
        explain: Some(Arc::new(asked.iter().cloned().collect::<HashSet<_>>())),
        ..du_options(eager())
    };
    let report = ocigc::gc::run_gc(t.store.clone(), layout(), &opts)
        .await
        .expect("du run");
    assert_eq!((report.requests.put, report.requests.delete), (0, 0));
    assert_eq!(
        all_keys(t.store.as_ref()).await,
        before,
        "du changed the bucket"
    );
    let du = DuReport::of(&report, None);
    let dry_run = GcOptions {
        dry_run: true,
        ..eager()
    };
    let dry = (ocigc::gc::run_gc(t.store.clone(), layout(), &dry_run).await).expect("dry run");
    assert_eq!(du.totals.garbage_bytes, dry.totals.bytes_deleted);
    (report, du)
}

/// The options `ocigc du` runs with.
fn du_options(base: GcOptions) -> GcOptions {
    GcOptions {
        dry_run: true,
        detail: true,
        max_delete_fraction: 1.0,
        max_delete_bytes: None,
        ..base
    }
}

async fn du_is_read_only_and_its_garbage_is_what_gc_would_delete(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let neighbours = f.neighbours().await;
    // A second image under an index with a referrer, in one repository.
    let (repo, img, _) = &neighbours[0];
    let other = f.image(repo, "second").await;
    let idx = f.index(repo, OCI_INDEX, &[img, &other]).await;
    f.referrer(repo, img, "sig").await;
    f.layout(repo, &[(Some("latest"), img), (Some("v2"), &idx)])
        .await;
    // A cache from an earlier run: du reads it but must not write one.
    gc(
        &t.store,
        &GcOptions {
            dry_run: false,
            ..eager()
        },
    )
    .await;
    let garbage = f.image(repo, "new garbage").await;

    let before = all_keys(t.store.as_ref()).await;
    let recorder = Arc::new(common::serverless::Recorder::new(t.store.clone()));
    let store: Arc<dyn Store> = recorder.clone();
    let report = gc(&store, &du_options(eager())).await;
    assert!(
        recorder.writes().is_empty(),
        "du wrote: {:?}",
        recorder.writes()
    );
    assert_eq!((report.requests.put, report.requests.delete), (0, 0));
    assert_eq!(
        all_keys(t.store.as_ref()).await,
        before,
        "du changed the bucket"
    );
    let du = DuReport::of(&report, None);
    assert!(du.all_ok(), "{du:?}");

    let dry = gc(
        &t.store,
        &GcOptions {
            dry_run: true,
            ..eager()
        },
    )
    .await;
    assert_eq!(du.totals.garbage_bytes, dry.totals.bytes_deleted);
    for r in &dry.repositories {
        let d = du
            .repositories
            .iter()
            .find(|d| d.name == r.name)
            .expect("repo");
        assert_eq!(d.garbage_bytes, r.bytes_deleted(), "{}", r.name);
        assert_eq!(d.reachable_bytes, r.reachable.bytes, "{}", r.name);
        assert_eq!((d.objects, d.bytes), (r.objects, r.bytes), "{}", r.name);
    }
    let first = du
        .repositories
        .iter()
        .find(|d| d.name == *repo)
        .expect("repo");
    assert_eq!(first.tags, 2);
    // latest's manifest, the index, the second manifest, the referrer.
    assert_eq!(first.manifests, 4);
    assert!(first.garbage_bytes >= garbage.size);
    let sizes: Vec<u64> = du.repositories.iter().map(|r| r.bytes).collect();
    assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "largest first");

    // The real run deletes exactly that.
    let real = gc(&t.store, &eager()).await;
    assert_eq!(real.totals.bytes_deleted, du.totals.garbage_bytes);

    // With a grace period, what is unreferenced is pending, not garbage.
    let young = f.image(repo, "young garbage").await;
    let report = gc(&t.store, &du_options(GcOptions::default())).await;
    let du = DuReport::of(&report, None);
    assert_eq!(du.totals.garbage_bytes, 0);
    let first = du
        .repositories
        .iter()
        .find(|d| d.name == *repo)
        .expect("repo");
    assert!(first.pending_bytes >= young.size);
}

async fn explain_gives_a_path_and_a_reason(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let repo = "team/app";
    let img = f.image(repo, "app").await;
    let idx = f.index(repo, OCI_INDEX, &[&img]).await;
    let sig = f.referrer(repo, &img, "sig").await;
    f.layout(repo, &[(Some("v1"), &idx)]).await;
    let garbage = f.image(repo, "garbage").await;
    let layer = img.subtree[2].clone();
    let payload = sig.subtree[2].clone();
    let asked: Vec<Digest> = [&layer, &payload, &garbage.digest, &sha256(b"nowhere")]
        .iter()
        .map(|d| Digest::parse(d).expect("digest"))
        .collect();
    let before = all_keys(t.store.as_ref()).await;
    let opts = GcOptions {
        explain: Some(Arc::new(asked.iter().cloned().collect::<HashSet<_>>())),
        repos: only(&[repo]),
        ..du_options(eager())
    };
    let report = gc(&t.store, &opts).await;
    assert_eq!((report.requests.put, report.requests.delete), (0, 0));
    assert_eq!(all_keys(t.store.as_ref()).await, before);
    let ex = ExplainReport::of(&report, repo, &asked);

    let l = ex.digests[0].explained.as_ref().expect("layer explained");
    assert_eq!((l.decision, l.reason), ("keep", Reason::Reachable));
    assert_eq!(
        l.path,
        vec![
            "tag v1".to_string(),
            format!("index {}", idx.digest),
            format!("manifest {}", img.digest),
            format!("layer {layer}"),
        ]
    );
    let p = ex.digests[1].explained.as_ref().expect("payload explained");
    assert_eq!(p.reason, Reason::Reachable);
    assert!(
        p.path.contains(&format!("referrer {}", sig.digest)),
        "{:?}",
        p.path
    );
    assert_eq!(p.path.first().map(String::as_str), Some("tag v1"));
    let g = ex.digests[2].explained.as_ref().expect("garbage explained");
    assert_eq!((g.decision, g.reason), ("delete", Reason::Unreferenced));
    assert!(g.path.is_empty());
    assert!(ex.digests[3].not_found && ex.digests[3].explained.is_none());

    // Within the grace period: kept, with when it becomes deletable.
    let opts = GcOptions {
        grace: Duration::from_secs(3600),
        ..opts
    };
    let ex = ExplainReport::of(&gc(&t.store, &opts).await, repo, &asked);
    let g = ex.digests[2].explained.as_ref().expect("garbage explained");
    assert_eq!((g.decision, g.reason), ("keep", Reason::WithinGrace));
    assert!(g.deletable_at.is_some());
}

both_stores!(
    du_is_read_only_and_its_garbage_is_what_gc_would_delete,
    explain_gives_a_path_and_a_reason,
);

fn ocigc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .args(args)
        .env("OCIGC_LOG", "warn")
        .output()
        .expect("run ocigc")
}

fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), std::fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn du_prints_a_table_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_example(dir.path());
    let bucket = dir.path().to_str().expect("utf-8 path");
    let before = tree(dir.path());
    let o = ocigc(&["du", "--bucket", bucket, "--grace", "0s", "--delay", "0s"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let table = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("REPOSITORY") && lines[0].contains("GARBAGE"));
    assert!(
        lines[1].starts_with("library/alpine "),
        "largest first: {table}"
    );
    assert!(lines[5].starts_with("TOTAL (4 repositories)"), "{table}");
    assert_eq!(tree(dir.path()), before, "du changed the bucket");

    let o = ocigc(&["du", "--bucket", bucket, "--report", "-", "--pricing", "r2"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    assert_eq!(v["totals"]["repositories"], 4);
    assert_eq!(v["requests"]["put"], 0);
    assert!(
        v["cost"]["reclaimable_dollars_per_month"].is_number(),
        "{v}"
    );

    let o = ocigc(&[
        "explain",
        "--bucket",
        bucket,
        "library/alpine",
        "sha256:261fcbf482aacd2616f009e1516095a76ba62a25da7c684e57d611fed2c9dbc8",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("keep (reachable)")
            && text.contains("path: tag 3.19 → index")
            && text.contains(" (linux/arm64) → layer "),
        "{text}"
    );
    assert_eq!(tree(dir.path()), before, "explain changed the bucket");
}

#[test]
fn bad_input_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_example(dir.path());
    let d = dir.path().to_str().expect("utf-8 path");
    let digest = "sha256:261fcbf482aacd2616f009e1516095a76ba62a25da7c684e57d611fed2c9dbc8";
    let cases: &[(&[&str], &str)] = &[
        (&["du"], "--bucket"),
        (&["du", "--bucket", d, "--grace", "banana"], "--grace"),
        (&["du", "--bucket", d, "--layout", "nope"], "layout"),
        (&["du", "--bucket", d, "--repo", "[bad"], "--repo"),
        (&["explain", "--bucket", d, "library/alpine"], "DIGEST"),
        (
            &["explain", "--bucket", d, "library/alpine", "sha256:xyz"],
            "invalid digest",
        ),
        (
            &["explain", "--bucket", d, "Not A Name", digest],
            "repository",
        ),
        (
            &["explain", "--bucket", d, "no/such/repo", digest],
            "no repository",
        ),
    ];
    for (args, needle) in cases {
        let o = ocigc(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

async fn distribution_du_and_explain(t: TestStore) {
    let w = common::dist::DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let amd = f.image("a", "amd64").await;
    let idx = f.index("a", OCI_INDEX, &[&amd]).await;
    w.tag("a", "1.0", &idx).await;
    let garbage = f.image("a", "garbage").await;
    let b = f.image("b", "b").await;
    w.tag("b", "latest", &b).await;
    let before = all_keys(t.store.as_ref()).await;
    let layer = amd.subtree[2].clone();
    let asked: Vec<Digest> = [&layer, &garbage.digest]
        .iter()
        .map(|d| Digest::parse(d).expect("digest"))
        .collect();
    let (report, du) = read_only_du(&t, "distribution", &asked).await;
    assert!(du.totals.garbage_bytes >= garbage.size);
    let ex = ExplainReport::of(&report, "a", &asked);
    let l = ex.digests[0].explained.as_ref().expect("layer explained");
    assert_eq!(l.reason, Reason::Reachable);
    assert_eq!(l.path.last(), Some(&format!("layer {layer}")));
    assert!(
        l.path.contains(&format!("manifest {}", amd.digest)),
        "{:?}",
        l.path
    );
    let g = ex.digests[1].explained.as_ref().expect("garbage explained");
    assert_eq!((g.decision, g.reason), ("delete", Reason::Unreferenced));

    // The binary narrows `explain` to the repository and the global unit.
    let (mut args, env) = cli_target(&t);
    args.splice(0..0, ["explain".to_string()]);
    let rest = [
        "--layout",
        "distribution",
        "--report",
        "-",
        "a",
        layer.as_str(),
    ];
    args.extend(rest.iter().map(|s| s.to_string()));
    let o = Command::new(env!("CARGO_BIN_EXE_ocigc"))
        .args(&args)
        .envs(env)
        .env("OCIGC_LOG", "warn")
        .output()
        .expect("run ocigc");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["digests"][0]["reason"], "reachable", "{v}");
    assert_eq!(v["digests"][0]["path"][3], format!("layer {layer}"), "{v}");
    assert_eq!(
        all_keys(t.store.as_ref()).await,
        before,
        "explain changed the bucket"
    );
}

both_stores!(distribution_du_and_explain);

async fn serverless_du_and_explain(t: TestStore) {
    let w = common::serverless::SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let img = f.image("a", "img").await;
    let idx = f.index("a", OCI_INDEX, &[&img]).await;
    w.tag("a", "1.0", &idx).await;
    // Manifests stored by digest are roots there: an orphan layer is the garbage.
    let garbage = f.blob("a", OCI_LAYER, b"orphan layer").await;
    let layer = img.subtree[2].clone();
    let asked: Vec<Digest> = [&layer, &garbage.digest]
        .iter()
        .map(|d| Digest::parse(d).expect("digest"))
        .collect();
    let (report, du) = read_only_du(&t, "serverless-registry", &asked).await;
    assert!(du.totals.garbage_bytes >= garbage.size);
    let a = du.repositories.iter().find(|r| r.name == "a").expect("a");
    assert_eq!(a.tags, 1);
    let ex = ExplainReport::of(&report, "a", &asked);
    let l = ex.digests[0].explained.as_ref().expect("layer explained");
    assert_eq!(l.reason, Reason::Reachable);
    // Every manifest stored by digest is a root of its own there.
    assert_eq!(
        l.path.first().map(String::as_str),
        Some("untagged root"),
        "{:?}",
        l.path
    );
    assert_eq!(l.path[1], format!("manifest {}", img.digest));
    assert_eq!(l.path.last(), Some(&format!("layer {layer}")));
    let g = ex.digests[1].explained.as_ref().expect("garbage explained");
    assert_eq!((g.decision, g.reason), ("delete", Reason::Unreferenced));
    assert_eq!(a.unique_bytes, a.reachable_bytes);

    // Mounted into `b`: `b` reads `a`'s copy, so deleting `a` would not free it.
    w.mount("a", "b", &layer).await;
    let layout = ocigc::layout::by_name("serverless-registry", Default::default()).expect("layout");
    let report = ocigc::gc::run_gc(t.store.clone(), layout, &du_options(eager()))
        .await
        .expect("du run");
    let du = DuReport::of(&report, None);
    let a = du.repositories.iter().find(|r| r.name == "a").expect("a");
    assert_eq!(
        a.reachable_bytes - a.unique_bytes,
        "layer of img".len() as u64,
        "{du:#?}"
    );
}

both_stores!(serverless_du_and_explain);

fn du_row<'d>(du: &'d DuReport, name: &str) -> &'d ocigc::du::DuRepo {
    du.repositories
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("{name} not in {du:#?}"))
}

/// An image of `repo` over `config` and `layers`, with every byte it takes.
async fn image_over(f: &Fixture<'_>, repo: &str, config: &Desc, layers: &[&Desc]) -> (Desc, u64) {
    let m = f.manifest(repo, config, layers, None).await;
    let bytes = m.size + config.size + layers.iter().map(|l| l.size).sum::<u64>();
    (m, bytes)
}

/// Distribution keeps blobs once for every repository: `du` splits them by the repositories
/// whose revisions reach them. Two repositories share a layer and each has one of its own.
async fn distribution_du_splits_global_blobs_by_repository(t: TestStore) {
    let w = common::dist::DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let shared_a = f.blob("a", OCI_LAYER, b"shared base layer").await;
    let shared_b = f.blob("b", OCI_LAYER, b"shared base layer").await;
    assert_eq!(shared_a.digest, shared_b.digest);
    let mut sizes = Vec::new();
    let mut manifests = Vec::new();
    for repo in ["a", "b"] {
        let config = f.blob(repo, OCI_CONFIG, repo.as_bytes()).await;
        let own = f
            .blob(repo, OCI_LAYER, format!("layer only {repo} has").as_bytes())
            .await;
        let (m, bytes) = image_over(&f, repo, &config, &[&shared_a, &own]).await;
        w.tag(repo, "latest", &m).await;
        sizes.push(bytes);
        manifests.push(m);
    }
    let garbage = f.image("a", "garbage").await;
    let layout =
        || ocigc::layout::by_name("distribution", Default::default()).expect("distribution layout");
    let report = ocigc::gc::run_gc(t.store.clone(), layout(), &du_options(eager()))
        .await
        .expect("du run");
    let du = DuReport::of(&report, None);
    assert!(du.all_ok(), "{du:#?}");
    for (i, name) in ["a", "b"].iter().enumerate() {
        let r = du_row(&du, name);
        assert_eq!(r.reachable_bytes, sizes[i], "{name}: {du:#?}");
        assert_eq!(r.unique_bytes, sizes[i] - shared_a.size, "{name}: {du:#?}");
        assert_eq!(r.manifests, 1, "{name}");
    }
    let global = du_row(&du, ocigc::layout::GLOBAL_REPOSITORY);
    assert_eq!(
        global.reachable_bytes,
        sizes[0] + sizes[1] - shared_a.size,
        "each blob once"
    );
    assert!(global.garbage_bytes >= garbage.size);
    assert_eq!(
        global.unique_bytes, 0,
        "its blobs are in the repositories' rows"
    );
    assert_eq!(du.totals.reachable_bytes, global.reachable_bytes);
    assert_eq!(du.totals.manifests, 2);
    assert_eq!(
        du.totals.unique_bytes,
        du.repositories.iter().map(|r| r.unique_bytes).sum::<u64>()
    );
    assert_eq!(
        du.totals.unique_bytes,
        sizes[0] + sizes[1] - 2 * shared_a.size
    );

    // With --delete-untagged an untagged revision of `a` goes first: the global unit's
    // remaining roots must still be credited to the repositories that hold them.
    let untagged = f.image("a", "untagged").await;
    w.untagged("a", &untagged).await;
    let layout = || {
        let opts = ocigc::layout::LayoutOptions {
            delete_untagged: true,
        };
        ocigc::layout::by_name("distribution", opts).expect("distribution layout")
    };
    // The manifest, its config, the shared layer, its own layer.
    let own_b = Digest::parse(&manifests[1].subtree[3]).expect("digest");
    let opts = GcOptions {
        explain: Some(Arc::new(HashSet::from([own_b.clone()]))),
        ..du_options(eager())
    };
    let report = ocigc::gc::run_gc(t.store.clone(), layout(), &opts)
        .await
        .expect("du run");
    let du = DuReport::of(&report, None);
    assert!(du.all_ok(), "{du:#?}");
    for (i, name) in ["a", "b"].iter().enumerate() {
        // Its revision links are its own blobs now, on top of its share of the global ones.
        let links = repo_report(&report, name).reachable.bytes;
        assert!(links > 0, "{name}");
        let r = du_row(&du, name);
        assert_eq!(r.reachable_bytes, links + sizes[i], "{name}: {du:#?}");
        assert_eq!(r.unique_bytes, links + sizes[i] - shared_a.size, "{name}");
        assert_eq!(r.manifests, 1, "{name}");
    }
    let global = repo_report(&report, ocigc::layout::GLOBAL_REPOSITORY);
    let explained = &global.detail.as_ref().expect("detail").explained;
    let e = explained
        .iter()
        .find(|e| e.digest == own_b)
        .expect("explained");
    assert_eq!(
        e.path.first(),
        Some(&format!(
            "root {}",
            common::dist::revision_key("b", &manifests[1].digest)
        )),
        "{:?}",
        e.path
    );

    // A manifest of `b` that retention moved to the trash (its revision link gone): what it
    // alone needs is `b`'s, and the shared layer it also lists stays in neither's unique.
    let config = f.blob("b", OCI_CONFIG, b"trashed config").await;
    let own = f
        .blob("b", OCI_LAYER, b"layer only the trashed image has")
        .await;
    let (trashed, trashed_bytes) = image_over(&f, "b", &config, &[&shared_a, &own]).await;
    let now = t.store.server_time().await.expect("time");
    let entry = ocigc::retention::trash::TrashEntry::new(
        None,
        Digest::parse(&trashed.digest).expect("digest"),
        "retention[0]".into(),
        None,
        now,
        Duration::from_secs(7 * 86400),
    );
    let file = ocigc::retention::trash::TrashFile {
        version: 1,
        entries: vec![entry],
    };
    t.store
        .put(
            &ocigc::namespace::trash_key("b"),
            Bytes::from(serde_json::to_vec(&file).expect("json")),
            PutCondition::None,
        )
        .await
        .expect("trash");
    let plain =
        || ocigc::layout::by_name("distribution", Default::default()).expect("distribution layout");
    let report = ocigc::gc::run_gc(t.store.clone(), plain(), &du_options(eager()))
        .await
        .expect("du run");
    let du = DuReport::of(&report, None);
    assert!(du.all_ok(), "{du:#?}");
    let b = du_row(&du, "b");
    let with_trash = sizes[1] + trashed_bytes - shared_a.size;
    assert_eq!(b.reachable_bytes, with_trash, "{du:#?}");
    assert_eq!(b.unique_bytes, with_trash - shared_a.size, "{du:#?}");
}

/// zot's dedupe: `b` holds a 0-byte placeholder for a layer whose content `a` stores. `a`
/// needs the layer too, but deleting `a` would not free it (`b` reads it): not unique.
async fn oci_placeholder_content_is_not_unique(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let shared = f.blob("a", OCI_LAYER, b"deduplicated layer").await;
    let config_a = f.blob("a", OCI_CONFIG, b"{\"a\":1}").await;
    let own = f.blob("a", OCI_LAYER, b"a's own layer").await;
    let (ma, a_bytes) = image_over(&f, "a", &config_a, &[&shared, &own]).await;
    f.layout("a", &[(Some("latest"), &ma)]).await;
    let config_b = f.blob("b", OCI_CONFIG, b"{\"b\":1}").await;
    f.put(&blob_key("b", &shared.digest), b"").await;
    let (mb, _) = image_over(&f, "b", &config_b, &[&shared]).await;
    f.layout("b", &[(Some("latest"), &mb)]).await;

    let report = gc(&t.store, &du_options(eager())).await;
    let du = DuReport::of(&report, None);
    assert!(du.all_ok(), "{du:#?}");
    let a = du_row(&du, "a");
    assert_eq!(a.reachable_bytes, a_bytes, "{du:#?}");
    assert_eq!(a.unique_bytes, a_bytes - shared.size, "{du:#?}");
    let b = du_row(&du, "b");
    // The placeholder lists as 0 bytes: nothing of the layer is b's to subtract.
    assert_eq!(b.reachable_bytes, mb.size + config_b.size);
    assert_eq!(b.unique_bytes, b.reachable_bytes);
    assert_eq!(du.totals.unique_bytes, a.unique_bytes + b.unique_bytes);
    assert_eq!(
        du.totals.reachable_bytes,
        a.reachable_bytes + b.reachable_bytes
    );

    // A copy its own repository no longer needs, kept only because b's placeholder reads it:
    // `explain` says so.
    f.layout("a", &[]).await;
    let shared_digest = Digest::parse(&shared.digest).expect("digest");
    let opts = GcOptions {
        explain: Some(Arc::new(HashSet::from([shared_digest.clone()]))),
        ..du_options(eager())
    };
    let report = gc(&t.store, &opts).await;
    let ex = ExplainReport::of(&report, "a", std::slice::from_ref(&shared_digest));
    let e = ex.digests[0].explained.as_ref().expect("explained");
    assert_eq!(
        (e.decision, e.reason),
        ("keep", Reason::Reachable),
        "{ex:?}"
    );
    assert_eq!(
        e.path.first().map(String::as_str),
        Some("a placeholder in another repository (its content copy)"),
        "{:?}",
        e.path
    );
    let du = DuReport::of(&report, None);
    assert_eq!(du_row(&du, "a").unique_bytes, 0, "{du:#?}");
}

/// A manifest an index entry with a platform leads to reads `manifest sha256:… (os/arch)`:
/// one extra read of the index for every digest asked about under it, and none for `du`.
async fn explain_names_platforms(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let repo = "multi";
    let arm = f.image(repo, "arm64").await;
    let v7 = f.image(repo, "armv7").await;
    let amd = f.image(repo, "amd64").await;
    let entry = |d: &Desc, platform: Option<serde_json::Value>| {
        let mut e = d.json();
        if let Some(p) = platform {
            e["platform"] = p;
        }
        e
    };
    let doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            entry(&arm, Some(serde_json::json!({"os": "linux", "architecture": "arm64"}))),
            entry(&v7, Some(serde_json::json!(
                {"os": "linux", "architecture": "arm", "variant": "v7"}
            ))),
            entry(&amd, None),
        ],
    });
    let idx = f.doc(repo, OCI_INDEX, &doc, &[&arm, &v7, &amd]).await;
    f.layout(repo, &[(Some("v1"), &idx)]).await;
    let layers: Vec<Digest> = [&arm, &v7, &amd]
        .iter()
        .map(|d| Digest::parse(&d.subtree[2]).expect("digest"))
        .collect();
    let du = gc(&t.store, &du_options(eager())).await;
    let opts = GcOptions {
        explain: Some(Arc::new(layers.iter().cloned().collect::<HashSet<_>>())),
        ..du_options(eager())
    };
    let report = gc(&t.store, &opts).await;
    assert_eq!(
        report.requests.get,
        du.requests.get + 1,
        "one read of the index"
    );
    let ex = ExplainReport::of(&report, repo, &layers);
    let path = |i: usize| {
        ex.digests[i]
            .explained
            .as_ref()
            .expect("explained")
            .path
            .clone()
    };
    assert_eq!(
        path(0),
        vec![
            "tag v1".to_string(),
            format!("index {}", idx.digest),
            format!("manifest {} (linux/arm64)", arm.digest),
            format!("layer {}", layers[0]),
        ]
    );
    assert_eq!(path(1)[2], format!("manifest {} (linux/arm/v7)", v7.digest));
    assert_eq!(
        path(2)[2],
        format!("manifest {}", amd.digest),
        "no platform"
    );
    let v = serde_json::to_value(&ex).expect("json");
    assert_eq!(
        v["digests"][0]["path"][2],
        format!("manifest {} (linux/arm64)", arm.digest),
        "{v}"
    );
}

both_stores!(
    distribution_du_splits_global_blobs_by_repository,
    oci_placeholder_content_is_not_unique,
    explain_names_platforms,
);
