//! Sweeping: executing a plan's deletions in batches.
//!
//! Batches run one after another within a repository, so that a deadline (and, with the
//! online-safety protocol, a re-check of the roots) is honoured between any two of them.
//! Parallelism comes from collecting several repositories at once.

use tokio::time::Instant;

use crate::report::Deleted;
use crate::store::{Store, MAX_DELETE_BATCH};

/// What a sweep did.
#[derive(Debug, Default)]
pub struct SweepOutcome {
    /// Keys the store confirmed deleted.
    pub deleted: Vec<Deleted>,
    /// Keys or batches that failed.
    pub errors: Vec<String>,
    /// True when the deadline passed before every batch was sent.
    pub timed_out: bool,
}

/// Deletes `items` in batches of at most [`MAX_DELETE_BATCH`], stopping before a batch if
/// `deadline` has passed or after a batch that failed as a whole.
pub async fn sweep(
    store: &dyn Store,
    items: Vec<Deleted>,
    deadline: Option<Instant>,
) -> SweepOutcome {
    let mut out = SweepOutcome::default();
    let mut rest = items.into_iter().peekable();
    while rest.peek().is_some() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            out.timed_out = true;
            break;
        }
        let batch: Vec<Deleted> = rest.by_ref().take(MAX_DELETE_BATCH).collect();
        let keys: Vec<String> = batch.iter().map(|d| d.key.clone()).collect();
        match store.delete_batch(&keys).await {
            Ok(failures) => {
                let failed: std::collections::HashSet<&str> =
                    failures.iter().map(|f| f.key.as_str()).collect();
                for f in &failures {
                    out.errors.push(format!("delete {}: {}", f.key, f.message));
                }
                out.deleted.extend(
                    batch
                        .into_iter()
                        .filter(|d| !failed.contains(d.key.as_str())),
                );
            }
            Err(e) => {
                // The batch may or may not have been applied; stop rather than push on
                // against a failing store. The next run sees what is left.
                out.errors
                    .push(format!("delete batch of {} keys: {e}", keys.len()));
                break;
            }
        }
    }
    out
}
