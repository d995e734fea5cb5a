//! `GET /v1/jobs/{job_id}` and `GET /v1/pets/{pet_id}/clusters`.

use actix_web::{HttpResponse, web};

use super::auth::ReadAccess;
use super::error::{ApiError, ErrorBody};
use super::images::{check_pet_id, parse_id};
use super::openapi::{Clustering, Job};
use super::tenancy;
use crate::adapters::postgres;
use crate::startup::AppState;

/// The status of a job
#[utoipa::path(
    get,
    path = "/v1/jobs/{job_id}",
    tag = "jobs",
    operation_id = "get_job",
    params(("job_id" = uuid::Uuid, Path, description = "The `job_id` of an upload or recluster")),
    responses(
        (status = 200, description = "The job", body = Job),
        (status = 400, description = "`job_id` is not a UUID", body = ErrorBody),
        (status = 401, response = super::openapi::Unauthorized),
        (status = 403, response = super::openapi::Forbidden),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 429, response = super::openapi::RateLimited),
        (status = 503, response = super::openapi::Unavailable),
    ),
    security(("jwt" = ["media:read"])),
)]
pub async fn get_job(
    ReadAccess(caller): ReadAccess,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "job_id")?;
    let missing = || ApiError::NotFound("no such job".into());
    let job = postgres::get_job(&state.db, id)
        .await?
        .ok_or_else(missing)?;
    tenancy::may_read(&state.db, &caller, &job.pet_id, missing).await?;
    Ok(HttpResponse::Ok().json(job))
}

/// The latest clustering of a pet
#[utoipa::path(
    get,
    path = "/v1/pets/{pet_id}/clusters",
    tag = "jobs",
    operation_id = "get_clusters",
    params(
        ("pet_id" = String, Path, description = "1-64 characters of [A-Za-z0-9_-]",
            pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64),
    ),
    responses(
        (status = 200, description = "Every photo of the pet in exactly one cluster", body = Clustering),
        (status = 400, description = "Bad `pet_id`", body = ErrorBody),
        (status = 401, response = super::openapi::Unauthorized),
        (status = 403, response = super::openapi::Forbidden),
        (status = 404, description = "No clustering yet", body = ErrorBody),
        (status = 429, response = super::openapi::RateLimited),
        (status = 503, response = super::openapi::Unavailable),
    ),
    security(("jwt" = ["media:read"])),
)]
pub async fn get_clusters(
    ReadAccess(caller): ReadAccess,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_pet_id(&path)?;
    let missing = || ApiError::NotFound(format!("pet {} has no clustering yet", path.as_str()));
    tenancy::may_read(&state.db, &caller, &path, missing).await?;
    let view = postgres::latest_clusters(&state.db, &path)
        .await?
        .ok_or_else(missing)?;
    Ok(HttpResponse::Ok().json(view))
}
