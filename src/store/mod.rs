//! Object stores: one trait, a directory-as-bucket and S3, plus the instrumentation layer that
//! counts requests, bounds concurrency and enforces per-request time-outs for both.

mod dir;
mod generated;
mod instrumented;
pub mod listing;
mod rate;
mod s3;
mod sum;
mod url;

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub use dir::DirStore;
pub use generated::{GeneratedSpec, GeneratedSpecError, GeneratedStore, GENERATED_SCHEME};
pub use instrumented::{Instrumented, Outcome, RequestCounts, RequestObserver};
pub use listing::{list_part, plan_parts, plan_shards, Part, SplitPolicy};
pub use rate::{backoff, RateLimit, BACKOFF_BASE, BACKOFF_CAP};
pub use s3::{S3Settings, S3Store, StaticCredentials};
pub use sum::ListingSum;
pub use url::BucketUrl;

/// Most keys a single batch delete may carry (the S3 `DeleteObjects` limit).
pub const MAX_DELETE_BATCH: usize = 1000;

/// The size cap of [`Store::get`]: larger objects are refused, never read into memory.
/// Callers that read bigger objects of their own (state, large indexes) name their cap with
/// [`Store::get_capped`].
pub const DEFAULT_READ_LIMIT: u64 = 4 * 1024 * 1024;

/// User metadata of an object (`x-amz-meta-*` over S3): lower-case names without the prefix.
pub type Metadata = BTreeMap<String, String>;

/// One object as seen in a listing or a HEAD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the store's prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time, on the store's clock.
    pub last_modified: SystemTime,
    /// Entity tag, where the store gives one in this response.
    pub etag: Option<String>,
    /// Set when the store found something at this key that it cannot serve as an object (an
    /// unreadable directory, a name that is not UTF-8): whatever owns the key fails closed.
    pub defect: Option<Box<str>>,
}

impl ObjectMeta {
    /// An ordinary object.
    pub fn new(
        key: impl Into<String>,
        size: u64,
        last_modified: SystemTime,
        etag: Option<String>,
    ) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size,
            last_modified,
            etag,
            defect: None,
        }
    }
}

/// A whole object as read by GET.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// The content.
    pub body: Bytes,
    /// Entity tag of exactly this content, where the store gives one.
    pub etag: Option<String>,
}

/// Precondition of a conditional PUT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutCondition {
    /// Write unconditionally.
    None,
    /// Create only if no object exists (`If-None-Match: *`).
    IfNoneMatch,
    /// Replace only if the current ETag is this one (`If-Match`).
    IfMatch(String),
}

/// Result of a PUT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written; the new object's ETag.
    Written { etag: String },
    /// The precondition did not hold; nothing was written.
    PreconditionFailed,
}

/// A key a batch delete could not remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteFailure {
    /// The key that is still there (or in an unknown state).
    pub key: String,
    /// What the store said.
    pub message: String,
}

/// One level of the key space below a prefix, as a listing with delimiter `/` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Level {
    /// Objects whose key has no `/` after the prefix, in key order.
    pub objects: Vec<ObjectMeta>,
    /// Sub-prefixes, each the prefix plus one name and a `/`, in byte order, without repeats.
    pub prefixes: Vec<String>,
}

impl Level {
    /// Puts the objects and prefixes in order and drops repeated prefixes, so that a level
    /// collected from several pages (or a store that sends them unordered) reads the same.
    pub fn normalize(&mut self) {
        self.objects.sort_by(|a, b| a.key.cmp(&b.key));
        self.prefixes.sort();
        self.prefixes.dedup();
    }

    /// This (normalized) level cut into pages of at most `page` entries, objects and prefixes
    /// merged in key order within and across pages, as S3 sends it: an empty level is one
    /// empty page.
    pub fn into_pages(self, page: usize) -> Vec<Level> {
        let page = page.max(1);
        let mut pages = vec![Level::default()];
        let mut objects = self.objects.into_iter().peekable();
        let mut prefixes = self.prefixes.into_iter().peekable();
        loop {
            let take_object = match (objects.peek(), prefixes.peek()) {
                (Some(o), Some(p)) => o.key.as_str() < p.as_str(),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let full = pages
                .last()
                .is_some_and(|p| p.objects.len() + p.prefixes.len() >= page);
            if full {
                pages.push(Level::default());
            }
            let Some(last) = pages.last_mut() else { break };
            if take_object {
                last.objects.extend(objects.next());
            } else {
                last.prefixes.extend(prefixes.next());
            }
        }
        pages
    }
}

/// Store operations, for error messages and request accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// One page of a listing.
    List,
    /// Read a whole object.
    Get,
    /// Read an object's metadata.
    Head,
    /// Write an object.
    Put,
    /// One batch delete request.
    Delete,
}

