//! The GC engine: list → partition by repository → mark → plan → re-check → delete → verify →
//! report, per repository under a lease, with ages on the bucket clock (SPEC §3).
//!
//! Layout- and store-agnostic: everything layout-specific goes through [`Layout`], every request
//! through [`Instrumented`] (concurrency bound, time-out, counts).

pub mod budget;
pub mod cache;
pub mod clock;
mod delete_repo;
pub mod intent;
pub mod lease;
pub mod mark;
mod options;
mod parts;
pub mod plan;
mod recheck;
mod repo;
mod run;
mod scope;
pub mod state;
pub mod stop;
mod streamed;
pub mod sweep;
mod verify;

use std::time::Duration;

use futures::TryStreamExt;

use crate::layout::Layout;
use crate::namespace;
use crate::report::{timestamp, Report};
use crate::store::{Instrumented, ObjectMeta, Store, StoreError};
use clock::BucketClock;

pub use delete_repo::{delete_repositories, DeleteRepoOptions};
pub use options::{GcOptions, Progress, RepoFilter, Shard, DEFAULT_MAX_DELETE_FRACTION};
pub use run::run_gc;

/// A fatal error: the run could not even start on the repositories.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The bucket listing failed, so no repository can be judged.
    #[error("listing {bucket} failed")]
    List {
        bucket: String,
        #[source]
        source: StoreError,
    },
    /// The store's time could not be read (the first request of every run).
    #[error("cannot use {bucket}")]
    Clock {
        bucket: String,
        #[source]
        source: clock::ClockError,
    },
    /// Cross-repository links could not be read, so no repository's roots are complete.
    #[error("reading cross-repository links in {bucket} failed")]
    Links {
        bucket: String,
        #[source]
        source: StoreError,
    },
    /// The run time-out passed while the bucket was still being listed.
    #[error("run time-out of {0:?} reached while listing the bucket")]
    ListTimeout(Duration),
}

/// A bucket listing split into repository objects and ocigc's own state objects.
pub(crate) struct Listing {
    pub objects: Vec<ObjectMeta>,
    pub state: Vec<ObjectMeta>,
}

/// Lists every object under `prefix`, setting ocigc's own state apart.
pub(crate) async fn list_all(store: &dyn Store, prefix: &str) -> Result<Listing, StoreError> {
    let pages: Vec<Vec<ObjectMeta>> = store.list(prefix).try_collect().await?;
    let (state, objects) = pages
        .into_iter()
        .flatten()
        .partition(|o| namespace::is_state(&o.key));
    Ok(Listing { objects, state })
}

pub(crate) fn new_report(
    command: &'static str,
    store: &Instrumented,
    layout: &dyn Layout,
    dry_run: bool,
) -> Report {
    Report {
        run_id: uuid::Uuid::new_v4().to_string(),
        command,
        bucket: store.describe(),
        layout: layout.name(),
        started_at: String::new(),
        finished_at: String::new(),
        dry_run,
        grace: None,
        delay: None,
        repositories: Vec::new(),
        rejected: Vec::new(),
        unowned_objects: 0,
        totals: Default::default(),
        requests: Default::default(),
        cost: None,
    }
}

/// Runs one of the whole-bucket reads that precede any repository's work, failing the run
/// with [`GcError::ListTimeout`] if it outlasts the run's deadline.
async fn before_run_deadline<T>(
    deadline: Option<tokio::time::Instant>,
    opts: &GcOptions,
    read: impl std::future::Future<Output = T>,
) -> Result<T, GcError> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, read)
            .await
            .map_err(|_| GcError::ListTimeout(opts.run_timeout.unwrap_or_default())),
        None => Ok(read.await),
    }
}

pub(crate) async fn probe_clock(store: &Instrumented) -> Result<BucketClock, GcError> {
    BucketClock::probe(store)
        .await
        .map_err(|source| GcError::Clock {
            bucket: store.describe(),
            source,
        })
}

pub(crate) fn finish_report(report: &mut Report, store: &Instrumented, clock: &BucketClock) {
    report.repositories.sort_by(|a, b| a.name.cmp(&b.name));
    report.finished_at = timestamp(clock.now());
    report.requests = store.counts();
    report.compute_totals();
}
