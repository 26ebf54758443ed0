//! What a `gc` run is asked to do: the selection of repositories, the shard, and every
//! setting of the run (SPEC §4).

use std::sync::Arc;
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Which repositories a run collects: all, or those matching any of a set of globs.
///
/// `*` and `?` stay within one path segment, `**` spans segments (`team/**`).
#[derive(Clone, Debug, Default)]
pub struct RepoFilter(Option<GlobSet>);

impl RepoFilter {
    /// A filter from glob patterns; no patterns select every repository.
    pub fn new(patterns: &[String]) -> Result<RepoFilter, globset::Error> {
        if patterns.is_empty() {
            return Ok(RepoFilter(None));
        }
        let mut set = GlobSetBuilder::new();
        for p in patterns {
            set.add(GlobBuilder::new(p).literal_separator(true).build()?);
        }
        Ok(RepoFilter(Some(set.build()?)))
    }

    /// Whether `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        self.0.as_ref().is_none_or(|s| s.is_match(name))
    }
}

/// One shard of a sharded run: this process collects the repositories of the `index`-th of
/// `count` contiguous slices of the key space, cut between repositories (see
/// [`crate::store::plan_shards`]); shards planned on the same listing cover every repository
/// exactly once, and the global unit is the first shard's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: u32,
    /// How many shards there are.
    pub count: u32,
}

impl Shard {
    /// Parses `I/N` with `I < N`.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected I/N, e.g. 0/4"))?;
        let index: u32 = i.trim().parse().map_err(|_| format!("{s:?}: bad index"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: bad shard count"))?;
        if count == 0 || index >= count {
            return Err(format!("{s:?}: need 0 <= I < N"));
        }
        Ok(Shard { index, count })
    }
}

/// Settings of a `gc` run.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Unreferenced blobs younger than this are kept.
    pub grace: Duration,
    /// Delay between the two observations required before a delete; zero deletes in this run.
    pub delay: Duration,
    /// Plan and report only.
    pub dry_run: bool,
    /// Repositories to collect.
    pub repos: RepoFilter,
    /// Only this shard's repositories, if set.
    pub shard: Option<Shard>,
    /// Store requests in flight at most (also repositories collected at once).
    pub concurrency: usize,
    /// About how many parts a listing longer than one page is split into and listed at once
    /// (within `concurrency`); 1 lists sequentially.
    pub list_parts: usize,
    /// Time-out of one store request, retries included.
    pub request_timeout: Duration,
    /// Time-out of one repository.
    pub repo_timeout: Option<Duration>,
    /// Time-out of the whole run.
    pub run_timeout: Option<Duration>,
    /// Lifetime of a repository lease between renewals.
    pub lease_ttl: Duration,
    /// Added to the bucket clock: simulates the passage of time (tests, drills). Zero in use.
    pub clock_offset: Duration,
    /// Where to record metrics, if anywhere.
    pub metrics: Option<Arc<Metrics>>,
    /// Cancelled on shutdown: no repository starts after it, marking is abandoned, deleting
    /// stops before the next batch.
    pub stop: CancellationToken,
    /// Progress receiver, if any.
    pub progress: Option<Arc<dyn Progress>>,
    /// A run of this one repository (the daemon's hook): only it is collected, only its
    /// prefix is listed where the layout allows, and metrics count it as a hook run.
    pub only: Option<String>,
    /// Neither read nor write the incremental cache (`_ocigc/cache/`): every repository is
    /// observed in full. For measurements and for ruling the cache out; never needed for safety.
    pub no_cache: bool,
    /// Which tags go before marking (`[[retention]]`, `--protect-file`, `--trash-ttl`); no
    /// tables: retention removes nothing, but trashed manifests stay roots all the same.
    pub retention: Arc<crate::retention::RetentionOptions>,
    /// A repository whose plan deletes more than this share of its blob bytes fails closed
    /// (`budget_exceeded`); 1 disables the check (SPEC §3.10).
    pub max_delete_fraction: f64,
    /// The run deletes at most this many bytes: the repository whose plan would cross it, and
    /// every one after it, delete nothing.
    pub max_delete_bytes: Option<u64>,
    /// Store requests per second at most, shared by everything holding the same limiter
    /// (the daemon's runs and hook jobs); `None`: unlimited.
    pub rate_limit: Option<Arc<crate::store::RateLimit>>,
    /// Prices for the report's `cost` and the cost metrics; `None`: no cost.
    pub prices: Option<crate::cost::Prices>,
    /// Record [`crate::report::RepoDetail`] for each repository (`du`, `explain`); the
    /// incremental cache is then read but never lets a repository be skipped.
    pub detail: bool,
    /// Digests to explain (with `detail`): the marker records one parent per digest.
    pub explain: Option<Arc<std::collections::HashSet<crate::digest::Digest>>>,
}

/// The default of `--max-delete-fraction`.
pub const DEFAULT_MAX_DELETE_FRACTION: f64 = 0.9;

impl std::fmt::Debug for dyn Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// Receives progress of a run (the CLI draws a progress bar from it on a terminal).
pub trait Progress: Send + Sync {
    /// The run is about to collect `repositories` repositories (as far as it knows yet).
    fn start(&self, repositories: u64);
    /// The listing has found `repositories` repositories to collect so far.
    fn found(&self, _repositories: u64) {}
    /// One repository is done.
    fn repository_done(&self, name: &str, deleted: u64);
    /// The run is over.
    fn finish(&self);
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(24 * 3600),
            delay: Duration::from_secs(3600),
            dry_run: false,
            repos: RepoFilter::default(),
            shard: None,
            concurrency: 16,
            list_parts: 16,
            request_timeout: Duration::from_secs(60),
            repo_timeout: None,
            run_timeout: None,
            lease_ttl: Duration::from_secs(600),
            clock_offset: Duration::ZERO,
            metrics: None,
            stop: CancellationToken::new(),
            progress: None,
            only: None,
            no_cache: false,
            retention: Arc::default(),
            max_delete_fraction: DEFAULT_MAX_DELETE_FRACTION,
            max_delete_bytes: None,
            rate_limit: None,
            prices: None,
            detail: false,
            explain: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_syntax() {
        assert_eq!(Shard::parse("2/4"), Ok(Shard { index: 2, count: 4 }));
        for bad in ["4/4", "1/0", "x/2", "3", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }
}
