//! `/healthz` (the process answers) and `/readyz` (Postgres and Redis answer).

use std::time::Duration;

use actix_web::{HttpResponse, web};

use crate::startup::AppState;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let limit = Duration::from_secs(2);
    let pg = tokio::time::timeout(limit, sqlx::query("SELECT 1").execute(&state.db)).await;
    let redis = tokio::time::timeout(limit, state.queue.ping()).await;
    let mut problems = Vec::new();
    match pg {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => problems.push(format!("postgres: {e}")),
        Err(_) => problems.push("postgres: timed out".into()),
    }
    match redis {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("redis: {e}")),
        Err(_) => problems.push("redis: timed out".into()),
    }
    if problems.is_empty() {
        HttpResponse::Ok().json(serde_json::json!({ "status": "ready" }))
    } else {
        HttpResponse::ServiceUnavailable().json(
            serde_json::json!({ "error": { "code": "not_ready", "message": problems.join("; ") } }),
        )
    }
}
