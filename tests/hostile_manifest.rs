//! Documents that Go registries and clients read one way and a naive parser another: ocigc
//! must keep every blob a Go reader (or any reader) would need, or fail the repository closed.
//! Each scenario runs against the directory store and moto S3.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use common::wrap::{Intercept, Wrapped};
use common::*;
use ocigc::report::RepoStatus;
use ocigc::store::{Object, Op, Store, StoreError, StoreResult};
use serde_json::json;

/// Stores `text` as a blob verbatim (duplicate keys and deep nesting survive) and returns its
/// descriptor, whose subtree includes `children`.
async fn raw_doc(
    f: &Fixture<'_>,
    repo: &str,
    media_type: &str,
    text: &str,
    children: &[&Desc],
) -> Desc {
    let mut d = f.blob(repo, media_type, text.as_bytes()).await;
    for c in children {
        d.subtree.extend(c.subtree.iter().cloned());
    }
    d
}

fn desc_text(d: &Desc) -> String {
    d.json().to_string()
}

/// A garbage image next to the scenario: it must go, so the run is known to have collected.
async fn with_garbage(f: &Fixture<'_>, repo: &str) -> Desc {
    f.image(repo, &format!("{repo} garbage")).await
}

fn assert_collected(
    report: &ocigc::report::Report,
    repo: &str,
    k: &std::collections::BTreeSet<String>,
    garbage: &Desc,
) {
    let r = repo_report(report, repo);
    assert_eq!(r.status, RepoStatus::Ok, "{repo}: {r:#?}");
    assert_gone(k, repo, garbage, "garbage image");
}

async fn go_cased_fields_keep_config_and_layers(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let config = f.blob("app", OCI_CONFIG, b"{\"cased\":true}").await;
    let layer = f.blob("app", OCI_LAYER, b"cased layer").await;
    let upper = json!({
        "SchemaVersion": 2,
        "MediaType": OCI_MANIFEST,
        "Config": {"MediaType": OCI_CONFIG, "Digest": config.digest, "Size": config.size},
        "Layers": [{"MEDIATYPE": OCI_LAYER, "dIgEsT": layer.digest, "size": layer.size}],
    });
    let upper = f.doc("app", OCI_MANIFEST, &upper, &[&config, &layer]).await;
    // Go folds 'ſ' (U+017F) to 's': "layerſ" is "layers" and "digeſt" is "digest" to it.
    let config2 = f.blob("app", OCI_CONFIG, b"{\"long s\":true}").await;
    let layer2 = f.blob("app", OCI_LAYER, b"long s layer").await;
    let long_s = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digeſt": config2.digest, "size": config2.size},
        "layerſ": [{"mediaType": OCI_LAYER, "digeſt": layer2.digest, "ſize": layer2.size}],
    });
    let long_s = f
        .doc("app", OCI_MANIFEST, &long_s, &[&config2, &layer2])
        .await;
    let garbage = with_garbage(&f, "app").await;
    f.layout("app", &[(Some("upper"), &upper), (Some("long-s"), &long_s)])
        .await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &upper, "manifest with \"Config\"/\"Layers\"");
    assert_intact(&k, "app", &long_s, "manifest with \"layerſ\"/\"digeſt\"");
    assert_collected(&report, "app", &k, &garbage);
}

async fn referrer_with_capital_subject_is_found(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "signed").await;
    let config = f
        .blob("app", "application/vnd.oci.empty.v1+json", b"{}")
        .await;
    let payload = f
        .blob(
            "app",
            "application/vnd.example.sig.v1",
            b"capital signature",
        )
        .await;
    // Stored only as a blob: only its "Subject" makes it reachable.
    let sig = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig",
        "config": config.json(),
        "layers": [payload.json()],
        "Subject": img.json(),
    });
    let sig = f.doc("app", OCI_MANIFEST, &sig, &[&config, &payload]).await;
    let garbage = with_garbage(&f, "app").await;
    f.layout("app", &[(Some("v1"), &img)]).await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &img, "signed image");
    assert_intact(&k, "app", &sig, "referrer found by \"Subject\"");
    assert_collected(&report, "app", &k, &garbage);
}

/// A manifest with an annotation nested `depth` levels below the top-level object.
async fn deep_manifest(
    f: &Fixture<'_>,
    repo: &str,
    name: &str,
    depth: usize,
    subject: Option<&Desc>,
) -> Desc {
    let config = f
        .blob(
            repo,
            OCI_CONFIG,
            format!("{{\"deep\":\"{name}\"}}").as_bytes(),
        )
        .await;
    let layer = f
        .blob(repo, OCI_LAYER, format!("deep layer {name}").as_bytes())
        .await;
    let subject = subject.map_or(String::new(), |s| format!(",\"subject\":{}", desc_text(s)));
    let text = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","annotations":{{"x":"y"}},"nested":{}{},"config":{},"layers":[{}]{subject}}}"#,
        "[".repeat(depth),
        "]".repeat(depth),
        desc_text(&config),
        desc_text(&layer),
    );
    raw_doc(f, repo, OCI_MANIFEST, &text, &[&config, &layer]).await
}

