//! `/healthz` (the process answers) and `/readyz` (the pipeline is healthy, Postgres and Redis
//! answer).

use std::time::Duration;

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ErrorBody;
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
    responses((status = 200, description = "Alive: `{\"status\": \"ok\"}`", body = Health)),
    security(()),
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// Readiness: the pipeline has not given up, Postgres and Redis answer
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Ready: `{\"status\": \"ready\"}`", body = Health),
        (status = 503, description = "A dependency does not answer (code `not_ready`, the reason in the message)", body = ErrorBody),
    ),
    security(()),
)]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    // The pipeline's own state first: an escalated process is not ready whatever else.
    let mut problems = state.health.problems();
    let limit = Duration::from_secs(2);
    let pg = tokio::time::timeout(limit, sqlx::query("SELECT 1").execute(&state.db)).await;
    // Redis answers, and the consumer group exists (a lost one makes jobs wait for ever).
    let redis = tokio::time::timeout(limit, state.queue.group_exists()).await;
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
    if problems.is_empty() {
        HttpResponse::Ok().json(Health { status: "ready" })
    } else {
        HttpResponse::ServiceUnavailable().json(ErrorBody::new("not_ready", problems.join("; ")))
    }
}
