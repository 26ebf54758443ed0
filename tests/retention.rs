//! Retention (issue 11) on every layout and store: each rule clause, ages from when a tag last
//! moved, referrers and fallback tags following their subject, the protect file, the trash
//! (its manifests stay roots until the TTL, then the ordinary GC collects them), restore
//! (never over an existing tag), dry run = real run, a push that moves a tag between the
//! decision and the removal, and the incremental cache never skipping retention.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::dist::*;
use common::serverless::*;
use common::wrap::{Intercept, Wrapped};
use common::*;
use ocigc::gc::{run_gc, GcOptions};
use ocigc::layout::{by_name, Layout, LayoutOptions};
use ocigc::namespace::{tags_seen_key, trash_key};
use ocigc::report::{RepoStatus, Report};
use ocigc::retention::protect::Protected;
use ocigc::retention::restore::{restore, RestoreError, Target};
use ocigc::retention::rules::Rules;
use ocigc::retention::RetentionOptions;
use ocigc::store::{Metadata, PutCondition, PutOutcome, Store, StoreResult};
use serde_json::{json, Value};

const DAY: Duration = Duration::from_secs(86400);

fn layout(name: &str, delete_untagged: bool) -> Arc<dyn Layout> {
    by_name(name, LayoutOptions { delete_untagged }).expect("layout")
}

/// Eager GC options (grace and delay 0) with retention `rules`, `protect` and the clock
/// `days` ahead.
fn opts(rules: Value, protect: &str, days: u64) -> GcOptions {
    GcOptions {
        retention: Arc::new(RetentionOptions {
            rules: Rules::parse(&rules).expect("valid rules"),
            protected: Protected::parse(protect).expect("valid protect file"),
            ..RetentionOptions::default()
        }),
        clock_offset: DAY * days as u32,
        ..eager()
    }
}

async fn run(store: &Arc<dyn Store>, layout: &Arc<dyn Layout>, opts: &GcOptions) -> Report {
    run_gc(store.clone(), layout.clone(), opts)
        .await
        .expect("gc run")
}

/// `tag` (or `@digest`) → "decision rule" for `repo`.
fn decisions(report: &Report, repo: &str) -> BTreeMap<String, String> {
    let r = repo_report(report, repo);
    assert_eq!(r.status, RepoStatus::Ok, "{repo}: {:?}", r.errors);
    let ret = r.retention.as_ref().expect("retention applied");
    ret.tags
        .iter()
        .map(|t| {
            let name = t.tag.clone().unwrap_or_else(|| format!("@{}", t.digest));
            let v = serde_json::to_value(t.decision).expect("json");
            (name, format!("{} {}", v.as_str().unwrap_or("?"), t.rule))
        })
        .collect()
}

