//! `POST /v1/pets/{pet_id}/images`, `POST /v1/pets/{pet_id}/recluster` and `GET /v1/images/{image_id}`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{CONTENT_TYPE, LOCATION};
use actix_web::{HttpRequest, HttpResponse, web};
use actors::algo::decode::{ACCEPTED_TYPES, DecodeError, Format};
use actors::algo::photo;
use actors::job::{JobEntry, JobKind, valid_pet_id};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::{Instrument, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::{Claims, ReadAccess, WriteAccess};
use super::body::{Counted, REGION_CAP, Tally, Violation};
use super::error::{ApiError, ErrorBody};
use super::tenancy;
use crate::adapters::postgres::{self, CommitError, NewImage, UploadRows};
use crate::startup::AppState;
use actors::algo::embed::Preprocess;
use actors::algo::prepared::{Prepared, PreparedCache};
use actors::ports::image_key;

/// One photo of an accepted upload, in the order of the request.
#[derive(Serialize, ToSchema)]
pub struct UploadedImage {
    pub image_id: Uuid,
    /// Hex SHA-256 of the bytes.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub sha256: String,
    /// True when the pet already had these bytes (same `image_id` as before).
    pub duplicate: bool,
}

/// `202` of an upload.
#[derive(Serialize, ToSchema)]
pub struct UploadAccepted {
    pub job_id: Uuid,
    pub images: Vec<UploadedImage>,
}

/// `202` of a recluster.
#[derive(Serialize, ToSchema)]
pub struct ReclusterAccepted {
    pub job_id: Uuid,
}

/// The multipart form of an upload.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// One or more photos (JPEG, PNG or WebP, sniffed from the bytes), each a `file` part.
    #[schema(value_type = Vec<String>, format = Binary, min_items = 1)]
    pub file: Vec<Vec<u8>>,
}

/// Raw image bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct RawImage(pub Vec<u8>);

pub fn check_pet_id(pet_id: &str) -> Result<(), ApiError> {
    if valid_pet_id(pet_id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_pet_id",
            "pet_id must be 1-64 characters of [A-Za-z0-9_-]",
        ))
    }
}

pub fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad_request("invalid_id", format!("{what} must be a UUID")))
}

/// The next chunk of a body, or 408 when the client sends nothing for `idle`.
pub(super) async fn next_chunk<S, T>(stream: &mut S, idle: Duration) -> Result<Option<T>, ApiError>
where
    S: futures::Stream<Item = T> + Unpin,
{
    tokio::time::timeout(idle, stream.next())
        .await
        .map_err(|_| ApiError::RequestTimeout(idle.as_millis() as u64))
}

/// The `boundary` parameter of a multipart content type.
fn boundary(content_type: &str) -> Option<&str> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"'))
    })
}

/// What ended reading a body early, as the API's answer.
fn body_error(tally: &Tally, limit: u64, what: impl std::fmt::Display) -> ApiError {
    match tally.violation() {
        Some(Violation::TooLarge) => ApiError::PayloadTooLarge(limit),
        Some(Violation::RegionTooLarge) => ApiError::bad_request(
            "bad_multipart",
            format!(
                "a multipart preamble, part header block or epilogue is over {REGION_CAP} bytes"
            ),
        ),
        None => ApiError::bad_request("bad_multipart", format!("malformed multipart body: {what}")),
    }
}

