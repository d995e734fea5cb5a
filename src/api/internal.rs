//! `GET /internal/metrics`: the process registry in Prometheus text format, behind the internal token.

use actix_web::{HttpResponse, web};
use prometheus::{Encoder, TextEncoder};

use super::auth::InternalAccess;
use super::error::ApiError;
use crate::startup::AppState;

/// Prometheus metrics of this process
#[utoipa::path(
    get,
    path = "/internal/metrics",
    tag = "internal",
    operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus text format",
            content_type = "text/plain", body = String),
        (status = 401, response = super::openapi::Unauthorized),
    ),
    security(("internal_token" = [])),
)]
pub async fn metrics(
    _: InternalAccess,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&state.registry.gather(), &mut buf)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(buf))
}