fn removed(report: &Report, repo: &str) -> BTreeSet<String> {
    decisions(report, repo)
        .into_iter()
        .filter(|(_, d)| d.starts_with("remove"))
        .map(|(t, _)| t)
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Tags of an `oci` repository (`@digest` for untagged entries) → digest.
async fn oci_tags(store: &dyn Store, repo: &str) -> BTreeMap<String, String> {
    let body = store
        .get(&format!("{repo}/index.json"))
        .await
        .expect("index")
        .body;
    let doc: Value = serde_json::from_slice(&body).expect("json");
    doc["manifests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let d = e["digest"].as_str().unwrap_or("").to_string();
            let t = e["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .map_or_else(|| format!("@{d}"), str::to_string);
            (t, d)
        })
        .collect()
}

/// Adds (or moves) tag `tag` of an `oci` repository to `desc`, as a pusher rewrites
/// `index.json`.
async fn oci_tag(store: &dyn Store, repo: &str, tag: &str, desc: &Desc) {
    let key = format!("{repo}/index.json");
    let mut doc: Value =
        serde_json::from_slice(&store.get(&key).await.expect("index").body).expect("json");
    let list = doc["manifests"].as_array_mut().expect("manifests");
    list.retain(|e| e["annotations"]["org.opencontainers.image.ref.name"] != json!(tag));
    let mut e = desc.json();
    e["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    list.push(e);
    store
        .put(
            &key,
            Bytes::from(serde_json::to_vec(&doc).expect("json")),
            PutCondition::None,
        )
        .await
        .expect("put index");
}

fn sig_tag(subject: &Desc, suffix: &str) -> String {
    format!(
        "sha256-{}{suffix}",
        subject.digest.trim_start_matches("sha256:")
    )
}

async fn now(store: &dyn Store, days: u64) -> std::time::SystemTime {
    store.server_time().await.expect("time") + DAY * days as u32
}

fn target(s: &str) -> Target {
    Target::parse(s).expect("target")
}

/// Every clause on `oci`: keep_tags, keep_semver, older_than, untagged_older_than, the
/// protect file (by tag with a registry host, and by digest), a fallback signature tag removed
/// with its subject, an untagged referrer kept with its subject, a repository no table
/// matches; dry run = real run; the trash keeps every removed image whole; restore, and
/// refusing to overwrite; after the TTL the ordinary GC collects what only the trash kept.
async fn oci_clauses_trash_restore_and_expiry(t: TestStore) {
    let repo = "team/app";
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let latest = f.image(repo, "latest").await;
    let v110 = f.image(repo, "1.1.0").await;
    let v111 = f.image(repo, "1.1.1").await;
    let pr1 = f.image(repo, "pr-1").await;
    let pr2 = f.image(repo, "pr-2").await;
    let old = f.image(repo, "old").await;
    let keepme = f.image(repo, "keepme").await;
    let stale = f.image(repo, "untagged").await;
    let sig = f.referrer(repo, &pr1, "signature of pr-1").await;
    let sbom = f.referrer(repo, &latest, "sbom of latest").await;
    let sig_name = sig_tag(&pr1, ".sig");
    f.layout(
        repo,
        &[
            (Some("latest"), &latest),
            (Some("v1.1.0"), &v110),
            (Some("1.1.1"), &v111),
            (Some("pr-1"), &pr1),
            (Some("pr-2"), &pr2),
            (Some("old"), &old),
            (Some("keepme"), &keepme),
            (None, &stale),
            (Some(&sig_name), &sig),
            (None, &sbom),
        ],
    )
    .await;
    let other = f.image("other/x", "x").await;
    f.layout("other/x", &[(Some("t"), &other)]).await;
    let rules = json!([{
        "repos": ["team/**"], "keep_tags": ["latest"], "older_than": "30d",
        "keep_semver": {"per": "minor", "last": 1}, "untagged_older_than": "7d"
    }]);
    let protect = format!(
        "registry.example.com:5000/team/app:old\nteam/app@{}\n",
        keepme.digest
    );
    let o = opts(rules, &protect, 40);
    let oci = layout("oci", false);

    let before = keys(t.store.as_ref()).await;
    let dry = run(
        &t.store,
        &oci,
        &GcOptions {
            dry_run: true,
            ..o.clone()
        },
    )
    .await;
    assert_eq!(keys(t.store.as_ref()).await, before, "dry run wrote");
    let expected = set(&[
        "v1.1.0",
        "pr-1",
        "pr-2",
        &sig_name,
        &format!("@{}", stale.digest),
    ]);
    assert_eq!(removed(&dry, repo), expected, "{}", t.kind);
    let d = decisions(&dry, repo);
    assert_eq!(d["latest"], "keep keep_tags");
    assert_eq!(d["1.1.1"], "keep keep_semver");
    assert_eq!(d["v1.1.0"], "remove retention[0]");
    assert_eq!(d["old"], "keep protected");
    assert_eq!(d["keepme"], "keep protected");
    assert_eq!(d[&sig_name], "remove subject_removed");
    assert_eq!(d[&format!("@{}", sbom.digest)], "keep referrer");
    assert!(
        repo_report(&dry, "other/x").retention.is_none(),
        "no table matches"
    );

    let real = run(&t.store, &oci, &o).await;
    assert_eq!(removed(&real, repo), expected, "dry run = real run");
    assert_eq!(real.totals.tags_removed, 5);
    let tags = oci_tags(t.store.as_ref(), repo).await;
    let left: BTreeSet<String> = tags.keys().cloned().collect();
    let sbom_entry = format!("@{}", sbom.digest);
    assert_eq!(
        left,
        set(&["latest", "1.1.1", "old", "keepme", &sbom_entry])
    );
    assert_eq!(oci_tags(t.store.as_ref(), "other/x").await.len(), 1);
    // In the trash every removed image is a root: nothing of it was collected.
    let k = keys(t.store.as_ref()).await;
    assert!(
        all_deleted_keys(&real).is_empty(),
        "{:?}",
        all_deleted_keys(&real)
    );
    for (d, what) in [
        (&v110, "v1.1.0"),
        (&pr1, "pr-1"),
        (&pr2, "pr-2"),
        (&stale, "@"),
        (&sig, "sig"),
    ] {
        assert_intact(&k, repo, d, what);
    }
    assert!(k.contains(&trash_key(repo)));
    assert!(dangling(t.store.as_ref()).await.is_empty());

    // Restore: back where it was; not twice; never over a tag pushed since.
    let at = now(t.store.as_ref(), 40).await;
    let back = restore(t.store.as_ref(), oci.as_ref(), &target("team/app:pr-1"), at)
        .await
        .expect("restored");
    assert_eq!(back.to_string(), pr1.digest);
    assert_eq!(oci_tags(t.store.as_ref(), repo).await["pr-1"], pr1.digest);
    assert!(matches!(
        restore(t.store.as_ref(), oci.as_ref(), &target("team/app:pr-1"), at).await,
        Err(RestoreError::NotInTrash(_))
    ));
    oci_tag(t.store.as_ref(), repo, "pr-2", &latest).await;
    let refused = restore(t.store.as_ref(), oci.as_ref(), &target("team/app:pr-2"), at).await;
    assert!(
        matches!(refused, Err(RestoreError::Tag { .. })),
        "{refused:?}"
    );
    assert_eq!(
        oci_tags(t.store.as_ref(), repo).await["pr-2"],
        latest.digest
    );

    // Past the TTL (7 days), without rules: the trash no longer holds anything.
    let expired = run(&t.store, &oci, &opts(json!([]), "", 48)).await;
    assert_eq!(repo_report(&expired, repo).status, RepoStatus::Ok);
    let k = keys(t.store.as_ref()).await;
    assert_gone(&k, repo, &v110, "v1.1.0 after the TTL");
    assert_gone(&k, repo, &stale, "untagged after the TTL");
    for (d, what) in [
        (&pr1, "restored"),
        (&sig, "signature of restored"),
        (&latest, "latest"),
        (&sbom, "sbom"),
        (&v111, "1.1.1"),
        (&old, "old"),
        (&keepme, "keepme"),
    ] {
        assert_intact(&k, repo, d, what);
    }
    assert!(dangling(t.store.as_ref()).await.is_empty());
}

/// `serverless-registry` with `--delete-untagged`: delete_tags and older_than; a protected
/// tag; a cosign signature tag goes with its subject; the trashed manifest (untagged now) and
/// its blobs survive the sweep until the TTL; restore rewrites the tag object.
async fn serverless_trash_keeps_untagged_manifests(t: TestStore) {
    let repo = "team/app";
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let pr1 = f.image(repo, "pr-1").await;
    let pr2 = f.image(repo, "pr-2").await;
    let latest = f.image(repo, "latest").await;
    let sig = f.referrer(repo, &pr1, "cosign").await;
    w.tag(repo, "pr-1", &pr1).await;
    w.tag(repo, "pr-2", &pr2).await;
    w.tag(repo, "latest", &latest).await;
    let sig_name = sig_tag(&pr1, ".sig");
    w.tag(repo, &sig_name, &sig).await;
    let sr = layout("serverless-registry", true);
    let o = opts(
        json!([{"delete_tags": ["pr-.*"], "older_than": "30d"}]),
        "team/app:pr-2",
        40,
    );
    let dry = run(
        &t.store,
        &sr,
        &GcOptions {
            dry_run: true,
            ..o.clone()
        },
    )
    .await;
    let expected = set(&["pr-1", &sig_name]);
    assert_eq!(removed(&dry, repo), expected, "{}", t.kind);
    assert_eq!(decisions(&dry, repo)["latest"], "keep delete_tags");
    assert_eq!(decisions(&dry, repo)["pr-2"], "keep protected");
    let real = run(&t.store, &sr, &o).await;
    assert_eq!(removed(&real, repo), expected);
    let k = keys(t.store.as_ref()).await;
    assert!(!k.contains(&sr_manifest(repo, "pr-1")));
    assert!(!k.contains(&sr_manifest(repo, &sig_name)));
    assert!(k.contains(&sr_manifest(repo, "pr-2")));
    // Untagged now, yet kept: the trash holds them as roots.
    for d in pr1.subtree.iter().chain(&sig.subtree) {
        assert!(
            k.contains(&sr_manifest(repo, d)) || k.contains(&sr_blob(repo, d)),
            "{d} was collected while in the trash"
        );
    }
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
    let at = now(t.store.as_ref(), 40).await;
    restore(t.store.as_ref(), sr.as_ref(), &target("team/app:pr-1"), at)
        .await
        .expect("restored");
    let body = t
        .store
        .get(&sr_manifest(repo, "pr-1"))
        .await
        .expect("tag")
        .body;
    assert_eq!(sha256(&body), pr1.digest);
    assert!(matches!(
        restore(
            t.store.as_ref(),
            sr.as_ref(),
            &target("team/app:latest"),
            at
        )
        .await,
        Err(RestoreError::NotInTrash(_))
    ));
    // Removed again (its signature is still in the trash), then past the TTL: both go.
    let again = run(&t.store, &sr, &o).await;
    assert_eq!(removed(&again, repo), set(&["pr-1"]));
    run(&t.store, &sr, &opts(json!([]), "", 48)).await;
    let k = keys(t.store.as_ref()).await;
    assert!(!k.contains(&sr_manifest(repo, &sig.digest)), "expired");
    assert!(!k.contains(&sr_manifest(repo, &pr1.digest)), "expired");
    assert!(!k.contains(&sr_blob(repo, &pr1.subtree[1])), "expired");
    assert!(k.contains(&sr_manifest(repo, &pr2.digest)), "protected");
    assert!(k.contains(&sr_manifest(repo, &latest.digest)));
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
    // With --delete-untagged, untagged manifests are no roots: the clause warns, removes none.
    let untagged = json!([{"keep_tags": [".*"], "untagged_older_than": "1d"}]);
    let r = run(&t.store, &sr, &opts(untagged, "", 48)).await;
    assert!(removed(&r, repo).is_empty(), "{:?}", decisions(&r, repo));
    let warned = repo_report(&r, repo)
        .warnings
        .iter()
        .any(|w| w.contains("no effect"));
    assert!(warned, "{:?}", repo_report(&r, repo).warnings);
}

/// `distribution` with `--delete-untagged`: the tag directory goes, the revision link and the
/// global blobs stay while in the trash, restore writes the links back, and after the TTL the
/// revision and then the blobs go. Without `--delete-untagged` retention still removes tags.
async fn distribution_tags_trash_and_restore(t: TestStore) {
    let repo = "team/app";
    let w = DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let old = f.image(repo, "old").await;
    let latest = f.image(repo, "latest").await;
    w.tag(repo, "old", &old).await;
    w.tag(repo, "latest", &latest).await;
    let dist = layout("distribution", true);
    let o = opts(
        json!([{"keep_tags": ["latest"], "older_than": "30d"}]),
        "",
        40,
    );
    let dry = run(
        &t.store,
        &dist,
        &GcOptions {
            dry_run: true,
            ..o.clone()
        },
    )
    .await;
    assert_eq!(removed(&dry, repo), set(&["old"]), "{}", t.kind);
    let real = run(&t.store, &dist, &o).await;
    assert_eq!(removed(&real, repo), set(&["old"]));
    let k = keys(t.store.as_ref()).await;
    let tag_dir = format!("{V2}/repositories/{repo}/_manifests/tags/old/");
    assert!(!k.iter().any(|key| key.starts_with(&tag_dir)));
    assert!(
        k.contains(&revision_key(repo, &old.digest)),
        "trashed revision"
    );
    for d in &old.subtree {
        assert!(k.contains(&data_key(d)), "{d} collected while in the trash");
    }
    assert!(dist_dangling(t.store.as_ref()).await.is_empty());
    // A run of this repository alone (the daemon's hook) lists only its own state: the
    // trash must be part of it.
    let hook = GcOptions {
        only: Some(repo.to_string()),
        ..opts(json!([]), "", 40)
    };
    let r = run(&t.store, &dist, &hook).await;
    assert_eq!(repo_report(&r, repo).status, RepoStatus::Ok);
    let k = keys(t.store.as_ref()).await;
    assert!(
        k.contains(&revision_key(repo, &old.digest)),
        "trashed revision, hook run"
    );
    let at = now(t.store.as_ref(), 40).await;
    restore(t.store.as_ref(), dist.as_ref(), &target("team/app:old"), at)
        .await
        .expect("restored");
    assert!(tagged(t.store.as_ref())
        .await
        .contains(&(repo.to_string(), old.digest.clone())));
    // Removed again, then expired: the revision and its blobs go.
    run(&t.store, &dist, &o).await;
    run(&t.store, &dist, &opts(json!([]), "", 48)).await;
    let k = keys(t.store.as_ref()).await;
    assert!(!k.contains(&revision_key(repo, &old.digest)));
    for d in &old.subtree {
        assert!(!k.contains(&data_key(d)), "{d} kept past the TTL");
    }
    for d in &latest.subtree {
        assert!(k.contains(&data_key(d)));
    }
    assert!(dist_dangling(t.store.as_ref()).await.is_empty());

    // The classic layout without --delete-untagged: tags still go (revisions stay roots).
    w.tag(repo, "old2", &latest).await;
    let plain = layout("distribution", false);
    let r = run(
        &t.store,
        &plain,
        &opts(json!([{"delete_tags": ["old2"]}]), "", 40),
    )
    .await;
    assert_eq!(removed(&r, repo), set(&["old2"]));
    let k = keys(t.store.as_ref()).await;
    assert!(!k.contains(&format!(
        "{V2}/repositories/{repo}/_manifests/tags/old2/current/link"
    )));
    assert!(k.contains(&format!(
        "{V2}/repositories/{repo}/_manifests/tags/latest/current/link"
    )));
}

/// `untagged_older_than` on `distribution`: an untagged root revision older than the threshold
/// (and its untagged referrer) goes to the trash and its revision link is deleted; a referrer
/// of a tagged image and the children of a tagged index stay. While in the trash the global
/// sweep keeps every blob of the manifest whose link is gone; restore puts the link back
/// (never over an existing one); after the TTL the ordinary GC collects its blobs. A push
/// that tags an untagged root between the decision and the removal keeps it.
async fn distribution_untagged_older_than(t: TestStore) {
    let repo = "team/app";
    let w = DistWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let latest = f.image(repo, "latest").await;
    let sig = f.referrer(repo, &latest, "latest").await;
    let stale = f.image(repo, "stale").await;
    let stale_sig = f.referrer(repo, &stale, "stale").await;
    let amd = f.image(repo, "amd64").await;
    let arm = f.image(repo, "arm64").await;
    let multi = f.index(repo, OCI_INDEX, &[&amd, &arm]).await;
    w.tag(repo, "latest", &latest).await;
    w.tag(repo, "multi", &multi).await;
    for d in [&sig, &stale, &stale_sig, &amd, &arm] {
        w.untagged(repo, d).await;
    }
    let plain = layout("distribution", false);
    let rules = json!([{"keep_tags": [".*"], "untagged_older_than": "7d"}]);
    let o = opts(rules.clone(), "", 10);
    let gone = set(&[
        &format!("@{}", stale.digest),
        &format!("@{}", stale_sig.digest),
    ]);
    let dry = run(
        &t.store,
        &plain,
        &GcOptions {
            dry_run: true,
            ..o.clone()
        },
    )
    .await;
    assert_eq!(
        removed(&dry, repo),
        gone,
        "{} {:?}",
        t.kind,
        decisions(&dry, repo)
    );
    let d = decisions(&dry, repo);
    assert!(d[&format!("@{}", sig.digest)].starts_with("keep"), "{d:?}");
    for child in [&amd, &arm] {
        assert!(!d.contains_key(&format!("@{}", child.digest)), "{d:?}");
    }
    let k = keys(t.store.as_ref()).await;
    assert!(k.contains(&revision_key(repo, &stale.digest)), "dry run");
    let real = run(&t.store, &plain, &o).await;
    assert_eq!(removed(&real, repo), gone, "{}", t.kind);
    assert!(repo_report(&real, repo).warnings.is_empty());
    let k = keys(t.store.as_ref()).await;
    for d in [&stale, &stale_sig] {
        assert!(!k.contains(&revision_key(repo, &d.digest)), "{}", d.digest);
    }
    for d in [&latest, &sig, &multi, &amd, &arm] {
        assert!(k.contains(&revision_key(repo, &d.digest)), "{}", d.digest);
    }
    // In the trash, its revision link gone: the global sweep must keep all it needs.
    for _ in 0..2 {
        let r = run(&t.store, &plain, &opts(json!([]), "", 10)).await;
        assert!(r.all_ok(), "{r:?}");
    }
    let k = keys(t.store.as_ref()).await;
    for d in stale.subtree.iter().chain(&stale_sig.subtree) {
        assert!(k.contains(&data_key(d)), "{d} collected while in the trash");
    }
    for d in [&latest, &sig, &multi] {
        for b in &d.subtree {
            assert!(k.contains(&data_key(b)), "{b} of a kept image");
        }
    }
    // Restore: the link comes back and the image is whole; never over an existing link.
    let at = now(t.store.as_ref(), 10).await;
    let back = restore(
        t.store.as_ref(),
        plain.as_ref(),
        &target(&format!("{repo}@{}", stale.digest)),
        at,
    )
    .await
    .expect("restored");
    assert_eq!(back.to_string(), stale.digest);
    let link = t
        .store
        .get(&revision_key(repo, &stale.digest))
        .await
        .expect("revision link back");
    assert_eq!(link.body.as_ref(), stale.digest.as_bytes());
    let (reached, missing) = walk(t.store.as_ref(), std::slice::from_ref(&stale.digest)).await;
    assert!(missing.is_empty(), "{missing:?}");
    assert!(reached.contains(&stale.digest));
    w.untagged(repo, &stale_sig).await;
    let refused = restore(
        t.store.as_ref(),
        plain.as_ref(),
        &target(&format!("{repo}@{}", stale_sig.digest)),
        at,
    )
    .await;
    assert!(
        matches!(refused, Err(RestoreError::Tag { .. })),
        "{refused:?}"
    );
    // Removed again, then expired: the ordinary GC collects what only they used.
    let again = run(&t.store, &plain, &o).await;
    assert_eq!(removed(&again, repo), gone);
    run(&t.store, &plain, &opts(json!([]), "", 20)).await;
    run(&t.store, &plain, &opts(json!([]), "", 20)).await;
    let k = keys(t.store.as_ref()).await;
    let kept: BTreeSet<&String> = [&latest, &sig, &multi]
        .iter()
        .flat_map(|d| &d.subtree)
        .collect();
    for d in stale.subtree.iter().chain(&stale_sig.subtree) {
        // (The referrers' empty config is shared with the kept signature.)
        if !kept.contains(d) {
            assert!(!k.contains(&data_key(d)), "{d} kept past the TTL");
        }
    }
    for b in kept {
        assert!(k.contains(&data_key(b)), "{b} of a kept image");
    }
    assert!(dist_dangling(t.store.as_ref()).await.is_empty());

    // A push that tags an untagged root between the decision and the removal: it stays, and
    // its trash entry is taken back.
    let late = f.image(repo, "late").await;
    let late_sig = f.referrer(repo, &late, "late").await;
    w.untagged(repo, &late).await;
    w.untagged(repo, &late_sig).await;
    let digest = late.digest.clone();
    let mover = move |s: Arc<dyn Store>| -> futures::future::BoxFuture<'static, ()> {
        let digest = digest.clone();
        Box::pin(async move {
            s.put(
                &format!("{V2}/repositories/team/app/_manifests/tags/late/current/link"),
                Bytes::from(digest),
                PutCondition::None,
            )
            .await
            .expect("tag pushed");
        })
    };
    let mover = Box::new(mover);
    let late = [&late, &late_sig];
    a_push_meanwhile_keeps_both(&t, &plain, rules, late, mover, &|d| revision_key(repo, d)).await;
}

/// `untagged_older_than` on `serverless-registry` (no `--delete-untagged`): an untagged
/// manifest older than the threshold and its untagged referrer are deleted, their content kept
/// in the trash entry; a referrer of a tagged image and the children of a tagged index stay.
/// While in the trash, marking reads the manifest from the entry (the store has it no more)
/// and keeps every blob it needs; restore writes it back; a tag removed and then its manifest
/// (untagged by then) restores from that content; after the TTL the ordinary GC collects what
/// only they used. A push that tags an untagged manifest between the decision and the removal
/// keeps it.
async fn serverless_untagged_older_than(t: TestStore) {
    let repo = "team/app";
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let latest = f.image(repo, "latest").await;
    let sig = f.referrer(repo, &latest, "latest").await;
    let stale = f.image(repo, "stale").await;
    let stale_sig = f.referrer(repo, &stale, "stale").await;
    let amd = f.image(repo, "amd64").await;
    let arm = f.image(repo, "arm64").await;
    let multi = f.index(repo, OCI_INDEX, &[&amd, &arm]).await;
    let old = f.image(repo, "old").await;
    // Referrers the registry indexed under `_referrers/` whose content names no subject.
    let att = f.image(repo, "attestation of latest").await;
    w.referrer_link(repo, &latest, &att).await;
    let stale_att = f.image(repo, "attestation of stale").await;
    w.referrer_link(repo, &stale, &stale_att).await;
    w.tag(repo, "latest", &latest).await;
    w.tag(repo, "multi", &multi).await;
    w.tag(repo, "old", &old).await;
    let sr = layout("serverless-registry", false);
    let rules = json!([{"delete_tags": ["old"], "untagged_older_than": "7d"}]);
    let o = opts(rules.clone(), "", 10);
    let first = set(&[
        "old",
        &format!("@{}", stale.digest),
        &format!("@{}", stale_sig.digest),
        &format!("@{}", stale_att.digest),
    ]);
    let dry = run(
        &t.store,
        &sr,
        &GcOptions {
            dry_run: true,
            ..o.clone()
        },
    )
    .await;
    let d = decisions(&dry, repo);
    assert_eq!(removed(&dry, repo), first, "{} {d:?}", t.kind);
    assert_eq!(d[&format!("@{}", sig.digest)], "keep referrer", "{d:?}");
    assert_eq!(d[&format!("@{}", att.digest)], "keep referrer", "{d:?}");
    let stale_att_rule = &d[&format!("@{}", stale_att.digest)];
    assert_eq!(stale_att_rule, "remove subject_removed", "{d:?}");
    for child in [&amd, &arm] {
        assert!(!d.contains_key(&format!("@{}", child.digest)), "{d:?}");
    }
    let before = keys(t.store.as_ref()).await;
    assert!(
        before.contains(&sr_manifest(repo, &stale.digest)),
        "dry run"
    );
    let real = run(&t.store, &sr, &o).await;
    assert_eq!(removed(&real, repo), first, "{}", t.kind);
    assert!(repo_report(&real, repo).warnings.is_empty(), "{real:?}");
    let k = keys(t.store.as_ref()).await;
    for d in [&stale, &stale_sig] {
        assert!(!k.contains(&sr_manifest(repo, &d.digest)), "{}", d.digest);
    }
    for d in [&latest, &sig, &multi, &amd, &arm, &old] {
        assert!(k.contains(&sr_manifest(repo, &d.digest)), "{}", d.digest);
    }
    // Untagged now, the tag's manifest goes in the next run (the tag's entry keeps it a root).
    let second = run(&t.store, &sr, &o).await;
    assert_eq!(
        removed(&second, repo),
        set(&[&format!("@{}", old.digest)]),
        "{:?}",
        decisions(&second, repo)
    );
    // In the trash, the manifests deleted: marking must read them from the entries and keep
    // every blob they need, run after run.
    for _ in 0..2 {
        let r = run(&t.store, &sr, &opts(json!([]), "", 10)).await;
        assert!(r.all_ok(), "{r:?}");
    }
    let k = keys(t.store.as_ref()).await;
    for img in [&stale, &stale_sig, &old] {
        assert!(
            !k.contains(&sr_manifest(repo, &img.digest)),
            "{}",
            img.digest
        );
        for b in &img.subtree[1..] {
            assert!(
                k.contains(&sr_blob(repo, b)),
                "{b} collected while in the trash"
            );
        }
    }
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
    // Restore: the manifest comes back byte for byte; never over an existing one.
    let at = now(t.store.as_ref(), 10).await;
    let back = restore(
        t.store.as_ref(),
        sr.as_ref(),
        &target(&format!("{repo}@{}", stale.digest)),
        at,
    )
    .await
    .expect("restored");
    assert_eq!(back.to_string(), stale.digest);
    let body = (t.store.get(&sr_manifest(repo, &stale.digest)).await)
        .expect("manifest back")
        .body;
    assert_eq!(sha256(&body), stale.digest);
    for b in &stale.subtree[1..] {
        assert!(keys(t.store.as_ref()).await.contains(&sr_blob(repo, b)));
    }
    // The tag whose manifest went as an untagged root: both come back from the entry.
    restore(t.store.as_ref(), sr.as_ref(), &target("team/app:old"), at)
        .await
        .expect("tag restored");
    for key in [sr_manifest(repo, "old"), sr_manifest(repo, &old.digest)] {
        let body = t.store.get(&key).await.expect("restored").body;
        assert_eq!(sha256(&body), old.digest, "{key}");
    }
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
    // An untagged manifest pushed again meanwhile: restore refuses to overwrite it.
    let again = run(&t.store, &sr, &opts(rules.clone(), "", 10)).await;
    assert!(removed(&again, repo).contains(&format!("@{}", stale.digest)));
    f.image(repo, "stale").await;
    let refused = restore(
        t.store.as_ref(),
        sr.as_ref(),
        &target(&format!("{repo}@{}", stale.digest)),
        at,
    )
    .await;
    assert!(
        matches!(refused, Err(RestoreError::Tag { .. })),
        "{refused:?}"
    );
    // Removed again (the tag `old` too, then its manifest), then past the TTL: the ordinary
    // GC collects what only they used.
    let third = run(&t.store, &sr, &opts(rules.clone(), "", 10)).await;
    assert!(removed(&third, repo).contains(&format!("@{}", old.digest)));
    run(&t.store, &sr, &opts(json!([]), "", 20)).await;
    run(&t.store, &sr, &opts(json!([]), "", 20)).await;
    let k = keys(t.store.as_ref()).await;
    let kept: BTreeSet<&String> = [&latest, &sig, &multi]
        .iter()
        .flat_map(|d| &d.subtree)
        .collect();
    for d in stale
        .subtree
        .iter()
        .chain(&stale_sig.subtree)
        .chain(&old.subtree)
    {
        if !kept.contains(d) {
            assert!(
                !k.contains(&sr_blob(repo, d)) && !k.contains(&sr_manifest(repo, d)),
                "{d} kept past the TTL"
            );
        }
    }
    for b in kept {
        assert!(
            k.contains(&sr_blob(repo, b)) || k.contains(&sr_manifest(repo, b)),
            "{b} of a kept image"
        );
    }
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());

    // A push that tags an untagged manifest between the decision and the removal: it stays,
    // with its signature, and their trash entries are taken back.
    let late = f.image(repo, "late").await;
    let late_sig = f.referrer(repo, &late, "late").await;
    let digest = late.digest.clone();
    let mover = move |s: Arc<dyn Store>| -> futures::future::BoxFuture<'static, ()> {
        let digest = digest.clone();
        Box::pin(async move {
            let body = s
                .get(&sr_manifest("team/app", &digest))
                .await
                .expect("m")
                .body;
            s.put(&sr_manifest("team/app", "late"), body, PutCondition::None)
                .await
                .expect("tag pushed");
        })
    };
    let mover = Box::new(mover);
    let late = [&late, &late_sig];
    a_push_meanwhile_keeps_both(&t, &sr, rules, late, mover, &|d| sr_manifest(repo, d)).await;
}