async fn deep_but_valid_documents_are_read(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    // 9999 levels under the top-level object: 10000, Go's limit; serde_json's own is 128.
    let img = deep_manifest(&f, "app", "tagged", 9_999, None).await;
    let garbage = with_garbage(&f, "app").await;
    f.layout("app", &[(Some("deep"), &img)]).await;
    // A deep referrer (stored only as blobs) of a plain tagged image.
    let plain = f.image("sig", "plain").await;
    let sig = deep_manifest(&f, "sig", "referrer", 9_999, Some(&plain)).await;
    let sig_garbage = with_garbage(&f, "sig").await;
    f.layout("sig", &[(Some("v1"), &plain)]).await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "sig", &plain, "signed image");
    assert_intact(&k, "sig", &sig, "deep referrer");
    assert_collected(&report, "sig", &k, &sig_garbage);
    assert_intact(&k, "app", &img, "deep tagged manifest");
    assert_collected(&report, "app", &k, &garbage);
}

async fn too_deep_for_go_fails_closed(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = deep_manifest(&f, "app", "too deep", 10_000, None).await;
    let garbage = with_garbage(&f, "app").await;
    f.layout("app", &[(Some("deep"), &img)]).await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    let r = repo_report(&report, "app");
    assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
    assert!(r.deleted.is_empty());
    assert!(
        r.errors.iter().any(|e| e.contains("10000")),
        "{:?}",
        r.errors
    );
    assert_intact(&k, "app", &img, "unreadable tagged manifest");
    assert_intact(&k, "app", &garbage, "garbage of a repository failed closed");
}

async fn one_bad_descriptor_is_one_bad_descriptor(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    // A tagged index with one malformed entry: its good sibling is followed, the repository
    // is collected.
    let good = f.image("app", "good sibling").await;
    let mut idx = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": "sha256:zz", "size": 1}, good.json()],
    });
    let index = f.doc("app", OCI_INDEX, &idx, &[&good]).await;
    let garbage = with_garbage(&f, "app").await;
    f.layout("app", &[(Some("v1"), &index)]).await;

    // A referrer (stored only as blobs) with a bad entry among good ones.
    let img = f.image("sig", "signed").await;
    let attached = f.image("sig", "attached").await;
    idx["manifests"] = json!([{"digest": "blake3:abc"}, attached.json(), 7]);
    idx["subject"] = img.json();
    let sig = f.doc("sig", OCI_INDEX, &idx, &[&attached]).await;
    let sig_garbage = with_garbage(&f, "sig").await;
    f.layout("sig", &[(Some("v1"), &img)]).await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "sig", &img, "signed image");
    assert_intact(&k, "sig", &sig, "referrer with a bad entry");
    assert_collected(&report, "sig", &k, &sig_garbage);
    assert_intact(&k, "app", &index, "index with a bad entry");
    assert_collected(&report, "app", &k, &garbage);
    let r = repo_report(&report, "app");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("unsupported reference kept") && w.contains("sha256:zz")),
        "{:?}",
        r.warnings
    );
}

async fn duplicate_keys_keep_every_occurrence(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let config = f.blob("app", OCI_CONFIG, b"{\"dup\":1}").await;
    let first = f.blob("app", OCI_LAYER, b"first layers").await;
    let last = f.blob("app", OCI_LAYER, b"last layers").await;
    // Go reads the last "layers", a map-based reader the first: both are needed.
    let text = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":[{}],"layers":[{}]}}"#,
        desc_text(&config),
        desc_text(&first),
        desc_text(&last)
    );
    let img = raw_doc(&f, "app", OCI_MANIFEST, &text, &[&config, &first, &last]).await;
    // A referrer whose first "subject" is the tagged image and whose last another image.
    let other = f.image("app", "other subject").await;
    let payload = f.blob("app", OCI_LAYER, b"dup signature").await;
    let text = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":[{}],"subject":{},"subject":{}}}"#,
        desc_text(&config),
        desc_text(&payload),
        desc_text(&img),
        desc_text(&other)
    );
    let sig = raw_doc(&f, "app", OCI_MANIFEST, &text, &[&config, &payload]).await;
    let garbage = with_garbage(&f, "app").await;
    f.layout("app", &[(Some("dup"), &img)]).await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &img, "manifest with two \"layers\"");
    assert_intact(&k, "app", &sig, "referrer with two \"subject\"s");
    // A reachable document keeps what it points at, its subjects included.
    assert_intact(&k, "app", &other, "the other subject");
    assert_collected(&report, "app", &k, &garbage);
}

