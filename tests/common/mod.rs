//! Helpers shared by the integration tests: stores (directory, moto S3 and SeaweedFS S3), a
//! writer of real OCI content, and a way to run one scenario against every store.
#![allow(dead_code)]

pub mod dist;
pub mod hooked;
pub mod serverless;
pub mod wrap;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use ocigc::gc::{delete_repositories, run_gc, DeleteRepoOptions, GcOptions, RepoFilter};
use ocigc::layout::oci::OciLayout;
use ocigc::report::Report;
use ocigc::store::{DirStore, PutCondition, S3Settings, S3Store, StaticCredentials, Store};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Repositories that collide by prefix or nest.
pub const NEIGHBOURS: [&str; 4] = [
    "library/alpine",
    "library/alpine-edge",
    "team/app",
    "team/app/tools",
];

/// A store under test; keeps its temporary directory alive.
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub kind: &'static str,
    pub bucket: String,
    _dir: Option<tempfile::TempDir>,
}

pub fn dir_store() -> TestStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = DirStore::open(dir.path()).expect("open dir store");
    TestStore {
        store: Arc::new(store),
        kind: "dir",
        bucket: dir.path().display().to_string(),
        _dir: Some(dir),
    }
}

/// The moto endpoint started by scripts/test.sh.
pub fn s3_endpoint() -> String {
    std::env::var("OCIGC_TEST_S3_ENDPOINT").expect(
        "OCIGC_TEST_S3_ENDPOINT is not set: run the suite with ./scripts/test.sh, which starts moto",
    )
}

/// The SeaweedFS S3 endpoint started by scripts/test.sh.
pub fn seaweed_endpoint() -> String {
    std::env::var("OCIGC_TEST_SEAWEED_ENDPOINT").expect(
        "OCIGC_TEST_SEAWEED_ENDPOINT is not set: run the suite with ./scripts/test.sh, which \
         starts SeaweedFS",
    )
}

/// Settings for a bucket on moto.
pub fn s3_settings(bucket: &str, prefix: &str) -> S3Settings {
    s3_settings_at(&s3_endpoint(), bucket, prefix)
}

/// Settings for a bucket on any of the test S3 servers.
pub fn s3_settings_at(endpoint: &str, bucket: &str, prefix: &str) -> S3Settings {
    S3Settings {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        endpoint: Some(endpoint.to_string()),
        region: Some("us-east-1".into()),
        path_style: true,
        credentials: Some(StaticCredentials {
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
            session_token: None,
        }),
        connect_timeout: Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(30),
        max_attempts: 3,
    }
}

impl TestStore {
    /// The S3 endpoint of a bucket store, `None` for a directory.
    pub fn endpoint(&self) -> Option<String> {
        match self.kind {
            "s3" => Some(s3_endpoint()),
            "seaweed" => Some(seaweed_endpoint()),
            _ => None,
        }
    }
}

/// A fresh, empty bucket on the S3 server of `kind` ("s3" is moto, "seaweed" SeaweedFS).
async fn bucket_store(kind: &'static str, endpoint: &str, prefix: &str) -> TestStore {
    let bucket = format!("t-{}", uuid::Uuid::new_v4().simple());
    let store = S3Store::connect(s3_settings_at(endpoint, &bucket, prefix)).await;
    store
        .client()
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create bucket on {kind} at {endpoint}: {e:?}"));
    TestStore {
        store: Arc::new(store),
        kind,
        bucket,
        _dir: None,
    }
}

/// A fresh, empty bucket on moto whose store sees only keys under `prefix`.
pub async fn s3_store_with_prefix(prefix: &str) -> TestStore {
    bucket_store("s3", &s3_endpoint(), prefix).await
}

/// A fresh, empty bucket on moto.
pub async fn s3_store() -> TestStore {
    s3_store_with_prefix("").await
}

/// A fresh, empty bucket on SeaweedFS whose store sees only keys under `prefix`.
pub async fn seaweed_store_with_prefix(prefix: &str) -> TestStore {
    bucket_store("seaweed", &seaweed_endpoint(), prefix).await
}

/// A fresh, empty bucket on SeaweedFS.
pub async fn seaweed_store() -> TestStore {
    seaweed_store_with_prefix("").await
}

/// Runs one scenario against every store kind (directory, moto, SeaweedFS).
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn dir() {
                super::$name($crate::common::dir_store()).await
            }
            #[tokio::test]
            async fn s3() {
                super::$name($crate::common::s3_store().await).await
            }
            #[tokio::test]
            async fn seaweed() {
                super::$name($crate::common::seaweed_store().await).await
            }
        }
    )*};
}

