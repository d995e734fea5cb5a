//! `GET /internal/metrics`: the process registry behind the internal token, in the Prometheus
//! text format, or in OpenMetrics (with exemplars) when the scraper asks for it.

use actix_web::{HttpRequest, HttpResponse, http::header, web};
use actors::exemplars::{OPENMETRICS_CONTENT_TYPE, encode_openmetrics, wants_openmetrics};
use prometheus::{Encoder, TextEncoder};

use super::auth::InternalAccess;
use super::error::ApiError;
use crate::startup::AppState;

/// Prometheus metrics of this process
///
/// The plain text format by default; OpenMetrics 1.0, whose histogram buckets carry exemplars
/// with the `trace_id` of a recent observation, when `Accept` prefers
/// `application/openmetrics-text` (as Prometheus's scrapes do).
#[utoipa::path(
    get,
    path = "/internal/metrics",
    tag = "internal",
    operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus text format, or OpenMetrics when asked for",
            content(
                (String = "text/plain"),
                (String = "application/openmetrics-text"),
            )),
        (status = 401, response = super::openapi::Unauthorized),
    ),
    security(("internal_token" = [])),
)]
pub async fn metrics(
    _: InternalAccess,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let families = state.registry.gather();
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if wants_openmetrics(accept) {
        return Ok(HttpResponse::Ok()
            .content_type(OPENMETRICS_CONTENT_TYPE)
            .body(encode_openmetrics(&families, &state.metrics.exemplars)));
    }
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut buf)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(buf))
}
