//! GC while pushes land (SPEC §3): pushers write images (blobs, a pause, manifest, then
//! `index.json` updated with If-Match), move and drop tags, and reuse layers of images tagged
//! at the time, announcing the reuse with an intent first; two collectors run `gc` in loops
//! with a short grace and delay. No image reachable from any `index.json` may miss a blob,
//! and a final eager run must leave no unreferenced blob. Every loop is bounded.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ocigc::digest::Digest;
use ocigc::gc::{intent, run_gc, GcOptions};
use ocigc::layout::oci::OciLayout;
use ocigc::store::{PutCondition, PutOutcome, Store, StoreError};
use serde_json::{json, Value};

const REPOS: [&str; 3] = ["c/app", "c/app/tools", "c/web"];
const PUSHERS: u64 = 4;
/// Each pusher pushes at least this many images, then goes on (up to the maximum) until the
/// collectors have deleted something, so that deletions certainly overlap pushes.
const MIN_PUSHES_EACH: u64 = 8;
const MAX_PUSHES_EACH: u64 = 60;
const MAX_COLLECTOR_RUNS: u64 = 150;

/// Layer contents by digest, so a pusher can upload a reused layer that has vanished.
type Contents = Arc<Mutex<HashMap<String, Bytes>>>;

struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

async fn put_blob(store: &dyn Store, repo: &str, contents: &Contents, data: Bytes) -> Value {
    let digest = sha256(&data);
    contents
        .lock()
        .expect("contents")
        .insert(digest.clone(), data.clone());
    let size = data.len();
    store
        .put(&blob_key(repo, &digest), data, PutCondition::None)
        .await
        .expect("put blob");
    json!({"mediaType": OCI_LAYER, "digest": digest, "size": size})
}

/// A layer of an image tagged right now in `repo`, if any.
async fn tagged_layer(store: &dyn Store, repo: &str, rng: &mut Rng) -> Option<String> {
    let index = store.get(&format!("{repo}/index.json")).await.ok()?;
    let doc: Value = serde_json::from_slice(&index.body).ok()?;
    let entries = doc["manifests"].as_array()?;
    let pick = entries.get(rng.next(entries.len() as u64) as usize)?;
    let manifest = store
        .get(&blob_key(repo, pick["digest"].as_str()?))
        .await
        .ok()?;
    let m: Value = serde_json::from_slice(&manifest.body).ok()?;
    // The image's own (last) layer: referenced by that image alone unless reused already.
    m["layers"].as_array()?.last()?["digest"]
        .as_str()
        .map(str::to_string)
}

async fn push(
    store: &dyn Store,
    repo: &str,
    tag: &str,
    name: &str,
    contents: &Contents,
    rng: &mut Rng,
) {
    // Reuse a layer of an image tagged at the time: announce it first, then check it exists.
    let reused = tagged_layer(store, repo, rng).await;
    // Think time: the layer's image may be untagged meanwhile, and collected.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut intent_key = None;
    let mut layers = Vec::new();
    if let Some(digest) = &reused {
        let d = Digest::parse(digest).expect("digest");
        let key = intent::begin_reuse(
            store,
            repo,
            &[d],
            Duration::from_secs(600),
            Duration::from_secs(60),
        )
        .await
        .expect("intent");
        intent_key = Some(key);
        let key = blob_key(repo, digest);
        let size = match store.head(&key).await.expect("head") {
            Some(meta) => meta.size,
            None => {
                let data = contents
                    .lock()
                    .expect("contents")
                    .get(digest)
                    .cloned()
                    .expect("known layer");
                let size = data.len() as u64;
                store
                    .put(&key, data, PutCondition::None)
                    .await
                    .expect("re-upload");
                size
            }
        };
        layers.push(json!({"mediaType": OCI_LAYER, "digest": digest, "size": size}));
    }
    let config = put_blob(
        store,
        repo,
        contents,
        Bytes::from(format!("{{\"n\":\"{name}\"}}")),
    )
    .await;
    layers.push(put_blob(store, repo, contents, Bytes::from(format!("layer {name}"))).await);
    // The rest of the build: the blobs sit unreferenced meanwhile, longer than the delay
    // between two observations, shorter than the grace period that protects them.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config["digest"], "size": config["size"]},
        "layers": layers});
    let body = Bytes::from(serde_json::to_vec(&manifest).expect("json"));
    let mdesc = json!({"mediaType": OCI_MANIFEST, "digest": sha256(&body), "size": body.len(),
                       "annotations": {"org.opencontainers.image.ref.name": tag}});
    store
        .put(&blob_key(repo, &sha256(&body)), body, PutCondition::None)
        .await
        .expect("put manifest");
    // Tag it: move `tag` here, sometimes drop another tag; If-Match, retried on conflict.
    let drop_other = rng.next(4) == 0;
    let mut updated = false;
    for _ in 0..100 {
        let current = store
            .get(&format!("{repo}/index.json"))
            .await
            .expect("index");
        let mut doc: Value = serde_json::from_slice(&current.body).expect("index json");
        let mut entries: Vec<Value> = doc["manifests"].as_array().cloned().unwrap_or_default();
        entries.retain(|e| e["annotations"]["org.opencontainers.image.ref.name"] != tag);
        if drop_other && entries.len() > 1 {
            let i = rng.next(entries.len() as u64) as usize;
            entries.remove(i);
        }
        entries.push(mdesc.clone());
        doc["manifests"] = Value::Array(entries);
        let etag = current.etag.expect("etag");
        let body = Bytes::from(serde_json::to_vec(&doc).expect("json"));
        match store
            .put(
                &format!("{repo}/index.json"),
                body,
                PutCondition::IfMatch(etag),
            )
            .await
            .expect("put index")
        {
            PutOutcome::Written { .. } => {
                updated = true;
                break;
            }
            PutOutcome::PreconditionFailed => tokio::task::yield_now().await,
        }
    }
    assert!(updated, "index.json of {repo} kept changing underneath");
    if let Some(key) = intent_key {
        match store.delete_batch(&[key]).await {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => panic!("removing intent: {e}"),
        }
    }
}