/// Mover of [`MoveOnTrash`].
type Mover = Box<dyn Fn(Arc<dyn Store>) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// A push (`mover`) that tags the untagged root `late[0]` of `team/app` between the decision
/// and the removal: it stays, with its signature `late[1]` (both still stored at `stored`),
/// and their trash entries are taken back.
async fn a_push_meanwhile_keeps_both(
    t: &TestStore,
    layout: &Arc<dyn Layout>,
    rules: Value,
    late: [&Desc; 2],
    mover: Mover,
    stored: &dyn Fn(&str) -> String,
) {
    let wrapped: Arc<dyn Store> = Arc::new(Wrapped(MoveOnTrash {
        inner: t.store.clone(),
        moved: AtomicBool::new(false),
        mover,
    }));
    let r = run(&wrapped, layout, &opts(rules, "", 30)).await;
    let d = decisions(&r, "team/app");
    let k = keys(t.store.as_ref()).await;
    for m in late {
        assert_eq!(d[&format!("@{}", m.digest)], "keep moved", "{d:?}");
        assert!(k.contains(&stored(&m.digest)), "{}: {}", t.kind, m.digest);
    }
    let at = now(t.store.as_ref(), 30).await;
    let taken_back = restore(
        t.store.as_ref(),
        layout.as_ref(),
        &target(&format!("team/app@{}", late[0].digest)),
        at,
    )
    .await;
    assert!(
        matches!(taken_back, Err(RestoreError::NotInTrash(_))),
        "{taken_back:?}"
    );
}