impl Op {
    /// Lower-case name, as used in reports and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::List => "list",
            Op::Get => "get",
            Op::Head => "head",
            Op::Put => "put",
            Op::Delete => "delete",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong with a store request.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{op} {key:?}: not found")]
    NotFound { op: Op, key: String },
    /// The request did not finish within its time-out.
    #[error("{op} {key:?}: timed out after {after:?}")]
    Timeout {
        op: Op,
        key: String,
        after: std::time::Duration,
    },
    /// The store refused the request or could not be reached.
    #[error("{op} {key:?}: {message}")]
    Request {
        op: Op,
        key: String,
        message: String,
    },
    /// The key cannot be represented in this store.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// The store asked to slow down (`503 SlowDown`, `429 Too Many Requests`): the request
    /// was not carried out and may be sent again after a while.
    #[error("{op} {key:?}: throttled: {message}")]
    Throttled {
        op: Op,
        key: String,
        message: String,
    },
    /// The object is larger than the caller's cap; it was not read.
    #[error("{op} {key:?}: larger than the {limit}-byte read limit")]
    TooLarge { op: Op, key: String, limit: u64 },
}

impl StoreError {
    /// True for a missing object.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// Result alias for store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// A bucket: flat keys, listing by prefix, whole-object reads, conditional writes, batch deletes.
///
/// Keys are relative to the store's own prefix, `/`-separated, never starting with `/`.
#[async_trait]
pub trait Store: Send + Sync {
    /// Human-readable location, e.g. `s3://bucket/prefix` or `file:///srv/bucket`.
    fn describe(&self) -> String;

    /// Lists every object under `prefix` in pages of at most 1000, in the store's key order.
    ///
    /// That order is lexicographic by bytes on S3 (and MinIO, moto) and on the directory store,
    /// across pages as well as within one. Stores that keep a file tree list it component by
    /// component instead (SeaweedFS: `a/b/1` before `a/b-c`, as if `/` sorted first). Both
    /// keep every prefix ending in `/` contiguous, which is what a consumer may rely on
    /// everywhere; "every key below the last one seen is complete" holds only in byte order.
    /// The directory store reports a directory `d` it cannot read as a defect keyed `d` but
    /// placed where `d/` sorts.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.list_after(prefix, None)
    }

    /// Like [`Store::list`], but only the keys after `start_after` (S3's `StartAfter`): a
    /// listing resumed, or one range of the key space, without reading the keys before it.
    /// "After" is in the store's order: by bytes, or on a file-tree store by the first path
    /// component that differs (which skips a whole directory named like `start_after`'s last
    /// component); [`listing::plan_parts`] places its cuts where the two agree.
    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>>;

    /// One level below `prefix` (delimiter `/`), one item per request: each page's objects and
    /// sub-prefixes, in order within the page. [`Store::list_level`] collects them.
    fn list_level_pages<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Level>>;

    /// The objects directly under `prefix` and its sub-prefixes (each ending in `/`), all pages
    /// collected, both sorted.
    async fn list_level(&self, prefix: &str) -> StoreResult<Level> {
        use futures::StreamExt as _;
        let mut level = Level::default();
        let mut pages = self.list_level_pages(prefix);
        while let Some(page) = pages.next().await {
            let page = page?;
            level.objects.extend(page.objects);
            level.prefixes.extend(page.prefixes);
        }
        level.normalize();
        Ok(level)
    }

    /// Reads a whole object and its ETag, refusing ([`StoreError::TooLarge`]) one of more
    /// than `limit` bytes without holding more than `limit + 1` bytes of it in memory.
    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object>;

    /// Reads a whole object of at most [`DEFAULT_READ_LIMIT`] bytes.
    async fn get(&self, key: &str) -> StoreResult<Object> {
        self.get_capped(key, DEFAULT_READ_LIMIT).await
    }

    /// Reads an object's listing metadata and its user metadata, `None` if it does not exist.
    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>>;

    /// Reads an object's metadata, `None` if it does not exist.
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        Ok(self.head_with_metadata(key).await?.map(|(meta, _)| meta))
    }

    /// Writes an object with user metadata under a precondition.
    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        condition: PutCondition,
        metadata: Metadata,
    ) -> StoreResult<PutOutcome>;

    /// Writes an object under a precondition.
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        condition: PutCondition,
    ) -> StoreResult<PutOutcome> {
        self.put_with_metadata(key, body, condition, Metadata::new())
            .await
    }

    /// The store's current time, from a read (the `Date` of a response): the bucket clock
    /// without writing anything.
    async fn server_time(&self) -> StoreResult<SystemTime>;

    /// The `Date` of the latest answer this store received, with the moment it arrived: the
    /// bucket clock without a request of its own, once any request has been answered. `None`
    /// where the store keeps none (then [`Store::server_time`] asks).
    fn answered_time(&self) -> Option<(SystemTime, tokio::time::Instant)> {
        None
    }

    /// Deletes up to [`MAX_DELETE_BATCH`] keys in one request; missing keys count as deleted.
    /// Returns the keys that could not be deleted.
    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>>;
}
