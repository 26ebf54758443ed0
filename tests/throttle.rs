//! Throttling and the request-rate limit (issue 14, part 4): a store that answers `503
//! SlowDown` to part of the requests is survived within the request time-outs, every such
//! answer is counted (`ocigc_store_requests_total{result="throttled"}`), a store that never
//! stops throttling fails the repositories closed instead of hanging, and the rate limit holds
//! a run's requests below it.

mod common;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use common::wrap::{Intercept, Wrapped};
use common::*;
use ocigc::gc::GcOptions;
use ocigc::metrics::Metrics;
use ocigc::report::RepoStatus;
use ocigc::store::{
    DeleteFailure, Metadata, Object, ObjectMeta, Op, PutCondition, PutOutcome, RateLimit, Store,
    StoreError, StoreResult,
};

/// Answers `503 SlowDown` to every `every`-th request that is not a listing page (a listing
/// page cannot be asked for again once refused; the S3 client retries those itself), or only
/// to requests of operation `only`.
struct SlowDown {
    inner: Arc<dyn Store>,
    every: u64,
    only: Option<Op>,
    requests: AtomicU64,
    throttled: AtomicU64,
}

impl SlowDown {
    fn new(inner: Arc<dyn Store>, every: u64, only: Option<Op>) -> Wrapped<SlowDown> {
        Wrapped(SlowDown {
            inner,
            every,
            only,
            requests: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
        })
    }

    fn answer(&self, op: Op, key: &str) -> StoreResult<()> {
        if self.only.is_some_and(|o| o != op) {
            return Ok(());
        }
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        if n.is_multiple_of(self.every) {
            self.throttled.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Throttled {
                op,
                key: key.to_string(),
                message: "HTTP 503 SlowDown".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Intercept for SlowDown {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object> {
        self.answer(Op::Get, key)?;
        self.inner.get_capped(key, limit).await
    }
    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>> {
        self.answer(Op::Head, key)?;
        self.inner.head_with_metadata(key).await
    }
    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        c: PutCondition,
        m: Metadata,
    ) -> StoreResult<PutOutcome> {
        self.answer(Op::Put, key)?;
        self.inner.put_with_metadata(key, body, c, m).await
    }
    async fn server_time(&self) -> StoreResult<SystemTime> {
        self.answer(Op::Head, "")?;
        self.inner.server_time().await
    }
    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        self.answer(Op::Delete, keys.first().map(String::as_str).unwrap_or(""))?;
        self.inner.delete_batch(keys).await
    }
}

/// The sum of a metric's series whose labels contain `label`.
fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One request in three throttled: the run completes, deletes exactly the garbage, and every
/// throttling answer is in the report and the metrics.
async fn slow_down_is_survived_and_counted(t: TestStore) {
    let f = Fixture {
        store: t.store.as_ref(),
    };
    let neighbours = f.neighbours().await;
    let slow = Arc::new(SlowDown::new(t.store.clone(), 3, None));
    let store: Arc<dyn Store> = slow.clone();
    let metrics = Arc::new(Metrics::new());
    let opts = GcOptions {
        metrics: Some(metrics.clone()),
        request_timeout: Duration::from_secs(30),
        ..eager()
    };
    let report = gc(&store, &opts).await;
    assert!(report.all_ok(), "{report:#?}");
    let after = keys(t.store.as_ref()).await;
    for (repo, kept, garbage) in &neighbours {
        assert_intact(&after, repo, kept, "tagged image under throttling");
        assert_gone(&after, repo, garbage, "garbage under throttling");
    }
    assert!(dangling(t.store.as_ref()).await.is_empty());

    let throttled = slow.throttled.load(Ordering::SeqCst);
    assert!(throttled > 5, "the wrapper throttled {throttled} requests");
    assert_eq!(report.requests.throttled, throttled);
    let text = metrics.encode();
    assert_eq!(
        metric_sum(&text, "ocigc_store_requests_total", "result=\"throttled\"") as u64,
        throttled,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "ocigc_timeouts_total", "scope=\"request\""),
        0.0
    );
}

both_stores!(slow_down_is_survived_and_counted);

/// A store that throttles every GET for good: each GET gives up when its time-out is spent,
/// the repositories fail closed, nothing is deleted, and the run ends.
#[tokio::test]
async fn endless_throttling_fails_closed_within_the_time_out() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    f.neighbours().await;
    let before = keys(t.store.as_ref()).await;
    let slow = Arc::new(SlowDown::new(t.store.clone(), 1, Some(Op::Get)));
    let store: Arc<dyn Store> = slow.clone();
    let opts = GcOptions {
        request_timeout: Duration::from_secs(1),
        ..eager()
    };
    let report = gc(&store, &opts).await;
    assert!(!report.all_ok());
    for r in &report.repositories {
        assert_eq!(r.status, RepoStatus::Failed, "{r:#?}");
        assert!(r.deleted.is_empty());
        assert!(r.errors.iter().any(|e| e.contains("throttled")), "{r:#?}");
    }
    assert_eq!(keys(t.store.as_ref()).await, before);
    // Backed off and tried again: more answers than requests the run needed.
    assert!(report.requests.throttled > report.repositories.len() as u64);
}