/// Reads the photos of a request: `file` parts of a multipart form, or one raw image body.
/// Every byte of the body counts against `limit` (see [`body`](super::body)); bytes past it
/// are read (up to a few times the limit, for a clean 413) but never kept.
async fn read_files(
    req: &HttpRequest,
    payload: web::Payload,
    limit: u64,
    max_files: usize,
    idle: Duration,
) -> Result<Vec<Bytes>, ApiError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mime = content_type
        .split(';')
        .next()
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let within = |tally: &Tally| tally.total() <= limit;
    if mime == "multipart/form-data" {
        let (counted, tally) = Counted::new(payload.into_inner(), limit, boundary(content_type));
        let mut form = actix_multipart::Multipart::new(req.headers(), counted);
        let mut files = Vec::new();
        while let Some(part) = next_chunk(&mut form, idle).await? {
            let mut part = part.map_err(|e| body_error(&tally, limit, e))?;
            let is_file = matches!(part.name(), Some("file") | Some("files"));
            let mut buf = BytesMut::new();
            while let Some(chunk) = next_chunk(&mut part, idle).await? {
                let chunk = chunk.map_err(|e| body_error(&tally, limit, e))?;
                if is_file && within(&tally) {
                    buf.extend_from_slice(&chunk);
                }
            }
            if is_file && within(&tally) {
                files.push(buf.freeze());
            }
        }
        if !within(&tally) {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        if files.is_empty() {
            return Err(ApiError::bad_request(
                "no_files",
                "the form has no `file` part",
            ));
        }
        if files.len() > max_files {
            return Err(ApiError::bad_request(
                "too_many_files",
                format!("at most {max_files} files per request"),
            ));
        }
        Ok(files)
    } else if mime.starts_with("image/") || mime == "application/octet-stream" {
        let (mut payload, tally) = Counted::new(payload.into_inner(), limit, None);
        let mut buf = BytesMut::new();
        while let Some(chunk) = next_chunk(&mut payload, idle).await? {
            let chunk = chunk.map_err(|e| match tally.violation() {
                Some(_) => ApiError::PayloadTooLarge(limit),
                None => ApiError::bad_request("bad_body", format!("cannot read the body: {e}")),
            })?;
            if within(&tally) {
                buf.extend_from_slice(&chunk);
            }
        }
        if !within(&tally) {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        Ok(vec![buf.freeze()])
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "send multipart/form-data with `file` parts, or one raw body of type {ACCEPTED_TYPES}"
        )))
    }
}

struct CheckedImage {
    bytes: Bytes,
    sha256: String,
    format: Format,
    width: u32,
    height: u32,
    /// EXIF capture time, Unix ms, when the file states one.
    captured_at_ms: Option<i64>,
    /// What the embedder needs of it ([`actors::algo::prepared`]), when this process's
    /// embedders can use it.
    prepared: Option<Prepared>,
}

/// Sniffs, checks the header against the pixel and aspect ratio limits, then decodes each
/// photo exactly as the embedder will ([`photo::check`]: the same function, the same
/// reduction, within the process's decoding budget), one at a time, so that what is accepted
/// can be processed. What that decode yields is kept for the embedder ([`photo::prepare`]),
/// which then need not decode the photo again.
fn check_images(
    files: Vec<Bytes>,
    d: &crate::startup::Decoding,
) -> Result<Vec<CheckedImage>, ApiError> {
    let many = files.len() > 1;
    files
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            let which = if many {
                format!("file {}: ", i + 1)
            } else {
                String::new()
            };
            let checked = if d.prepared.is_some() {
                photo::prepare(&bytes, d.limits, &d.preprocess, &d.budget)
                    .map(|(format, w, h, p)| (format, w, h, Some(p)))
            } else {
                photo::check(
                    &bytes,
                    d.limits,
                    d.preprocess.source_short_side(),
                    &d.budget,
                )
                .map(|d| (d.format, d.width, d.height, None))
            };
            match checked {
                Ok((format, width, height, prepared)) => Ok(CheckedImage {
                    sha256: hex::encode(Sha256::digest(&bytes)),
                    captured_at_ms: actors::algo::capture::capture_time_ms(&bytes),
                    bytes,
                    format,
                    width,
                    height,
                    prepared,
                }),
                Err(DecodeError::Empty) => Err(ApiError::bad_request(
                    "empty_file",
                    format!("{which}the file is empty"),
                )),
                Err(e @ DecodeError::Unsupported) => {
                    Err(ApiError::UnsupportedMediaType(format!("{which}{e}")))
                }
                Err(e) => Err(ApiError::Unprocessable(format!("{which}{e}"))),
            }
        })
        .collect()
}

