//! The layer every request goes through: the request-rate limit, a bound on requests in flight
//! (back-pressure), a time-out on each request, back-off and retry after throttling answers,
//! and counts by operation for the report. Metrics see requests through [`RequestObserver`],
//! so the store layer knows nothing of who watches it.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::{
    DeleteFailure, Level, Metadata, Object, ObjectMeta, Op, PutCondition, PutOutcome, RateLimit,
    Store, StoreError, StoreResult,
};

/// How a store request ended, as far as an observer cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It succeeded.
    Ok,
    /// The key does not exist (an expected answer, not a failure of the store).
    NotFound,
    /// No answer within the request time-out.
    Timeout,
    /// The store asked to slow down; the request is sent again after a back-off.
    Throttled,
    /// Any other failure.
    Error,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::NotFound,
        Outcome::Timeout,
        Outcome::Throttled,
        Outcome::Error,
    ];

    /// Lower-case name, as used in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotFound => "not_found",
            Outcome::Timeout => "timeout",
            Outcome::Throttled => "throttled",
            Outcome::Error => "error",
        }
    }

    fn of<T>(result: &StoreResult<T>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(StoreError::NotFound { .. }) => Outcome::NotFound,
            Err(StoreError::Timeout { .. }) => Outcome::Timeout,
            Err(StoreError::Throttled { .. }) => Outcome::Throttled,
            Err(_) => Outcome::Error,
        }
    }
}

/// Watches every request [`Instrumented`] makes (the metrics implement it); called once per
/// request, after it ended, so it must be cheap and must not block.
pub trait RequestObserver: Send + Sync {
    /// One request of `op` ended with `outcome` after `elapsed` (waiting for a permit
    /// excluded).
    fn observe(&self, op: Op, outcome: Outcome, elapsed: Duration);
}

/// Requests made, by operation (a LIST page and a batch delete count as one each; each
/// attempt of a request sent again after a throttling answer counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    /// LIST pages.
    pub list: u64,
    /// Whole-object GETs.
    pub get: u64,
    /// HEADs.
    pub head: u64,
    /// PUTs.
    pub put: u64,
    /// Batch delete requests.
    pub delete: u64,
    /// Throttling answers among all of these (`503 SlowDown`, `429`), each backed off from.
    pub throttled: u64,
}

#[derive(Default)]
struct Counters([AtomicU64; 5]);

impl Counters {
    fn bump(&self, op: Op) {
        self.0[op as usize].fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self, op: Op) -> u64 {
        self.0[op as usize].load(Ordering::Relaxed)
    }
}

/// Wraps a store with a rate limit, a concurrency limit, a per-request time-out, retries
/// after throttling and request counting.
pub struct Instrumented {
    inner: Arc<dyn Store>,
    permits: Semaphore,
    timeout: Duration,
    counters: Counters,
    throttled: AtomicU64,
    observer: Option<Arc<dyn RequestObserver>>,
    rate: Option<Arc<RateLimit>>,
}

impl Instrumented {
    /// `concurrency` requests at most in flight, each bounded by `timeout` (waiting for a
    /// permit is not counted against it).
    pub fn new(inner: Arc<dyn Store>, concurrency: usize, timeout: Duration) -> Instrumented {
        Instrumented {
            inner,
            permits: Semaphore::new(concurrency.max(1)),
            timeout,
            counters: Counters::default(),
            throttled: AtomicU64::new(0),
            observer: None,
            rate: None,
        }
    }

    /// Sends requests no faster than `rate` allows; the limiter may be shared with other
    /// stores (the daemon's runs and jobs share one).
    pub fn with_rate_limit(mut self, rate: Option<Arc<RateLimit>>) -> Instrumented {
        self.rate = rate;
        self
    }

    /// Throttling answers received so far (each was backed off from and sent again while the
    /// request's time-out allowed).
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// Also reports every request to `observer`.
    pub fn with_observer(mut self, observer: Option<Arc<dyn RequestObserver>>) -> Instrumented {
        self.observer = observer;
        self
    }

    /// [`Instrumented::with_observer`] for a concrete observer type, as the engine holds its
    /// metrics (`Option<Arc<Metrics>>`); kept so its call sites need no cast.
    pub fn with_metrics<O: RequestObserver + 'static>(
        self,
        observer: Option<Arc<O>>,
    ) -> Instrumented {
        self.with_observer(observer.map(|o| o as Arc<dyn RequestObserver>))
    }

    /// Requests made so far.
    pub fn counts(&self) -> RequestCounts {
        RequestCounts {
            list: self.counters.get(Op::List),
            get: self.counters.get(Op::Get),
            head: self.counters.get(Op::Head),
            put: self.counters.get(Op::Put),
            delete: self.counters.get(Op::Delete),
            throttled: self.throttled(),
        }
    }

    /// Sends a request made by `send` (once per attempt): waits for the rate limit and a
    /// permit, bounds the attempts by the time-out, and after a throttling answer backs off
    /// (jittered, doubling) and sends it again. The attempts and the back-offs between them
    /// share the one time-out; waiting for the rate limit or a permit is not counted.
    async fn call<T, F, Fut>(&self, op: Op, key: &str, send: F) -> StoreResult<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let mut left = self.timeout;
        let mut retry = 0u32;
        loop {
            self.counters.bump(op);
            let (result, took) = self.limited(op, key, left, send()).await;
            self.record(op, &result, took);
            let Err(StoreError::Throttled { .. }) = &result else {
                return result;
            };
            self.throttled.fetch_add(1, Ordering::Relaxed);
            retry += 1;
            let wait = super::backoff(retry);
            left = left.saturating_sub(took);
            // No time left for another attempt after the back-off: the throttling answer is
            // the request's outcome.
            if wait >= left {
                return result;
            }
            left -= wait;
            tracing::debug!(%op, key, retry, wait_ms = wait.as_millis() as u64, "throttled; backing off");
            tokio::time::sleep(wait).await;
        }
    }

    /// Reports one attempt that took `took` (the request itself, no waiting for the rate
    /// limit or a permit).
    fn record<T>(&self, op: Op, result: &StoreResult<T>, took: Duration) {
        if let Some(o) = &self.observer {
            o.observe(op, Outcome::of(result), took);
        }
    }

    /// One attempt: the rate limit, a permit, then the request for at most `timeout`
    /// (waiting for the limit or a permit is back-pressure, not the store's slowness: not
    /// timed). Returns the result and how long the request itself took.
    async fn limited<T>(
        &self,
        op: Op,
        key: &str,
        timeout: Duration,
        fut: impl Future<Output = StoreResult<T>>,
    ) -> (StoreResult<T>, Duration) {
        if let Some(rate) = &self.rate {
            rate.acquire().await;
        }
        let Ok(_permit) = self.permits.acquire().await else {
            let closed = StoreError::Request {
                op,
                key: key.to_string(),
                message: "store closed".into(),
            };
            return (Err(closed), Duration::ZERO);
        };
        let sent = tokio::time::Instant::now();
        let result = match tokio::time::timeout(timeout, fut).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout {
                op,
                key: key.to_string(),
                after: self.timeout,
            }),
        };
        (result, sent.elapsed())
    }
}