/// The rate limit holds a whole run below it: N requests at R per second (burst R) take at
/// least (N - R) / R seconds. A lower bound only, which no scheduling delay can break.
#[tokio::test]
async fn the_rate_limit_holds_a_run_below_it() {
    let t = dir_store();
    let f = Fixture {
        store: t.store.as_ref(),
    };
    f.neighbours().await;
    let rate = 20;
    let opts = GcOptions {
        rate_limit: Some(Arc::new(RateLimit::per_second(
            NonZeroU32::new(rate).expect("non-zero"),
        ))),
        ..eager()
    };
    let started = std::time::Instant::now();
    let report = gc(&t.store, &opts).await;
    let took = started.elapsed();
    assert!(report.all_ok(), "{report:#?}");
    let r = report.requests;
    let sent = r.list + r.get + r.head + r.put + r.delete;
    assert!(
        sent > 2 * u64::from(rate),
        "{sent} requests: too few to measure"
    );
    let least = Duration::from_secs_f64((sent - u64::from(rate)) as f64 / f64::from(rate));
    assert!(
        took >= least,
        "{sent} requests in {took:?}, faster than {rate}/s allows ({least:?})"
    );
}

/// A minimal S3 endpoint: answers `503 SlowDown` to the first `get_throttles` GETs of the
/// object `a/b` and to the first listing page request, then the object and a one-key page;
/// counts the requests it sees of each kind.
struct FakeS3 {
    gets: AtomicU64,
    lists: AtomicU64,
    get_throttles: u64,
}

impl FakeS3 {
    fn answer(&self, request_line: &str) -> String {
        const SLOW_DOWN: &str =
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>\
            <Message>Please reduce your request rate.</Message><RequestId>r</RequestId></Error>";
        let respond = |status: &str, headers: &str, body: &str| {
            format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
                body.len()
            )
        };
        let slow_down = || {
            respond(
                "503 Slow Down",
                "Content-Type: application/xml\r\n",
                SLOW_DOWN,
            )
        };
        if request_line.contains("list-type=2") {
            if self.lists.fetch_add(1, Ordering::SeqCst) == 0 {
                return slow_down();
            }
            let page = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                <ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>b</Name>\
                <Prefix></Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys>\
                <IsTruncated>false</IsTruncated><Contents><Key>a/b</Key>\
                <LastModified>2026-12-02T05:00:00.000Z</LastModified><ETag>\"e\"</ETag>\
                <Size>1</Size><StorageClass>STANDARD</StorageClass></Contents></ListBucketResult>";
            return respond("200 OK", "Content-Type: application/xml\r\n", page);
        }
        if request_line.starts_with("GET /b/a/b") {
            if self.gets.fetch_add(1, Ordering::SeqCst) < self.get_throttles {
                return slow_down();
            }
            return respond(
                "200 OK",
                "ETag: \"e\"\r\nLast-Modified: Wed, 02 Dec 2026 05:00:00 GMT\r\n",
                "x",
            );
        }
        respond("404 Not Found", "", "")
    }

    /// Serves one request per connection until the test ends.
    async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = listener.accept().await {
            let fake = self.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let line = text.lines().next().unwrap_or_default().to_string();
                let _ = conn.write_all(fake.answer(&line).as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    }
}