fn current_trace_id() -> Option<String> {
    crate::telemetry::trace_id(&tracing::Span::current())
}

/// XADDs the job in a PRODUCER span whose context travels in the entry's `traceparent`;
/// returns its stream id.
async fn enqueue(state: &AppState, mut entry: JobEntry) -> Result<String, ApiError> {
    let span = tracing::info_span!(
        "enqueue",
        otel.name = %format_args!("send {}", state.queue.stream),
        otel.kind = "producer",
        messaging.system = "redis",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = %state.queue.stream,
        server.address = %state.queue.address,
        server.port = i64::from(state.queue.port),
        messaging.message.id = field::Empty,
        job_id = %entry.job_id,
        pet_id = %entry.pet_id,
    );
    let mut carrier: HashMap<String, String> = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&span.context(), &mut carrier)
    });
    entry.traceparent = carrier.remove("traceparent");
    entry.tracestate = carrier.remove("tracestate").filter(|s| !s.is_empty());
    let id = state
        .queue
        .enqueue(&entry)
        .instrument(span.clone())
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot enqueue the job: {e}")))?;
    span.record("messaging.message.id", id.as_str());
    Ok(id)
}

fn stream_id_not_recorded(job_id: Uuid, e: sqlx::Error) {
    tracing::warn!(job_id = %job_id, error = %e, "Recording the stream id failed; the job is enqueued.");
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn accepted<T: Serialize>(job_id: Uuid, body: &T) -> HttpResponse {
    HttpResponse::Accepted()
        .insert_header((LOCATION, format!("/v1/jobs/{job_id}")))
        .json(body)
}

/// Upload photos of a pet
///
/// `multipart/form-data` with one or more `file` parts, or one raw image body. The format
/// is sniffed from the bytes. A request with one bad file is rejected whole and stores
/// nothing. The same bytes uploaded again for a pet give the same `image_id`.
#[utoipa::path(
    post,
    path = "/v1/pets/{pet_id}/images",
    tag = "images",
    operation_id = "upload_images",
    params(
        ("pet_id" = String, Path, description = "1-64 characters of [A-Za-z0-9_-]",
            pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64),
    ),
    request_body(
        description = "Photos: `file` parts of a form, or one raw JPEG, PNG or WebP body",
        content(
            (UploadForm = "multipart/form-data"),
            (RawImage = "image/jpeg"),
            (RawImage = "image/png"),
            (RawImage = "image/webp"),
            (RawImage = "application/octet-stream"),
        ),
    ),
    responses(
        (status = 202, description = "Stored and enqueued", body = UploadAccepted,
            headers(("Location" = String, description = "`/v1/jobs/{job_id}`")),
            links(
                ("GetJob" = (operation_id = "get_job",
                    parameters(("job_id" = "$response.body#/job_id")))),
                ("GetImage" = (operation_id = "get_image",
                    parameters(("image_id" = "$response.body#/images/0/image_id")))),
                ("GetClusters" = (operation_id = "get_clusters",
                    parameters(("pet_id" = "$request.path.pet_id")))),
                ("Recluster" = (operation_id = "recluster",
                    parameters(("pet_id" = "$request.path.pet_id")))),
            )),
        (status = 400, description = "Bad `pet_id`, empty file, no `file` part, too many files or a malformed form", body = ErrorBody),
        (status = 401, response = super::openapi::Unauthorized),
        (status = 403, response = super::openapi::Forbidden),
        (status = 408, description = "The body stalled for longer than `server.request_timeout_ms`", body = ErrorBody),
        (status = 413, description = "The body is over `server.max_upload_bytes`", body = ErrorBody),
        (status = 415, description = "Not multipart or an image body, or a file that is not JPEG, PNG or WebP", body = ErrorBody),
        (status = 422, description = "Truncated, undecodable, or over `server.max_image_pixels`", body = ErrorBody),
        (status = 429, response = super::openapi::RateLimited),
        (status = 503, response = super::openapi::Unavailable),
    ),
    security(("jwt" = ["media:write"])),
)]
#[tracing::instrument(name = "upload", skip_all, fields(pet_id = %path.as_str(), job_id = field::Empty, files = field::Empty))]
pub async fn upload(
    WriteAccess(caller): WriteAccess,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let pet_id = path.into_inner();
    check_pet_id(&pet_id)?;
    // Before a byte of the body is read: another owner's pet is not there for this caller.
    tenancy::may_write(&state.db, &caller, &pet_id).await?;
    let s = &state.settings.server;
    let idle = Duration::from_millis(s.request_timeout_ms);
    // However steadily a client trickles, the whole body must arrive within the deadline.
    let deadline = Duration::from_millis(s.upload_timeout_ms);
    let files = tokio::time::timeout(
        deadline,
        read_files(
            &req,
            payload,
            s.max_upload_bytes,
            s.max_files_per_request,
            idle,
        ),
    )
    .await
    .map_err(|_| ApiError::UploadTimeout(s.upload_timeout_ms))??;
    tracing::Span::current().record("files", files.len());
    // From here on the work runs to completion whatever happens to the connection: a client
    // that resets now cancels only its wait for the answer, never a half-done upload.
    let task = accept_upload(state.into_inner(), caller, pet_id, files)
        .instrument(tracing::Span::current());
    actix_web::rt::spawn(task)
        .await
        .map_err(|e| ApiError::Internal(format!("the upload task failed: {e}")))?
}

