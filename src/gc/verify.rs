//! Verify after the sweep (SPEC §3.6): the roots and intents are read again, and a deleted
//! blob that is referenced now and still missing is a dangling reference. A blob that an
//! intent merely names is its pusher's to upload again (the handshake of
//! [`intent::begin_reuse`]), so it is a warning.

use std::collections::HashSet;

use futures::{stream, StreamExt};

use super::intent;
use super::repo::RepoRun;
use super::stop::Stop;
use crate::digest::Digest;
use crate::gc::mark::Marker;
use crate::layout::{Repository, RootsError};
use crate::report::RepoReport;
use crate::store::Store;

impl RepoRun<'_> {
    /// Re-reads the roots after the sweep: a deleted blob that is now reachable is a dangling
    /// reference, logged, counted and failing the repository.
    pub(super) async fn verify(
        &self,
        repo: &Repository,
        marker: &mut Marker<'_>,
        report: &mut RepoReport,
    ) {
        crate::failpoint::hit("before-verify");
        let roots = match self.layout.read_roots(self.store, repo).await {
            Ok(r) => r,
            Err(RootsError::Missing(_)) => {
                report.warnings.push(
                    "roots vanished after the sweep (repository deleted?); not verified".into(),
                );
                return;
            }
            Err(e) => {
                report
                    .warnings
                    .push(format!("verify could not read roots: {e}"));
                return;
            }
        };
        marker.prime(roots.documents);
        let from_roots = match marker.closure_allowing_missing(&roots.descriptors).await {
            Ok(r) => r,
            Err(e) => {
                report.warnings.push(format!("verify could not mark: {e}"));
                return;
            }
        };
        let intents = match self.fresh_intents(repo).await {
            Ok(read) => read.roots,
            Err(e) => {
                report
                    .warnings
                    .push(format!("verify could not read intents: {e}"));
                Vec::new()
            }
        };
        // The second walk reuses the documents and referrers the first one knows.
        let from_intents = match marker.closure_allowing_missing(&intents).await {
            Ok(r) => r,
            Err(e) => {
                report.warnings.push(format!("verify could not mark: {e}"));
                return;
            }
        };
        let named: HashSet<&Digest> = intents.iter().map(|d| &d.digest).collect();
        let mut announced_reuse = Vec::new();
        let referenced: Vec<(String, Digest)> = report
            .deleted
            .iter()
            .filter_map(|d| d.digest.clone().map(|g| (d.key.clone(), g)))
            .filter(|(_, g)| {
                if from_roots.contains(g) {
                    return true;
                }
                // Named by an intent written after the batch's re-check: by the handshake
                // (`intent::begin_reuse`) its pusher looks for the blob only after the delete,
                // finds it missing and uploads it. Nothing references it yet. A blob an
                // intent reaches only through a named manifest has no such promise.
                if named.contains(g) {
                    announced_reuse.push(g.clone());
                    return false;
                }
                from_intents.contains(g)
            })
            .collect();
        for digest in announced_reuse {
            report.warnings.push(format!(
                "{digest} was deleted and then named by a push intent; its pusher uploads it again"
            ));
        }
        let looks = stream::iter(referenced)
            .map(|(key, digest)| async move {
                let back = matches!(self.store.head(&key).await, Ok(Some(_)));
                (digest, back)
            })
            .buffer_unordered(self.concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        let mut dangling = Vec::new();
        for (digest, back) in looks {
            if back {
                report.warnings.push(format!(
                    "{digest} was deleted, referenced again and uploaded again during the run"
                ));
            } else {
                dangling.push(digest);
            }
        }
        dangling.sort();
        for d in &dangling {
            tracing::error!(repo = %repo.name, digest = %d, "dangling reference: a deleted blob is referenced");
        }
        if !dangling.is_empty() {
            report.stopped(&Stop::Dangling(dangling.len()));
            report.dangling_references = dangling;
        }
    }

    async fn fresh_intents(&self, repo: &Repository) -> Result<intent::Intents, String> {
        let listed = intent::list_intents(self.store, repo.into())
            .await
            .map_err(|e| e.to_string())?;
        intent::read_intents(self.store, &listed, self.clock.now()).await
    }
}
