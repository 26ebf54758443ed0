//! The HTTP API of `ocigc serve` (axum).
//!
//! `/metrics`, `/healthz` and `/readyz` are open (scraped and probed by the platform); the hook
//! endpoints need `Authorization: Bearer <token>`, compared in constant time.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;

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

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// The rejection to send, if any: 401 without a token, 403 with a wrong one.
fn rejection(app: &App, headers: &HeaderMap) -> Option<Response> {
    let expected = app.token.as_ref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({ "error": "missing bearer token" })),
            )
                .into_response(),
        ),
        Some(t) if bool::from(t.as_bytes().ct_eq(expected.as_bytes())) => None,
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
    let probe = app.store.head("_ocigc/readyz");
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
    let id = app.start_job(kind, name);
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
