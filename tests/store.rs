//! The Store contract, against the directory store, moto S3 and SeaweedFS S3 alike.

mod common;

use bytes::Bytes;
use common::*;
use futures::TryStreamExt;
use std::time::{Duration, SystemTime};

use ocigc::store::{Instrumented, Metadata, PutCondition, PutOutcome, Store, StoreError};

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

/// Keys whose order tells a directory walk from a byte sort: `b.x` and `b-c/` sort before the
/// directory `b/`, `b0` after it; a multi-byte name after every ASCII one.
const ORDER_KEYS: [&str; 11] = [
    "a/b-c/1",
    "a/b.x",
    "a/b/1",
    "a/b/2/3",
    "a/b/\u{e9}t\u{e9}",
    "a/b0",
    "a/ba",
    "a/\u{e9}",
    "top",
    "top.d/1",
    "z/y/x/w",
];

async fn put_order_keys(t: &TestStore) -> Vec<String> {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let mut keys: Vec<String> = (0..1005).map(|i| format!("many/{i:05}")).collect();
    keys.extend(ORDER_KEYS.iter().map(|k| k.to_string()));
    futures::stream::iter(keys.iter())
        .for_each_concurrent(16, |k| f.put(k, b"x"))
        .await;
    keys.sort();
    keys
}

/// Keys as listed, in the order they came, checking each page's size.
async fn listed_in_order(store: &dyn Store, prefix: &str, after: Option<&str>) -> Vec<String> {
    let pages: Vec<_> = store
        .list_after(prefix, after)
        .try_collect()
        .await
        .expect("list");
    assert!(pages.iter().all(|p| p.len() <= 1000));
    pages.into_iter().flatten().map(|o| o.key).collect()
}

/// The order a store lists in: bytes (S3, moto, the directory store), or component by
/// component (SeaweedFS lists its file tree: `/` before every other character).
fn in_store_order(kind: &str, keys: &mut [String]) {
    if kind == "seaweed" {
        keys.sort_by_key(|k| k.split('/').map(str::to_string).collect::<Vec<_>>());
    } else {
        keys.sort();
    }
}

/// Whether `StartAfter` `after` lets `key` through: by bytes, or (SeaweedFS) where the first
/// differing path component of the key is the greater one; a key inside the directory `after`
/// names is skipped with it.
fn passes(kind: &str, key: &str, after: &str) -> bool {
    if kind != "seaweed" {
        return key > after;
    }
    let first_difference = key.split('/').zip(after.split('/')).find(|(k, a)| k != a);
    first_difference.is_some_and(|(k, a)| k > a)
}

/// `list` gives keys in the store's order across pages; `list_after` gives exactly the keys
/// after its start, wherever that start falls (inside a subtree, on a prefix, past the end).
async fn listing_order_and_start_after(t: TestStore) {
    let mut keys = put_order_keys(&t).await;
    in_store_order(t.kind, &mut keys);
    let s = t.store.as_ref();
    let pages: Vec<_> = s.list("").try_collect().await.expect("list");
    assert!(pages.len() >= 2, "{}", t.kind);
    let plain: Vec<String> = pages.into_iter().flatten().map(|o| o.key).collect();
    assert!(plain == keys, "{}: list order {:?}", t.kind, &plain[..12]);
    let starts = [
        "",
        "0",
        "a/b",
        "a/b/",
        "a/b/1",
        "a/b/2",
        "a/b/2/3",
        "a/b0",
        "a/c",
        "many/00999",
        "many/01004",
        "many0",
        "top",
        "zzz",
    ];
    for after in starts {
        let expected: Vec<&String> = keys.iter().filter(|k| passes(t.kind, k, after)).collect();
        let got = listed_in_order(s, "", Some(after)).await;
        let got: Vec<&String> = got.iter().collect();
        assert!(
            got == expected,
            "{}: after {after:?}: {:?}",
            t.kind,
            &got[..got.len().min(12)]
        );
    }
    for (prefix, after) in [("a/", "a/b/"), ("a/b", "a/b.x"), ("many/", "many/00500")] {
        let expected: Vec<&String> = keys
            .iter()
            .filter(|k| k.starts_with(prefix) && passes(t.kind, k, after))
            .collect();
        let got = listed_in_order(s, prefix, Some(after)).await;
        let got: Vec<&String> = got.iter().collect();
        assert!(
            got == expected,
            "{}: {prefix:?}: {:?}",
            t.kind,
            &got[..got.len().min(12)]
        );
    }
}