async fn layer_then_manifest_is_read(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "dual").await;
    // Reached first (depth 2) as a layer of a tagged manifest, which is not read...
    let config = f.blob("app", OCI_CONFIG, b"{\"layer-first\":1}").await;
    let as_layer = Desc {
        media_type: OCI_LAYER.into(),
        ..img.clone()
    };
    let odd = f.manifest("app", &config, &[&as_layer], None).await;
    // ...then (depth 3) as a manifest, whose config and layer are needed.
    let inner = f.index("app", OCI_INDEX, &[&img]).await;
    let outer = f.index("app", OCI_INDEX, &[&inner]).await;
    let garbage = with_garbage(&f, "app").await;
    f.layout("app", &[(Some("odd"), &odd), (Some("idx"), &outer)])
        .await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &odd, "manifest with a manifest as a layer");
    assert_intact(&k, "app", &outer, "index reaching the same manifest");
    assert_collected(&report, "app", &k, &garbage);
}

async fn digest_that_could_name_a_blob_fails_closed(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let config = f.blob("app", OCI_CONFIG, b"{\"upper\":1}").await;
    let layer = f.blob("app", OCI_LAYER, b"upper-case layer").await;
    let m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.json(),
        "layers": [{"mediaType": OCI_LAYER, "digest": layer.digest.to_uppercase(), "size": layer.size}],
    });
    let img = f.doc("app", OCI_MANIFEST, &m, &[&config, &layer]).await;
    let garbage = with_garbage(&f, "app").await;
    f.layout("app", &[(Some("upper"), &img)]).await;

    let report = gc(&t.store, &eager()).await;
    let k = keys(t.store.as_ref()).await;
    let r = repo_report(&report, "app");
    assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
    assert!(r.deleted.is_empty(), "{r:#?}");
    assert!(
        r.errors.iter().any(|e| e.contains("not canonical")),
        "{:?}",
        r.errors
    );
    assert_intact(&k, "app", &img, "layer named in upper case");
    assert_intact(&k, "app", &garbage, "garbage of a repository failed closed");
}

/// Spoils the first GET of a key ending in `suffix`, as for a blob another collector removed
/// after the listing and a pusher then wrote again (`truncate: false`: "not found"), or one
/// whose upload was still in progress (`truncate: true`: half of its content).
struct FirstReadSpoilt {
    inner: Arc<dyn Store>,
    suffix: String,
    truncate: bool,
    tripped: AtomicBool,
}

#[async_trait]
impl Intercept for FirstReadSpoilt {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object> {
        if !key.ends_with(&self.suffix) || self.tripped.swap(true, Ordering::SeqCst) {
            return self.inner.get_capped(key, limit).await;
        }
        if !self.truncate {
            return Err(StoreError::NotFound {
                op: Op::Get,
                key: key.into(),
            });
        }
        let mut o = self.inner.get_capped(key, limit).await?;
        o.body = o.body.slice(..o.body.len() / 2);
        Ok(o)
    }
}

/// A document the referrer scan reads while it is unreadable, reached later in the same run
/// through a referrer the scan found: read again then, and what it references kept.
async fn spoilt_at_scan_is_read_when_reached(t: TestStore, truncate: bool) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let img = f.image("app", "signed").await;
    let layer = f.blob("app", OCI_LAYER, b"layer of an attachment").await;
    let attachment = f
        .doc(
            "app",
            "application/vnd.example.attachment+json",
            &json!({"layers": [layer.json()]}),
            &[&layer],
        )
        .await;
    let config = f
        .blob("app", "application/vnd.oci.empty.v1+json", b"{}")
        .await;
    let sig = f.manifest("app", &config, &[&attachment], Some(&img)).await;
    let garbage = with_garbage(&f, "app").await;
    f.layout("app", &[(Some("v1"), &img)]).await;

    let hex = attachment.digest.trim_start_matches("sha256:").to_string();
    let spoilt = Arc::new(Wrapped(FirstReadSpoilt {
        inner: t.store.clone(),
        suffix: hex,
        truncate,
        tripped: AtomicBool::new(false),
    }));
    let store: Arc<dyn Store> = spoilt.clone();
    let report = gc(&store, &eager()).await;
    assert!(spoilt.tripped.load(Ordering::SeqCst), "the scan read it");
    let k = keys(t.store.as_ref()).await;
    assert_intact(&k, "app", &sig, "referrer and the attachment it references");
    assert_collected(&report, "app", &k, &garbage);
}

async fn missing_at_scan_is_read_when_reached(t: TestStore) {
    spoilt_at_scan_is_read_when_reached(t, false).await
}

async fn truncated_at_scan_is_read_when_reached(t: TestStore) {
    spoilt_at_scan_is_read_when_reached(t, true).await
}

both_stores!(
    go_cased_fields_keep_config_and_layers,
    referrer_with_capital_subject_is_found,
    deep_but_valid_documents_are_read,
    too_deep_for_go_fails_closed,
    one_bad_descriptor_is_one_bad_descriptor,
    duplicate_keys_keep_every_occurrence,
    layer_then_manifest_is_read,
    digest_that_could_name_a_blob_fails_closed,
    missing_at_scan_is_read_when_reached,
    truncated_at_scan_is_read_when_reached,
);
