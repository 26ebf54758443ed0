//! cloudflare/serverless-registry's own GC/push protocol, taken part in the way the registry's
//! `GarbageCollector` (`src/registry/garbage-collector.ts`) runs it, so that the registry's
//! pushers are protected from ocigc's deletions as from its own GC's.
//!
//! The pusher (`putManifest`) writes `<repo>/insertion/<uuid>` and stamps
//! `<repo>/insertion/last_update` before it checks its layers, reads `<repo>/gc/last_update`
//! first, and writes the manifest only if `<repo>/gc/marker` is absent and `gc/last_update`
//! still reads the same. The collector, per repository:
//!
//! 1. before deleting: PUT `gc/marker` (body: a fresh UUID), then stamp `gc/last_update`, then
//!    read the stamp of `insertion/last_update`;
//! 2. before each delete batch: list `insertion/`; a marker younger than 60 s (bucket clock)
//!    refuses the batch, an older one is removed (its pusher is gone); then refuse if
//!    `insertion/last_update` no longer reads as in step 1;
//! 3. after the sweep, whatever its outcome: stamp `gc/last_update` again, then DELETE
//!    `gc/marker`.
//!
//! A stamp is an empty object whose user metadata `timestamp` (`x-amz-meta-timestamp` over S3,
//! `customMetadata` on R2) is `<milliseconds since the epoch>-<uuid>`; a stamp object without
//! that metadata reads as `mark`, a missing one as empty, as in the registry.
//!
//! Two deliberate departures, both on the side of keeping: only direct children of
//! `<repo>/insertion/` are markers (the registry lists the prefix `<repo>/insertion` without a
//! slash, which also takes in the keys of a repository `<repo>/insertion-x` and would delete
//! them), and only markers named by a UUID, as pushers name them, are removed when stale.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::serverless_registry::is_uuid;
use super::{list_prefix, DeletionProtocol, ProtocolError};
use crate::store::{Metadata, PutCondition, Store, StoreError, MAX_DELETE_BATCH};

/// How long an insertion marker holds the collector off (the registry's GC: 60 s).
pub const INSERTION_HOLD: Duration = Duration::from_secs(60);
/// The user metadata that carries a stamp.
pub const TIMESTAMP: &str = "timestamp";
/// What a stamp object without [`TIMESTAMP`] metadata reads as.
const NO_TIMESTAMP: &str = "mark";
const LAST_UPDATE: &str = "last_update";

/// A stamp as read: absent, or its value and when it was written (a rewrite with the same
/// value still counts as a change).
type Stamp = Option<(String, SystemTime)>;

/// The protocol for one repository's deletions.
#[derive(Debug)]
pub(super) struct ServerlessProtocol {
    /// The repository's key prefix, ending in `/`.
    prefix: String,
    /// `insertion/last_update` as read when the collection was announced.
    insertion_mark: Option<Stamp>,
    /// The collector's run id, written as the marker's body (the registry writes a UUID
    /// there too), so that a later run can tell a marker a dead ocigc run left.
    owner: String,
}

