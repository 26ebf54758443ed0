//! A store that runs one injected action at an exact protocol step, as a concurrent pusher or
//! collector would act at that instant.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use ocigc::store::{
    DeleteFailure, Level, Metadata, ObjectMeta, PutCondition, PutOutcome, Store, StoreResult,
};

use super::wrap::{Intercept, Wrapped};

/// When the action runs (once).
#[derive(Clone, Copy, Debug)]
pub enum When {
    /// Before the first HEAD of a key ending with this.
    BeforeHead(&'static str),
    /// Before the first LIST whose prefix starts with this.
    BeforeList(&'static str),
    /// Before the n-th (from 1) LIST whose prefix starts with this.
    BeforeNthList(&'static str, usize),
    /// Before the n-th (from 1) delimiter listing of exactly this prefix.
    BeforeNthLevel(&'static str, usize),
    /// After the first batch delete that removes a key containing this.
    AfterDelete(&'static str),
    /// Before the first PUT of a key starting with this.
    BeforePut(&'static str),
}

pub struct Hooked {
    pub inner: Arc<dyn Store>,
    when: When,
    lists: std::sync::atomic::AtomicUsize,
    action: Mutex<Option<BoxFuture<'static, ()>>>,
}

impl Hooked {
    pub fn new(
        inner: Arc<dyn Store>,
        when: When,
        action: BoxFuture<'static, ()>,
    ) -> Wrapped<Hooked> {
        Wrapped(Hooked {
            inner,
            when,
            lists: Default::default(),
            action: Mutex::new(Some(action)),
        })
    }

    async fn fire(&self) {
        let action = self.action.lock().expect("hook lock").take();
        if let Some(a) = action {
            a.await;
        }
    }

    pub fn fired(&self) -> bool {
        self.action.lock().expect("hook lock").is_none()
    }
}

#[async_trait]
impl Intercept for Hooked {
    fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Vec<ObjectMeta>>> {
        let (p, n) = match self.when {
            When::BeforeList(p) => (p, 1),
            When::BeforeNthList(p, n) => (p, n),
            _ => return self.inner.list(prefix),
        };
        if prefix.starts_with(p) {
            let seen = 1 + self.lists.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if seen == n {
                return Box::pin(
                    futures::stream::once(self.fire()).flat_map(move |_| self.inner.list(prefix)),
                );
            }
        }
        self.inner.list(prefix)
    }
    fn list_level_pages<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, StoreResult<Level>> {
        if let When::BeforeNthLevel(p, n) = self.when {
            if prefix == p {
                let seen = 1 + self.lists.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if seen == n {
                    return Box::pin(
                        futures::stream::once(self.fire())
                            .flat_map(move |_| self.inner.list_level_pages(prefix)),
                    );
                }
            }
        }
        self.inner.list_level_pages(prefix)
    }
    async fn head_with_metadata(&self, key: &str) -> StoreResult<Option<(ObjectMeta, Metadata)>> {
        if let When::BeforeHead(suffix) = self.when {
            if key.ends_with(suffix) {
                self.fire().await;
            }
        }
        self.inner.head_with_metadata(key).await
    }
    async fn put_with_metadata(
        &self,
        key: &str,
        body: Bytes,
        c: PutCondition,
        m: Metadata,
    ) -> StoreResult<PutOutcome> {
        if let When::BeforePut(prefix) = self.when {
            if key.starts_with(prefix) {
                self.fire().await;
            }
        }
        self.inner.put_with_metadata(key, body, c, m).await
    }
    async fn delete_batch(&self, keys: &[String]) -> StoreResult<Vec<DeleteFailure>> {
        let out = self.inner.delete_batch(keys).await;
        if let When::AfterDelete(needle) = self.when {
            if keys.iter().any(|k| k.contains(needle)) {
                self.fire().await;
            }
        }
        out
    }
}

use futures::StreamExt;