pub fn sha256(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A descriptor written by the fixture, plus every digest of its subtree.
#[derive(Clone, Debug)]
pub struct Desc {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    pub subtree: Vec<String>,
}

impl Desc {
    pub fn json(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// Writes OCI content into a store.
pub struct Fixture<'a> {
    pub store: &'a dyn Store,
}

pub fn blob_key(repo: &str, digest: &str) -> String {
    format!("{repo}/blobs/{}", digest.replacen(':', "/", 1))
}

impl Fixture<'_> {
    pub async fn put(&self, key: &str, data: &[u8]) {
        self.store
            .put(key, Bytes::copy_from_slice(data), PutCondition::None)
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
    }

    /// A blob with a given media type.
    pub async fn blob(&self, repo: &str, media_type: &str, data: &[u8]) -> Desc {
        let digest = sha256(data);
        self.put(&blob_key(repo, &digest), data).await;
        Desc {
            media_type: media_type.into(),
            digest: digest.clone(),
            size: data.len() as u64,
            subtree: vec![digest],
        }
    }

    /// A JSON document stored as a blob; its subtree includes the given children.
    pub async fn doc(&self, repo: &str, media_type: &str, doc: &Value, children: &[&Desc]) -> Desc {
        let bytes = serde_json::to_vec(doc).expect("json");
        let mut d = self.blob(repo, media_type, &bytes).await;
        for c in children {
            d.subtree.extend(c.subtree.iter().cloned());
        }
        d
    }

    /// An OCI image (config + one layer + manifest) named `name`.
    pub async fn image(&self, repo: &str, name: &str) -> Desc {
        let config = self
            .blob(
                repo,
                OCI_CONFIG,
                format!("{{\"name\":\"{name}\"}}").as_bytes(),
            )
            .await;
        let layer = self
            .blob(repo, OCI_LAYER, format!("layer of {name}").as_bytes())
            .await;
        self.manifest(repo, &config, &[&layer], None).await
    }

    /// An OCI image manifest with the given config and layers, optionally a referrer.
    pub async fn manifest(
        &self,
        repo: &str,
        config: &Desc,
        layers: &[&Desc],
        subject: Option<&Desc>,
    ) -> Desc {
        let mut m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.json(),
            "layers": layers.iter().map(|l| l.json()).collect::<Vec<_>>(),
        });
        if let Some(s) = subject {
            m["subject"] = s.json();
            m["artifactType"] = json!("application/vnd.example.sig");
        }
        let mut children = vec![config];
        children.extend_from_slice(layers);
        self.doc(repo, OCI_MANIFEST, &m, &children).await
    }

    /// A signature-like referrer of `subject`, stored only as blobs.
    pub async fn referrer(&self, repo: &str, subject: &Desc, name: &str) -> Desc {
        let config = self
            .blob(repo, "application/vnd.oci.empty.v1+json", b"{}")
            .await;
        let payload = self
            .blob(
                repo,
                "application/vnd.example.sig.v1",
                format!("signature {name}").as_bytes(),
            )
            .await;
        self.manifest(repo, &config, &[&payload], Some(subject))
            .await
    }

    /// An image index (OCI or Docker list) over `children`.
    pub async fn index(&self, repo: &str, media_type: &str, children: &[&Desc]) -> Desc {
        let doc = json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": children.iter().map(|c| c.json()).collect::<Vec<_>>(),
        });
        self.doc(repo, media_type, &doc, children).await
    }

    /// Four repositories whose names collide by prefix or nest (`library/alpine` and
    /// `library/alpine-edge`, `team/app` and `team/app/tools`), each with one tagged image and
    /// one garbage image. Returns (repository, kept image, garbage image).
    pub async fn neighbours(&self) -> Vec<(&'static str, Desc, Desc)> {
        let mut out = Vec::new();
        for repo in NEIGHBOURS {
            let img = self.image(repo, repo).await;
            self.layout(repo, &[(Some("latest"), &img)]).await;
            let garbage = self.image(repo, &format!("{repo} garbage")).await;
            out.push((repo, img, garbage));
        }
        out
    }

    /// `oci-layout` and `index.json` listing `roots` (with an optional tag each).
    pub async fn layout(&self, repo: &str, roots: &[(Option<&str>, &Desc)]) {
        self.put(
            &format!("{repo}/oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .await;
        let manifests: Vec<Value> = roots
            .iter()
            .map(|(tag, d)| {
                let mut v = d.json();
                if let Some(t) = tag {
                    v["annotations"] = json!({"org.opencontainers.image.ref.name": t});
                }
                v
            })
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        self.put(
            &format!("{repo}/index.json"),
            &serde_json::to_vec(&index).expect("json"),
        )
        .await;
    }
}

/// Every key in the store (state included).
/// Every key of the bucket, the incremental cache's included.
pub async fn all_keys(store: &dyn Store) -> BTreeSet<String> {
    let pages: Vec<_> = store.list("").try_collect().await.expect("list");
    pages.into_iter().flatten().map(|o| o.key).collect()
}

/// Every key of the bucket but the incremental cache's (ocigc's memory between runs, which
/// the scenarios do not count as content or as state left behind).
pub async fn keys(store: &dyn Store) -> BTreeSet<String> {
    let pages: Vec<_> = store.list("").try_collect().await.expect("list");
    pages
        .into_iter()
        .flatten()
        .map(|o| o.key)
        .filter(|k| !k.starts_with("_ocigc/cache/"))
        .collect()
}

/// Options for a first observation (`--delay 1h`, no incremental cache), real or dry.
pub fn first_observation(dry_run: bool) -> GcOptions {
    GcOptions {
        dry_run,
        delay: Duration::from_secs(3600),
        no_cache: true,
        ..eager()
    }
}

/// Options for a run that deletes unreferenced blobs immediately.
pub fn eager() -> GcOptions {
    GcOptions {
        grace: Duration::ZERO,
        delay: Duration::ZERO,
        concurrency: 8,
        request_timeout: Duration::from_secs(60),
        // The scenarios test what is deleted, and many make a repository all garbage on
        // purpose: the blast-radius budget has its own tests (tests/budget.rs).
        max_delete_fraction: 1.0,
        ..GcOptions::default()
    }
}

pub fn only(globs: &[&str]) -> RepoFilter {
    RepoFilter::new(&globs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("globs")
}

/// Options for `delete-repo` in the tests: eight requests in flight, a ten-minute lease.
pub fn delete_options(dry_run: bool) -> DeleteRepoOptions {
    DeleteRepoOptions {
        dry_run,
        concurrency: 8,
        request_timeout: Duration::from_secs(60),
        lease_ttl: Duration::from_secs(600),
        clock_offset: Duration::ZERO,
        metrics: None,
        rate_limit: None,
    }
}

/// Deletes repositories of the `oci` layout.
pub async fn delete(store: &Arc<dyn Store>, names: &[&str], dry_run: bool) -> Report {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    delete_repositories(
        store.clone(),
        Arc::new(OciLayout),
        &names,
        &delete_options(dry_run),
    )
    .await
    .expect("delete-repo run")
}

pub async fn gc(store: &Arc<dyn Store>, opts: &GcOptions) -> Report {
    run_gc(store.clone(), Arc::new(OciLayout), opts)
        .await
        .expect("gc run")
}

/// Asserts that every digest of `desc` is stored in `repo`.
pub fn assert_intact(keys: &BTreeSet<String>, repo: &str, desc: &Desc, what: &str) {
    for d in &desc.subtree {
        assert!(
            keys.contains(&blob_key(repo, d)),
            "{what}: blob {d} of {repo} was deleted"
        );
    }
}

/// Asserts that no digest of `desc` is stored in `repo`.
pub fn assert_gone(keys: &BTreeSet<String>, repo: &str, desc: &Desc, what: &str) {
    for d in &desc.subtree {
        assert!(
            !keys.contains(&blob_key(repo, d)),
            "{what}: blob {d} of {repo} should have been deleted"
        );
    }
}

/// Deleted keys of every repository in a report.
pub fn all_deleted_keys(report: &Report) -> BTreeSet<String> {
    report
        .repositories
        .iter()
        .flat_map(|r| r.deleted.iter().map(|d| d.key.clone()))
        .collect()
}

/// Runs `gc` as a dry run and then for real (both eager) and asserts that the dry run left the
/// bucket alone, both runs planned the same keys, and those are exactly the keys that left the
/// bucket. Returns them.
pub async fn dry_run_equals_real<F, Fut>(store: &dyn Store, gc: F) -> BTreeSet<String>
where
    F: Fn(GcOptions) -> Fut,
    Fut: std::future::Future<Output = Report>,
{
    let before = keys(store).await;
    let dry = gc(GcOptions {
        dry_run: true,
        ..eager()
    })
    .await;
    assert!(dry.dry_run);
    assert_eq!(keys(store).await, before, "dry run changed the bucket");
    let real = gc(eager()).await;
    let removed: BTreeSet<String> = before.difference(&keys(store).await).cloned().collect();
    let planned = all_deleted_keys(&dry);
    assert_eq!(
        planned,
        all_deleted_keys(&real),
        "dry run differs from real run"
    );
    assert_eq!(planned, removed, "report differs from the bucket");
    removed
}

/// Deleted keys of one repository in a report.
pub fn deleted_keys(report: &Report, repo: &str) -> BTreeSet<String> {
    report
        .repositories
        .iter()
        .find(|r| r.name == repo)
        .unwrap_or_else(|| panic!("{repo} not in report"))
        .deleted
        .iter()
        .map(|d| d.key.clone())
        .collect()
}

pub fn repo_report<'r>(report: &'r Report, repo: &str) -> &'r ocigc::report::RepoReport {
    report
        .repositories
        .iter()
        .find(|r| r.name == repo)
        .unwrap_or_else(|| panic!("{repo} not in report: {report:#?}"))
}

