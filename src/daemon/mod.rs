//! `ocigc serve`: scheduled full runs, the repository-deletion and on-demand GC hooks, and the
//! metrics endpoint, in one long-running process.
//!
//! Full runs never overlap (one run slot); hook jobs run beside them, at most
//! [`MAX_PARALLEL_JOBS`] at a time, kept apart from full runs per repository by leases; at most
//! `max_queued_jobs` more wait, further requests get 429. The HTTP server bounds what a client
//! can hold: connections at most `max_connections`, and a request head (or an idle keep-alive
//! connection) at most `header_read_timeout`. On shutdown new work is refused, running work
//! stops at its next safe point (marking is abandoned, deleting stops between batches), and
//! the process waits at most the drain time, open connections included.

mod http;
pub mod jobs;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gc::{self, DeleteRepoOptions, GcOptions, RepoFilter};
use crate::layout::Layout;
use crate::metrics::Metrics;
use crate::report::RepoStatus;
use crate::store::Store;
use jobs::{JobKind, JobStatus, Jobs};

/// Hook jobs running at once at most; more wait in the queue.
pub const MAX_PARALLEL_JOBS: usize = 4;

/// Everything `serve` needs.
pub struct ServeOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Interval between scheduled full runs; `None` runs only on request.
    pub interval: Option<Duration>,
    /// Bearer token of the hook API; `None` only with `--insecure-no-auth`.
    pub token: Option<String>,
    /// How long to wait for running work on shutdown.
    pub drain_timeout: Duration,
    /// Settings of every GC run (full and on-demand); `repos` limits scheduled runs.
    pub gc: GcOptions,
    /// Settings of repository deletions.
    pub delete: DeleteRepoOptions,
    /// Pushgateway to push to once on shutdown, if any.
    pub pushgateway: Option<String>,
    /// Hook jobs waiting for a slot at most; more requests are answered 429.
    pub max_queued_jobs: usize,
    /// HTTP connections open at most; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// How long a client may take to send a request head, or keep a connection idle.
    pub header_read_timeout: Duration,
}

/// Default of [`ServeOptions::max_queued_jobs`].
pub const DEFAULT_MAX_QUEUED_JOBS: usize = 64;
/// Default of [`ServeOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// The state shared by the HTTP handlers, the scheduler and the jobs.
pub(crate) struct App {
    pub store: Arc<dyn Store>,
    pub layout: Arc<dyn Layout>,
    pub metrics: Arc<Metrics>,
    pub jobs: Jobs,
    /// SHA-256 of the hook token: comparing digests takes the same time whatever the
    /// given token's length.
    pub token: Option<[u8; 32]>,
    pub gc: GcOptions,
    pub delete: DeleteRepoOptions,
    /// Start of the full run in progress, if any.
    pub running_since: Mutex<Option<Instant>>,
    /// How long a full run may take before `/readyz` calls it stuck.
    pub stuck_after: Duration,
    pub run_slot: Semaphore,
    pub job_slots: Semaphore,
    /// One permit per job accepted and not yet started.
    pub queue: Arc<Semaphore>,
    pub tasks: TaskTracker,
    pub stop: CancellationToken,
    /// The runtime GC work runs on (the HTTP server has its own, so that health checks never
    /// queue behind marking).
    pub work: tokio::runtime::Handle,
}

impl App {
    /// Runs one full GC (waiting for the run slot: never two at once).
    async fn full_run(&self) {
        let Ok(_slot) = self.run_slot.acquire().await else {
            return;
        };
        if self.stop.is_cancelled() {
            return;
        }
        let opts = match self.gc_options() {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "scheduled gc run skipped");
                return;
            }
        };
        *self.running_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let result = gc::run_gc(self.store.clone(), self.layout.clone(), &opts).await;
        *self.running_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Err(e) = result {
            tracing::error!(error = %anyhow::Error::from(e), "scheduled gc run failed");
        }
    }

    /// The GC options of the next run, with the protect file read again.
    fn gc_options(&self) -> Result<GcOptions, crate::retention::protect::LoadError> {
        let mut opts = self.gc.clone();
        if opts.retention.protect_file.is_some() {
            opts.retention = Arc::new(opts.retention.reloaded()?);
        }
        Ok(opts)
    }

    /// Queues a hook job and returns its id; `None` when the queue is full.
    pub fn start_job(self: &Arc<Self>, kind: JobKind, repository: &str) -> Option<String> {
        let queued = self.queue.clone().try_acquire_owned().ok()?;
        let id = self.jobs.create(kind, repository);
        let (app, job, repo) = (self.clone(), id.clone(), repository.to_string());
        self.tasks.spawn_on(
            async move {
                let Ok(_slot) = app.job_slots.acquire().await else {
                    return;
                };
                drop(queued);
                if app.stop.is_cancelled() {
                    app.jobs.update(&job, |j| {
                        j.status = JobStatus::Failed;
                        j.error = Some("shutting down before the job started".into());
                    });
                    return;
                }
                app.jobs.update(&job, |j| j.status = JobStatus::Running);
                app.run_job(&job, kind, &repo).await;
            },
            &self.work,
        );
        Some(id)
    }

    async fn run_job(&self, job: &str, kind: JobKind, repo: &str) {
        let names = [repo.to_string()];
        let result = match kind {
            JobKind::DeleteRepo => {
                gc::delete_repositories(
                    self.store.clone(),
                    self.layout.clone(),
                    &names,
                    &self.delete,
                )
                .await
            }
            JobKind::Gc => {
                let mut opts = match self.gc_options() {
                    Ok(o) => o,
                    Err(e) => {
                        self.jobs.update(job, |j| {
                            j.status = JobStatus::Failed;
                            j.error = Some(e.to_string());
                        });
                        return;
                    }
                };
                // Repository names contain no glob metacharacters: the glob is the name.
                opts.repos = match RepoFilter::new(&names) {
                    Ok(f) => f,
                    Err(e) => {
                        self.jobs.update(job, |j| {
                            j.status = JobStatus::Failed;
                            j.error = Some(e.to_string());
                        });
                        return;
                    }
                };
                opts.only = Some(repo.to_string());
                gc::run_gc(self.store.clone(), self.layout.clone(), &opts).await
            }
        };
        self.jobs.update(job, |j| match result {
            Ok(report) => {
                j.run_id = Some(report.run_id.clone());
                let mine = report.repositories.into_iter().find(|r| r.name == repo);
                j.status = match &mine {
                    Some(r) if r.status != RepoStatus::Ok => JobStatus::Failed,
                    _ => JobStatus::Succeeded,
                };
                if mine.is_none() && kind == JobKind::Gc {
                    j.error = Some("repository not found".into());
                }
                j.result = mine;
            }
            Err(e) => {
                j.status = JobStatus::Failed;
                j.error = Some(format!("{:#}", anyhow::Error::from(e)));
            }
        });
    }
}