/// Against a real S3 client: a throttled GET comes back to ocigc (the SDK does not retry it),
/// which backs off, sends it again and counts each answer; a throttled listing page is retried
/// inside the client, which alone can ask for it again.
#[tokio::test]
async fn the_s3_client_leaves_throttling_to_ocigc_but_retries_listing_pages() {
    use futures::TryStreamExt;
    use ocigc::store::{Instrumented, S3Store};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let fake = Arc::new(FakeS3 {
        gets: AtomicU64::new(0),
        lists: AtomicU64::new(0),
        get_throttles: 2,
    });
    let server = tokio::spawn(fake.clone().serve(listener));
    let mut settings = s3_settings_at(&endpoint, "b", "");
    settings.attempt_timeout = Duration::from_secs(10);
    let s3: Arc<dyn Store> = Arc::new(S3Store::connect(settings).await);
    let store = Instrumented::new(s3, 4, Duration::from_secs(30));

    let object = store
        .get("a/b")
        .await
        .expect("the GET succeeds after two SlowDowns");
    assert_eq!(&object.body[..], b"x");
    assert_eq!(
        fake.gets.load(Ordering::SeqCst),
        3,
        "three GETs reached the store"
    );
    let counts = store.counts();
    assert_eq!(
        (counts.get, counts.throttled),
        (3, 2),
        "ocigc sent every attempt itself and counted both throttling answers"
    );

    let pages: Vec<Vec<ObjectMeta>> = store.list("").try_collect().await.expect("listing");
    assert_eq!(pages.concat().len(), 1);
    assert_eq!(
        fake.lists.load(Ordering::SeqCst),
        2,
        "the client asked for the page again"
    );
    assert_eq!(store.counts().list, 1);
    server.abort();
}

/// A listing page the store throttled for good (past the S3 client's own retries) ends the
/// listing, which its caller must not act on, and is counted like any throttling answer.
#[tokio::test]
async fn a_throttled_listing_page_ends_the_listing_and_is_counted() {
    use futures::StreamExt;
    use ocigc::store::Instrumented;

    struct ThrottledList(Arc<dyn Store>);
    impl Intercept for ThrottledList {
        fn inner(&self) -> &Arc<dyn Store> {
            &self.0
        }
        fn list<'a>(
            &'a self,
            prefix: &'a str,
        ) -> futures::stream::BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
            futures::stream::iter([Err(StoreError::Throttled {
                op: Op::List,
                key: prefix.to_string(),
                message: "HTTP 503 SlowDown".into(),
            })])
            .boxed()
        }
    }
    let t = dir_store();
    let metrics = Arc::new(Metrics::new());
    let store = Instrumented::new(
        Arc::new(Wrapped(ThrottledList(t.store.clone()))),
        2,
        Duration::from_secs(5),
    )
    .with_metrics(Some(metrics.clone()));
    let pages: Vec<_> = store.list("").collect().await;
    assert!(matches!(
        pages.as_slice(),
        [Err(StoreError::Throttled { .. })]
    ));
    assert_eq!((store.counts().list, store.counts().throttled), (1, 1));
    let text = metrics.encode();
    assert!(
        text.contains("ocigc_store_requests_total{op=\"list\",result=\"throttled\"} 1"),
        "{text}"
    );
}
