//! `GET /openapi.json`: the OpenAPI 3 document, generated from the handlers'
//! `#[utoipa::path]` attributes and the response types.
//!
//! `Job`, `Clustering` and `Cluster` mirror the response types of
//! `adapters::postgres` (`JobView`, `ClusteringView`, `ClusterView`) field for
//! field; tests serialise the real types and check them against these schemas.

use std::sync::OnceLock;

use actix_web::HttpResponse;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToResponse, ToSchema};
use uuid::Uuid;

use super::error::{ErrorBody, ErrorDetail};
use super::health::Health;
use super::images::{ReclusterAccepted, UploadAccepted, UploadForm, UploadedImage};

/// Where a job is.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    DeadLettered,
}

/// A job (mirrors `adapters::postgres::JobView`).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct Job {
    pub job_id: Uuid,
    pub pet_id: String,
    pub status: JobStatus,
    /// Deliveries so far.
    pub attempts: i32,
    /// Why the job failed, once it has; otherwise null.
    #[schema(required = true)]
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Null until a worker takes the job.
    #[schema(required = true)]
    pub started_at: Option<DateTime<Utc>>,
    /// Null until the job ends.
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    /// The cluster version that completed the job (jobs of a pet that waited for it are
    /// completed together, by one version); null until it succeeds.
    #[schema(required = true)]
    pub cluster_version: Option<i64>,
    /// The trace its upload started (W3C trace id, 32 hex digits); null when not traced.
    #[schema(required = true, pattern = "^[0-9a-f]{32}$")]
    pub trace_id: Option<String>,
    /// Photos of this job that cannot be processed (left out of clustering), with why.
    pub unprocessable: Vec<Unprocessable>,
}

/// A photo that cannot be processed (mirrors `adapters::postgres::Unprocessable`).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct Unprocessable {
    pub image_id: Uuid,
    pub error: String,
}

/// One cluster of similar photos (mirrors `adapters::postgres::ClusterView`).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct Cluster {
    /// Kept across versions while the cluster is essentially the same group.
    pub cluster_id: Uuid,
    /// The best photo of the cluster, or the owner's pin.
    pub hero_image_id: Uuid,
    /// Whether the hero is the owner's choice (`PUT …/clusters/{cluster_id}/hero`); it stays
    /// while the photo is a member. Otherwise the best-scored member, kept over a newcomer
    /// that scores less than 5 % better.
    pub hero_pinned: bool,
    pub image_ids: Vec<Uuid>,
    #[schema(minimum = 1)]
    pub size: i32,
    /// The members, best-scored first.
    pub members: Vec<ClusterMember>,
}

/// One photo of a cluster (mirrors `adapters::postgres::MemberView`).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ClusterMember {
    pub image_id: Uuid,
    /// Null for clusterings written before scores were kept.
    #[schema(required = true)]
    pub score: Option<HeroScore>,
    /// A better-scored member this photo nearly duplicates (a burst shot): a client may keep
    /// the better one and offer to archive this one.
    #[schema(required = true)]
    pub near_duplicate_of: Option<Uuid>,
}

/// The hero score and its factors, each in [0, 1]; `total` is their product.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct HeroScore {
    #[schema(minimum = 0, maximum = 1)]
    pub sharpness: f64,
    #[schema(minimum = 0, maximum = 1)]
    pub noise: f64,
    #[schema(minimum = 0, maximum = 1)]
    pub exposure: f64,
    #[schema(minimum = 0, maximum = 1)]
    pub resolution: f64,
    #[schema(minimum = 0, maximum = 1)]
    pub centrality: f64,
    #[schema(minimum = 0, maximum = 1)]
    pub total: f64,
}

/// `PUT /v1/pets/{pet_id}/clusters/{cluster_id}/hero` (no other field is accepted).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct PinHero {
    /// A member of the cluster.
    pub image_id: Uuid,
}

