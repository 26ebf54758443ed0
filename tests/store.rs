//! The Store contract, against the directory store, moto S3 and SeaweedFS S3 alike.

mod common;

use bytes::Bytes;
use common::*;
use futures::TryStreamExt;
use std::time::{Duration, SystemTime};

use ocigc::store::{Metadata, PutCondition, PutOutcome, Store, StoreError};

async fn list_keys(store: &dyn Store, prefix: &str) -> Vec<String> {
    let pages: Vec<_> = store.list(prefix).try_collect().await.expect("list");
    let mut keys: Vec<String> = pages.into_iter().flatten().map(|o| o.key).collect();
    keys.sort();
    keys
}

async fn get_head_put_roundtrip(t: TestStore) {
    let s = t.store.as_ref();
    assert!(matches!(
        s.get("a/b").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(s.head("a/b").await.expect("head"), None);
    let out = s
        .put("a/b", Bytes::from_static(b"hello"), PutCondition::None)
        .await
        .expect("put");
    let PutOutcome::Written { etag } = out else {
        panic!("unconditional put not written: {out:?}")
    };
    let got = s.get("a/b").await.expect("get");
    assert_eq!(got.body, Bytes::from_static(b"hello"));
    assert_eq!(
        got.etag.as_deref(),
        Some(etag.as_str()),
        "GET and PUT ETags differ"
    );
    let head = s.head("a/b").await.expect("head").expect("exists");
    assert_eq!(head.size, 5);
    assert_eq!(head.etag.as_deref(), Some(etag.as_str()));
    let age = std::time::SystemTime::now()
        .duration_since(head.last_modified)
        .unwrap_or_default();
    assert!(
        age.as_secs() < 600,
        "{}: LastModified is {age:?} old",
        t.kind
    );
}

async fn conditional_put(t: TestStore) {
    let s = t.store.as_ref();
    let first = s
        .put(
            "lease",
            Bytes::from_static(b"one"),
            PutCondition::IfNoneMatch,
        )
        .await
        .expect("create");
    let PutOutcome::Written { etag } = first else {
        panic!("create failed: {first:?}")
    };
    let again = s
        .put(
            "lease",
            Bytes::from_static(b"two"),
            PutCondition::IfNoneMatch,
        )
        .await
        .expect("second create");
    assert_eq!(again, PutOutcome::PreconditionFailed);
    let wrong = s
        .put(
            "lease",
            Bytes::from_static(b"three"),
            PutCondition::IfMatch("\"nope\"".into()),
        )
        .await
        .expect("if-match wrong");
    assert_eq!(wrong, PutOutcome::PreconditionFailed);
    assert_eq!(
        s.get("lease").await.expect("get").body,
        Bytes::from_static(b"one")
    );
    let right = s
        .put(
            "lease",
            Bytes::from_static(b"four"),
            PutCondition::IfMatch(etag.clone()),
        )
        .await
        .expect("if-match right");
    let PutOutcome::Written { etag: newer } = right else {
        panic!("if-match with the current etag failed: {right:?}")
    };
    assert_ne!(newer, etag);
    // The old ETag no longer matches.
    let stale = s
        .put(
            "lease",
            Bytes::from_static(b"five"),
            PutCondition::IfMatch(etag),
        )
        .await
        .expect("stale if-match");
    assert_eq!(stale, PutOutcome::PreconditionFailed);
    let absent = s
        .put(
            "nothing",
            Bytes::from_static(b"x"),
            PutCondition::IfMatch(newer),
        )
        .await
        .expect("if-match on a missing key");
    assert_eq!(absent, PutOutcome::PreconditionFailed);
}

async fn listing_pages_and_prefix_boundaries(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let keys: Vec<String> = (0..1005).map(|i| format!("many/{i:05}")).collect();
    futures::stream::iter(keys.iter())
        .for_each_concurrent(16, |k| f.put(k, b"x"))
        .await;
    for k in ["lib/alpine/x", "lib/alpine-edge/y", "lib/alpinex"] {
        f.put(k, b"z").await;
    }
    let pages: Vec<_> = t.store.list("many/").try_collect().await.expect("list");
    assert!(pages.len() >= 2, "1005 keys in {} page(s)", pages.len());
    assert!(pages.iter().all(|p| p.len() <= 1000));
    assert_eq!(list_keys(t.store.as_ref(), "many/").await, keys);
    assert_eq!(
        list_keys(t.store.as_ref(), "lib/alpine/").await,
        ["lib/alpine/x"]
    );
    assert_eq!(list_keys(t.store.as_ref(), "lib/alpine").await.len(), 3);
    assert!(list_keys(t.store.as_ref(), "nothing/").await.is_empty());
}

async fn batch_delete(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    for k in ["d/1", "d/2", "d/3"] {
        f.put(k, b"x").await;
    }
    let failures = t
        .store
        .delete_batch(&["d/1".into(), "d/2".into(), "d/missing".into()])
        .await
        .expect("delete");
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(list_keys(t.store.as_ref(), "d/").await, ["d/3"]);
}

/// User metadata round-trips through PUT and HEAD (bucket stores; the directory store keeps
/// none), the store's clock agrees with ours, and a capped read refuses one byte too many (also
/// for an empty object, which some stores answer differently).
async fn metadata_clock_and_read_cap(t: TestStore) {
    let s = t.store.as_ref();
    let metadata: Metadata = if t.endpoint().is_some() {
        [("ocigc-run".to_string(), "Run-1".to_string())].into()
    } else {
        Metadata::new()
    };
    s.put_with_metadata(
        "m/x",
        Bytes::from_static(b"12345"),
        PutCondition::None,
        metadata.clone(),
    )
    .await
    .expect("put with metadata");
    let (meta, got) = s
        .head_with_metadata("m/x")
        .await
        .expect("head")
        .expect("object exists");
    assert_eq!((meta.size, &got), (5, &metadata), "{}", t.kind);
    assert!(meta.defect.is_none());

    let now = s.server_time().await.expect("server time");
    let skew = |a: SystemTime, b: SystemTime| a.duration_since(b).unwrap_or_else(|e| e.duration());
    assert!(
        skew(now, SystemTime::now()) < Duration::from_secs(60),
        "{}",
        t.kind
    );
    // Stores keep whole seconds at best, so allow a little on both sides.
    assert!(
        skew(meta.last_modified, now) < Duration::from_secs(5),
        "{}: written {:?}, store time {now:?}",
        t.kind,
        meta.last_modified
    );

    assert!(
        matches!(
            s.get_capped("m/x", 4).await,
            Err(StoreError::TooLarge { .. })
        ),
        "{}",
        t.kind
    );
    assert_eq!(s.get_capped("m/x", 5).await.expect("at cap").body, "12345");
    s.put("m/empty", Bytes::new(), PutCondition::None)
        .await
        .expect("put empty");
    assert!(s
        .get_capped("m/empty", 0)
        .await
        .expect("empty")
        .body
        .is_empty());
}

use futures::StreamExt;

both_stores!(
    get_head_put_roundtrip,
    conditional_put,
    listing_pages_and_prefix_boundaries,
    batch_delete,
    metadata_clock_and_read_cap,
);

async fn prefix_scopes_every_operation(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    f.put("app/x", b"1").await;
    assert_eq!(list_keys(t.store.as_ref(), "").await, ["app/x"]);
    // The same bucket seen without the prefix holds the full key.
    let endpoint = t.endpoint().expect("a bucket store");
    let raw = ocigc::store::S3Store::connect(s3_settings_at(&endpoint, &t.bucket, "")).await;
    assert_eq!(list_keys(&raw, "").await, ["reg/v2/app/x"]);
    t.store
        .delete_batch(&["app/x".into()])
        .await
        .expect("delete");
    assert!(list_keys(&raw, "").await.is_empty());
}

#[tokio::test]
async fn s3_prefix_scopes_every_operation() {
    prefix_scopes_every_operation(s3_store_with_prefix("reg/v2").await).await
}

#[tokio::test]
async fn seaweed_prefix_scopes_every_operation() {
    prefix_scopes_every_operation(seaweed_store_with_prefix("reg/v2").await).await
}

#[tokio::test]
async fn dir_store_rejects_escaping_keys() {
    let t = dir_store();
    for key in ["../outside", "a/../../b", "/abs"] {
        let err = t
            .store
            .put(key, Bytes::from_static(b"x"), PutCondition::None)
            .await
            .expect_err(key);
        assert!(matches!(err, StoreError::InvalidKey { .. }), "{key}: {err}");
    }
}
