//! `/healthz` (the process answers) and `/readyz` (the pipeline is healthy, Postgres and Redis
//! answer).

use std::time::{Duration, Instant};

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::rate_limit::retry_after_secs;
use crate::startup::AppState;

/// `{"status": "ok"}` or `{"status": "ready"}`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Liveness: the process answers
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "healthz",
    responses(
        (status = 200, description = "Alive: `{\"status\": \"ok\"}`", body = Health),
        (status = 429, response = super::openapi::RateLimited),
    ),
    security(()),
)]
pub async fn healthz(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    limit_probe(&req, &state)?;
    Ok(HttpResponse::Ok().json(Health { status: "ok" }))
}

/// Probes are unauthenticated: each peer gets its own token bucket (`rate_limit.probe_*`).
fn limit_probe(req: &actix_web::HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let Some(limiter) = &state.probe_limiter else {
        return Ok(());
    };
    let peer = req
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    limiter
        .check(&peer, Instant::now())
        .map_err(|wait| ApiError::RateLimited(retry_after_secs(wait)))
}

/// How long a dependency check's answer is reused: a flood of probes costs one Postgres
/// query and one Redis round trip a second, not one each.
const READY_CACHE: Duration = Duration::from_secs(1);

/// The last dependency check: when, and what was wrong.
pub type ReadyCache = tokio::sync::Mutex<Option<(Instant, Vec<String>)>>;

/// Checks Postgres and Redis (and that the consumer group exists), at most once per
/// [`READY_CACHE`]; callers that arrive meanwhile wait for that one check.
async fn dependency_problems(state: &AppState) -> Vec<String> {
    let mut cached = state.ready_cache.lock().await;
    if let Some((at, problems)) = cached.as_ref()
        && at.elapsed() < READY_CACHE
    {
        return problems.clone();
    }
    let limit = Duration::from_secs(2);
    let pg = tokio::time::timeout(limit, sqlx::query("SELECT 1").execute(&state.db)).await;
    // Redis answers, and the consumer group exists (a lost one makes jobs wait for ever).
    let redis = tokio::time::timeout(limit, state.queue.group_exists()).await;
    let mut problems = Vec::new();
    match pg {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => problems.push(format!("postgres: {e}")),
        Err(_) => problems.push("postgres: timed out".into()),
    }
    match redis {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => problems.push(format!(
            "redis: the consumer group `{}` does not exist on `{}`",
            state.queue.group, state.queue.stream
        )),
        Ok(Err(e)) => problems.push(format!("redis: {e}")),
        Err(_) => problems.push("redis: timed out".into()),
    }
    *cached = Some((Instant::now(), problems.clone()));
    problems
}

/// Readiness: the pipeline has not given up, Postgres and Redis answer
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Ready: `{\"status\": \"ready\"}`", body = Health),
        (status = 429, response = super::openapi::RateLimited),
        (status = 503, description = "A dependency does not answer, the consumer group is missing, or the pipeline gave up (code `not_ready`, the reason in the message)", body = ErrorBody),
    ),
    security(()),
)]
pub async fn readyz(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    limit_probe(&req, &state)?;
    // The pipeline's own state first: an escalated process is not ready whatever else.
    let mut problems = state.health.problems();
    problems.extend(dependency_problems(&state).await);
    Ok(if problems.is_empty() {
        HttpResponse::Ok().json(Health { status: "ready" })
    } else {
        HttpResponse::ServiceUnavailable().json(ErrorBody::new("not_ready", problems.join("; ")))
    })
}
