//! Why a repository's collection ended before its plan was carried out: one typed value per
//! cause, mapped to a status and a message in one place (SPEC §3.8: nothing more is deleted in
//! the repository once any of these happens).

use crate::report::{RepoReport, RepoStatus};

/// A phase of a repository's collection, for messages that say where a stop happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before anything was read.
    Start,
    /// Applying retention (reading, deciding and removing tags).
    Retention,
    /// Reading roots, intents and state, and marking.
    Marking,
    /// Listing the global blob space against what marking found (streamed `distribution`).
    Listing,
    /// The re-check before a delete batch.
    Recheck,
    /// Between delete batches.
    Sweeping,
    /// Writing the pending state after the sweep.
    State,
    /// The verify pass after the sweep.
    Verify,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::Start => "before this repository started",
            Phase::Retention => "while applying retention",
            Phase::Marking => "while marking",
            Phase::Listing => "while listing the blob space against its marks",
            Phase::Recheck => "during a re-check before a delete batch",
            Phase::Sweeping => "between delete batches",
            Phase::State => "while writing the pending state",
            Phase::Verify => "while verifying",
        }
    }
}

/// Why a repository stopped early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Something could not be read or understood safely: nothing (more) is deleted.
    FailedClosed(String),
    /// The repository's or the run's deadline passed.
    Timeout(Phase),
    /// The process is shutting down.
    Shutdown(Phase),
    /// Another collector holds the repository's lease.
    LeaseHeld {
        /// The holder's run id.
        owner: String,
        /// When its lease expires.
        expires_at: String,
    },
    /// This run's lease could not be kept (renewal failed or another collector took it over).
    LeaseLost(String),
    /// The registry's own GC protocol said not now (a push in progress).
    Refused(String),
    /// A store request failed.
    Store(String),
    /// The verify pass found deleted blobs referenced and missing (must never happen).
    Dangling(usize),
    /// The plan would delete more than the blast-radius budget allows (SPEC §3.10): nothing
    /// is deleted in the repository.
    BudgetExceeded(String),
}

impl Stop {
    /// The repository status this stop gives.
    pub fn status(&self) -> RepoStatus {
        match self {
            Stop::FailedClosed(_) | Stop::LeaseLost(_) | Stop::Store(_) | Stop::Dangling(_) => {
                RepoStatus::Failed
            }
            Stop::Timeout(Phase::Start) | Stop::Shutdown(_) => RepoStatus::Skipped,
            Stop::LeaseHeld { .. } | Stop::Refused(_) => RepoStatus::Skipped,
            Stop::Timeout(_) => RepoStatus::Timeout,
            Stop::BudgetExceeded(_) => RepoStatus::BudgetExceeded,
        }
    }

    /// The message for the report.
    pub fn message(&self) -> String {
        match self {
            Stop::FailedClosed(why) => format!("failed closed, nothing deleted: {why}"),
            Stop::Timeout(Phase::Start) => {
                "run time-out reached before this repository started".into()
            }
            Stop::Timeout(p @ (Phase::Marking | Phase::Listing)) => {
                format!("timed out {}; nothing deleted", p.describe())
            }
            Stop::Timeout(p) => format!("timed out {}", p.describe()),
            Stop::Shutdown(Phase::Start) => "shutting down; not started".into(),
            Stop::Shutdown(p @ (Phase::Marking | Phase::Listing)) => {
                format!("shutting down {}; nothing deleted", p.describe())
            }
            Stop::Shutdown(p) => format!("shutting down {}", p.describe()),
            Stop::LeaseHeld { owner, expires_at } => {
                format!("lease held by {owner} until {expires_at}; nothing deleted")
            }
            Stop::LeaseLost(why) => format!("lease lost, nothing more deleted: {why}"),
            Stop::Refused(why) => format!("stopped before a delete batch: {why}"),
            Stop::Store(why) => why.clone(),
            Stop::Dangling(n) => format!("{n} deleted blobs are referenced: dangling references"),
            Stop::BudgetExceeded(why) => format!("budget exceeded, nothing deleted: {why}"),
        }
    }
}

/// How bad a status is: a report keeps the worst status any stop gave it.
fn severity(s: RepoStatus) -> u8 {
    match s {
        RepoStatus::Ok => 0,
        RepoStatus::Skipped => 1,
        RepoStatus::Timeout => 2,
        // As bad as failed: both fail closed, and an operator must look at either.
        RepoStatus::Failed | RepoStatus::BudgetExceeded => 3,
    }
}

impl RepoReport {
    /// Records `stop`: its message among the errors, and its status unless a worse one is
    /// already set.
    pub fn stopped(&mut self, stop: &Stop) {
        let status = stop.status();
        if severity(status) >= severity(self.status) {
            self.status = status;
        }
        if matches!(stop, Stop::LeaseHeld { .. }) {
            self.lease_conflict = true;
        }
        self.errors.push(stop.message());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_status_wins() {
        let mut r = RepoReport::new("r", RepoStatus::Ok);
        r.stopped(&Stop::Timeout(Phase::Sweeping));
        r.stopped(&Stop::Shutdown(Phase::Verify));
        assert_eq!(r.status, RepoStatus::Timeout);
        r.stopped(&Stop::Store("x".into()));
        assert_eq!(r.status, RepoStatus::Failed);
        assert_eq!(r.errors.len(), 3);
    }

    #[test]
    fn a_held_lease_is_a_conflict() {
        let mut r = RepoReport::new("r", RepoStatus::Ok);
        r.stopped(&Stop::LeaseHeld {
            owner: "o".into(),
            expires_at: "t".into(),
        });
        assert!(r.lease_conflict);
        assert_eq!(r.status, RepoStatus::Skipped);
    }
}
