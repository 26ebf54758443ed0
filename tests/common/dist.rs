//! Writing content in the classic registry's layout (`docker/registry/v2/`), and an
//! independent checker of what its tags and revisions reference.
//!
//! [`DistWriter`] lets the OCI [`Fixture`](super::Fixture) write distribution data unchanged:
//! every `<repo>/blobs/<alg>/<hex>` it writes lands in the global blob store, with the
//! repository's `_layers` link, as the registry does on upload.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use ocigc::store::{Metadata, PutCondition, PutOutcome, Store, StoreResult};
use serde_json::Value;

use super::wrap::{Intercept, Wrapped};
use super::{keys, Desc};

pub const V2: &str = "docker/registry/v2";

/// The global key of a blob's content.
pub fn data_key(digest: &str) -> String {
    let (alg, hex) = digest.split_once(':').expect("digest");
    format!("{V2}/blobs/{alg}/{}/{hex}/data", &hex[..2])
}

fn link(repo: &str, path: &str, digest: &str) -> String {
    let (alg, hex) = digest.split_once(':').expect("digest");
    format!("{V2}/repositories/{repo}/{path}/{alg}/{hex}/link")
}

/// The revision link of a manifest in a repository.
pub fn revision_key(repo: &str, digest: &str) -> String {
    link(repo, "_manifests/revisions", digest)
}

/// Maps the OCI fixture's blob writes onto the distribution layout.
pub struct DistWriter {
    pub inner: Arc<dyn Store>,
}

impl DistWriter {
    /// The writer, usable as a store.
    pub fn new(inner: Arc<dyn Store>) -> Wrapped<DistWriter> {
        Wrapped(DistWriter { inner })
    }

    async fn write(&self, key: &str, data: &[u8]) {
        self.inner
            .put(key, Bytes::copy_from_slice(data), PutCondition::None)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }

    /// Tags `desc` in `repo`: revision link, current tag link and tag index entry.
    pub async fn tag(&self, repo: &str, tag: &str, desc: &Desc) {
        self.untagged(repo, desc).await;
        let d = desc.digest.as_bytes();
        self.write(
            &format!("{V2}/repositories/{repo}/_manifests/tags/{tag}/current/link"),
            d,
        )
        .await;
        self.write(
            &link(repo, &format!("_manifests/tags/{tag}/index"), &desc.digest),
            d,
        )
        .await;
    }

    /// A manifest revision with no tag.
    pub async fn untagged(&self, repo: &str, desc: &Desc) {
        self.write(&revision_key(repo, &desc.digest), desc.digest.as_bytes())
            .await;
    }
}

#[async_trait]
impl Intercept for DistWriter {
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
            .filter(|(repo, rest)| !repo.starts_with(V2) && rest.matches('/').count() == 1);
        let Some((repo, rest)) = blob else {
            return self.inner.put_with_metadata(key, body, cond, meta).await;
        };
        let digest = rest.replacen('/', ":", 1);
        self.inner
            .put(
                &link(repo, "_layers", &digest),
                Bytes::from(digest.clone()),
                PutCondition::None,
            )
            .await?;
        self.inner
            .put_with_metadata(&data_key(&digest), body, cond, meta)
            .await
    }
}

/// The manifests each repository's tags point at, as `(repo, digest)`.
pub async fn tagged(store: &dyn Store) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for k in keys(store).await {
        let Some(rest) = k.strip_prefix(&format!("{V2}/repositories/")) else {
            continue;
        };
        let Some((repo, tail)) = rest.split_once("/_manifests/tags/") else {
            continue;
        };
        if tail.ends_with("/current/link") {
            if let Ok(o) = store.get(&k).await {
                out.push((repo.to_string(), String::from_utf8_lossy(&o.body).into()));
            }
        }
    }
    out
}

/// Every digest reachable from `roots` through the global blobs (independent walker), and
/// those of them that are missing.
pub async fn walk(store: &dyn Store, roots: &[String]) -> (BTreeSet<String>, Vec<String>) {
    let all = keys(store).await;
    let mut seen = BTreeSet::new();
    let mut missing = Vec::new();
    let mut stack: Vec<String> = roots.to_vec();
    while let Some(digest) = stack.pop() {
        if !seen.insert(digest.clone()) {
            continue;
        }
        let key = data_key(&digest);
        if !all.contains(&key) {
            missing.push(digest);
            continue;
        }
        let Ok(body) = store.get(&key).await else {
            continue;
        };
        let Ok(doc) = serde_json::from_slice::<Value>(&body.body) else {
            continue;
        };
        let mut descs: Vec<Value> = Vec::new();
        for field in ["manifests", "layers", "blobs"] {
            descs.extend(doc[field].as_array().cloned().unwrap_or_default());
        }
        for field in ["config", "subject"] {
            if doc[field].is_object() {
                descs.push(doc[field].clone());
            }
        }
        stack.extend(
            descs
                .iter()
                .filter_map(|d| d["digest"].as_str().map(str::to_string)),
        );
    }
    (seen, missing)
}

/// Blobs that some tag needs but the bucket no longer holds, as "repo: digest".
pub async fn dist_dangling(store: &dyn Store) -> Vec<String> {
    let mut out = Vec::new();
    for (repo, digest) in tagged(store).await {
        let (_, missing) = walk(store, &[digest]).await;
        out.extend(missing.into_iter().map(|m| format!("{repo}: {m}")));
    }
    out
}
