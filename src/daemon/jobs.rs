//! Background jobs started by the hook API: whole-repository deletions and on-demand GC of one
//! repository. Kept in memory, the most recent [`MAX_JOBS`] of them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

use crate::report::RepoReport;

/// Jobs remembered at most; the oldest finished ones are forgotten first.
pub const MAX_JOBS: usize = 1000;

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// `DELETE /v1/repos/{name}`.
    DeleteRepo,
    /// `POST /v1/repos/{name}/gc`.
    Gc,
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a slot.
    Queued,
    /// Running.
    Running,
    /// Finished with the repository `ok`.
    Succeeded,
    /// Finished otherwise; `error` and `result` say why.
    Failed,
}

/// One job, as `GET /v1/jobs/{id}` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Job {
    /// Job id.
    pub id: String,
    /// What it does.
    pub kind: JobKind,
    /// The repository.
    pub repository: String,
    /// Where it is.
    pub status: JobStatus,
    /// The run's id, once running.
    pub run_id: Option<String>,
    /// The repository's part of the run report (same shape as in `--report`).
    pub result: Option<RepoReport>,
    /// Why it failed, when the run itself failed.
    pub error: Option<String>,
}

/// The job table.
#[derive(Default)]
pub struct Jobs {
    inner: Mutex<(HashMap<String, Job>, VecDeque<String>)>,
}

impl Jobs {
    /// Registers a new queued job and returns its id.
    pub fn create(&self, kind: JobKind, repository: &str) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let job = Job {
            id: id.clone(),
            kind,
            repository: repository.to_string(),
            status: JobStatus::Queued,
            run_id: None,
            result: None,
            error: None,
        };
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (table, order) = &mut *guard;
        while order.len() >= MAX_JOBS {
            // Forget the oldest finished job; running ones stay visible.
            let Some(pos) = order.iter().position(|id| {
                table
                    .get(id)
                    .is_none_or(|j| matches!(j.status, JobStatus::Succeeded | JobStatus::Failed))
            }) else {
                break;
            };
            if let Some(old) = order.remove(pos) {
                table.remove(&old);
            }
        }
        table.insert(id.clone(), job);
        order.push_back(id.clone());
        id
    }

    /// Changes a job.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Job)) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(job) = guard.0.get_mut(id) {
            f(job);
        }
    }

    /// A snapshot of a job.
    pub fn get(&self, id: &str) -> Option<Job> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        guard.0.get(id).cloned()
    }
}