/// Runs the daemon until `shutdown` resolves, then drains. Returns once the process may exit.
pub async fn serve(
    store: Arc<dyn Store>,
    layout: Arc<dyn Layout>,
    metrics: Arc<Metrics>,
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(opts.listen)?;
    serve_on(listener, store, layout, metrics, opts, shutdown).await
}

/// [`serve`] on a listener bound already (`opts.listen` is not used).
pub async fn serve_on(
    listener: std::net::TcpListener,
    store: Arc<dyn Store>,
    layout: Arc<dyn Layout>,
    metrics: Arc<Metrics>,
    mut opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    opts.gc.stop = stop.clone();
    opts.gc.metrics = Some(metrics.clone());
    opts.delete.metrics = Some(metrics.clone());
    let stuck_after = opts
        .gc
        .run_timeout
        .map_or(Duration::from_secs(24 * 3600), |t| {
            t.saturating_add(Duration::from_secs(60))
        });
    let app = Arc::new(App {
        store,
        layout,
        metrics: metrics.clone(),
        jobs: Jobs::default(),
        token: opts.token.as_deref().map(http::token_digest),
        gc: opts.gc.clone(),
        delete: opts.delete.clone(),
        running_since: Mutex::new(None),
        stuck_after,
        run_slot: Semaphore::new(1),
        job_slots: Semaphore::new(MAX_PARALLEL_JOBS),
        queue: Arc::new(Semaphore::new(opts.max_queued_jobs)),
        tasks: TaskTracker::new(),
        stop: stop.clone(),
        work: tokio::runtime::Handle::current(),
    });
    listener.set_nonblocking(true)?;
    tracing::info!(listen = %listener.local_addr()?, interval = ?opts.interval, "serving");

    if let Some(interval) = opts.interval {
        let app2 = app.clone();
        app.tasks.spawn(async move {
            loop {
                app2.full_run().await;
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = app2.stop.cancelled() => return,
                }
            }
        });
    }

    // The HTTP server runs on a runtime of its own, on its own thread: however busy GC keeps
    // the work runtime, /healthz and /metrics answer at once.
    let router = http::router(app.clone());
    let http_stop = stop.clone();
    let limits = http::Limits {
        max_connections: opts.max_connections,
        header_read_timeout: opts.header_read_timeout,
        drain_timeout: opts.drain_timeout,
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ocigc-http".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|rt| {
                    rt.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        http::serve(listener, router, limits, http_stop).await;
                        Ok(())
                    })
                });
            let _ = done_tx.send(result);
        })?;
    shutdown.await;
    tracing::info!("shutdown requested: refusing new work, draining");
    // One deadline for open connections and running work together.
    let deadline = Instant::now() + opts.drain_timeout;
    stop.cancel();
    match done_rx.await {
        Ok(result) => result?,
        Err(_) => tracing::error!("the HTTP server thread died"),
    }

    app.tasks.close();
    if tokio::time::timeout_at(deadline, app.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(drain_timeout = ?opts.drain_timeout, "drain time-out reached; leaving (leases expire)");
    }
    if let Some(gateway) = &opts.pushgateway {
        if let Err(e) = metrics
            .push(gateway, &app.store.describe(), Duration::from_secs(10))
            .await
        {
            // The error shows the URL without its credentials.
            tracing::error!(error = %e, "metrics push failed");
        }
    }
    tracing::info!("stopped");
    Ok(())
}
