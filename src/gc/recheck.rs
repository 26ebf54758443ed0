//! The re-check before every delete batch (SPEC §3.5): lease renewal, the registry's own
//! protocol, a fresh look at the roots and the intents, and the batch announcement; whatever
//! became reachable leaves the batch.

use std::collections::HashSet;

use async_trait::async_trait;

use super::repo::RepoRun;
use super::stop::{Phase, Stop};
use super::{intent, sweep};
use crate::digest::Digest;
use crate::gc::lease::Lease;
use crate::gc::mark::Marker;
use crate::layout::{DeletionProtocol, ProtocolError, Repository, RootsVersion};
use crate::manifest::Descriptor;
use crate::report::Deleted;
use crate::store::ObjectMeta;

/// The re-check before each delete batch (SPEC §3.5) and the lease renewal (§3.7).
pub(super) struct RepoGuard<'g, 'm, 'r> {
    pub(super) run: &'g RepoRun<'r>,
    pub(super) repo: &'g Repository,
    pub(super) marker: &'g mut Marker<'m>,
    pub(super) lease: Lease,
    pub(super) roots_version: Option<RootsVersion>,
    pub(super) intents_seen: HashSet<String>,
    pub(super) rescued: u64,
    /// A batch announcement of this run stands (`intent::announce_deletion`).
    pub(super) announced: bool,
    /// The layout's registry protocol, and whether it was begun.
    pub(super) protocol: Option<(Box<dyn DeletionProtocol>, bool)>,
}

#[async_trait]
impl sweep::Guard for RepoGuard<'_, '_, '_> {
    async fn before_batch(&mut self, batch: Vec<Deleted>) -> Result<Vec<Deleted>, Stop> {
        let run = self.run;
        if run.stop.is_cancelled() {
            return Err(Stop::Shutdown(Phase::Recheck));
        }
        run.leases
            .keep(&mut self.lease)
            .await
            .map_err(|e| Stop::LeaseLost(e.to_string()))?;
        // Before the roots are re-read: a push that finished before the protocol let this
        // batch through has its manifest in that re-read.
        if let Some((p, begun)) = &mut self.protocol {
            let now = run.clock.now();
            let first = !std::mem::replace(begun, true);
            let asked = async {
                if first {
                    p.begin(run.store, now).await?;
                }
                p.before_batch(run.store, now).await
            };
            if let Err(e) = asked.await {
                let why = format!("the registry's GC protocol: {e}");
                return Err(match e {
                    ProtocolError::Refused(_) => Stop::Refused(why),
                    ProtocolError::Store { .. } => Stop::Store(why),
                });
            }
        }
        let version = run
            .layout
            .roots_version(run.store, self.repo)
            .await
            .map_err(|e| Stop::FailedClosed(format!("re-reading roots: {e}")))?;
        let mut more: Vec<Descriptor> = Vec::new();
        if version.is_none() || version != self.roots_version {
            let roots = run
                .layout
                .read_roots(run.store, self.repo)
                .await
                .map_err(|e| Stop::FailedClosed(format!("re-reading roots: {e}")))?;
            self.roots_version = roots.version;
            self.marker.prime(roots.documents);
            more.extend(roots.descriptors);
        }
        // Announce the batch before the last look at intents: a pusher that writes its
        // intent after that look will see the announcement and wait (the handshake of
        // `intent::begin_reuse`).
        let candidates: Vec<&Digest> = batch
            .iter()
            .filter_map(|d| d.digest.as_ref())
            .filter(|d| !self.marker.reachable.contains(*d))
            .collect();
        if !candidates.is_empty() {
            intent::announce_deletion(
                run.store,
                &self.repo.name,
                &run.run_id,
                &candidates,
                run.clock.now() + run.leases.ttl,
            )
            .await
            .map_err(|e| Stop::Store(format!("announcing the batch: {e}")))?;
            self.announced = true;
        }
        let listed = intent::list_intents(run.store, self.repo.into())
            .await
            .map_err(|e| Stop::Store(format!("re-listing intents: {e}")))?;
        let new: Vec<ObjectMeta> = listed
            .into_iter()
            .filter(|o| !self.intents_seen.contains(&o.key))
            .collect();
        let read = intent::read_intents(run.store, &new, run.clock.now())
            .await
            .map_err(Stop::FailedClosed)?;
        self.intents_seen.extend(new.into_iter().map(|o| o.key));
        more.extend(read.roots);
        if !more.is_empty() {
            self.marker
                .mark(&more)
                .await
                .map_err(|e| Stop::FailedClosed(e.0))?;
        }
        let before = batch.len();
        let safe: Vec<Deleted> = batch
            .into_iter()
            .filter(|d| {
                d.digest
                    .as_ref()
                    .is_none_or(|g| !self.marker.reachable.contains(g))
            })
            .collect();
        self.rescued += (before - safe.len()) as u64;
        Ok(safe)
    }

    async fn after_batch(&mut self, last: bool) {
        // After the last batch the announcement stays until the sweep's end removes it,
        // with the pending state where that goes too (one request, not two).
        if !last && std::mem::take(&mut self.announced) {
            if let Err(e) = intent::clear_deletion(self.run.store, &self.repo.name).await {
                // Pushers treat it as stale once its expiry passes.
                tracing::warn!(repo = %self.repo.name, error = %e, "could not remove the batch announcement");
            }
        }
    }
}
