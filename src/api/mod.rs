//! The HTTP API (DESIGN.md "HTTP API"): routes, auth, errors, rate limits and
//! the OpenAPI document.

pub mod auth;
mod body;
pub mod error;
mod health;
pub mod http_span;
mod images;
mod internal;
mod jobs;
pub mod openapi;
pub mod rate_limit;
mod tenancy;

use actix_web::middleware::from_fn;
use actix_web::{HttpResponse, Route, web};

use error::ApiError;
pub use health::ReadyCache;
pub use images::UploadPoint;

/// A resource answering `route` on `method`, and 405 with `Allow` and the JSON error otherwise.
fn resource(path: &str, method: &'static str, route: Route) -> actix_web::Resource {
    web::resource(path)
        .route(route)
        .default_service(web::to(move || async move {
            Err::<HttpResponse, _>(ApiError::MethodNotAllowed { allow: method })
        }))
}

/// The public API (`/v1/*`, rate-limited per caller) and its OpenAPI document.
pub fn configure_api(cfg: &mut web::ServiceConfig) {
    cfg.service(resource(
        "/openapi.json",
        "GET",
        web::get().to(openapi::openapi_json),
    ))
    .service(
        web::scope("/v1")
            .wrap(from_fn(rate_limit::limit))
            .service(resource(
                "/pets/{pet_id}/images",
                "POST",
                web::post().to(images::upload),
            ))
            .service(resource(
                "/pets/{pet_id}/recluster",
                "POST",
                web::post().to(images::recluster),
            ))
            .service(resource(
                "/pets/{pet_id}/clusters",
                "GET",
                web::get().to(jobs::get_clusters),
            ))
            .service(resource(
                "/pets/{pet_id}/clusters/{cluster_id}/hero",
                "PUT",
                web::put().to(jobs::pin_hero),
            ))
            .service(resource(
                "/jobs/{job_id}",
                "GET",
                web::get().to(jobs::get_job),
            ))
            .service(resource(
                "/images/{image_id}",
                "GET",
                web::get().to(images::get_image),
            )),
    );
}

/// Health and internal endpoints (the worker serves only these).
pub fn configure_internal(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/healthz", "GET", web::get().to(health::healthz)))
        .service(resource("/readyz", "GET", web::get().to(health::readyz)))
        .service(resource(
            "/internal/metrics",
            "GET",
            web::get().to(internal::metrics),
        ));
}

/// Answers 405 to a method outside HTTP's standard set, before anything else sees it: the
/// HTTP metrics label requests by method, and unauthenticated made-up methods would make
/// their series grow without bound.
pub async fn standard_methods_only(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<
    actix_web::dev::ServiceResponse<actix_web::body::EitherBody<impl actix_web::body::MessageBody>>,
    actix_web::Error,
> {
    use actix_web::ResponseError;
    use actix_web::http::Method;
    let standard = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
        Method::PATCH,
        Method::TRACE,
        Method::CONNECT,
    ];
    if !standard.contains(req.method()) {
        let res = ApiError::MethodNotAllowed {
            allow: "GET, POST, PUT",
        }
        .error_response();
        return Ok(req.into_response(res).map_into_right_body());
    }
    next.call(req)
        .await
        .map(actix_web::dev::ServiceResponse::map_into_left_body)
}

/// Unknown routes answer the JSON error shape too.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}
