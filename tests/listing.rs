//! Parallel listing against real stores: parts planned by `plan_parts` on buckets shaped like
//! the three layouts are disjoint, cover exactly the plain listing (minus excluded prefixes),
//! keep each repository whole, list in the store's order, and cost about one listing's pages.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::{StreamExt, TryStreamExt};
use ocigc::store::{list_part, plan_parts, Instrumented, Level, Part, SplitPolicy, Store};

/// A prefix is (or may be) a repository, and is never split, when it holds an `oci-layout`
/// object, or a `manifests/` (serverless-registry) or `_manifests/` (distribution) prefix.
struct RepoPolicy;

impl SplitPolicy for RepoPolicy {
    fn may_split(&self, _prefix: &str, level: &Level) -> bool {
        let oci = level
            .objects
            .iter()
            .any(|o| o.key == "oci-layout" || o.key.ends_with("/oci-layout"));
        let manifests = level
            .prefixes
            .iter()
            .any(|p| p.ends_with("/manifests/") || p.ends_with("/_manifests/"));
        !oci && !manifests
    }
}

/// Refuses every split.
struct Never;

impl SplitPolicy for Never {
    fn may_split(&self, _prefix: &str, _level: &Level) -> bool {
        false
    }
}

const EXCLUDE: &[&str] = &["_ocigc/"];

fn digest(i: usize) -> String {
    sha256(format!("blob {i}").as_bytes())
        .trim_start_matches("sha256:")
        .to_string()
}

async fn put_all(t: &TestStore, keys: &[String]) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    futures::stream::iter(keys.iter())
        .for_each_concurrent(16, |k| f.put(k, b"x"))
        .await;
}

/// An `oci` repository: a few blobs, `index.json`, `oci-layout`.
fn oci_repo(keys: &mut Vec<String>, repo: &str, blobs: usize) {
    let at = |k: &str| {
        if repo.is_empty() {
            k.to_string()
        } else {
            format!("{repo}/{k}")
        }
    };
    for i in 0..blobs {
        keys.push(at(&format!("blobs/sha256/{}", digest(i + repo.len()))));
    }
    keys.push(at("index.json"));
    keys.push(at("oci-layout"));
}

/// The store's listing order: bytes, or path components on SeaweedFS.
fn ordered(kind: &str, keys: &[String]) -> bool {
    keys.windows(2).all(|w| {
        if kind == "seaweed" {
            w[0].split('/').lt(w[1].split('/'))
        } else {
            w[0] < w[1]
        }
    })
}

async fn plain_keys(store: &dyn Store) -> Vec<String> {
    let pages: Vec<_> = store.list("").try_collect().await.expect("list");
    pages.into_iter().flatten().map(|o| o.key).collect()
}