/// The latest clustering of a pet (mirrors `adapters::postgres::ClusteringView`).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct Clustering {
    pub pet_id: String,
    /// Monotonic per pet.
    #[schema(minimum = 1)]
    pub version: i64,
    /// `name-<first 8 hex of the model's sha256>`.
    pub model_version: String,
    pub clusters: Vec<Cluster>,
    /// The pet's photos left out of clustering because they cannot be processed.
    pub unprocessable: Vec<Unprocessable>,
}

/// No valid bearer token (code `unauthorized`).
#[derive(ToResponse)]
#[response(
    description = "No valid bearer token (code `unauthorized`)",
    headers(("WWW-Authenticate" = String, description = "`Bearer`"))
)]
#[allow(dead_code)]
pub struct Unauthorized(ErrorBody);

/// The token lacks the needed scope (code `forbidden`).
#[derive(ToResponse)]
#[response(description = "The token lacks the needed scope (code `forbidden`)")]
#[allow(dead_code)]
pub struct Forbidden(ErrorBody);

/// Over the caller's `rate_limit` (code `rate_limited`).
#[derive(ToResponse)]
#[response(
    description = "Over the caller's `rate_limit` (code `rate_limited`)",
    headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))
)]
#[allow(dead_code)]
pub struct RateLimited(ErrorBody);

/// Postgres, Redis or storage is unavailable; nothing was stored (code `unavailable`).
#[derive(ToResponse)]
#[response(
    description = "Postgres, Redis or storage is unavailable; nothing was stored (code `unavailable`)"
)]
#[allow(dead_code)]
pub struct Unavailable(ErrorBody);

/// The document itself
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    operation_id = "openapi",
    responses((status = 200, description = "This OpenAPI 3 document", body = Object)),
    security(()),
)]
pub async fn openapi_json() -> HttpResponse {
    static DOC: OnceLock<String> = OnceLock::new();
    let body = DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the document serialises")
    });
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body.as_str())
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut jwt = Http::new(HttpAuthScheme::Bearer);
        jwt.bearer_format = Some("JWT".into());
        jwt.description = Some(
            "HS256 JWT signed with `auth.jwt_secret`; claims `sub`, `exp`, `scope` \
             (`media:read` for GETs, `media:write` for POSTs)"
                .into(),
        );
        components.add_security_scheme("jwt", SecurityScheme::Http(jwt));
        let mut internal = Http::new(HttpAuthScheme::Bearer);
        internal.description =
            Some("The internal token (`auth.internal_token`, `INTERNAL_METRICS_TOKEN`)".into());
        components.add_security_scheme("internal_token", SecurityScheme::Http(internal));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "media-clustering",
        description = "Groups each pet's photos into clusters of similar shots and picks a hero \
                       photo per cluster. Errors are always `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        super::images::upload,
        super::images::recluster,
        super::jobs::get_job,
        super::jobs::get_clusters,
        super::jobs::pin_hero,
        super::images::get_image,
        super::health::healthz,
        super::health::readyz,
        super::internal::metrics,
        openapi_json,
    ),
    components(
        schemas(
            ErrorBody, ErrorDetail, UploadAccepted, UploadedImage, ReclusterAccepted, UploadForm,
            Job, JobStatus, Clustering, Cluster, ClusterMember, HeroScore, PinHero, Unprocessable,
            Health
        ),
        responses(Unauthorized, Forbidden, RateLimited, Unavailable)
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "images", description = "Uploads and photos"),
        (name = "jobs", description = "Jobs and clusterings"),
        (name = "health", description = "Liveness, readiness, this document"),
        (name = "internal", description = "Operators only"),
    )
)]
pub struct ApiDoc;

/// The document as JSON, for tests and tools.
pub fn document() -> serde_json::Value {
    serde_json::to_value(ApiDoc::openapi()).expect("the document serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_with_every_path() {
        let doc = document();
        if std::env::var("PRINT_OPENAPI").is_ok() {
            println!("{}", serde_json::to_string_pretty(&doc).unwrap());
        }
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        assert_eq!(doc["paths"].as_object().unwrap().len(), 10);
    }
}