/// Where a development build may pause an upload (`MEDIA_CLUSTERING_UPLOAD_PAUSE`), so that
/// tests can reset the connection or kill the process at each point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadPoint {
    AfterCheck,
    AfterStore,
    AfterCommit,
    AfterEnqueue,
}

impl UploadPoint {
    /// `point:milliseconds`, e.g. `after_commit:1500`.
    pub fn parse(spec: &str) -> Option<(UploadPoint, Duration)> {
        let (point, ms) = spec.split_once(':')?;
        let point = match point {
            "after_check" => UploadPoint::AfterCheck,
            "after_store" => UploadPoint::AfterStore,
            "after_commit" => UploadPoint::AfterCommit,
            "after_enqueue" => UploadPoint::AfterEnqueue,
            _ => return None,
        };
        Some((point, Duration::from_millis(ms.parse().ok()?)))
    }
}

async fn pause_at(state: &AppState, point: UploadPoint) {
    if let Some((p, d)) = state.upload_pause
        && p == point
    {
        tokio::time::sleep(d).await;
    }
}

/// Objects an upload wrote. Unless the upload commits and keeps them, `Drop` removes them:
/// on an error, and on a panic too.
struct WrittenObjects {
    storage: crate::adapters::storage::Storage,
    ids: Vec<Uuid>,
}

impl WrittenObjects {
    fn keep(mut self, kept: &HashSet<Uuid>) {
        self.ids.retain(|id| !kept.contains(id));
    }
}

impl Drop for WrittenObjects {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut self.ids);
        if ids.is_empty() {
            return;
        }
        let storage = self.storage.clone();
        actix_web::rt::spawn(async move {
            for id in ids {
                if let Err(e) = storage.delete(&image_key(id)).await {
                    tracing::error!(image_id = %id, error = %e, "Removing an object the upload did not keep failed; the sweeper will.");
                }
            }
        });
    }
}

/// Objects one upload writes at once (an object store answers each put in a round trip).
const STORAGE_PUTS_AT_ONCE: usize = 8;