/// Lists every part concurrently; returns each part's keys in the order they came.
async fn list_parts(store: &dyn Store, parts: &[Part]) -> Vec<Vec<String>> {
    let listed: Vec<(usize, Vec<String>)> = futures::stream::iter(parts.iter().enumerate())
        .map(|(i, part)| async move {
            let pages: Vec<_> = list_part(store, part).try_collect().await.expect("part");
            assert!(pages.iter().all(|p| p.len() <= 1000));
            (i, pages.into_iter().flatten().map(|o| o.key).collect())
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let mut by_index: BTreeMap<usize, Vec<String>> = listed.into_iter().collect();
    (0..parts.len())
        .map(|i| by_index.remove(&i).unwrap_or_default())
        .collect()
}

fn instrumented(t: &TestStore) -> Instrumented {
    Instrumented::new(Arc::clone(&t.store), 8, Duration::from_secs(60))
}

/// Checks one plan's parts: each key once, in order, inside its part; returns the part of
/// every key.
fn check_parts(
    kind: &str,
    parts: &[Part],
    listed: &[Vec<String>],
    expected: &BTreeSet<String>,
) -> BTreeMap<String, usize> {
    let mut owner = BTreeMap::new();
    for (i, keys) in listed.iter().enumerate() {
        assert!(
            ordered(kind, keys),
            "{kind}: part {:?} out of order",
            parts[i]
        );
        for k in keys {
            assert!(parts[i].contains(k), "{kind}: {k} listed by {:?}", parts[i]);
            if let Some(other) = owner.insert(k.clone(), i) {
                panic!("{kind}: {k} in parts {other} and {i}: {parts:?}");
            }
        }
    }
    let got: BTreeSet<String> = owner.keys().cloned().collect();
    assert_eq!(&got, expected, "{kind}: union of {parts:?}");
    owner
}

/// Plans and lists `root` = "" at several part counts and shard counts.
async fn check_layout(t: &TestStore, policy: &dyn SplitPolicy, repos: &[&str], excluded: bool) {
    let all = plain_keys(t.store.as_ref()).await;
    let expected: BTreeSet<String> = all
        .iter()
        .filter(|k| !excluded || !EXCLUDE.iter().any(|e| k.starts_with(e)))
        .cloned()
        .collect();
    let sequential = instrumented(t);
    plain_keys(&sequential).await;
    let pages = sequential.counts().list;

    for target in [1, 2, 3, 5, 8, 16] {
        let store = instrumented(t);
        let parts = plan_parts(&store, "", policy, target, EXCLUDE, None)
            .await
            .expect("plan");
        let planning = store.counts().list;
        assert!(
            planning <= 2 * target as u64 + 1,
            "{}: {planning} level listings",
            t.kind
        );
        assert!(!parts.is_empty() && parts.len() <= target + 3, "{parts:?}");
        let listed = list_parts(&store, &parts).await;
        let listing = store.counts().list - planning;
        assert!(
            listing <= pages + parts.len() as u64,
            "{}: {listing} LIST requests for {} parts, {pages} sequentially",
            t.kind,
            parts.len()
        );
        let owner = check_parts(t.kind, &parts, &listed, &expected);
        for repo in repos {
            let homes: BTreeSet<usize> = owner
                .iter()
                .filter(|(k, _)| k.starts_with(repo))
                .map(|(_, i)| *i)
                .collect();
            assert_eq!(homes.len(), 1, "{}: {repo} split over {homes:?}", t.kind);
        }
    }

    let unsharded: BTreeSet<String> = expected;
    for count in [2u32, 3, 4] {
        let mut shards = Vec::new();
        for index in 0..count {
            let parts = plan_parts(
                t.store.as_ref(),
                "",
                policy,
                2,
                EXCLUDE,
                Some((index, count)),
            )
            .await
            .expect("plan shard");
            shards.extend(parts);
        }
        let listed = list_parts(t.store.as_ref(), &shards).await;
        check_parts(t.kind, &shards, &listed, &unsharded);
    }
}

/// `oci`: top-level and nested repositories (`team/app/tools` inside `team/app`), names that
/// sort differently by bytes and by tree (`alpine`, `alpine-edge`), one repository of more
/// than a page, and the collector's own state.
async fn oci_buckets(t: TestStore) {
    let mut keys = Vec::new();
    for r in 0..12 {
        oci_repo(&mut keys, &format!("r{r:02}"), 3);
    }
    for repo in [
        "team/app",
        "team/app/tools",
        "team/web",
        "library/alpine",
        "library/alpine-edge",
        "library/alpine0",
    ] {
        oci_repo(&mut keys, repo, 4);
    }
    oci_repo(&mut keys, "big/app", 1005);
    keys.extend([
        "_ocigc/lease/x".to_string(),
        "_ocigc/state.json".to_string(),
    ]);
    put_all(&t, &keys).await;
    let repos = [
        "r00/",
        "r07/",
        "team/app/",
        "team/web/",
        "library/alpine/",
        "library/alpine-edge/",
        "library/alpine0/",
        "big/app/",
    ];
    check_layout(&t, &RepoPolicy, &repos, true).await;
}

/// `oci` with the repository at the bucket root: never split, one part, state included.
async fn oci_root_repository(t: TestStore) {
    let mut keys = Vec::new();
    oci_repo(&mut keys, "", 5);
    keys.push("_ocigc/lease/x".to_string());
    put_all(&t, &keys).await;
    for target in [1, 4] {
        let parts = plan_parts(t.store.as_ref(), "", &RepoPolicy, target, EXCLUDE, None)
            .await
            .expect("plan");
        assert_eq!(
            parts,
            [Part {
                prefix: String::new(),
                after: None,
                before: None
            }]
        );
    }
    check_layout(&t, &RepoPolicy, &[""], false).await;
    let shard = plan_parts(t.store.as_ref(), "", &RepoPolicy, 4, EXCLUDE, Some((1, 2)))
        .await
        .expect("plan");
    assert!(shard.is_empty(), "{shard:?}");
}

/// serverless-registry: `<repo>/{blobs,manifests}/…` plus upload leftovers at the root.
async fn serverless_buckets(t: TestStore) {
    let mut keys = Vec::new();
    for repo in ["alpha", "beta", "team/app", "team/app-x", "team/db", "zeta"] {
        for i in 0..3 {
            keys.push(format!("{repo}/blobs/sha256:{}", digest(i)));
        }
        keys.push(format!("{repo}/manifests/latest"));
        keys.push(format!("{repo}/manifests/sha256:{}", digest(9)));
    }
    keys.extend(
        ["upload-1", "upload-2.tmp", "_ocigc/x"]
            .iter()
            .map(|k| k.to_string()),
    );
    put_all(&t, &keys).await;
    let repos = [
        "alpha/",
        "beta/",
        "team/app/",
        "team/app-x/",
        "team/db/",
        "zeta/",
    ];
    check_layout(&t, &RepoPolicy, &repos, true).await;
}

/// distribution: `docker/registry/v2/{blobs,repositories}/…`.
async fn distribution_buckets(t: TestStore) {
    let v2 = "docker/registry/v2";
    let mut keys = Vec::new();
    for i in 0..24 {
        let d = digest(i);
        keys.push(format!("{v2}/blobs/sha256/{}/{d}/data", &d[..2]));
    }
    for repo in [
        "library/alpine",
        "library/nginx",
        "team/app",
        "team/app/tools",
    ] {
        let r = format!("{v2}/repositories/{repo}");
        keys.push(format!("{r}/_layers/sha256/{}/link", digest(1)));
        keys.push(format!(
            "{r}/_manifests/revisions/sha256/{}/link",
            digest(2)
        ));
        keys.push(format!("{r}/_manifests/tags/latest/current/link"));
    }
    keys.push("_ocigc/state.json".to_string());
    put_all(&t, &keys).await;
    let repos = [
        "docker/registry/v2/repositories/library/alpine/",
        "docker/registry/v2/repositories/library/nginx/",
        "docker/registry/v2/repositories/team/app/",
    ];
    check_layout(&t, &RepoPolicy, &repos, true).await;
}

/// A policy that refuses every split keeps the whole root in one part.
async fn refusing_policy_keeps_one_part(t: TestStore) {
    let mut keys = Vec::new();
    for r in ["a", "b", "c"] {
        oci_repo(&mut keys, r, 2);
    }
    put_all(&t, &keys).await;
    let parts = plan_parts(t.store.as_ref(), "", &Never, 8, EXCLUDE, None)
        .await
        .expect("plan");
    assert_eq!(parts.len(), 1, "{parts:?}");
    let listed = list_parts(t.store.as_ref(), &parts).await;
    let all: BTreeSet<String> = keys.into_iter().collect();
    check_parts(t.kind, &parts, &listed, &all);
}

/// A root below the bucket's top: parts stay under it, and `list_part` stops at `before`
/// without asking for the pages after it.
async fn parts_under_a_root(t: TestStore) {
    let mut keys = Vec::new();
    for r in 0..6 {
        oci_repo(&mut keys, &format!("org/r{r}"), 1);
    }
    oci_repo(&mut keys, "org/r3/huge", 0);
    for i in 0..1500 {
        keys.push(format!("org/r3/blobs/sha256/{i:05}"));
    }
    oci_repo(&mut keys, "other", 1);
    put_all(&t, &keys).await;
    let store = instrumented(&t);
    let parts = plan_parts(&store, "org/", &RepoPolicy, 6, EXCLUDE, None)
        .await
        .expect("plan");
    assert_eq!(parts.len(), 6, "{parts:?}");
    let listed = list_parts(t.store.as_ref(), &parts).await;
    let expected: BTreeSet<String> = keys
        .iter()
        .filter(|k| k.starts_with("org/"))
        .cloned()
        .collect();
    check_parts(t.kind, &parts, &listed, &expected);
    // The part of org/r2 ends before org/r3's 1500 keys: one page, not three.
    let r2 = parts
        .iter()
        .find(|p| p.contains("org/r2/index.json"))
        .expect("a part for org/r2");
    let before = store.counts().list;
    let pages: Vec<_> = list_part(&store, r2).try_collect().await.expect("part");
    assert_eq!(pages.len(), 1);
    assert_eq!(store.counts().list - before, 1);
}

both_stores!(
    oci_buckets,
    oci_root_repository,
    serverless_buckets,
    distribution_buckets,
    refusing_policy_keeps_one_part,
    parts_under_a_root,
);

/// Parts listed concurrently under one concurrency bound add up to the plain listing.
#[tokio::test]
async fn concurrent_parts_add_up_to_the_listing() {
    let t = dir_store();
    let mut keys = Vec::new();
    for r in 0..40 {
        oci_repo(&mut keys, &format!("repo{r:02}"), 5);
    }
    put_all(&t, &keys).await;
    let store = Instrumented::new(Arc::clone(&t.store), 2, Duration::from_secs(60));
    let parts = plan_parts(&store, "", &RepoPolicy, 8, EXCLUDE, None)
        .await
        .expect("plan");
    assert_eq!(parts.len(), 8);
    let union: Vec<String> = futures::stream::iter(parts.iter())
        .map(|p| list_part(&store, p).try_concat())
        .buffer_unordered(8)
        .map_ok(|page| page.into_iter().map(|o| o.key).collect::<Vec<_>>())
        .try_concat()
        .await
        .expect("parts");
    let mut union = union;
    union.sort();
    keys.sort();
    assert_eq!(union, keys);
}