/// Moves tag `tag` the first time retention writes the trash (between its decision and the
/// removal), as a concurrent push would.
struct MoveOnTrash {
    inner: Arc<dyn Store>,
    moved: AtomicBool,
    mover: Mover,
}

#[async_trait]
impl Intercept for MoveOnTrash {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        c: PutCondition,
        m: Metadata,
    ) -> StoreResult<PutOutcome> {
        let out = self.inner.put_with_metadata(key, body, c, m).await;
        if key.starts_with("_ocigc/trash/") && !self.moved.swap(true, Ordering::SeqCst) {
            (self.mover)(self.inner.clone()).await;
        }
        out
    }
}

/// A push that moves a tag after retention decided to remove it, before the removal: the
/// moved tag is never removed (oci: `index.json` changed, so it decides again; the other
/// layouts re-read the tag right before deleting it), and its new image is whole.
async fn concurrent_move_is_never_undone(t: TestStore) {
    let repo = "team/app";
    for name in ["oci", "serverless-registry", "distribution"] {
        let store: Arc<dyn Store> = match name {
            "oci" => t.store.clone(),
            "serverless-registry" => Arc::new(SrWriter::new(t.store.clone())),
            _ => Arc::new(DistWriter::new(t.store.clone())),
        };
        let repo = format!("{name}/{repo}");
        let f = Fixture {
            store: store.as_ref(),
        };
        let a = f.image(&repo, "a").await;
        let b = f.image(&repo, "b").await;
        let new = f.image(&repo, "pushed during retention").await;
        let days = match name {
            "oci" => {
                f.layout(&repo, &[(Some("pr-1"), &a), (Some("pr-2"), &b)])
                    .await;
                // ocigc saw both pairs 60 days ago: they are old; a moved tag is new.
                let since = ocigc::report::timestamp(now(store.as_ref(), 0).await - DAY * 60);
                let seen = json!({"version": 1, "untagged": {}, "tags": {
                    "pr-1": {"digest": a.digest, "since": since},
                    "pr-2": {"digest": b.digest, "since": since}}});
                f.put(&tags_seen_key(&repo), seen.to_string().as_bytes())
                    .await;
                0
            }
            "serverless-registry" => {
                let w = SrWriter::new(t.store.clone());
                w.tag(&repo, "pr-1", &a).await;
                w.tag(&repo, "pr-2", &b).await;
                40
            }
            _ => {
                let w = DistWriter::new(t.store.clone());
                w.tag(&repo, "pr-1", &a).await;
                w.tag(&repo, "pr-2", &b).await;
                40
            }
        };
        let (repo2, new2, kind) = (repo.clone(), new.clone(), name);
        let mover = move |s: Arc<dyn Store>| -> futures::future::BoxFuture<'static, ()> {
            let (repo, new) = (repo2.clone(), new2.clone());
            Box::pin(async move {
                match kind {
                    "oci" => oci_tag(s.as_ref(), &repo, "pr-1", &new).await,
                    "serverless-registry" => SrWriter::new(s).tag(&repo, "pr-1", &new).await,
                    _ => DistWriter::new(s).tag(&repo, "pr-1", &new).await,
                }
            })
        };
        let wrapped: Arc<dyn Store> = Arc::new(Wrapped(MoveOnTrash {
            inner: t.store.clone(),
            moved: AtomicBool::new(false),
            mover: Box::new(mover),
        }));
        let o = opts(json!([{"older_than": "30d"}]), "", days);
        let report = run(&wrapped, &layout(name, name != "oci"), &o).await;
        let d = decisions(&report, &repo);
        assert_eq!(d["pr-2"], "remove retention[0]", "{name} {}", t.kind);
        match name {
            // Decided again on the new index.json: the moved tag is young.
            "oci" => assert_eq!(d["pr-1"], "keep older_than", "{name}"),
            _ => assert_eq!(d["pr-1"], "keep moved", "{name}"),
        }
        let now_at = match name {
            "oci" => oci_tags(t.store.as_ref(), &repo).await.get("pr-1").cloned(),
            "serverless-registry" => t
                .store
                .get(&sr_manifest(&repo, "pr-1"))
                .await
                .ok()
                .map(|o| sha256(&o.body)),
            _ => tagged(t.store.as_ref())
                .await
                .into_iter()
                .find(|(r, d)| *r == repo && *d == new.digest)
                .map(|(_, d)| d),
        };
        assert_eq!(
            now_at.as_deref(),
            Some(new.digest.as_str()),
            "{name}: push undone"
        );
        // The moved tag is not in the trash: nothing to restore over the push.
        let trash = ocigc::retention::trash::read(t.store.as_ref(), &repo)
            .await
            .expect("trash");
        let trashed: BTreeSet<_> = trash
            .file
            .entries
            .iter()
            .filter_map(|e| e.tag.clone())
            .collect();
        assert_eq!(trashed, set(&["pr-2"]), "{name}");
    }
    assert!(dangling(t.store.as_ref()).await.is_empty());
    assert!(sr_dangling(t.store.as_ref()).await.is_empty());
    assert!(dist_dangling(t.store.as_ref()).await.is_empty());
}