/// Checks, stores, commits and enqueues an upload (see [`upload`]).
async fn accept_upload(
    state: Arc<AppState>,
    caller: Claims,
    pet_id: String,
    files: Vec<Bytes>,
) -> Result<HttpResponse, ApiError> {
    let decoding = state.decoding.clone();
    let images = web::block(move || check_images(files, &decoding))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    pause_at(&state, UploadPoint::AfterCheck).await;

    // Objects first, for the photos the pet does not have; rows only once they are stored.
    let shas: Vec<String> = images.iter().map(|i| i.sha256.clone()).collect();
    let known = postgres::images_by_sha(&state.db, &pet_id, &shas).await?;
    let mut rows: Vec<NewImage> = Vec::new();
    let mut seen = HashSet::new();
    for img in &images {
        if known.contains_key(&img.sha256) || !seen.insert(img.sha256.clone()) {
            continue;
        }
        let id = Uuid::now_v7();
        rows.push(NewImage {
            id,
            sha256: img.sha256.clone(),
            content_type: img.format.mime(),
            byte_size: img.bytes.len() as i64,
            width: img.width as i32,
            height: img.height as i32,
            storage_key: image_key(id),
            captured_at_ms: img.captured_at_ms,
        });
    }
    let mut written = WrittenObjects {
        storage: state.storage.clone(),
        ids: Vec::with_capacity(rows.len()),
    };
    let image_of: HashMap<&str, &CheckedImage> =
        images.iter().map(|i| (i.sha256.as_str(), i)).collect();
    // Counted as written before the puts: a put that fails half-way is removed too.
    written.ids.extend(rows.iter().map(|r| r.id));
    futures::stream::iter(&rows)
        .map(|row| {
            let (storage, bytes) = (&state.storage, image_of[row.sha256.as_str()].bytes.clone());
            async move { storage.put(&row.storage_key, bytes).await }
        })
        .buffer_unordered(STORAGE_PUTS_AT_ONCE)
        .try_collect::<()>()
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot store the photo: {e}")))?;
    pause_at(&state, UploadPoint::AfterStore).await;

    let job_id = Uuid::now_v7();
    tracing::Span::current().record("job_id", field::display(job_id));
    let upload = UploadRows {
        claimant: tenancy::claimant(&caller).map(str::to_owned),
        pet_id: pet_id.clone(),
        new: rows,
        known,
        photos: shas,
        job_id,
        trace_id: current_trace_id(),
    };
    let committed = state
        .uploads
        .commit(upload)
        .instrument(tracing::info_span!("commit upload"))
        .await
        .map_err(|e| match e {
            CommitError::NotOwner => tenancy::no_such_pet(&pet_id),
            CommitError::Database(e) => ApiError::from_db(&e),
            CommitError::Lost => ApiError::Internal("the upload's commit was lost".into()),
        })?;
    let mut out = Vec::with_capacity(images.len());
    let mut first = HashSet::new();
    for (img, &(image_id, is_new)) in images.iter().zip(&committed) {
        out.push(UploadedImage {
            image_id,
            sha256: img.sha256.clone(),
            // A repeat within one request is a duplicate of its first occurrence.
            duplicate: !(is_new && first.insert(image_id)),
        });
    }
    let image_ids: Vec<Uuid> = out.iter().map(|i| i.image_id).collect();
    // Objects of photos another upload inserted meanwhile are not kept.
    let new_ids: Vec<Uuid> = committed
        .iter()
        .filter(|(_, n)| *n)
        .map(|(id, _)| *id)
        .collect();
    written.keep(&new_ids.iter().copied().collect());
    if let Some(cache) = &state.decoding.prepared {
        keep_prepared(cache, &state.decoding.preprocess, images, &out);
    }
    pause_at(&state, UploadPoint::AfterCommit).await;

    let entry = JobEntry {
        job_id,
        pet_id: pet_id.clone(),
        kind: JobKind::ImageAdded,
        image_ids,
        enqueued_at_ms: now_ms(),
        attempt: 1,
        traceparent: None,
        tracestate: None,
    };
    match enqueue(&state, entry).await {
        // Written in batches off the request path (the relay tells queued from enqueued jobs
        // by it only after `redis.relay_grace_ms`).
        Ok(stream_id) => {
            if let Err(e) = state.stream_ids.record(job_id, stream_id).await {
                stream_id_not_recorded(job_id, e);
            }
        }
        Err(e) => {
            // Nothing may stay behind an upload that answered an error. (Were this process to
            // die here instead, the committed job would reach the stream through the relay.)
            if let Err(db) = postgres::undo_upload(&state.db, job_id, &new_ids).await {
                tracing::error!(job_id = %job_id, error = %db, "Cleaning up after a failed enqueue failed; the relay enqueues the job.");
            } else {
                remove_objects(&state, &new_ids).await;
            }
            return Err(e);
        }
    }
    pause_at(&state, UploadPoint::AfterEnqueue).await;
    tracing::info!(images = out.len(), new = new_ids.len(), "Upload accepted.");
    Ok(accepted(
        job_id,
        &UploadAccepted {
            job_id,
            images: out,
        },
    ))
}

