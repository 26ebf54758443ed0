//! Sweeping: executing a plan's deletions in batches.
//!
//! Rounds of batches run one after another within a repository, so that a deadline (and, with
//! the online-safety protocol, a re-check of the roots) is honoured between any two of them.
//! A round is one batch unless the layout's re-check is costly (a whole LIST, for global
//! blobs); then a few batches share one re-check and go out together. Parallelism otherwise
//! comes from collecting several repositories at once.

use async_trait::async_trait;
use futures::future::join_all;
use tokio::time::Instant;

use super::stop::{Phase, Stop};
use crate::report::Deleted;
use crate::store::{Store, MAX_DELETE_BATCH};

/// Runs immediately before each delete batch: renews the lease, re-checks the roots, and
/// returns the part of the batch that is still safe to delete, or why the sweep must stop.
#[async_trait]
pub trait Guard: Send {
    /// Filters `batch`; an error stops the sweep before this batch.
    async fn before_batch(&mut self, batch: Vec<Deleted>) -> Result<Vec<Deleted>, Stop>;

    /// Runs after each delete request returned, whatever its outcome; `last` when no batch
    /// follows in this sweep (what it would undo may then be left to whoever ends the sweep,
    /// to go with its own requests).
    async fn after_batch(&mut self, _last: bool) {}
}

/// A guard that lets every batch through.
pub struct NoGuard;

#[async_trait]
impl Guard for NoGuard {
    async fn before_batch(&mut self, batch: Vec<Deleted>) -> Result<Vec<Deleted>, Stop> {
        Ok(batch)
    }
}

/// What a sweep did.
#[derive(Debug, Default)]
pub struct SweepOutcome {
    /// Keys the store confirmed deleted.
    pub deleted: Vec<Deleted>,
    /// Keys or batches that failed.
    pub errors: Vec<String>,
    /// Why the sweep stopped before every batch was sent: the deadline (between batches or
    /// during a re-check) or the guard.
    pub stopped: Option<Stop>,
}

/// Deletes `items` in rounds of `batches_per_round` batches of at most [`MAX_DELETE_BATCH`]
/// keys: the guard sees each round before any of its batches is sent, and the batches of a
/// round go out concurrently. Stops before a round if `deadline` has passed or `guard` says so
/// (a re-check that outlasts the deadline is abandoned), and after a batch that failed as a
/// whole.
pub async fn sweep(
    store: &dyn Store,
    items: Vec<Deleted>,
    deadline: Option<Instant>,
    batches_per_round: usize,
    guard: &mut dyn Guard,
) -> SweepOutcome {
    let mut out = SweepOutcome::default();
    let round_size = MAX_DELETE_BATCH * batches_per_round.max(1);
    let mut rest = items.into_iter().peekable();
    while rest.peek().is_some() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            out.stopped = Some(Stop::Timeout(Phase::Sweeping));
            break;
        }
        let round: Vec<Deleted> = rest.by_ref().take(round_size).collect();
        // The re-check is bounded by the same deadline as the batches it guards.
        let checked = match deadline {
            Some(d) => tokio::time::timeout_at(d, guard.before_batch(round))
                .await
                .unwrap_or(Err(Stop::Timeout(Phase::Recheck))),
            None => guard.before_batch(round).await,
        };
        let round = match checked {
            Ok(b) => b,
            Err(why) => {
                guard.after_batch(true).await;
                out.stopped = Some(why);
                break;
            }
        };
        if round.is_empty() {
            guard.after_batch(rest.peek().is_none()).await;
            continue;
        }
        crate::failpoint::hit("before-delete-batch");
        let results = join_all(round.chunks(MAX_DELETE_BATCH).map(|batch| async move {
            let keys: Vec<String> = batch.iter().map(|d| d.key.clone()).collect();
            (batch, store.delete_batch(&keys).await)
        }))
        .await;
        guard.after_batch(rest.peek().is_none()).await;
        let mut failed_whole = false;
        for (batch, result) in results {
            match result {
                Ok(failures) => {
                    let failed: std::collections::HashSet<&str> =
                        failures.iter().map(|f| f.key.as_str()).collect();
                    for f in &failures {
                        out.errors.push(format!("delete {}: {}", f.key, f.message));
                    }
                    out.deleted.extend(
                        batch
                            .iter()
                            .filter(|d| !failed.contains(d.key.as_str()))
                            .cloned(),
                    );
                    crate::failpoint::hit("after-delete-batch");
                }
                Err(e) => {
                    // The batch may or may not have been applied; stop rather than push on
                    // against a failing store. The next run sees what is left.
                    out.errors
                        .push(format!("delete batch of {} keys: {e}", batch.len()));
                    failed_whole = true;
                }
            }
        }
        if failed_whole {
            break;
        }
    }
    out
}