/// Every blob referenced from any repository's `index.json` (walked with a parser independent
/// of ocigc's) that is missing from the store, as "repo: digest". Empty means every image that
/// any tag or root points at is complete.
pub async fn dangling(store: &dyn Store) -> Vec<String> {
    let all = keys(store).await;
    let mut missing = Vec::new();
    for index in all.iter().filter(|k| k.ends_with("/index.json")) {
        let repo = index.trim_end_matches("/index.json");
        let Ok(obj) = store.get(index).await else {
            continue;
        };
        let Ok(doc) = serde_json::from_slice::<Value>(&obj.body) else {
            continue;
        };
        let mut stack: Vec<Value> = doc["manifests"].as_array().cloned().unwrap_or_default();
        let mut seen = BTreeSet::new();
        while let Some(desc) = stack.pop() {
            let Some(digest) = desc["digest"].as_str().map(str::to_string) else {
                continue;
            };
            if !seen.insert(digest.clone()) {
                continue;
            }
            let key = blob_key(repo, &digest);
            if !all.contains(&key) {
                missing.push(format!("{repo}: {digest}"));
                continue;
            }
            let is_doc = desc["mediaType"]
                .as_str()
                .is_none_or(|m| m.contains("manifest") || m.contains("index"));
            if !is_doc {
                continue;
            }
            let Ok(body) = store.get(&key).await else {
                missing.push(format!("{repo}: {digest} (unreadable)"));
                continue;
            };
            if let Ok(child) = serde_json::from_slice::<Value>(&body.body) {
                for field in ["manifests", "layers", "blobs"] {
                    stack.extend(child[field].as_array().cloned().unwrap_or_default());
                }
                for field in ["config", "subject"] {
                    if child[field].is_object() {
                        stack.push(child[field].clone());
                    }
                }
            }
        }
    }
    missing
}