/// `keep_last` keeps the most recently pushed tags: the manifest's LastModified on `oci`, the
/// tag's on `serverless-registry`. (Pushed oldest first as `c`, `b`, `a`: equal times, as S3's
/// whole seconds give, order by name, which agrees.) Fallback tags are not counted.
async fn keep_last_keeps_the_most_recently_pushed(t: TestStore) {
    let w = SrWriter::new(t.store.clone());
    let sr = Fixture { store: &w };
    let oci = Fixture {
        store: t.store.as_ref(),
    };
    let mut images = Vec::new();
    for name in ["c", "b", "a"] {
        let img = sr.image("sr", name).await;
        w.tag("sr", name, &img).await;
        images.push((name, oci.image("o", name).await));
    }
    let sig = sr.referrer("sr", &sr.image("sr", "x").await, "sig").await;
    w.tag("sr", &sig_tag(&images[2].1, ".sig"), &sig).await;
    let roots: Vec<(Option<&str>, &Desc)> = images.iter().map(|(n, d)| (Some(*n), d)).collect();
    oci.layout("o", &roots).await;
    let rules = json!([{"keep_last": 2}]);
    let r = run(
        &t.store,
        &layout("serverless-registry", false),
        &opts(rules.clone(), "", 1),
    )
    .await;
    assert_eq!(removed(&r, "sr"), set(&["c"]), "{}", t.kind);
    assert_eq!(decisions(&r, "sr")["a"], "keep keep_last");
    let r = run(&t.store, &layout("oci", false), &opts(rules, "", 1)).await;
    assert_eq!(removed(&r, "o"), set(&["c"]), "{}", t.kind);
}