impl ServerlessProtocol {
    pub(super) fn new(prefix: &str, owner: &str) -> ServerlessProtocol {
        ServerlessProtocol {
            prefix: prefix.to_string(),
            insertion_mark: None,
            owner: owner.to_string(),
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// Stamps `gc/last_update` so that pushers that began before now refuse their manifest.
    async fn stamp_gc(&self, store: &dyn Store, now: SystemTime) -> Result<(), ProtocolError> {
        let key = self.key("gc/last_update");
        let metadata = Metadata::from([(TIMESTAMP.to_string(), stamp_value(now))]);
        store
            .put_with_metadata(&key, Bytes::new(), PutCondition::None, metadata)
            .await
            .map_err(|e| store_error(format!("stamping {key}"), e))?;
        Ok(())
    }

    async fn read_insertion_mark(&self, store: &dyn Store) -> Result<Stamp, ProtocolError> {
        let key = self.key("insertion/last_update");
        let read = store
            .head_with_metadata(&key)
            .await
            .map_err(|e| store_error(format!("reading {key}"), e))?;
        Ok(read.map(|(meta, metadata)| {
            let value = metadata
                .get(TIMESTAMP)
                .cloned()
                .unwrap_or_else(|| NO_TIMESTAMP.to_string());
            (value, meta.last_modified)
        }))
    }
}

/// `<ms since the epoch>-<uuid>`, the registry's stamp format.
pub fn stamp_value(now: SystemTime) -> String {
    let ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{ms}-{}", uuid::Uuid::new_v4())
}

fn store_error(what: String, source: StoreError) -> ProtocolError {
    ProtocolError::Store { what, source }
}

#[async_trait]
impl DeletionProtocol for ServerlessProtocol {
    async fn begin(&mut self, store: &dyn Store, now: SystemTime) -> Result<(), ProtocolError> {
        let key = self.key("gc/marker");
        let body = Bytes::from(self.owner.clone());
        store
            .put(&key, body, PutCondition::None)
            .await
            .map_err(|e| store_error(format!("writing {key}"), e))?;
        self.stamp_gc(store, now).await?;
        // Read after the announcement: a push that stamps after this read is seen changing it,
        // one that stamped before it either still has its marker or has written its manifest,
        // which the re-check of the roots after each protocol check lists.
        self.insertion_mark = Some(self.read_insertion_mark(store).await?);
        Ok(())
    }

    async fn before_batch(
        &mut self,
        store: &dyn Store,
        now: SystemTime,
    ) -> Result<(), ProtocolError> {
        let Some(mark) = &self.insertion_mark else {
            return Err(ProtocolError::Refused(
                "the registry's GC protocol was not begun; nothing deleted".into(),
            ));
        };
        let dir = self.key("insertion/");
        let listed = list_prefix(store, &dir)
            .await
            .map_err(|e| store_error(format!("listing {dir}"), e))?;
        let mut stale = Vec::new();
        for o in listed {
            let Some(leaf) = o.key.strip_prefix(&dir) else {
                continue;
            };
            // Deeper keys belong to a repository nested under `insertion/`, not to pushers.
            if leaf.contains('/') || leaf == LAST_UPDATE {
                continue;
            }
            let age = now.duration_since(o.last_modified).unwrap_or_default();
            if age < INSERTION_HOLD || o.defect.is_some() {
                return Err(ProtocolError::Refused(format!(
                    "a push is in progress: {} is {}s old (the registry's pushers hold its GC \
                     off for {}s)",
                    o.key,
                    age.as_secs(),
                    INSERTION_HOLD.as_secs()
                )));
            }
            if is_uuid(leaf) {
                stale.push(o.key);
            }
        }
        // Left by a pusher that died; the registry's GC removes them the same way.
        for chunk in stale.chunks(MAX_DELETE_BATCH) {
            match store.delete_batch(chunk).await {
                Ok(failed) if failed.is_empty() => {}
                Ok(failed) => {
                    tracing::warn!(count = failed.len(), prefix = %dir, "stale insertion markers not removed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, prefix = %dir, "removing stale insertion markers");
                }
            }
        }
        let current = self.read_insertion_mark(store).await?;
        if &current != mark {
            return Err(ProtocolError::Refused(format!(
                "a push ran: {dir}{LAST_UPDATE} changed since the collection was announced"
            )));
        }
        Ok(())
    }

    async fn recover(
        &mut self,
        store: &dyn Store,
        now: SystemTime,
        dead_owner: &str,
    ) -> Result<bool, ProtocolError> {
        let key = self.key("gc/marker");
        let body = match store.get_capped(&key, 1024).await {
            Ok(o) => o.body,
            Err(StoreError::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(store_error(format!("reading {key}"), e)),
        };
        if body.as_ref() != dead_owner.as_bytes() {
            return Ok(false);
        }
        self.end(store, now).await.map(|()| true)
    }

    async fn end(&mut self, store: &dyn Store, now: SystemTime) -> Result<(), ProtocolError> {
        // Stamp first: a pusher that checked while the marker stood sees the stamp move.
        self.stamp_gc(store, now).await?;
        let key = self.key("gc/marker");
        let failed = store
            .delete_batch(std::slice::from_ref(&key))
            .await
            .map_err(|e| store_error(format!("removing {key}"), e))?;
        if let Some(f) = failed.first() {
            return Err(store_error(
                format!("removing {key}"),
                StoreError::Request {
                    op: crate::store::Op::Delete,
                    key: f.key.clone(),
                    message: f.message.clone(),
                },
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_milliseconds_and_a_uuid() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_733_090_000_123);
        let v = stamp_value(t);
        let (ms, id) = v.split_once('-').expect("dash");
        assert_eq!(ms, "1733090000123");
        assert!(is_uuid(id), "{v}");
        assert_ne!(stamp_value(t), v, "each stamp is unique");
    }
}
