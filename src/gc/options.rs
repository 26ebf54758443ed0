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

/// One shard of a sharded run: this process collects the repositories whose stable hash falls
/// in `index` out of `count`. The union of all shards is every repository exactly once.
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

    /// Whether this shard owns `repository`. FNV-1a: fixed forever, so every process and
    /// every version agrees on the split.
    pub fn owns(&self, repository: &str) -> bool {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in repository.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h % u64::from(self.count) == u64::from(self.index)
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
}

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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_repository_exactly_once() {
        let names: Vec<String> = (0..5000)
            .map(|i| format!("team-{}/app-{i}", i % 37))
            .collect();
        for count in [1u32, 2, 3, 7, 16] {
            let shards: Vec<Shard> = (0..count).map(|index| Shard { index, count }).collect();
            let mut sizes = vec![0usize; count as usize];
            for n in &names {
                let owners: Vec<_> = shards.iter().filter(|s| s.owns(n)).collect();
                assert_eq!(owners.len(), 1, "{n} with {count} shards");
                sizes[owners[0].index as usize] += 1;
            }
            // Balanced within 20% of the mean.
            let mean = names.len() / count as usize;
            assert!(
                sizes
                    .iter()
                    .all(|&s| s * 5 >= mean * 4 && s * 5 <= mean * 6),
                "{sizes:?}"
            );
        }
    }

    #[test]
    fn shard_syntax() {
        assert_eq!(Shard::parse("2/4"), Ok(Shard { index: 2, count: 4 }));
        for bad in ["4/4", "1/0", "x/2", "3", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }
}