both_stores!(
    keep_last_keeps_the_most_recently_pushed,
    oci_clauses_trash_restore_and_expiry,
    serverless_trash_keeps_untagged_manifests,
    distribution_tags_trash_and_restore,
    distribution_untagged_older_than,
    serverless_untagged_older_than,
    a_concurrent_retention_cannot_hide_a_manifest,
    concurrent_move_is_never_undone,
);

/// Ages on `oci` run from when ocigc first saw a tag→digest pair, or from `index.json`'s
/// LastModified until then: a tag moved since is young again, and a run records the pairs.
#[tokio::test]
async fn oci_ages_run_from_when_a_tag_last_moved() {
    let t = dir_store();
    let repo = "app";
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let a = f.image(repo, "a").await;
    let b = f.image(repo, "b").await;
    let c = f.image(repo, "c").await;
    f.layout(
        repo,
        &[(Some("moved"), &c), (Some("still"), &b), (Some("new"), &a)],
    )
    .await;
    let since = ocigc::report::timestamp(now(t.store.as_ref(), 0).await - DAY * 60);
    let seen = json!({"version": 1, "untagged": {}, "tags": {
        "moved": {"digest": a.digest, "since": since},
        "still": {"digest": b.digest, "since": since}}});
    f.put(&tags_seen_key(repo), seen.to_string().as_bytes())
        .await;
    let o = opts(json!([{"older_than": "30d"}]), "", 0);
    let r = run(&t.store, &layout("oci", false), &o).await;
    let d = decisions(&r, repo);
    assert_eq!(d["still"], "remove retention[0]");
    assert_eq!(d["moved"], "keep older_than", "moved since it was seen");
    assert_eq!(d["new"], "keep older_than", "never seen: index.json's time");
    let age = |tag: &str| {
        let ret = repo_report(&r, repo).retention.clone().expect("retention");
        ret.tags
            .iter()
            .find(|x| x.tag.as_deref() == Some(tag))
            .map(|x| x.age_seconds)
    };
    assert!(age("still").is_some_and(|s| s >= 60 * 86400 - 5));
    assert!(age("moved").is_some_and(|s| s < 3600));
    // The record now holds what stays, with the times first seen.
    let rec: Value = serde_json::from_slice(
        &t.store
            .get(&tags_seen_key(repo))
            .await
            .expect("record")
            .body,
    )
    .expect("json");
    assert_eq!(rec["tags"]["moved"]["digest"], json!(c.digest));
    assert!(rec["tags"].get("still").is_none());
    // Thirty-one days on, the pair first seen by that run is old.
    let later = run(
        &t.store,
        &layout("oci", false),
        &opts(json!([{"older_than": "30d"}]), "", 31),
    )
    .await;
    assert_eq!(removed(&later, repo), set(&["moved", "new"]));
}