/// Hands what the check prepared of the photos this upload added to this process's
/// embedders (before the job is enqueued, so that it is there when the job is read).
fn keep_prepared(
    cache: &PreparedCache,
    pre: &Preprocess,
    images: Vec<CheckedImage>,
    out: &[UploadedImage],
) {
    for (img, up) in images.into_iter().zip(out) {
        if let Some(p) = img.prepared.filter(|_| !up.duplicate)
            && !cache.insert(up.image_id, pre, p)
        {
            // Full: the embedders are behind; they decode the rest from storage.
            tracing::debug!(bytes = cache.bytes(), "The prepared-photo cache is full.");
            break;
        }
    }
}

async fn remove_objects(state: &AppState, ids: &[Uuid]) {
    for id in ids {
        if let Err(e) = state.storage.delete(&image_key(*id)).await {
            tracing::error!(image_id = %id, error = %e, "Removing an orphaned object failed.");
        }
    }
}

/// Re-cluster all the photos of a pet
///
/// A request while the pet's previous recluster is still queued (not started) joins it:
/// the answer carries that job's `job_id`, and the photos are clustered once.
#[utoipa::path(
    post,
    path = "/v1/pets/{pet_id}/recluster",
    tag = "images",
    operation_id = "recluster",
    params(
        ("pet_id" = String, Path, description = "1-64 characters of [A-Za-z0-9_-]",
            pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64),
    ),
    responses(
        (status = 202, description = "Enqueued, or the pet's recluster that is still queued (the same `job_id`)", body = ReclusterAccepted,
            headers(("Location" = String, description = "`/v1/jobs/{job_id}`")),
            links(("GetJob" = (operation_id = "get_job",
                parameters(("job_id" = "$response.body#/job_id")))))),
        (status = 400, description = "Bad `pet_id`", body = ErrorBody),
        (status = 401, response = super::openapi::Unauthorized),
        (status = 403, response = super::openapi::Forbidden),
        (status = 404, description = "The pet has no photos", body = ErrorBody),
        (status = 429, response = super::openapi::RateLimited),
        (status = 503, response = super::openapi::Unavailable),
    ),
    security(("jwt" = ["media:write"])),
)]
#[tracing::instrument(name = "recluster", skip_all, fields(pet_id = %path.as_str(), job_id = field::Empty))]
pub async fn recluster(
    WriteAccess(caller): WriteAccess,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let pet_id = path.into_inner();
    check_pet_id(&pet_id)?;
    tenancy::may_write(&state.db, &caller, &pet_id).await?;
    if !postgres::pet_has_images(&state.db, &pet_id).await? {
        return Err(ApiError::NotFound(format!("pet {pet_id} has no photos")));
    }
    if let Some(job_id) = postgres::queued_recluster(&state.db, &pet_id).await? {
        tracing::Span::current().record("job_id", field::display(job_id));
        tracing::info!(job_id = %job_id, "The pet's recluster is still queued; this request joins it.");
        return Ok(accepted(job_id, &ReclusterAccepted { job_id }));
    }
    let job_id = Uuid::now_v7();
    tracing::Span::current().record("job_id", field::display(job_id));
    let mut tx = state.db.begin().await?;
    tenancy::claim(&mut tx, &caller, &pet_id).await?;
    postgres::insert_job(
        &mut tx,
        job_id,
        &pet_id,
        JobKind::Recluster.as_str(),
        &[],
        current_trace_id().as_deref(),
    )
    .await?;
    tx.commit().await?;
    let entry = JobEntry {
        job_id,
        pet_id,
        kind: JobKind::Recluster,
        image_ids: vec![],
        enqueued_at_ms: now_ms(),
        attempt: 1,
        traceparent: None,
        tracestate: None,
    };
    match enqueue(&state, entry).await {
        // Written before the answer: the next recluster request joins this job by it.
        Ok(stream_id) => {
            if let Err(e) = postgres::set_job_stream_id(&state.db, job_id, &stream_id).await {
                stream_id_not_recorded(job_id, e);
            }
        }
        Err(e) => {
            if let Err(db) = postgres::undo_upload(&state.db, job_id, &[]).await {
                tracing::error!(job_id = %job_id, error = %db, "Cleaning up after a failed enqueue failed.");
            }
            return Err(e);
        }
    }
    Ok(accepted(job_id, &ReclusterAccepted { job_id }))
}

