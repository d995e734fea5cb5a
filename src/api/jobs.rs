//! `GET /v1/jobs/{job_id}` and `GET /v1/pets/{pet_id}/clusters`.

use actix_web::{HttpResponse, web};

use uuid::Uuid;

use super::auth::{ReadAccess, WriteAccess};
use super::error::{ApiError, ErrorBody};
use super::images::{check_pet_id, parse_id};
#[allow(unused_imports)] // named by the OpenAPI annotations
use super::openapi::{Cluster, Clustering, Job, PinHero};
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

/// The largest body `PUT …/hero` reads (`{"image_id": "<uuid>"}` is 50 bytes).
const PIN_BODY_LIMIT: usize = 1024;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PinHeroBody {
    image_id: Uuid,
}

/// Pin the hero of a cluster
///
/// The photo stays the cluster's hero through later clusterings for as long as it is one of
/// the cluster's members (cluster ids are stable); the answer is the cluster as it is now.
#[utoipa::path(
    put,
    path = "/v1/pets/{pet_id}/clusters/{cluster_id}/hero",
    tag = "jobs",
    operation_id = "pin_hero",
    params(
        ("pet_id" = String, Path, description = "1-64 characters of [A-Za-z0-9_-]",
            pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64),
        ("cluster_id" = Uuid, Path, description = "A `cluster_id` of the pet's latest clustering"),
    ),
    request_body(content = PinHero, content_type = "application/json"),
    responses(
        (status = 200, description = "Pinned; the cluster with its new hero", body = Cluster),
        (status = 400, description = "Bad `pet_id`, `cluster_id` or body", body = ErrorBody),
        (status = 401, response = super::openapi::Unauthorized),
        (status = 403, response = super::openapi::Forbidden),
        (status = 404, description = "No such pet or cluster", body = ErrorBody),
        (status = 408, description = "The body stalled for longer than `server.request_timeout_ms`", body = ErrorBody),
        (status = 409, description = "The photo is not a member of the cluster (code `not_a_member`)", body = ErrorBody),
        (status = 429, response = super::openapi::RateLimited),
        (status = 503, response = super::openapi::Unavailable),
    ),
    security(("jwt" = ["media:write"])),
)]
pub async fn pin_hero(
    WriteAccess(caller): WriteAccess,
    path: web::Path<(String, String)>,
    mut payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (pet_id, cluster_id) = path.into_inner();
    check_pet_id(&pet_id)?;
    let cluster_id = parse_id(&cluster_id, "cluster_id")?;
    // Read by hand, within a small limit and the idle timeout, so that an oversized or
    // stalled body gets this API's JSON error.
    let idle = std::time::Duration::from_millis(state.settings.server.request_timeout_ms);
    let mut body = Vec::new();
    while let Some(chunk) = super::images::next_chunk(&mut payload, idle).await? {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request("invalid_body", format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > PIN_BODY_LIMIT {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("the body must be at most {PIN_BODY_LIMIT} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    let PinHeroBody { image_id } = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("expected {{\"image_id\": \"<uuid>\"}}: {e}"),
        )
    })?;
    let missing = || ApiError::NotFound(format!("pet {pet_id} has no cluster {cluster_id}"));
    tenancy::may_read(&state.db, &caller, &pet_id, missing).await?;
    let mut tx = state.db.begin().await?;
    tenancy::claim(&mut tx, &caller, &pet_id).await?;
    match postgres::pin_hero(&mut tx, &pet_id, cluster_id, image_id).await? {
        Ok(cluster) => {
            tx.commit().await?;
            tracing::info!(pet_id = %pet_id, %cluster_id, %image_id, "Hero pinned.");
            Ok(HttpResponse::Ok().json(cluster))
        }
        Err(postgres::PinRefused::NoCluster) => Err(missing()),
        Err(postgres::PinRefused::NotAMember) => Err(ApiError::Conflict {
            code: "not_a_member",
            message: format!("image {image_id} is not a member of cluster {cluster_id}"),
        }),
    }
}
