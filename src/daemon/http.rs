//! The HTTP API of `ocigc serve` (axum routes on hyper's HTTP/1 connections).
//!
//! `/metrics`, `/healthz` and `/readyz` are open (scraped and probed by the platform); the hook
//! endpoints need `Authorization: Bearer <token>`, compared in constant time.
//!
//! `axum::serve` bounds neither the time a client takes to send a request head nor the number
//! of connections, and its graceful shutdown waits for every connection; so connections are
//! accepted here, at most [`Limits::max_connections`] at once, each with hyper's header read
//! time-out, and dropped when the drain time-out passes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::jobs::JobKind;
use super::App;
use crate::layout::validate_repository_name;

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/v1/repos/{*rest}",
            axum::routing::delete(delete_repo).post(post_repo),
        )
        .route("/v1/jobs/{id}", get(job))
        .with_state(app)
}

/// What one client may hold of the server.
pub(crate) struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub drain_timeout: Duration,
}

/// Serves `router` until `stop`, then waits at most the drain time-out for open connections
/// (a request in progress finishes, an idle connection closes at once) and drops the rest.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        // Past the limit, connections wait in the listen backlog until one closes.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = stop.cancelled() => break,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection closed");
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(limits.drain_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "drain time-out reached with connections open; closing them"
        );
    }
}

/// The SHA-256 of a token, as the daemon keeps and compares it.
pub(crate) fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case, RFC 9110).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Seconds a client is told to wait when the job queue is full.
const RETRY_AFTER_SECONDS: &str = "30";

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// The rejection to send, if any: 401 without a token, 403 with a wrong one.
fn rejection(app: &App, headers: &HeaderMap) -> Option<Response> {
    let expected = app.token.as_ref()?;
    match bearer(headers) {
        None => Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({ "error": "missing bearer token" })),
            )
                .into_response(),
        ),
        Some(t) if bool::from(token_digest(t).ct_eq(expected)) => None,
        Some(_) => Some(error(StatusCode::FORBIDDEN, "wrong token")),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.encode(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let since = *app.running_since.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(started) = since {
        if started.elapsed() > app.stuck_after {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("a gc run has been going for {:?}", started.elapsed()),
            );
        }
    }
    // One HEAD of a key that need not exist: proves the store answers and accepts our
    // credentials.
    let probe = app.store.head(crate::namespace::readiness_probe_key());
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("store: {e}")),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store: no answer within 5s",
        ),
    }
}

fn accept(app: &Arc<App>, kind: JobKind, name: &str) -> Response {
    if app.stop.is_cancelled() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    if let Err(e) = validate_repository_name(name) {
        return error(StatusCode::BAD_REQUEST, &e);
    }
    let Some(id) = app.start_job(kind, name) else {
        app.metrics.hook_job_rejected();
        tracing::warn!(repo = %name, ?kind, "job refused: the queue is full");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, RETRY_AFTER_SECONDS)],
            Json(json!({ "error": "the hook job queue is full; retry later" })),
        )
            .into_response();
    };
    tracing::info!(job = %id, repo = %name, ?kind, "job accepted");
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{id}"))],
        Json(json!({ "job": id, "status_url": format!("/v1/jobs/{id}") })),
    )
        .into_response()
}

async fn delete_repo(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(rest): Path<String>,
) -> Response {
    if let Some(r) = rejection(&app, &headers) {
        return r;
    }
    accept(&app, JobKind::DeleteRepo, &rest)
}

async fn post_repo(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(rest): Path<String>,
) -> Response {
    if let Some(r) = rejection(&app, &headers) {
        return r;
    }
    match rest.strip_suffix("/gc") {
        Some(name) => accept(&app, JobKind::Gc, name),
        None => error(StatusCode::NOT_FOUND, "POST /v1/repos/{name}/gc"),
    }
}

async fn job(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = rejection(&app, &headers) {
        return r;
    }
    match app.jobs.get(&id) {
        Some(j) => Json(j).into_response(),
        None => error(StatusCode::NOT_FOUND, "unknown job"),
    }
}
