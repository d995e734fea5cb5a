//! `GET /v1/jobs/{job_id}` and `GET /v1/pets/{pet_id}/clusters`.

use actix_web::{HttpResponse, web};

use super::auth::ReadAccess;
use super::error::ApiError;
use super::images::{check_pet_id, parse_id};
use crate::adapters::postgres;
use crate::startup::AppState;

pub async fn get_job(
    _: ReadAccess,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "job_id")?;
    let job = postgres::get_job(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such job".into()))?;
    Ok(HttpResponse::Ok().json(job))
}

pub async fn get_clusters(
    _: ReadAccess,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    check_pet_id(&path)?;
    let view = postgres::latest_clusters(&state.db, &path)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("pet {} has no clustering yet", path.as_str()))
        })?;
    Ok(HttpResponse::Ok().json(view))
}