/// The level below a prefix as a delimiter listing would show it, from the full key set.
fn level_of(keys: &[String], prefix: &str) -> (Vec<String>, Vec<String>) {
    let (mut objects, mut prefixes) = (Vec::new(), Vec::new());
    for k in keys.iter().filter(|k| k.starts_with(prefix)) {
        match k[prefix.len()..].find('/') {
            Some(i) => prefixes.push(k[..prefix.len() + i + 1].to_string()),
            None => objects.push(k.clone()),
        }
    }
    prefixes.dedup();
    (objects, prefixes)
}

/// `list_level` shows one level: direct objects and sub-prefixes, sorted, for whole and partial
/// prefixes, and all pages of a level wider than one page.
async fn level_listing(t: TestStore) {
    let keys = put_order_keys(&t).await;
    let s = t.store.as_ref();
    for prefix in [
        "", "a/", "a/b", "a/b/", "many/", "top", "z/y/", "nothing/", "a/b/1",
    ] {
        let level = s.list_level(prefix).await.expect("level");
        let objects: Vec<String> = level.objects.iter().map(|o| o.key.clone()).collect();
        assert_eq!(
            (objects, level.prefixes),
            level_of(&keys, prefix),
            "{}: {prefix:?}",
            t.kind
        );
        assert!(level
            .objects
            .iter()
            .all(|o| o.defect.is_none() && o.size == 1));
    }
    // A level of more than one page arrives in several, each in order, each one request.
    let pages: Vec<_> = s
        .list_level_pages("many/")
        .try_collect()
        .await
        .expect("pages");
    assert!(pages.len() >= 2, "{}", t.kind);
    for page in &pages {
        assert!(page.objects.len() + page.prefixes.len() <= 1000);
        assert!(page.objects.windows(2).all(|w| w[0].key < w[1].key));
    }
    let counted = Instrumented::new(t.store.clone(), 4, Duration::from_secs(60));
    let level = counted.list_level("many/").await.expect("level");
    assert_eq!(level.objects.len(), 1005);
    assert_eq!(counted.counts().list, pages.len() as u64, "{}", t.kind);
    let after: Vec<_> = counted
        .list_after("many/", Some("many/00010"))
        .try_collect()
        .await
        .expect("list");
    assert_eq!(
        counted.counts().list,
        pages.len() as u64 + after.len() as u64
    );
}

/// Sends the first page of a level, then never answers.
struct StallAfterFirstPage(std::sync::Arc<dyn Store>);

#[async_trait::async_trait]
impl common::wrap::Intercept for StallAfterFirstPage {
    fn inner(&self) -> &std::sync::Arc<dyn Store> {
        &self.0
    }
    fn list_level_pages<'a>(
        &'a self,
        prefix: &'a str,
    ) -> futures::stream::BoxStream<'a, ocigc::store::StoreResult<ocigc::store::Level>> {
        Box::pin(
            self.0
                .list_level_pages(prefix)
                .take(1)
                .chain(futures::stream::pending()),
        )
    }
}

/// Every page of a level listing is a request under the time-out: a store that stalls on the
/// second page fails the level, counted as the one request that arrived.
#[tokio::test]
async fn level_pages_are_timed_out_requests() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    for i in 0..1005 {
        f.put(&format!("many/{i:05}"), b"x").await;
    }
    let stalled: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(common::wrap::Wrapped(StallAfterFirstPage(t.store.clone())));
    let counted = Instrumented::new(stalled, 1, Duration::from_millis(300));
    let err = counted.list_level("many/").await.expect_err("stalled");
    assert!(matches!(err, StoreError::Timeout { .. }), "{err}");
    assert_eq!(counted.counts().list, 1);
    // The permit went back: the next request runs under the bound of one (and stalls too).
    let again = tokio::time::timeout(Duration::from_secs(10), counted.list_level("")).await;
    assert!(
        matches!(again, Ok(Err(StoreError::Timeout { .. }))),
        "{again:?}"
    );
    assert_eq!(counted.counts().list, 2);
}

use futures::StreamExt;

both_stores!(
    listing_order_and_start_after,
    level_listing,
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

    // Starts and levels are relative to the prefix as well.
    for k in ["app/x", "app/y/z", "b"] {
        t.store
            .put(k, Bytes::from_static(b"1"), PutCondition::None)
            .await
            .expect("put");
    }
    let after: Vec<_> = t
        .store
        .list_after("", Some("app/x"))
        .try_collect()
        .await
        .expect("list");
    let after: Vec<String> = after.into_iter().flatten().map(|o| o.key).collect();
    assert_eq!(after, ["app/y/z", "b"]);
    let level = t.store.list_level("").await.expect("level");
    assert_eq!(level.prefixes, ["app/"]);
    let objects: Vec<&str> = level.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(objects, ["b"]);
    assert_eq!(
        t.store.list_level("app/").await.expect("level").prefixes,
        ["app/y/"]
    );
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
