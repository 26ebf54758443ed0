//! Test stores that change one or two operations of the store they wrap: a type implements
//! [`Intercept`] for what it changes and [`Wrapped`] makes it a [`Store`] that passes the rest
//! through unchanged.

use std::ops::Deref;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use ocigc::store::{
    DeleteFailure, Object, ObjectMeta, PutCondition, PutOutcome, Store, StoreResult,
};

/// The operations a wrapper may change; each defaults to the wrapped store's.
#[async_trait]
pub trait Intercept: Send + Sync {
    /// The store underneath.
    fn inner(&self) -> &Arc<dyn Store>;

    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        self.inner().list(prefix)
    }
    async fn get(&self, key: &str) -> StoreResult<Object> {
        self.inner().get(key).await
    }
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.inner().head(key).await
    }
    async fn put(&self, key: &str, body: Bytes, c: PutCondition) -> StoreResult<PutOutcome> {
        self.inner().put(key, body, c).await
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
    async fn get(&self, key: &str) -> StoreResult<Object> {
        self.0.get(key).await
    }
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.0.head(key).await
    }
    async fn put(&self, key: &str, body: Bytes, c: PutCondition) -> StoreResult<PutOutcome> {
        self.0.put(key, body, c).await
    }
    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        self.0.delete_batch(keys).await
    }
}
