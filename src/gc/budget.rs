//! The blast-radius budget (SPEC §3.10): how much one run may delete, checked on each
//! repository's plan before anything of it is deleted.
//!
//! It guards against the mistakes no reachability rule can see: a bucket read with the wrong
//! `--layout`, a bucket URL whose prefix is one level off, or a bug, each of which makes most
//! of a repository look unreferenced. Whole-repository deletion never comes here (it deletes
//! everything by design).

use std::sync::Mutex;

use super::plan::Exposure;
use super::stop::Stop;
use crate::report::human_bytes;

/// The limits of one run: a share of each repository, and bytes for the whole run.
#[derive(Debug)]
pub struct Budget {
    max_fraction: f64,
    max_bytes: Option<u64>,
    run: Mutex<RunSpent>,
}

#[derive(Debug, Default)]
struct RunSpent {
    /// Bytes admitted so far.
    admitted: u64,
    /// A repository was refused for the run's bound: nothing more is admitted this run.
    crossed: bool,
}

impl Budget {
    /// A repository may lose at most `max_fraction` of its blob bytes (1 or more: no limit);
    /// the run at most `max_bytes` bytes, if set.
    pub fn new(max_fraction: f64, max_bytes: Option<u64>) -> Budget {
        Budget {
            max_fraction,
            max_bytes,
            run: Mutex::new(RunSpent::default()),
        }
    }

    /// Admits a plan that deletes `e`, of which `already` bytes were admitted for an earlier
    /// plan of the same repository (a plan made again): returns the bytes now admitted for
    /// the repository, or why nothing of it may be deleted.
    pub fn admit(&self, e: Exposure, already: u64) -> Result<u64, Stop> {
        if e.deleted_keys == 0 {
            return Ok(already);
        }
        if e.exceeds(self.max_fraction) {
            return Err(Stop::BudgetExceeded(format!(
                "the plan deletes {} blobs, {} of its {} of blobs ({:.1}%), more than \
                 --max-delete-fraction {} allows. A wrong --layout or bucket prefix looks like \
                 this; if the deletions are intended (e.g. every tag was removed), run once \
                 with --max-delete-fraction 1",
                e.deleted_blobs,
                human_bytes(e.deleted_blob_bytes),
                human_bytes(e.blob_bytes),
                e.fraction() * 100.0,
                self.max_fraction
            )));
        }
        let Some(max) = self.max_bytes else {
            return Ok(e.deleted_bytes.max(already));
        };
        // A poisoned lock only means another repository panicked mid-update of two integers.
        let mut run = self.run.lock().unwrap_or_else(|p| p.into_inner());
        if run.crossed {
            return Err(Stop::BudgetExceeded(format!(
                "the run reached --max-delete-bytes {} before this repository was swept",
                human_bytes(max)
            )));
        }
        let extra = e.deleted_bytes.saturating_sub(already);
        if run.admitted.saturating_add(extra) > max {
            run.crossed = true;
            return Err(Stop::BudgetExceeded(format!(
                "its {} of deletions would take the run past --max-delete-bytes {} ({} admitted \
                 before it); the run deletes nothing more",
                human_bytes(e.deleted_bytes),
                human_bytes(max),
                human_bytes(run.admitted)
            )));
        }
        run.admitted += extra;
        Ok(already + extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::RepoStatus;

    fn exposure(deleted: u64, of: u64) -> Exposure {
        Exposure {
            deleted_keys: u64::from(deleted > 0),
            deleted_bytes: deleted,
            deleted_blobs: u64::from(deleted > 0),
            deleted_blob_bytes: deleted,
            blobs: 1,
            blob_bytes: of,
        }
    }

    #[test]
    fn a_repository_over_its_fraction_is_refused() {
        let b = Budget::new(0.9, None);
        assert_eq!(b.admit(exposure(90, 100), 0), Ok(90));
        let refused = b.admit(exposure(91, 100), 0).expect_err("over 90%");
        assert_eq!(refused.status(), RepoStatus::BudgetExceeded);
        assert!(refused.message().contains("--max-delete-fraction 1"));
        assert_eq!(Budget::new(1.0, None).admit(exposure(100, 100), 0), Ok(100));
    }

    #[test]
    fn the_run_stops_at_the_repository_that_would_cross_its_bytes() {
        let b = Budget::new(1.0, Some(100));
        assert_eq!(b.admit(exposure(60, 100), 0), Ok(60));
        assert!(b.admit(exposure(50, 100), 0).is_err(), "60 + 50 > 100");
        // Once crossed, even what would fit is refused: the run stops deleting.
        let after = b.admit(exposure(10, 100), 0).expect_err("crossed");
        assert!(after.message().contains("before this repository"));
        // Nothing to delete needs no budget.
        assert_eq!(b.admit(exposure(0, 100), 0), Ok(0));
    }

    #[test]
    fn a_plan_made_again_is_charged_only_its_growth() {
        let b = Budget::new(1.0, Some(100));
        assert_eq!(b.admit(exposure(60, 100), 0), Ok(60));
        assert_eq!(b.admit(exposure(70, 100), 60), Ok(70));
        assert_eq!(b.admit(exposure(20, 100), 0), Ok(20), "70 + 20 <= 100");
        assert!(b.admit(exposure(11, 100), 0).is_err());
    }
}