async fn pushes_and_collections_race(t: TestStore) {
    let store = t.store.clone();
    let contents: Contents = Arc::default();
    let f = Fixture {
        store: store.as_ref(),
    };
    for repo in REPOS {
        let base = f.image(repo, &format!("{repo} base")).await;
        f.layout(repo, &[(Some("t0"), &base)]).await;
        for d in &base.subtree {
            let body = store.get(&blob_key(repo, d)).await.expect("base blob").body;
            contents.lock().expect("contents").insert(d.clone(), body);
        }
    }

    let done = Arc::new(AtomicBool::new(false));
    let deleted = Arc::new(AtomicU64::new(0));
    let runs = Arc::new(AtomicU64::new(0));
    let conflicts = Arc::new(AtomicU64::new(0));
    let mut collectors = Vec::new();
    for _ in 0..2 {
        let (store, done, deleted, runs, conflicts) = (
            store.clone(),
            done.clone(),
            deleted.clone(),
            runs.clone(),
            conflicts.clone(),
        );
        collectors.push(tokio::spawn(async move {
            let opts = GcOptions {
                grace: Duration::from_millis(1500),
                delay: Duration::from_millis(300),
                concurrency: 4,
                lease_ttl: Duration::from_secs(60),
                // Pushers empty repositories at random; the budget is tested on its own.
                max_delete_fraction: 1.0,
                ..GcOptions::default()
            };
            let (mut dangling_seen, mut named_by_intents) = (0, 0);
            for _ in 0..MAX_COLLECTOR_RUNS {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let r = run_gc(store.clone(), Arc::new(OciLayout), &opts)
                    .await
                    .expect("gc");
                runs.fetch_add(1, Ordering::SeqCst);
                deleted.fetch_add(r.totals.blobs_deleted, Ordering::SeqCst);
                conflicts.fetch_add(r.totals.lease_conflicts, Ordering::SeqCst);
                dangling_seen += r.totals.dangling_references;
                named_by_intents += r
                    .repositories
                    .iter()
                    .flat_map(|repo| &repo.warnings)
                    .filter(|w| w.contains("named by a push intent"))
                    .count();
                // The collectors' schedule: a run every 50 ms.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (dangling_seen, named_by_intents)
        }));
    }
    let pushes = Arc::new(AtomicU64::new(0));
    let mut pushers = Vec::new();
    for p in 0..PUSHERS {
        let (store, contents, deleted, pushes) = (
            store.clone(),
            contents.clone(),
            deleted.clone(),
            pushes.clone(),
        );
        pushers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (p + 1));
            for i in 0..MAX_PUSHES_EACH {
                if i >= MIN_PUSHES_EACH && deleted.load(Ordering::SeqCst) > 0 {
                    break;
                }
                pushes.fetch_add(1, Ordering::SeqCst);
                let repo = REPOS[rng.next(REPOS.len() as u64) as usize];
                let tag = format!("t{}", rng.next(4));
                push(
                    store.as_ref(),
                    repo,
                    &tag,
                    &format!("p{p}-{i}"),
                    &contents,
                    &mut rng,
                )
                .await;
            }
        }));
    }
    for p in pushers {
        p.await.expect("pusher");
    }
    done.store(true, Ordering::SeqCst);
    let (mut reported_dangling, mut named_by_intents) = (0, 0);
    for c in collectors {
        let (reported, named) = c.await.expect("collector");
        reported_dangling += reported;
        named_by_intents += named;
    }
    let broken = dangling(store.as_ref()).await;
    let concurrent_deletes = deleted.load(Ordering::SeqCst);

    // A final eager run leaves exactly the referenced blobs.
    let fin = run_gc(store.clone(), Arc::new(OciLayout), &eager())
        .await
        .expect("final gc");
    let referenced = referenced_blob_keys(store.as_ref()).await;
    let blobs: Vec<String> = keys(store.as_ref())
        .await
        .into_iter()
        .filter(|k| k.contains("/blobs/"))
        .collect();
    let garbage_left: Vec<&String> = blobs.iter().filter(|k| !referenced.contains(*k)).collect();
    let state_left: Vec<String> = keys(store.as_ref())
        .await
        .into_iter()
        .filter(|k| k.starts_with("_ocigc/") && !k.starts_with("_ocigc/cache/"))
        .collect();
    eprintln!(
        "{}: pushes {}, collector runs {}, deleted while pushing {}, lease conflicts {}, \
         dangling references {} (reported by ocigc {}), deleted blobs named by a later intent {}, \
         final run deleted {}, garbage left {}",
        t.kind,
        pushes.load(Ordering::SeqCst),
        runs.load(Ordering::SeqCst),
        concurrent_deletes,
        conflicts.load(Ordering::SeqCst),
        broken.len(),
        reported_dangling,
        named_by_intents,
        fin.totals.blobs_deleted,
        garbage_left.len()
    );
    assert!(broken.is_empty(), "dangling references: {broken:?}");
    assert_eq!(reported_dangling, 0);
    assert!(fin.all_ok(), "{:#?}", fin.repositories);
    assert!(
        garbage_left.is_empty(),
        "unreferenced blobs left: {garbage_left:?}"
    );
    assert!(state_left.is_empty(), "ocigc state left: {state_left:?}");
    assert!(
        runs.load(Ordering::SeqCst) >= 2,
        "collectors did not run during the pushes"
    );
}

both_stores!(pushes_and_collections_race);