/// The original bytes of a photo
#[utoipa::path(
    get,
    path = "/v1/images/{image_id}",
    tag = "images",
    operation_id = "get_image",
    params(("image_id" = Uuid, Path, description = "An `image_id` of an upload")),
    responses(
        (status = 200, description = "The bytes as uploaded, with their content type",
            content(
                (RawImage = "image/jpeg"),
                (RawImage = "image/png"),
                (RawImage = "image/webp"),
            )),
        (status = 400, description = "`image_id` is not a UUID", body = ErrorBody),
        (status = 401, response = super::openapi::Unauthorized),
        (status = 403, response = super::openapi::Forbidden),
        (status = 404, description = "No such image", body = ErrorBody),
        (status = 429, response = super::openapi::RateLimited),
        (status = 503, response = super::openapi::Unavailable),
    ),
    security(("jwt" = ["media:read"])),
)]
pub async fn get_image(
    ReadAccess(caller): ReadAccess,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "image_id")?;
    let missing = || ApiError::NotFound("no such image".into());
    let (content_type, key, pet_id) = postgres::get_image(&state.db, id)
        .await?
        .ok_or_else(missing)?;
    tenancy::may_read(&state.db, &caller, &pet_id, missing).await?;
    match state.storage.get(&key).await {
        Ok(bytes) => Ok(HttpResponse::Ok().content_type(content_type).body(bytes)),
        Err(object_store::Error::NotFound { .. }) => {
            Err(ApiError::NotFound("image bytes are missing".into()))
        }
        Err(e) => Err(ApiError::Unavailable(format!("storage: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use actix_web::FromRequest;
    use actix_web::error::PayloadError;

    /// A request of `content_type` whose body is `chunks`, and how many bytes were pulled.
    async fn request(
        content_type: &str,
        chunks: impl futures::Stream<Item = Bytes> + 'static,
    ) -> (HttpRequest, web::Payload, std::rc::Rc<std::cell::Cell<u64>>) {
        let pulled = std::rc::Rc::new(std::cell::Cell::new(0u64));
        let p = pulled.clone();
        let body = chunks.map(move |c| {
            p.set(p.get() + c.len() as u64);
            Ok::<_, PayloadError>(c)
        });
        let (req, _) = actix_web::test::TestRequest::post()
            .insert_header((CONTENT_TYPE, content_type))
            .to_http_parts();
        let mut pl = actix_web::dev::Payload::from(
            Box::pin(body) as std::pin::Pin<Box<dyn futures::Stream<Item = _>>>
        );
        let payload = web::Payload::from_request(&req, &mut pl).await.unwrap();
        (req, payload, pulled)
    }

    #[actix_web::test]
    async fn a_huge_multipart_preamble_is_stopped_after_a_few_kilobytes() {
        // An endless preamble: before, the parser buffered it all (238 MiB from one request).
        let endless = futures::stream::repeat_with(|| Bytes::from(vec![b'p'; 4096]));
        let (req, payload, pulled) = request("multipart/form-data; boundary=XyZ", endless).await;
        let e = read_files(&req, payload, 25 << 20, 8, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ApiError::BadRequest { code: "bad_multipart", message } if message.contains("16384")),
            "{e:?}"
        );
        assert!(
            pulled.get() <= (REGION_CAP + 8192) as u64,
            "read {} bytes",
            pulled.get()
        );
    }

    #[actix_web::test]
    async fn every_byte_of_a_form_counts_against_the_limit() {
        // A large part that is not a file still counts.
        let limit = 10_000u64;
        let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n".to_vec();
        body.extend(vec![b'n'; 12_000]);
        body.extend_from_slice(b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n\xFF\xD8\xFF\r\n--XyZ--\r\n");
        let chunks = futures::stream::iter(
            body.chunks(1000)
                .map(Bytes::copy_from_slice)
                .collect::<Vec<_>>(),
        );
        let (req, payload, _) = request("multipart/form-data; boundary=\"XyZ\"", chunks).await;
        let e = read_files(&req, payload, limit, 8, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::PayloadTooLarge(10_000)), "{e:?}");
    }

    #[actix_web::test]
    async fn a_raw_body_within_the_limit_is_kept_whole_and_one_past_it_is_413() {
        for (len, ok) in [(1000usize, true), (1001, false)] {
            let chunks = futures::stream::iter(vec![Bytes::from(vec![1u8; len])]);
            let (req, payload, _) = request("image/jpeg", chunks).await;
            let r = read_files(&req, payload, 1000, 8, Duration::from_secs(5)).await;
            match r {
                Ok(files) => assert!(ok && files[0].len() == len),
                Err(e) => assert!(!ok && matches!(e, ApiError::PayloadTooLarge(1000)), "{e:?}"),
            }
        }
    }

    #[actix_web::test]
    async fn an_endless_body_is_413_after_a_bounded_read() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};

        let limit = 64 * 1024u64;
        let pulled = Arc::new(AtomicU64::new(0));
        let counter = pulled.clone();
        // A client that never stops sending 8 KiB chunks.
        let endless = futures::stream::repeat_with(move || {
            counter.fetch_add(8 * 1024, Ordering::Relaxed);
            Ok::<_, PayloadError>(Bytes::from(vec![0xFFu8; 8 * 1024]))
        });
        let (req, _) = actix_web::test::TestRequest::post()
            .insert_header((CONTENT_TYPE, "image/jpeg"))
            .to_http_parts();
        let mut pl = actix_web::dev::Payload::from(
            Box::pin(endless) as std::pin::Pin<Box<dyn futures::Stream<Item = _>>>
        );
        let payload = web::Payload::from_request(&req, &mut pl).await.unwrap();
        let e = read_files(&req, payload, limit, 8, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(e, ApiError::PayloadTooLarge(l) if l == limit),
            "{e:?}"
        );
        let read = pulled.load(Ordering::Relaxed);
        assert!(
            read <= limit * super::super::body::DRAIN_FACTOR + 8 * 1024,
            "read {read} bytes"
        );
    }

    #[actix_web::test]
    async fn a_stalled_body_is_408() {
        let stalled =
            futures::stream::iter([Ok::<_, PayloadError>(Bytes::from_static(b"\xFF\xD8\xFF"))])
                .chain(futures::stream::pending());
        let (req, _) = actix_web::test::TestRequest::post()
            .insert_header((CONTENT_TYPE, "image/jpeg"))
            .to_http_parts();
        let mut pl = actix_web::dev::Payload::from(
            Box::pin(stalled) as std::pin::Pin<Box<dyn futures::Stream<Item = _>>>
        );
        let payload = web::Payload::from_request(&req, &mut pl).await.unwrap();
        let e = read_files(&req, payload, 1024, 8, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::RequestTimeout(50)), "{e:?}");
    }
}