/// The incremental cache skips an unchanged repository without a request, but never its
/// retention (time alone makes tags old); a repository with a trash is skipped only while its
/// trash is unchanged and no entry has expired.
#[tokio::test]
async fn the_cache_never_skips_retention() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let a = f.image("app", "a").await;
    f.layout("app", &[(Some("pr-1"), &a)]).await;
    let oci = layout("oci", false);
    run(&t.store, &oci, &eager()).await;
    let quiet = run(&t.store, &oci, &eager()).await;
    assert!(repo_report(&quiet, "app").unchanged, "cached");
    let r = run(
        &t.store,
        &oci,
        &opts(json!([{"older_than": "30d"}]), "", 40),
    )
    .await;
    assert_eq!(removed(&r, "app"), set(&["pr-1"]));
    assert!(!repo_report(&r, "app").unchanged);
    // Its trash is new: the unit is observed (the trash's roots with it) ...
    let again = run(&t.store, &oci, &eager()).await;
    assert!(!repo_report(&again, "app").unchanged);
    assert_intact(&keys(t.store.as_ref()).await, "app", &a, "trashed image");
    // ... then skipped while neither its listing nor its trash changes and nothing expires ...
    let quiet = run(&t.store, &oci, &eager()).await;
    assert!(
        repo_report(&quiet, "app").unchanged,
        "cached with its trash"
    );
    // ... and observed again once the entry expires: the image goes.
    let expired = run(&t.store, &oci, &opts(json!([]), "", 48)).await;
    assert!(!repo_report(&expired, "app").unchanged);
    assert_gone(
        &keys(t.store.as_ref()).await,
        "app",
        &a,
        "expired from the trash",
    );
}

/// The binary: a config file with retention tables (bad ones are exit 2 naming the key), the
/// protect file, the report's per-tag decisions, and `ocigc restore`.
#[tokio::test]
async fn cli_config_protect_report_and_restore() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let a = f.image("team/app", "a").await;
    let b = f.image("team/app", "b").await;
    f.layout("team/app", &[(Some("pr-1"), &a), (Some("prod"), &b)])
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ocigc.toml");
    let protect = dir.path().join("protect.txt");
    let report = dir.path().join("report.json");
    std::fs::write(&protect, "ghcr.io/team/app:prod\n").expect("write");
    let ocigc = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ocigc"))
            .args(args)
            .output()
            .expect("ocigc runs")
    };
    std::fs::write(&config, "[[retention]]\nkeep_tags = [\"(\"]\n").expect("write");
    let bad = ocigc(&[
        "gc",
        "--config",
        config.to_str().unwrap_or(""),
        "--bucket",
        &t.bucket,
    ]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("retention[0].keep_tags[0]"), "{err}");
    std::fs::write(
        &config,
        "grace = \"0s\"\ndelay = \"0s\"\n[[retention]]\nrepos = [\"team/**\"]\nolder_than = \"1d\"\n",
    )
    .expect("write");
    let path = |p: &std::path::Path| p.to_str().unwrap_or("").to_string();
    let gc = ocigc(&[
        "gc",
        "--config",
        &path(&config),
        "--bucket",
        &t.bucket,
        "--protect-file",
        &path(&protect),
        "--report",
        &path(&report),
        "--clock-offset",
        "2d",
    ]);
    assert_eq!(
        gc.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert!(String::from_utf8_lossy(&gc.stderr).contains("removed 1 tags"));
    let json: Value =
        serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    let tags = &json["repositories"][0]["retention"]["tags"];
    assert_eq!(tags[0]["tag"], json!("pr-1"));
    assert_eq!(tags[0]["decision"], json!("remove"));
    assert_eq!(tags[1]["rule"], json!("protected"));
    assert!(tags[0]["age_seconds"]
        .as_u64()
        .is_some_and(|s| s >= 2 * 86400 - 60));
    assert_eq!(json["totals"]["tags_removed"], json!(1));
    let restored = ocigc(&[
        "restore",
        "--bucket",
        &t.bucket,
        "team/app:pr-1",
        "team/app:nope",
    ]);
    assert_eq!(restored.status.code(), Some(3), "one of two restored");
    assert!(String::from_utf8_lossy(&restored.stdout).contains("restored team/app:pr-1"));
    assert_eq!(
        oci_tags(t.store.as_ref(), "team/app").await["pr-1"],
        a.digest
    );
    let usage = ocigc(&["restore", "--bucket", &t.bucket, "team/app"]);
    assert_eq!(usage.status.code(), Some(2));
}

