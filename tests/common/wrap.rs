//! Test stores that change one or two operations of the store they wrap: a type implements
//! [`Intercept`] for what it changes and [`Wrapped`] makes it a [`Store`] that passes the rest
//! through unchanged.

use std::ops::Deref;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use ocigc::store::{
    DeleteFailure, Level, Metadata, Object, ObjectMeta, PutCondition, PutOutcome, Store,
    StoreResult,
};

/// The operations a wrapper may change; each defaults to the wrapped store's.
#[async_trait]
pub trait Intercept: Send + Sync {
    /// The store underneath.
    fn inner(&self) -> &Arc<dyn Store>;

    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.inner().list(prefix)
    }
    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.inner().list_after(prefix, start_after)
    }
    fn list_level_pages<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Level>> {
        self.inner().list_level_pages(prefix)
    }
    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object> {
        self.inner().get_capped(key, limit).await
    }
    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>> {
        self.inner().head_with_metadata(key).await
    }
    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        c: PutCondition,
        m: Metadata,
    ) -> StoreResult<PutOutcome> {
        self.inner().put_with_metadata(key, body, c, m).await
    }
    async fn server_time(&self) -> StoreResult<SystemTime> {
        self.inner().server_time().await
    }
    fn answered_time(&self) -> Option<(SystemTime, tokio::time::Instant)> {
        self.inner().answered_time()
    }
    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        self.inner().delete_batch(keys).await
    }
}

/// An [`Intercept`] used as a [`Store`]; derefs to the wrapper for its own helpers.
pub struct Wrapped<T>(pub T);

impl<T> Deref for Wrapped<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[async_trait]
impl<T: Intercept> Store for Wrapped<T> {
    fn describe(&self) -> String {
        self.0.inner().describe()
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.0.list(prefix)
    }
    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.0.list_after(prefix, start_after)
    }
    fn list_level_pages<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Level>> {
        self.0.list_level_pages(prefix)
    }
    async fn get_capped(&self, key: &str, limit: u64) -> StoreResult<Object> {
        self.0.get_capped(key, limit).await
    }
    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>> {
        self.0.head_with_metadata(key).await
    }
    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        c: PutCondition,
        m: Metadata,
    ) -> StoreResult<PutOutcome> {
        self.0.put_with_metadata(key, body, c, m).await
    }
    async fn server_time(&self) -> StoreResult<SystemTime> {
        self.0.server_time().await
    }
    fn answered_time(&self) -> Option<(SystemTime, tokio::time::Instant)> {
        self.0.answered_time()
    }
    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        self.0.delete_batch(keys).await
    }
}
