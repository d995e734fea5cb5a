//! The HTTP API (DESIGN.md "HTTP API"): routes, auth, errors.

pub mod auth;
pub mod error;
mod health;
mod images;
mod internal;
mod jobs;

use actix_web::{HttpResponse, web};

use error::ApiError;

/// The public API (`/v1/*`) and the health endpoints.
pub fn configure_api(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/v1")
            .route("/pets/{pet_id}/images", web::post().to(images::upload))
            .route(
                "/pets/{pet_id}/recluster",
                web::post().to(images::recluster),
            )
            .route("/pets/{pet_id}/clusters", web::get().to(jobs::get_clusters))
            .route("/jobs/{job_id}", web::get().to(jobs::get_job))
            .route("/images/{image_id}", web::get().to(images::get_image)),
    );
}

/// Health and internal endpoints (the worker serves only these).
pub fn configure_internal(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/internal/metrics", web::get().to(internal::metrics));
}

/// Unknown routes answer the JSON error shape too.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}