/// Command-line arguments and environment that point the `ocigc` binary at a test store.
pub fn cli_target(t: &TestStore) -> (Vec<String>, Vec<(String, String)>) {
    match t.endpoint() {
        Some(endpoint) => (
            vec![
                "--bucket".into(),
                format!("s3://{}", t.bucket),
                "--s3-path-style".into(),
            ],
            vec![
                ("AWS_ENDPOINT_URL".into(), endpoint),
                ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
                ("AWS_REGION".into(), "us-east-1".into()),
            ],
        ),
        None => (vec!["--bucket".into(), t.bucket.clone()], vec![]),
    }
}

/// Keys of every blob referenced from any `index.json` (independent walker, see [`dangling`]).
pub async fn referenced_blob_keys(store: &dyn Store) -> BTreeSet<String> {
    let all = keys(store).await;
    let mut out = BTreeSet::new();
    for index in all.iter().filter(|k| k.ends_with("/index.json")) {
        let repo = index.trim_end_matches("/index.json");
        let Ok(obj) = store.get(index).await else {
            continue;
        };
        let doc: Value = serde_json::from_slice(&obj.body).unwrap_or(Value::Null);
        let mut stack: Vec<Value> = doc["manifests"].as_array().cloned().unwrap_or_default();
        while let Some(desc) = stack.pop() {
            let Some(digest) = desc["digest"].as_str() else {
                continue;
            };
            let key = blob_key(repo, digest);
            if !out.insert(key.clone()) {
                continue;
            }
            if let Ok(body) = store.get(&key).await {
                if let Ok(child) = serde_json::from_slice::<Value>(&body.body) {
                    for field in ["manifests", "layers", "blobs"] {
                        stack.extend(child[field].as_array().cloned().unwrap_or_default());
                    }
                    if child["config"].is_object() {
                        stack.push(child["config"].clone());
                    }
                }
            }
        }
    }
    out
}

/// Copies the example bucket shipped in the repository into `to` (made if missing).
pub fn copy_example(to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bucket");
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success());
}