impl Instrumented {
    /// Passes a listing through page by page: each page is one request, waited for under a
    /// permit and the time-out, and counted.
    fn pages<'a, T: Send + 'a>(
        &'a self,
        prefix: &'a str,
        pages: BoxStream<'a, StoreResult<T>>,
    ) -> BoxStream<'a, StoreResult<T>> {
        Box::pin(futures::stream::unfold(
            Some(pages),
            move |pages| async move {
                let mut pages = pages?;
                // A page cannot be asked for again once its request failed (the listing
                // ends there), so a throttled page is not retried here: the S3 client
                // retries listing pages itself, with its own jittered back-off.
                let (next, took) = self
                    .limited(Op::List, prefix, self.timeout, async {
                        Ok(pages.next().await)
                    })
                    .await;
                match next {
                    Ok(Some(page)) => {
                        // Counted once a page arrives: the end of a listing costs no request.
                        self.counters.bump(Op::List);
                        if matches!(page, Err(StoreError::Throttled { .. })) {
                            self.throttled.fetch_add(1, Ordering::Relaxed);
                        }
                        self.record(Op::List, &page, took);
                        Some((page, Some(pages)))
                    }
                    Ok(None) => None,
                    // A time-out ends the listing: its caller must not act on a partial view.
                    Err(e) => {
                        let failed: StoreResult<()> = Err(e);
                        self.record(Op::List, &failed, took);
                        failed.err().map(|e| (Err(e), None))
                    }
                }
            },
        ))
    }
}

#[async_trait]
impl Store for Instrumented {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    // Each listing goes to the same method of the inner store, which may be a wrapper that
    // changes only one of them.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.pages(prefix, self.inner.list(prefix))
    }

    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.pages(prefix, self.inner.list_after(prefix, start_after))
    }

    fn list_level_pages<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Level>> {
        self.pages(prefix, self.inner.list_level_pages(prefix))
    }

    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object> {
        self.call(Op::Get, key, || self.inner.get_capped(key, limit))
            .await
    }

    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>> {
        self.call(Op::Head, key, || self.inner.head_with_metadata(key))
            .await
    }

    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        condition: PutCondition,
        metadata: Metadata,
    ) -> StoreResult<PutOutcome> {
        self.call(Op::Put, key, || {
            self.inner
                .put_with_metadata(key, body.clone(), condition.clone(), metadata.clone())
        })
        .await
    }

    async fn server_time(&self) -> StoreResult<std::time::SystemTime> {
        // A read like a HEAD, and counted as one.
        self.call(Op::Head, "", || self.inner.server_time()).await
    }

    fn answered_time(&self) -> Option<(std::time::SystemTime, tokio::time::Instant)> {
        // No request: what an answer already counted said.
        self.inner.answered_time()
    }

    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        let first = keys.first().map(String::as_str).unwrap_or_default();
        self.call(Op::Delete, first, || self.inner.delete_batch(keys))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::store::DirStore;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(Op, Outcome)>>);

    impl RequestObserver for Recorder {
        fn observe(&self, op: Op, outcome: Outcome, _elapsed: Duration) {
            if let Ok(mut seen) = self.0.lock() {
                seen.push((op, outcome));
            }
        }
    }

    #[tokio::test]
    async fn every_request_reaches_the_observer_with_its_outcome() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn Store> = Arc::new(DirStore::open(dir.path()).expect("open"));
        let recorder = Arc::new(Recorder::default());
        let store = Instrumented::new(inner, 2, Duration::from_secs(10))
            .with_metrics(Some(recorder.clone()));
        store
            .put("a/b", Bytes::from_static(b"x"), PutCondition::None)
            .await
            .expect("put");
        store.get("a/b").await.expect("get");
        assert!(matches!(
            store.get("a/missing").await,
            Err(StoreError::NotFound { .. })
        ));
        let pages: Vec<_> = store.list("a/").collect().await;
        assert_eq!(pages.len(), 1);
        let seen = recorder.0.lock().expect("lock").clone();
        assert_eq!(
            seen,
            [
                (Op::Put, Outcome::Ok),
                (Op::Get, Outcome::Ok),
                (Op::Get, Outcome::NotFound),
                (Op::List, Outcome::Ok),
            ]
        );
        let counts = store.counts();
        assert_eq!((counts.put, counts.get, counts.list), (1, 2, 1));
    }
}