/// Another collector's retention removes an untagged manifest (its first trash entry, then
/// the manifest) after this run listed the bucket and before it reads the roots: the trash is
/// read all the same, and nothing the manifest needs is deleted, even with no grace and no
/// delay.
async fn a_concurrent_retention_cannot_hide_a_manifest(t: TestStore) {
    let repo = "team/app";
    let w = SrWriter::new(t.store.clone());
    let f = Fixture { store: &w };
    let latest = f.image(repo, "latest").await;
    w.tag(repo, "latest", &latest).await;
    let stale = f.image(repo, "stale").await;
    let body = (t.store.get(&sr_manifest(repo, &stale.digest)).await)
        .expect("manifest")
        .body;
    let at = t.store.server_time().await.expect("time");
    let entry = ocigc::retention::trash::TrashEntry::new(
        None,
        ocigc::digest::Digest::parse(&stale.digest).expect("digest"),
        "retention[0]".into(),
        Some(ocigc::layout::inline_manifest_entry(&body)),
        at,
        DAY * 7,
    );
    let file = ocigc::retention::trash::TrashFile {
        version: 1,
        entries: vec![entry],
    };
    let other = OnFirstList {
        inner: t.store.clone(),
        prefix: format!("{repo}/manifests/"),
        done: AtomicBool::new(false),
        trash: Bytes::from(serde_json::to_vec(&file).expect("json")),
        delete: sr_manifest(repo, &stale.digest),
    };
    let wrapped: Arc<dyn Store> = Arc::new(Wrapped(other));
    let r = run(&wrapped, &layout("serverless-registry", false), &eager()).await;
    assert!(r.all_ok(), "{} {r:?}", t.kind);
    let k = keys(t.store.as_ref()).await;
    assert!(
        !k.contains(&sr_manifest(repo, &stale.digest)),
        "the other run removed it"
    );
    for b in &stale.subtree[1..] {
        assert!(
            k.contains(&sr_blob(repo, b)),
            "{}: {b} of a trashed manifest",
            t.kind
        );
    }
}

/// Does what another collector's retention does (trash entry, then delete) the first time
/// `prefix` is listed.
struct OnFirstList {
    inner: Arc<dyn Store>,
    prefix: String,
    done: AtomicBool,
    trash: Bytes,
    delete: String,
}

#[async_trait]
impl Intercept for OnFirstList {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    fn list<'a>(
        &'a self,
        prefix: &'a str,
    ) -> futures::stream::BoxStream<'a, StoreResult<Vec<ocigc::store::ObjectMeta>>> {
        use futures::StreamExt;
        let first = prefix == self.prefix && !self.done.swap(true, Ordering::SeqCst);
        Box::pin(
            futures::stream::once(async move {
                if first {
                    let key = trash_key("team/app");
                    (self
                        .inner
                        .put(&key, self.trash.clone(), PutCondition::None)
                        .await)
                        .expect("trash written");
                    (self
                        .inner
                        .delete_batch(std::slice::from_ref(&self.delete))
                        .await)
                        .expect("manifest deleted");
                }
                self.inner.list(prefix)
            })
            .flatten(),
        )
    }
}

/// A trash that cannot be read leaves the repository's roots unknown: it fails closed and
/// nothing of it is deleted.
#[tokio::test]
async fn an_unreadable_trash_fails_the_repository_closed() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let kept = f.image("app", "kept").await;
    let garbage = f.image("app", "garbage").await;
    f.layout("app", &[(Some("v1"), &kept)]).await;
    f.put(&trash_key("app"), b"{not json").await;
    let r = run(&t.store, &layout("oci", false), &eager()).await;
    let app = repo_report(&r, "app");
    assert_eq!(app.status, RepoStatus::Failed);
    assert!(
        app.errors.iter().any(|e| e.contains("trash")),
        "{:?}",
        app.errors
    );
    assert_intact(
        &keys(t.store.as_ref()).await,
        "app",
        &garbage,
        "unknown roots",
    );
}

/// The daemon reads the protect file again before every run: what the cluster runs changes.
#[test]
fn the_protect_file_is_read_again_and_must_be_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("protect.txt");
    std::fs::write(&path, "team/app:a\n").expect("write");
    let opts = RetentionOptions {
        protected: Protected::load(&path).expect("valid"),
        protect_file: Some(path.clone()),
        ..RetentionOptions::default()
    };
    let d = ocigc::digest::Digest::parse(&sha256(b"x")).expect("digest");
    assert!(opts.protected.protects_tag("team/app", "a", &d));
    std::fs::write(&path, "team/app:b\n").expect("write");
    let fresh = opts.reloaded().expect("reloaded");
    assert!(fresh.protected.protects_tag("team/app", "b", &d));
    assert!(!fresh.protected.protects_tag("team/app", "a", &d));
    std::fs::write(&path, "team//app:1\n").expect("write");
    assert!(opts.reloaded().is_err(), "a broken file stops the run");
    std::fs::remove_file(&path).expect("remove");
    assert!(opts.reloaded().is_err(), "a missing file stops the run");
}

/// Deleting a repository takes its trash and tag record with it: a repository pushed again
/// under the name does not inherit roots whose manifests are gone.
#[tokio::test]
async fn delete_repo_takes_the_trash_with_it() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let a = f.image("app", "a").await;
    f.layout("app", &[(Some("pr-1"), &a)]).await;
    let oci = layout("oci", false);
    let r = run(
        &t.store,
        &oci,
        &opts(json!([{"older_than": "30d"}]), "", 40),
    )
    .await;
    assert_eq!(removed(&r, "app"), set(&["pr-1"]));
    assert!(keys(t.store.as_ref()).await.contains(&trash_key("app")));
    delete(&t.store, &["app"], false).await;
    let k = keys(t.store.as_ref()).await;
    assert!(!k.contains(&trash_key("app")) && !k.contains(&tags_seen_key("app")));
    let b = f.image("app", "b").await;
    f.layout("app", &[(Some("v1"), &b)]).await;
    let again = run(&t.store, &oci, &eager()).await;
    assert_eq!(repo_report(&again, "app").status, RepoStatus::Ok);
}
