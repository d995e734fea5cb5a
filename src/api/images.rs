//! `POST /v1/pets/{pet_id}/images`, `POST /v1/pets/{pet_id}/recluster` and `GET /v1/images/{image_id}`.

use std::collections::HashMap;

use actix_web::http::header::{CONTENT_TYPE, LOCATION};
use actix_web::{HttpRequest, HttpResponse, web};
use actors::algo::decode::{self, ACCEPTED_TYPES, DecodeError, Format};
use actors::job::{JobEntry, JobKind, valid_pet_id};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use opentelemetry::trace::TraceContextExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tracing::{Instrument, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use super::auth::{ReadAccess, WriteAccess};
use super::error::ApiError;
use crate::adapters::postgres::{self, NewImage};
use crate::adapters::storage::image_key;
use crate::startup::AppState;

/// A body past the limit is still read (and thrown away) up to this many times the
/// limit, so the client hears the 413 instead of a reset connection; past that the
/// connection is dropped. Memory stays at the limit either way.
const DRAIN_FACTOR: u64 = 4;

#[derive(Serialize)]
struct UploadedImage {
    image_id: Uuid,
    sha256: String,
    duplicate: bool,
}

#[derive(Serialize)]
struct UploadAccepted {
    job_id: Uuid,
    images: Vec<UploadedImage>,
}

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

/// Counts body bytes against the upload limit.
struct Budget {
    total: u64,
    limit: u64,
}

impl Budget {
    /// Adds `n` bytes; true once the limit is passed (the bytes are then discarded).
    fn take(&mut self, n: usize) -> Result<bool, ApiError> {
        self.total += n as u64;
        if self.total > self.limit.saturating_mul(DRAIN_FACTOR) {
            return Err(ApiError::PayloadTooLarge(self.limit));
        }
        Ok(self.over())
    }

    fn over(&self) -> bool {
        self.total > self.limit
    }
}

/// Reads the photos of a request: `file` parts of a multipart form, or one raw image body.
async fn read_files(
    req: &HttpRequest,
    payload: web::Payload,
    limit: u64,
    max_files: usize,
) -> Result<Vec<Bytes>, ApiError> {
    let mime = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let mut budget = Budget { total: 0, limit };
    if mime == "multipart/form-data" {
        let mut form = actix_multipart::Multipart::new(req.headers(), payload.into_inner());
        let mut files = Vec::new();
        while let Some(part) = form.next().await {
            let mut part = part.map_err(|e| {
                ApiError::bad_request("bad_multipart", format!("malformed multipart body: {e}"))
            })?;
            let is_file = matches!(part.name(), Some("file") | Some("files"));
            let mut buf = BytesMut::new();
            while let Some(chunk) = part.next().await {
                let chunk = chunk.map_err(|e| {
                    ApiError::bad_request("bad_multipart", format!("malformed multipart body: {e}"))
                })?;
                if !budget.take(chunk.len())? && is_file {
                    buf.extend_from_slice(&chunk);
                }
            }
            if is_file && !budget.over() {
                files.push(buf.freeze());
            }
        }
        if budget.over() {
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
        let mut payload = payload.into_inner();
        let mut buf = BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request("bad_body", format!("cannot read the body: {e}"))
            })?;
            if !budget.take(chunk.len())? {
                buf.extend_from_slice(&chunk);
            }
        }
        if budget.over() {
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
    format: Format,
    width: u32,
    height: u32,
}

/// Sniffs, checks the header against the pixel limit, then decodes each photo fully.
fn check_images(files: Vec<Bytes>, max_pixels: u64) -> Result<Vec<CheckedImage>, ApiError> {
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
            let checked = decode::probe(&bytes, max_pixels).and_then(|info| {
                let img = decode::decode(&bytes, max_pixels)?;
                Ok((info.format, img.width(), img.height()))
            });
            match checked {
                Ok((format, width, height)) => Ok(CheckedImage {
                    bytes,
                    format,
                    width,
                    height,
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
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// XADDs the job in a PRODUCER span whose context travels in the entry's `traceparent`.
async fn enqueue(state: &AppState, mut entry: JobEntry) -> Result<(), ApiError> {
    let span = tracing::info_span!(
        "enqueue",
        otel.name = %format_args!("send {}", state.queue.stream),
        otel.kind = "producer",
        messaging.system = "redis",
        messaging.operation.type = "send",
        messaging.destination.name = %state.queue.stream,
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
    if let Err(e) = postgres::set_job_stream_id(&state.db, entry.job_id, &id).await {
        tracing::warn!(job_id = %entry.job_id, error = %e, "Recording the stream id failed; the job is enqueued.");
    }
    Ok(())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn accepted<T: Serialize>(job_id: Uuid, body: &T) -> HttpResponse {
    HttpResponse::Accepted()
        .insert_header((LOCATION, format!("/v1/jobs/{job_id}")))
        .json(body)
}

#[tracing::instrument(name = "upload", skip_all, fields(pet_id = %path.as_str(), job_id = field::Empty, files = field::Empty))]
pub async fn upload(
    _: WriteAccess,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let pet_id = path.into_inner();
    check_pet_id(&pet_id)?;
    let s = &state.settings.server;
    let files = read_files(&req, payload, s.max_upload_bytes, s.max_files_per_request).await?;
    tracing::Span::current().record("files", files.len());
    let max_pixels = s.max_image_pixels;
    let images = web::block(move || check_images(files, max_pixels))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;

    let job_id = Uuid::now_v7();
    tracing::Span::current().record("job_id", field::display(job_id));
    let mut out = Vec::with_capacity(images.len());
    let mut new_ids = Vec::new();
    let mut tx = state.db.begin().await?;
    for img in &images {
        let sha = hex::encode(Sha256::digest(&img.bytes));
        let id = Uuid::now_v7();
        let row = NewImage {
            id,
            sha256: sha.clone(),
            content_type: img.format.mime(),
            byte_size: img.bytes.len() as i64,
            width: img.width as i32,
            height: img.height as i32,
            storage_key: image_key(id),
        };
        let (image_id, is_new) = postgres::insert_image(&mut tx, &pet_id, &row).await?;
        if is_new {
            if let Err(e) = state.storage.put(&row.storage_key, img.bytes.clone()).await {
                drop(tx);
                remove_objects(&state, &new_ids).await;
                return Err(ApiError::Unavailable(format!(
                    "cannot store the photo: {e}"
                )));
            }
            new_ids.push(image_id);
        }
        out.push(UploadedImage {
            image_id,
            sha256: sha,
            duplicate: !is_new,
        });
    }
    let image_ids: Vec<Uuid> = out.iter().map(|i| i.image_id).collect();
    let trace_id = current_trace_id();
    postgres::insert_job(
        &mut tx,
        job_id,
        &pet_id,
        JobKind::ImageAdded.as_str(),
        &image_ids,
        trace_id.as_deref(),
    )
    .await?;
    if let Err(e) = tx.commit().await {
        remove_objects(&state, &new_ids).await;
        return Err(e.into());
    }
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
    if let Err(e) = enqueue(&state, entry).await {
        // Nothing may stay behind an upload that answered an error.
        if let Err(db) = postgres::undo_upload(&state.db, job_id, &new_ids).await {
            tracing::error!(job_id = %job_id, error = %db, "Cleaning up after a failed enqueue failed.");
        }
        remove_objects(&state, &new_ids).await;
        return Err(e);
    }
    tracing::info!(images = out.len(), new = new_ids.len(), "Upload accepted.");
    Ok(accepted(
        job_id,
        &UploadAccepted {
            job_id,
            images: out,
        },
    ))
}

async fn remove_objects(state: &AppState, ids: &[Uuid]) {
    for id in ids {
        if let Err(e) = state.storage.delete(&image_key(*id)).await {
            tracing::error!(image_id = %id, error = %e, "Removing an orphaned object failed.");
        }
    }
}

#[tracing::instrument(name = "recluster", skip_all, fields(pet_id = %path.as_str(), job_id = field::Empty))]
pub async fn recluster(
    _: WriteAccess,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let pet_id = path.into_inner();
    check_pet_id(&pet_id)?;
    if !postgres::pet_has_images(&state.db, &pet_id).await? {
        return Err(ApiError::NotFound(format!("pet {pet_id} has no photos")));
    }
    let job_id = Uuid::now_v7();
    tracing::Span::current().record("job_id", field::display(job_id));
    let mut tx = state.db.begin().await?;
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
    if let Err(e) = enqueue(&state, entry).await {
        if let Err(db) = postgres::undo_upload(&state.db, job_id, &[]).await {
            tracing::error!(job_id = %job_id, error = %db, "Cleaning up after a failed enqueue failed.");
        }
        return Err(e);
    }
    Ok(accepted(job_id, &serde_json::json!({ "job_id": job_id })))
}

pub async fn get_image(
    _: ReadAccess,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "image_id")?;
    let (content_type, key) = postgres::get_image(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such image".into()))?;
    match state.storage.get(&key).await {
        Ok(bytes) => Ok(HttpResponse::Ok().content_type(content_type).body(bytes)),
        Err(object_store::Error::NotFound { .. }) => {
            Err(ApiError::NotFound("image bytes are missing".into()))
        }
        Err(e) => Err(ApiError::Unavailable(format!("storage: {e}"))),
    }
}
