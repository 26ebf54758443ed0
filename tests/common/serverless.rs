//! Writing content in cloudflare/serverless-registry's R2 layout, and an independent checker
//! of what its tags reference.
//!
//! [`SrWriter`] lets the OCI [`Fixture`](super::Fixture) write the layout unchanged: a blob
//! write `<repo>/blobs/<alg>/<hex>` lands at `<repo>/manifests/<alg>:<hex>` when it is a
//! manifest or index (it has `schemaVersion`), else at `<repo>/blobs/<alg>:<hex>`.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use ocigc::store::{DeleteFailure, Metadata, PutCondition, PutOutcome, Store, StoreResult};
use serde_json::Value;

use super::wrap::{Intercept, Wrapped};
use super::{keys, Desc};

pub fn sr_blob(repo: &str, digest: &str) -> String {
    format!("{repo}/blobs/{digest}")
}

pub fn sr_manifest(repo: &str, reference: &str) -> String {
    format!("{repo}/manifests/{reference}")
}

pub struct SrWriter {
    pub inner: Arc<dyn Store>,
}

impl SrWriter {
    /// The writer, usable as a store.
    pub fn new(inner: Arc<dyn Store>) -> Wrapped<SrWriter> {
        Wrapped(SrWriter { inner })
    }

    async fn write(&self, key: &str, data: Bytes) {
        self.inner
            .put(key, data, PutCondition::None)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }

    /// `<repo>/manifests/<tag>`: a full copy of the manifest, as the registry writes it.
    pub async fn tag(&self, repo: &str, tag: &str, desc: &Desc) {
        let body = self
            .inner
            .get(&sr_manifest(repo, &desc.digest))
            .await
            .expect("tagged manifest")
            .body;
        self.write(&sr_manifest(repo, tag), body).await;
    }

    /// A cross-repository mount: `<dest>/blobs/<digest>` names `<src>/blobs/<digest>`.
    pub async fn mount(&self, src: &str, dest: &str, digest: &str) {
        self.write(
            &sr_blob(dest, digest),
            Bytes::from(sr_blob(src, digest).into_bytes()),
        )
        .await;
    }

    /// A referrer recorded by key.
    pub async fn referrer_link(&self, repo: &str, subject: &Desc, referrer: &Desc) {
        self.write(
            &format!("{repo}/_referrers/{}/{}", subject.digest, referrer.digest),
            Bytes::new(),
        )
        .await;
    }
}

#[async_trait]
impl Intercept for SrWriter {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        cond: PutCondition,
        meta: Metadata,
    ) -> StoreResult<PutOutcome> {
        let blob = key
            .split_once("/blobs/")
            .filter(|(_, rest)| rest.matches('/').count() == 1);
        let Some((repo, rest)) = blob else {
            return self.inner.put_with_metadata(key, body, cond, meta).await;
        };
        let digest = rest.replacen('/', ":", 1);
        let is_manifest =
            serde_json::from_slice::<Value>(&body).is_ok_and(|v| v.get("schemaVersion").is_some());
        let target = if is_manifest {
            sr_manifest(repo, &digest)
        } else {
            sr_blob(repo, &digest)
        };
        self.inner
            .put_with_metadata(&target, body, cond, meta)
            .await
    }
}

/// Blobs or manifests that some tag needs and the bucket cannot serve, as "repo: digest".
/// Links are followed to their target, as the registry does on a pull.
pub async fn sr_dangling(store: &dyn Store) -> Vec<String> {
    let all: BTreeSet<String> = keys(store).await;
    let mut missing = Vec::new();
    for key in &all {
        let Some((repo, tag)) = key.split_once("/manifests/") else {
            continue;
        };
        if tag.contains(':') || tag.contains('/') {
            continue;
        }
        let mut stack: Vec<(String, bool)> = Vec::new();
        if let Ok(o) = store.get(key).await {
            push_children(&o.body, &mut stack);
        }
        let mut seen = BTreeSet::new();
        while let Some((digest, is_doc)) = stack.pop() {
            if !seen.insert(digest.clone()) {
                continue;
            }
            let manifest = sr_manifest(repo, &digest);
            let blob = sr_blob(repo, &digest);
            if all.contains(&manifest) {
                if let Ok(o) = store.get(&manifest).await {
                    push_children(&o.body, &mut stack);
                }
            } else if all.contains(&blob) && !is_doc {
                // A link must lead to a blob that is there.
                if let Ok(o) = store.get(&blob).await {
                    let text = String::from_utf8_lossy(&o.body).to_string();
                    if text.contains("/blobs/") && !all.contains(&text) {
                        missing.push(format!("{repo}: {digest} (link to {text})"));
                    }
                }
            } else {
                missing.push(format!("{repo}: {digest}"));
            }
        }
    }
    missing
}

fn push_children(body: &[u8], stack: &mut Vec<(String, bool)>) {
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    for d in doc["manifests"].as_array().into_iter().flatten() {
        if let Some(s) = d["digest"].as_str() {
            stack.push((s.to_string(), true));
        }
    }
    for field in ["layers", "blobs"] {
        for d in doc[field].as_array().into_iter().flatten() {
            if let Some(s) = d["digest"].as_str() {
                stack.push((s.to_string(), false));
            }
        }
    }
    if let Some(s) = doc["config"]["digest"].as_str() {
        stack.push((s.to_string(), false));
    }
    if let Some(s) = doc["subject"]["digest"].as_str() {
        stack.push((s.to_string(), true));
    }
}

/// One write request as [`Recorder`] saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Put { key: String, metadata: Metadata },
    Delete { key: String },
}

/// A store that records the order of its writes (PUTs with their metadata, and each key of a
/// batch delete), to check what the collector writes before and after it deletes.
pub struct Recorder {
    pub inner: Arc<dyn Store>,
    writes: std::sync::Mutex<Vec<Write>>,
}

impl Recorder {
    pub fn new(inner: Arc<dyn Store>) -> Wrapped<Recorder> {
        Wrapped(Recorder {
            inner,
            writes: Default::default(),
        })
    }

    /// Every write so far, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.writes.lock().expect("recorder lock").clone()
    }
}

#[async_trait]
impl Intercept for Recorder {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        cond: PutCondition,
        meta: Metadata,
    ) -> StoreResult<PutOutcome> {
        self.writes.lock().expect("recorder lock").push(Write::Put {
            key: key.to_string(),
            metadata: meta.clone(),
        });
        self.inner.put_with_metadata(key, body, cond, meta).await
    }
    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        self.writes
            .lock()
            .expect("recorder lock")
            .extend(keys.iter().map(|k| Write::Delete { key: k.clone() }));
        self.inner.delete_batch(keys).await
    }
}
