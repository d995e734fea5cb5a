//! Postgres: the API's reads and writes, and the pipeline's [`Store`] port.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actors::algo::hero::HERO_MARGIN;
use actors::algo::identity::match_clusters;
use actors::algo::quality::Quality;
use actors::error::PipelineError;
use actors::job::{JobEntry, JobKind};
use actors::ports::{
    ClusterOut, ClusteringResult, FinalStatus, JobStart, OutboxJob, PetImage, Store,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::config::PostgresSettings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens a pool lazily: the process starts even while Postgres is down, and `/readyz` tells.
pub fn pool(settings: &PostgresSettings) -> Result<PgPool, sqlx::Error> {
    let opts: PgConnectOptions = settings.url.expose().parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts))
}

fn unavailable(e: sqlx::Error) -> PipelineError {
    PipelineError::unavailable("postgres", e)
}

#[derive(Debug, Serialize)]
pub struct JobView {
    pub job_id: Uuid,
    pub pet_id: String,
    pub status: String,
    pub attempts: i32,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The cluster version that completed the job (several coalesced jobs share one).
    pub cluster_version: Option<i64>,
    /// The trace its upload started.
    pub trace_id: Option<String>,
    /// Photos of this job that cannot be processed, with why.
    pub unprocessable: Vec<Unprocessable>,
}

/// A photo left out of clustering because it cannot be processed.
#[derive(Debug, Serialize)]
pub struct Unprocessable {
    pub image_id: Uuid,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub cluster_id: Uuid,
    pub hero_image_id: Uuid,
    /// Whether the hero is the owner's choice (`PUT …/clusters/{cluster_id}/hero`).
    pub hero_pinned: bool,
    pub image_ids: Vec<Uuid>,
    pub size: i32,
    /// The members, best-scored first, with their scores and near-duplicates.
    pub members: Vec<MemberView>,
}

#[derive(Debug, Serialize)]
pub struct MemberView {
    pub image_id: Uuid,
    /// The hero score and its factors (null for a version written before they were kept).
    pub score: Option<ScoreView>,
    /// A better-scored member of the cluster this photo nearly duplicates.
    pub near_duplicate_of: Option<Uuid>,
}

/// The hero score as the pipeline computed it.
pub use actors::algo::hero::Score as ScoreView;

#[derive(Debug, Serialize)]
pub struct ClusteringView {
    pub pet_id: String,
    pub version: i64,
    pub model_version: String,
    pub clusters: Vec<ClusterView>,
    /// The pet's photos left out of clustering, with why.
    pub unprocessable: Vec<Unprocessable>,
}

/// Quarantined photos among `ids` (all of the pet's when `ids` is `None`).
async fn unprocessable(
    pool: &PgPool,
    pet_id: &str,
    ids: Option<&[Uuid]>,
) -> Result<Vec<Unprocessable>, sqlx::Error> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, error FROM images WHERE pet_id = $1 AND error IS NOT NULL
           AND ($2::uuid[] IS NULL OR id = ANY($2)) ORDER BY created_at, id",
    )
    .bind(pet_id)
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(image_id, error)| Unprocessable { image_id, error })
        .collect())
}

/// One accepted photo of an upload, to be inserted.
pub struct NewImage {
    pub id: Uuid,
    pub sha256: String,
    pub content_type: &'static str,
    pub byte_size: i64,
    pub width: i32,
    pub height: i32,
    pub storage_key: String,
    /// EXIF capture time, Unix ms ([`actors::algo::capture`]).
    pub captured_at_ms: Option<i64>,
}

/// The photos a pet already has among these contents: sha256 → image id.
pub async fn images_by_sha(
    pool: &PgPool,
    pet_id: &str,
    shas: &[String],
) -> Result<HashMap<String, Uuid>, sqlx::Error> {
    let rows: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT sha256, id FROM images WHERE pet_id = $1 AND sha256 = ANY($2)")
            .bind(pet_id)
            .bind(shas)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

/// What an upload writes in its transaction: its claim on the pet, the rows of the photos
/// the pet did not have when it looked, and its job.
pub struct UploadRows {
    /// Who claims the pet: the caller's owner, or `None` for an admin, who writes without
    /// claiming ([`crate::api::tenancy::claimant`]).
    pub claimant: Option<String>,
    pub pet_id: String,
    /// Rows for the photos the pet did not have.
    pub new: Vec<NewImage>,
    /// The photos it had: sha256 → image id.
    pub known: HashMap<String, Uuid>,
    /// Every photo of the upload, in the request's order, by sha256.
    pub photos: Vec<String>,
    pub job_id: Uuid,
    pub trace_id: Option<String>,
}

/// An upload refused in its transaction: the pet is another owner's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotOwner;

/// An upload's photos as committed, in the request's order: (image id, inserted by this
/// upload). A photo another upload inserted first comes back with that upload's id and
/// `false`.
pub type CommittedPhotos = Vec<(Uuid, bool)>;

/// Commits uploads in one transaction, with a fixed number of statements whatever their
/// number: the claims, the owners, the image rows, the rows other uploads inserted first,
/// the jobs. An upload whose pet is another owner's writes nothing and gets [`NotOwner`];
/// the others are committed. Pets and photos are locked in one order (sorted), so that two
/// such transactions cannot deadlock.
pub async fn commit_uploads(
    pool: &PgPool,
    uploads: &[UploadRows],
) -> Result<Vec<Result<CommittedPhotos, NotOwner>>, sqlx::Error> {
    let mut tx = pool.begin().await?;

    // Claims: the first upload of a batch to claim a new pet takes it.
    let mut claims: Vec<(&str, &str)> = uploads
        .iter()
        .filter_map(|u| Some((u.pet_id.as_str(), u.claimant.as_deref()?)))
        .collect();
    claims.sort_by_key(|(pet, _)| *pet);
    claims.dedup_by_key(|(pet, _)| *pet);
    let mut owners: HashMap<String, String> = HashMap::new();
    if !claims.is_empty() {
        let (pets, claimants): (Vec<&str>, Vec<&str>) = claims.into_iter().unzip();
        sqlx::query(
            "INSERT INTO pet_owners (pet_id, owner)
             SELECT * FROM UNNEST($1::text[], $2::text[]) ORDER BY 1
             ON CONFLICT (pet_id) DO NOTHING",
        )
        .bind(&pets)
        .bind(&claimants)
        .execute(&mut *tx)
        .await?;
        // A statement of its own: it sees claims that committed while the insert waited.
        owners = sqlx::query_as("SELECT pet_id, owner FROM pet_owners WHERE pet_id = ANY($1)")
            .bind(&pets)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
    }
    let admitted: Vec<bool> = uploads
        .iter()
        .map(|u| {
            u.claimant
                .as_ref()
                .is_none_or(|c| owners.get(&u.pet_id) == Some(c))
        })
        .collect();

    // Image rows, in (pet, sha256) order.
    let mut rows: Vec<(&str, &NewImage)> = uploads
        .iter()
        .zip(&admitted)
        .filter(|(_, ok)| **ok)
        .flat_map(|(u, _)| u.new.iter().map(|r| (u.pet_id.as_str(), r)))
        .collect();
    rows.sort_by(|a, b| (a.0, &a.1.sha256).cmp(&(b.0, &b.1.sha256)));
    let mut ids: HashMap<(String, String), Uuid> = HashMap::new();
    if !rows.is_empty() {
        let col = |f: fn(&NewImage) -> String| rows.iter().map(|(_, r)| f(r)).collect::<Vec<_>>();
        let pets: Vec<&str> = rows.iter().map(|(p, _)| *p).collect();
        let image_ids: Vec<Uuid> = rows.iter().map(|(_, r)| r.id).collect();
        let shas = col(|r| r.sha256.clone());
        let types = col(|r| r.content_type.to_owned());
        let keys = col(|r| r.storage_key.clone());
        let sizes: Vec<i64> = rows.iter().map(|(_, r)| r.byte_size).collect();
        let widths: Vec<i32> = rows.iter().map(|(_, r)| r.width).collect();
        let heights: Vec<i32> = rows.iter().map(|(_, r)| r.height).collect();
        let captured: Vec<Option<DateTime<Utc>>> = rows
            .iter()
            .map(|(_, r)| r.captured_at_ms.and_then(DateTime::from_timestamp_millis))
            .collect();
        let inserted: Vec<(String, String, Uuid)> = sqlx::query_as(
            "INSERT INTO images (id, pet_id, sha256, content_type, byte_size, width, height, storage_key, captured_at)
             SELECT u.id, u.pet, u.sha, u.ct, u.size, u.w, u.h, u.key, u.taken
             FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::int[], $7::int[], $8::text[], $9::timestamptz[])
                  WITH ORDINALITY AS u(pet, id, sha, ct, size, w, h, key, taken, n)
             ORDER BY u.n
             ON CONFLICT (pet_id, sha256) DO NOTHING RETURNING pet_id, sha256, id",
        )
        .bind(&pets)
        .bind(&image_ids)
        .bind(&shas)
        .bind(&types)
        .bind(&sizes)
        .bind(&widths)
        .bind(&heights)
        .bind(&keys)
        .bind(&captured)
        .fetch_all(&mut *tx)
        .await?;
        ids.extend(inserted.into_iter().map(|(p, s, id)| ((p, s), id)));
        // Photos another transaction inserted first (the insert waited for it, then did
        // nothing): a statement of its own sees them.
        let (raced_pets, raced_shas): (Vec<&str>, Vec<&str>) = rows
            .iter()
            .filter(|(p, r)| !ids.contains_key(&(p.to_string(), r.sha256.clone())))
            .map(|(p, r)| (*p, r.sha256.as_str()))
            .unzip();
        if !raced_pets.is_empty() {
            let raced: Vec<(String, String, Uuid)> = sqlx::query_as(
                "SELECT i.pet_id, i.sha256, i.id FROM images i
                 JOIN UNNEST($1::text[], $2::text[]) AS r(pet, sha)
                   ON i.pet_id = r.pet AND i.sha256 = r.sha",
            )
            .bind(&raced_pets)
            .bind(&raced_shas)
            .fetch_all(&mut *tx)
            .await?;
            ids.extend(raced.into_iter().map(|(p, s, id)| ((p, s), id)));
        }
    }

    // Each admitted upload's photos, then its job.
    let mut out = Vec::with_capacity(uploads.len());
    let (mut job_ids, mut job_pets, mut job_traces) = (Vec::new(), Vec::new(), Vec::new());
    let (mut photo_jobs, mut photo_ids) = (Vec::new(), Vec::new());
    for (u, ok) in uploads.iter().zip(&admitted) {
        if !*ok {
            out.push(Err(NotOwner));
            continue;
        }
        let mine: HashSet<Uuid> = u.new.iter().map(|r| r.id).collect();
        let photos = u
            .photos
            .iter()
            .map(|sha| match u.known.get(sha) {
                Some(id) => Ok((*id, false)),
                None => ids
                    .get(&(u.pet_id.clone(), sha.clone()))
                    .map(|id| (*id, mine.contains(id)))
                    .ok_or_else(|| {
                        sqlx::Error::Protocol(format!(
                            "no image row for photo {sha} of pet {}",
                            u.pet_id
                        ))
                    }),
            })
            .collect::<Result<CommittedPhotos, sqlx::Error>>()?;
        job_ids.push(u.job_id);
        job_pets.push(u.pet_id.as_str());
        job_traces.push(u.trace_id.as_deref());
        photo_jobs.extend(std::iter::repeat_n(job_ids.len() as i64, photos.len()));
        photo_ids.extend(photos.iter().map(|(id, _)| *id));
        out.push(Ok(photos));
    }
    if !job_ids.is_empty() {
        insert_jobs(
            &mut tx,
            JobKind::ImageAdded.as_str(),
            &job_ids,
            &job_pets,
            &job_traces,
            &photo_jobs,
            &photo_ids,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(out)
}

/// True when the error says the database could not be reached (rather than that it refused
/// what was sent).
pub fn is_unreachable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
    )
}

/// Commits a batch of uploads ([`commit_uploads`]). When its transaction fails for any
/// reason but an unreachable database, each upload is committed alone, so that one the
/// database refuses fails alone and the others go in.
pub async fn commit_batch(
    pool: &PgPool,
    uploads: &[UploadRows],
) -> Vec<Result<CommittedPhotos, CommitError>> {
    let refused =
        |r: Result<CommittedPhotos, NotOwner>| r.map_err(|NotOwner| CommitError::NotOwner);
    match commit_uploads(pool, uploads).await {
        Ok(results) => results.into_iter().map(refused).collect(),
        Err(e) if uploads.len() == 1 || is_unreachable(&e) => {
            let e = Arc::new(e);
            uploads
                .iter()
                .map(|_| Err(CommitError::Database(e.clone())))
                .collect()
        }
        Err(e) => {
            tracing::warn!(uploads = uploads.len(), error = %e, "A batch of uploads failed to commit; committing each alone.");
            let mut out = Vec::with_capacity(uploads.len());
            for upload in uploads {
                out.push(
                    match commit_uploads(pool, std::slice::from_ref(upload)).await {
                        Ok(mut one) => one.pop().map_or(Err(CommitError::Lost), refused),
                        Err(e) => Err(CommitError::Database(Arc::new(e))),
                    },
                );
            }
            out
        }
    }
}

/// Why an upload was not committed.
#[derive(Debug)]
pub enum CommitError {
    /// The pet is another owner's.
    NotOwner,
    /// The upload's transaction failed: its batch's when the database was unreachable, else
    /// its own ([`commit_batch`]).
    Database(Arc<sqlx::Error>),
    /// The batch was lost before it answered (its task panicked).
    Lost,
}

type CommitReply = tokio::sync::oneshot::Sender<Result<CommittedPhotos, CommitError>>;

/// Commits the uploads of concurrent requests together ([`commit_uploads`] for what has
/// arrived since the last batch, [`batcher`](super::batcher)): the API's uploads share a
/// transaction, its round trips and its commit instead of paying one each; an upload the
/// database refuses fails alone ([`commit_batch`]).
#[derive(Clone)]
pub struct UploadCommitter {
    queue: tokio::sync::mpsc::Sender<(UploadRows, CommitReply)>,
}

impl UploadCommitter {
    /// Uploads waiting for the task; more and their requests wait to hand them over.
    const QUEUE: usize = 1024;
    /// Uploads one transaction commits at most.
    const BATCH: usize = 64;

    /// Starts the task on the current runtime.
    pub fn spawn(pool: PgPool) -> Self {
        let queue = super::batcher::spawn(
            "upload commits",
            Self::QUEUE,
            Self::BATCH,
            move |batch: Vec<(UploadRows, CommitReply)>| {
                let pool = pool.clone();
                async move {
                    let (uploads, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    let results = commit_batch(&pool, &uploads).await;
                    for (result, reply) in results.into_iter().zip(replies) {
                        let _ = reply.send(result);
                    }
                }
            },
        );
        UploadCommitter { queue }
    }

    /// Commits `upload` with whatever other uploads are waiting.
    pub async fn commit(&self, upload: UploadRows) -> Result<CommittedPhotos, CommitError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue
            .send((upload, reply))
            .await
            .map_err(|_| CommitError::Lost)?;
        answer.await.map_err(|_| CommitError::Lost)?
    }
}

/// The owner a pet's first write recorded, if any.
pub async fn pet_owner(pool: &PgPool, pet_id: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT owner FROM pet_owners WHERE pet_id = $1")
        .bind(pet_id)
        .fetch_optional(pool)
        .await
}

/// Records `owner` as the pet's owner unless it has one; returns the pet's owner.
pub async fn claim_pet(
    tx: &mut Transaction<'_, Postgres>,
    pet_id: &str,
    owner: &str,
) -> Result<String, sqlx::Error> {
    sqlx::query(
        "INSERT INTO pet_owners (pet_id, owner) VALUES ($1, $2) ON CONFLICT (pet_id) DO NOTHING",
    )
    .bind(pet_id)
    .bind(owner)
    .execute(&mut **tx)
    .await?;
    sqlx::query_scalar("SELECT owner FROM pet_owners WHERE pet_id = $1")
        .bind(pet_id)
        .fetch_one(&mut **tx)
        .await
}

pub async fn insert_job(
    tx: &mut Transaction<'_, Postgres>,
    job_id: Uuid,
    pet_id: &str,
    kind: &str,
    image_ids: &[Uuid],
    trace_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    let photo_jobs = vec![1; image_ids.len()];
    insert_jobs(
        tx,
        kind,
        &[job_id],
        &[pet_id],
        &[trace_id],
        &photo_jobs,
        image_ids,
    )
    .await
}

/// Inserts queued jobs of one kind. Their photos come flat: `image_ids[i]` belongs to job
/// number `photo_jobs[i]` (1-based, in `job_ids`' order), in order.
async fn insert_jobs(
    conn: &mut sqlx::PgConnection,
    kind: &str,
    job_ids: &[Uuid],
    pet_ids: &[&str],
    trace_ids: &[Option<&str>],
    photo_jobs: &[i64],
    image_ids: &[Uuid],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO jobs (id, pet_id, kind, status, image_ids, trace_id)
         SELECT j.id, j.pet, $6, 'queued',
                COALESCE(array_agg(p.img ORDER BY p.n) FILTER (WHERE p.img IS NOT NULL), '{}'),
                j.trace
         FROM UNNEST($1::uuid[], $2::text[], $3::text[]) WITH ORDINALITY AS j(id, pet, trace, k)
         LEFT JOIN UNNEST($4::bigint[], $5::uuid[]) WITH ORDINALITY AS p(k, img, n) ON p.k = j.k
         GROUP BY j.id, j.pet, j.trace",
    )
    .bind(job_ids)
    .bind(pet_ids)
    .bind(trace_ids)
    .bind(photo_jobs)
    .bind(image_ids)
    .bind(kind)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn set_job_stream_id(
    pool: &PgPool,
    job_id: Uuid,
    stream_id: &str,
) -> Result<(), sqlx::Error> {
    set_job_stream_ids(pool, &[job_id], &[stream_id.to_owned()]).await
}

async fn set_job_stream_ids(
    pool: &PgPool,
    job_ids: &[Uuid],
    stream_ids: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs j SET stream_id = x.sid FROM UNNEST($1::uuid[], $2::text[]) AS x(id, sid)
         WHERE j.id = x.id AND j.stream_id IS NULL",
    )
    .bind(job_ids)
    .bind(stream_ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records the stream ids of enqueued jobs off the request path, a batch at a time
/// ([`batcher`](super::batcher)): a burst of uploads costs one update and one commit instead
/// of one each. Nothing depends on the write being prompt: the relay re-enqueues a queued job
/// without a stream id only after `redis.relay_grace_ms`, and the worker records the id itself
/// when it starts the job. When the queue is full the caller writes its own id.
#[derive(Clone)]
pub struct StreamIdRecorder {
    pool: PgPool,
    queue: tokio::sync::mpsc::Sender<(Uuid, String)>,
}

impl StreamIdRecorder {
    /// Ids waiting for the task; more and the caller writes its own.
    const QUEUE: usize = 4096;
    /// Ids one statement writes at most.
    const BATCH: usize = 512;

    /// Starts the task on the current runtime.
    pub fn spawn(pool: PgPool) -> Self {
        let writer = pool.clone();
        let queue = super::batcher::spawn("stream ids", Self::QUEUE, Self::BATCH, move |batch| {
            let writer = writer.clone();
            async move {
                let (jobs, ids): (Vec<Uuid>, Vec<String>) = batch.into_iter().unzip();
                if let Err(e) = set_job_stream_ids(&writer, &jobs, &ids).await {
                    tracing::warn!(jobs = jobs.len(), error = %e, "Recording stream ids failed; the jobs are enqueued, and their workers record them.");
                }
            }
        });
        StreamIdRecorder { pool, queue }
    }

    /// Records that `job_id` is on the stream as `stream_id`.
    pub async fn record(&self, job_id: Uuid, stream_id: String) -> Result<(), sqlx::Error> {
        use tokio::sync::mpsc::error::TrySendError::{Closed, Full};
        match self.queue.try_send((job_id, stream_id)) {
            Ok(()) => Ok(()),
            Err(Full((job_id, stream_id)) | Closed((job_id, stream_id))) => {
                set_job_stream_id(&self.pool, job_id, &stream_id).await
            }
        }
    }
}

/// Removes what an upload wrote when its job could not be enqueued.
pub async fn undo_upload(
    pool: &PgPool,
    job_id: Uuid,
    new_images: &[Uuid],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM jobs WHERE id = $1")
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM images WHERE id = ANY($1)")
        .bind(new_images)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Photos (of one pet, or all) without an embedding for `model_version`: `(id, storage key)`.
pub async fn images_without_embedding(
    pool: &PgPool,
    model_version: &str,
    pet_id: Option<&str>,
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT i.id, i.storage_key FROM images i
         WHERE ($2::text IS NULL OR i.pet_id = $2)
           AND NOT EXISTS (SELECT 1 FROM image_embeddings e WHERE e.image_id = i.id AND e.model_version = $1)
         ORDER BY i.pet_id, i.created_at, i.id",
    )
    .bind(model_version)
    .bind(pet_id)
    .fetch_all(pool)
    .await
}

/// Stores one photo's embedding and quality measures (kept if already there): by `reembed`,
/// and by a job as soon as the photo is embedded.
pub async fn insert_embedding<'e>(
    db: impl sqlx::PgExecutor<'e>,
    image_id: Uuid,
    model_version: &str,
    vector: &[f32],
    q: &Quality,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO image_embeddings (image_id, model_version, vector, sharpness, noise, exposure, pixels)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (image_id, model_version) DO NOTHING",
    )
    .bind(image_id)
    .bind(model_version)
    .bind(vector)
    .bind(q.sharpness)
    .bind(q.noise)
    .bind(q.exposure)
    .bind(q.pixels as i64)
    .execute(db)
    .await?;
    Ok(())
}

/// Puts a dead-lettered or failed job back to `queued` for a replay, with the replay's trace
/// (when it has one) as the job's; returns rows changed.
pub async fn requeue_for_replay(
    pool: &PgPool,
    job_id: Uuid,
    trace_id: Option<&str>,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE jobs SET status = 'queued', error = NULL, finished_at = NULL,
             trace_id = COALESCE($2, trace_id)
         WHERE id = $1 AND status IN ('dead_lettered', 'failed')",
    )
    .bind(job_id)
    .bind(trace_id)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

pub async fn pet_has_images(pool: &PgPool, pet_id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM images WHERE pet_id = $1)")
        .bind(pet_id)
        .fetch_one(pool)
        .await
}

/// The pet's recluster that is on the stream and not started yet, if any: a new recluster
/// request joins it instead of queueing a second full run of the same photos.
pub async fn queued_recluster(pool: &PgPool, pet_id: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM jobs WHERE pet_id = $1 AND kind = 'recluster' AND status = 'queued'
            AND stream_id IS NOT NULL
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(pet_id)
    .fetch_optional(pool)
    .await
}

pub async fn get_job(pool: &PgPool, job_id: Uuid) -> Result<Option<JobView>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, pet_id, status, attempts, error, created_at, started_at, finished_at,
                cluster_version, trace_id, image_ids
         FROM jobs WHERE id = $1",
    )
    .bind(job_id)
    .fetch_optional(pool)
    .await?;
    let Some(r) = row else { return Ok(None) };
    let pet_id: String = r.try_get("pet_id")?;
    let image_ids: Vec<Uuid> = r.try_get("image_ids")?;
    Ok(Some(JobView {
        job_id: r.try_get("id")?,
        unprocessable: unprocessable(pool, &pet_id, Some(&image_ids)).await?,
        pet_id,
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        cluster_version: r.try_get("cluster_version")?,
        trace_id: r.try_get("trace_id")?,
    }))
}

/// The pet's latest cluster version, clusters ordered by size then id.
pub async fn latest_clusters(
    pool: &PgPool,
    pet_id: &str,
) -> Result<Option<ClusteringView>, sqlx::Error> {
    let Some(v) = sqlx::query(
        "SELECT id, version, model_version FROM cluster_versions WHERE pet_id = $1 ORDER BY version DESC LIMIT 1",
    )
    .bind(pet_id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let version: i64 = v.try_get("version")?;
    let clusters = clusters_of_version(pool, pet_id, version, None).await?;
    Ok(Some(ClusteringView {
        pet_id: pet_id.to_owned(),
        version,
        model_version: v.try_get("model_version")?,
        clusters,
        unprocessable: unprocessable(pool, pet_id, None).await?,
    }))
}

/// The clusters of a pet's version (only `cluster_id` when given), biggest first, members
/// best-scored first.
async fn clusters_of_version(
    db: impl sqlx::PgExecutor<'_>,
    pet_id: &str,
    version: i64,
    cluster_id: Option<Uuid>,
) -> Result<Vec<ClusterView>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.cluster_id, c.hero_image_id, c.hero_pinned, c.size, m.image_id, m.score,
                m.sharpness, m.noise, m.exposure, m.resolution, m.centrality, m.near_duplicate_of
         FROM clusters c JOIN cluster_members m ON m.cluster = c.id
         WHERE c.pet_id = $1 AND c.first_version <= $2
           AND (c.until_version IS NULL OR c.until_version > $2)
           AND ($3::uuid IS NULL OR c.cluster_id = $3)
         ORDER BY c.size DESC, c.first_version, c.label, m.score DESC, m.image_id",
    )
    .bind(pet_id)
    .bind(version)
    .bind(cluster_id)
    .fetch_all(db)
    .await?;
    let mut clusters: Vec<ClusterView> = Vec::new();
    for r in rows {
        let cluster_id: Uuid = r.try_get("cluster_id")?;
        let image_id: Uuid = r.try_get("image_id")?;
        let factor = |k: &str| r.try_get::<Option<f64>, _>(k);
        let score = match (
            factor("sharpness")?,
            factor("noise")?,
            factor("exposure")?,
            factor("resolution")?,
            factor("centrality")?,
        ) {
            (Some(sharpness), Some(noise), Some(exposure), Some(resolution), Some(centrality)) => {
                Some(ScoreView {
                    sharpness,
                    noise,
                    exposure,
                    resolution,
                    centrality,
                    total: r.try_get("score")?,
                })
            }
            _ => None,
        };
        let member = MemberView {
            image_id,
            score,
            near_duplicate_of: r.try_get("near_duplicate_of")?,
        };
        match clusters.last_mut() {
            Some(c) if c.cluster_id == cluster_id => {
                c.image_ids.push(image_id);
                c.members.push(member);
            }
            _ => clusters.push(ClusterView {
                cluster_id,
                hero_image_id: r.try_get("hero_image_id")?,
                hero_pinned: r.try_get("hero_pinned")?,
                image_ids: vec![image_id],
                size: r.try_get("size")?,
                members: vec![member],
            }),
        }
    }
    Ok(clusters)
}

/// Why a hero could not be pinned.
#[derive(Debug)]
pub enum PinRefused {
    /// The pet has no clustering, or its latest has no cluster of that id.
    NoCluster,
    /// The photo is not a member of the cluster.
    NotAMember,
}

/// Pins `image_id` as the hero of the pet's cluster `cluster_id` (its latest version at once,
/// and every later version while the photo stays a member), in the caller's transaction.
pub async fn pin_hero(
    tx: &mut Transaction<'_, Postgres>,
    pet_id: &str,
    cluster_id: Uuid,
    image_id: Uuid,
) -> Result<Result<ClusterView, PinRefused>, sqlx::Error> {
    // The pipeline's commit takes the same lock: a pin lands wholly before or after a commit.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(pet_id)
        .execute(&mut **tx)
        .await?;
    let Some(version): Option<i64> = sqlx::query_scalar(
        "SELECT version FROM cluster_versions WHERE pet_id = $1 ORDER BY version DESC LIMIT 1",
    )
    .bind(pet_id)
    .fetch_optional(&mut **tx)
    .await?
    else {
        return Ok(Err(PinRefused::NoCluster));
    };
    let row: Option<(Uuid, bool)> = sqlx::query_as(
        "SELECT c.id, EXISTS (SELECT 1 FROM cluster_members m WHERE m.cluster = c.id AND m.image_id = $3)
         FROM clusters c WHERE c.pet_id = $1 AND c.cluster_id = $2 AND c.until_version IS NULL",
    )
    .bind(pet_id)
    .bind(cluster_id)
    .bind(image_id)
    .fetch_optional(&mut **tx)
    .await?;
    let row_id = match row {
        None => return Ok(Err(PinRefused::NoCluster)),
        Some((_, false)) => return Ok(Err(PinRefused::NotAMember)),
        Some((id, true)) => id,
    };
    sqlx::query(
        "INSERT INTO hero_pins (pet_id, cluster_id, image_id) VALUES ($1, $2, $3)
         ON CONFLICT (pet_id, cluster_id) DO UPDATE SET image_id = EXCLUDED.image_id, pinned_at = now()",
    )
    .bind(pet_id)
    .bind(cluster_id)
    .bind(image_id)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE clusters SET hero_image_id = $2, hero_pinned = true WHERE id = $1")
        .bind(row_id)
        .bind(image_id)
        .execute(&mut **tx)
        .await?;
    let mut view = clusters_of_version(&mut **tx, pet_id, version, Some(cluster_id)).await?;
    Ok(Ok(view.remove(0)))
}

/// A photo's content type, object key and pet.
pub async fn get_image(
    pool: &PgPool,
    image_id: Uuid,
) -> Result<Option<(String, String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT content_type, storage_key, pet_id FROM images WHERE id = $1")
        .bind(image_id)
        .fetch_optional(pool)
        .await
}

/// Each row of a photo query as a [`PetImage`], as the rows arrive: a pet's whole library
/// (50,000 photos of 2 x 1024 + 1 values) is 800 MB in Postgres's binary array format, twice
/// its floats, which `fetch_all` would hold all at once before the first was decoded.
async fn for_each_pet_image(
    mut rows: impl futures::Stream<Item = Result<sqlx::postgres::PgRow, sqlx::Error>> + Unpin,
    mut each: impl FnMut(PetImage),
) -> Result<(), PipelineError> {
    use futures::TryStreamExt;
    while let Some(row) = rows.try_next().await.map_err(unavailable)? {
        each(pet_image(&row).map_err(unavailable)?);
    }
    Ok(())
}

/// A photo row with its embedding, if any (`images` joined with `image_embeddings`).
fn pet_image(r: &sqlx::postgres::PgRow) -> Result<PetImage, sqlx::Error> {
    let vector: Option<Vec<f32>> = r.try_get("vector")?;
    let cached = match vector {
        Some(v) => Some((
            v,
            Quality {
                sharpness: r.try_get("sharpness")?,
                noise: r.try_get("noise")?,
                exposure: r.try_get("exposure")?,
                pixels: r.try_get::<i64, _>("pixels")? as u64,
            },
        )),
        None => None,
    };
    Ok(PetImage {
        image_id: r.try_get("id")?,
        storage_key: r.try_get("storage_key")?,
        cached,
        held: false,
        captured_at_ms: r
            .try_get::<Option<DateTime<Utc>>, _>("captured_at")?
            .map(|t| t.timestamp_millis()),
    })
}

/// The pipeline's view of Postgres.
#[derive(Clone)]
pub struct PgStore {
    pub pool: PgPool,
    /// Cluster versions kept per pet (`clustering.keep_versions`); older ones are deleted
    /// with each commit.
    pub keep_versions: i64,
}

#[async_trait]
impl Store for PgStore {
    async fn start_jobs(&self, jobs: &[(Uuid, String)]) -> Result<Vec<JobStart>, PipelineError> {
        let (ids, stream_ids): (Vec<Uuid>, Vec<String>) = jobs.iter().cloned().unzip();
        let started: Vec<(Uuid, i32)> = sqlx::query_as(
            "UPDATE jobs j SET status = 'running', attempts = j.attempts + 1,
                 started_at = COALESCE(j.started_at, now()), stream_id = COALESCE(j.stream_id, x.sid)
             FROM UNNEST($1::uuid[], $2::text[]) AS x(id, sid)
             WHERE j.id = x.id AND j.status IN ('queued', 'running')
             RETURNING j.id, j.attempts",
        )
        .bind(&ids)
        .bind(&stream_ids)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let started: HashMap<Uuid, i32> = started.into_iter().collect();
        let known: Vec<Uuid> = if started.len() == ids.len() {
            Vec::new()
        } else {
            sqlx::query_scalar("SELECT id FROM jobs WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?
        };
        Ok(ids
            .iter()
            .map(|id| match started.get(id) {
                Some(&attempts) => JobStart::Started { attempts },
                None if known.contains(id) => JobStart::AlreadyFinished,
                None => JobStart::Unknown,
            })
            .collect())
    }

    async fn pet_images(
        &self,
        pet_id: &str,
        model_version: &str,
        held: &[Uuid],
    ) -> Result<Vec<PetImage>, PipelineError> {
        if held.is_empty() {
            let rows = sqlx::query(
                "SELECT i.id, i.storage_key, i.captured_at, e.vector, e.sharpness, e.noise, e.exposure, e.pixels
                 FROM images i
                 LEFT JOIN image_embeddings e ON e.image_id = i.id AND e.model_version = $2
                 WHERE i.pet_id = $1 AND i.error IS NULL ORDER BY i.created_at, i.id",
            )
            .bind(pet_id)
            .bind(model_version)
            .fetch(&self.pool);
            let mut images = Vec::new();
            for_each_pet_image(rows, |image| images.push(image)).await?;
            return Ok(images);
        }
        // The caller holds most vectors: list the pet's photo ids only, then read the rest of
        // the photos it does not hold, with their embeddings.
        let held: HashSet<Uuid> = held.iter().copied().collect();
        let all: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM images WHERE pet_id = $1 AND error IS NULL ORDER BY created_at, id",
        )
        .bind(pet_id)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let others: Vec<Uuid> = all.iter().copied().filter(|i| !held.contains(i)).collect();
        let mut found: HashMap<Uuid, PetImage> = HashMap::with_capacity(others.len());
        if !others.is_empty() {
            let rows = sqlx::query(
                "SELECT i.id, i.storage_key, i.captured_at, e.vector, e.sharpness, e.noise, e.exposure, e.pixels
                 FROM images i
                 LEFT JOIN image_embeddings e ON e.image_id = i.id AND e.model_version = $2
                 WHERE i.id = ANY($1)",
            )
            .bind(&others)
            .bind(model_version)
            .fetch(&self.pool);
            for_each_pet_image(rows, |image| {
                found.insert(image.image_id, image);
            })
            .await?;
        }
        Ok(all
            .into_iter()
            .filter_map(|image_id| {
                if held.contains(&image_id) {
                    Some(PetImage {
                        image_id,
                        storage_key: String::new(),
                        cached: None,
                        held: true,
                        captured_at_ms: None,
                    })
                } else {
                    found.remove(&image_id)
                }
            })
            .collect())
    }

    async fn store_embedding(
        &self,
        image_id: Uuid,
        model_version: &str,
        vector: &[f32],
        quality: &Quality,
    ) -> Result<(), PipelineError> {
        insert_embedding(&self.pool, image_id, model_version, vector, quality)
            .await
            .map_err(unavailable)
    }

    async fn quarantine(&self, image_id: Uuid, error: &str) -> Result<(), PipelineError> {
        sqlx::query("UPDATE images SET error = $2 WHERE id = $1")
            .bind(image_id)
            .bind(error)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn commit(&self, result: &ClusteringResult) -> Result<i64, PipelineError> {
        match commit(&self.pool, result, self.keep_versions).await {
            Ok(Committed::Version(v)) => Ok(v),
            Ok(Committed::Fenced { latest }) => Err(PipelineError::LeaseLost(format!(
                "the commit carried fencing token {} but the pet's latest is {latest}",
                result.fence
            ))),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn finish_unsuccessful(
        &self,
        job_ids: &[Uuid],
        status: FinalStatus,
        error: &str,
    ) -> Result<(), PipelineError> {
        sqlx::query(
            "UPDATE jobs SET status = $2, error = $3, finished_at = now()
             WHERE id = ANY($1) AND status <> 'succeeded'",
        )
        .bind(job_ids)
        .bind(status.as_str())
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn take_fence(&self, pet_id: &str) -> Result<i64, PipelineError> {
        sqlx::query_scalar(
            "INSERT INTO pet_fences (pet_id, token) VALUES ($1, 1)
             ON CONFLICT (pet_id) DO UPDATE SET token = pet_fences.token + 1 RETURNING token",
        )
        .bind(pet_id)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)
    }

    async fn outbox(
        &self,
        grace_ms: u64,
        stale_ms: u64,
        check_entries: bool,
        limit: usize,
    ) -> Result<Vec<OutboxJob>, PipelineError> {
        let rows = sqlx::query(
            "SELECT id, pet_id, kind, image_ids, stream_id, trace_id FROM jobs
             WHERE (status = 'queued' AND created_at < now() - make_interval(secs => $1 / 1000.0)
                    AND (stream_id IS NULL OR $3))
                OR ($3 AND status = 'running' AND started_at < now() - make_interval(secs => $2 / 1000.0))
             ORDER BY created_at LIMIT $4",
        )
        .bind(grace_ms as f64)
        .bind(stale_ms as f64)
        .bind(check_entries)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let now = chrono::Utc::now().timestamp_millis();
        rows.into_iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                Ok(OutboxJob {
                    entry: JobEntry {
                        job_id: r.try_get("id")?,
                        pet_id: r.try_get("pet_id")?,
                        kind: JobKind::parse(&kind).unwrap_or(JobKind::Recluster),
                        image_ids: r.try_get("image_ids")?,
                        enqueued_at_ms: now,
                        attempt: 1,
                        traceparent: None,
                        tracestate: None,
                    },
                    stream_id: r.try_get("stream_id")?,
                    trace_id: r.try_get("trace_id")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(unavailable)
    }

    async fn set_stream_id(&self, job_id: Uuid, stream_id: &str) -> Result<(), PipelineError> {
        sqlx::query("UPDATE jobs SET stream_id = $2 WHERE id = $1")
            .bind(job_id)
            .bind(stream_id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn known_images(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, PipelineError> {
        sqlx::query_scalar("SELECT id FROM images WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn requeue(&self, job_ids: &[Uuid], error: &str) -> Result<(), PipelineError> {
        sqlx::query(
            "UPDATE jobs SET status = 'queued', error = $2 WHERE id = ANY($1) AND status = 'running'",
        )
        .bind(job_ids)
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }
}

/// What a commit did.
enum Committed {
    Version(i64),
    /// Refused: a later lease of the pet was taken since this batch's.
    Fenced {
        latest: i64,
    },
}

async fn commit(
    pool: &PgPool,
    r: &ClusteringResult,
    keep_versions: i64,
) -> Result<Committed, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Serialises commits per pet across every worker process, so versions are strictly increasing.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(&r.pet_id)
        .execute(&mut *tx)
        .await?;
    // Fencing: only the holder of the pet's latest lease may commit. Taking a lease bumps the
    // token, so a worker that lost its lock (expired during a pause, a failover) and whose
    // pet another worker took finds a later token here and gives up.
    let latest: Option<i64> = sqlx::query_scalar("SELECT token FROM pet_fences WHERE pet_id = $1")
        .bind(&r.pet_id)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(latest) = latest
        && latest != r.fence
    {
        return Ok(Committed::Fenced { latest });
    }
    let existing: Option<i64> =
        sqlx::query_scalar("SELECT version FROM cluster_versions WHERE job_id = $1")
            .bind(r.version_job)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(version) = existing {
        mark_succeeded(&mut tx, &r.job_ids, version).await?;
        tx.commit().await?;
        return Ok(Committed::Version(version));
    }
    // A job started after this batch's newest has already written a version: it saw every
    // photo this batch saw, so this result is stale. Write no version and finish the jobs as
    // coalesced into the newer one. Versions thus follow job start order, and the latest
    // covers every photo uploaded before its job started.
    let newer: Option<i64> = sqlx::query_scalar(
        "SELECT cv.version FROM cluster_versions cv
         JOIN jobs theirs ON theirs.id = cv.job_id
         JOIN jobs mine ON mine.id = $2
         WHERE cv.pet_id = $1 AND theirs.started_at > mine.started_at
         ORDER BY cv.version DESC LIMIT 1",
    )
    .bind(&r.pet_id)
    .bind(r.version_job)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(version) = newer {
        mark_succeeded(&mut tx, &r.job_ids, version).await?;
        tx.commit().await?;
        tracing::info!(job_id = %r.version_job, version, "A newer job already clustered this pet; coalesced.");
        return Ok(Committed::Version(version));
    }
    let previous = previous_clusters(&mut tx, &r.pet_id).await?;
    let version: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(version), 0) + 1 FROM cluster_versions WHERE pet_id = $1",
    )
    .bind(&r.pet_id)
    .fetch_one(&mut *tx)
    .await?;
    let params =
        serde_json::json!({ "eps_cosine": r.params.eps, "min_points": r.params.min_points });
    sqlx::query(
        "INSERT INTO cluster_versions (pet_id, version, job_id, model_version, algorithm, params)
         VALUES ($1, $2, $3, $4, 'dbscan', $5)",
    )
    .bind(&r.pet_id)
    .bind(version)
    .bind(r.version_job)
    .bind(&r.model_version)
    .bind(params)
    .execute(&mut *tx)
    .await?;
    let new_members: Vec<Vec<Uuid>> = r
        .clusters
        .iter()
        .map(|c| c.members.iter().map(|m| m.image_id).collect())
        .collect();
    let identities: Vec<(Uuid, Vec<Uuid>)> = previous
        .iter()
        .map(|p| (p.cluster_id, p.members.iter().map(|m| m.0).collect()))
        .collect();
    let kept = match_clusters(&identities, &new_members);
    let by_id: HashMap<Uuid, &PreviousCluster> =
        previous.iter().map(|p| (p.cluster_id, p)).collect();
    let pins = hero_pins(&mut tx, &r.pet_id).await?;
    let mut pinned_ids: Vec<Uuid> = Vec::new();
    // Clusters whose current row stays as it is (same members, scores and hero); every other
    // current row ends at this version and the changed clusters get new rows.
    let mut unchanged: Vec<Uuid> = Vec::new();
    let mut rows = ClusterRows::default();
    for (label, (c, kept)) in r.clusters.iter().zip(kept).enumerate() {
        let cluster_id = kept.unwrap_or_else(Uuid::now_v7);
        let previous = kept.and_then(|k| by_id.get(&k).copied());
        let (hero, pinned) = choose_hero(
            c,
            kept.and_then(|k| pins.get(&k)).copied(),
            previous.map(|p| p.hero),
        );
        if pinned {
            pinned_ids.push(cluster_id);
        }
        if previous.is_some_and(|p| p.is_same(c, hero, pinned)) {
            unchanged.push(cluster_id);
            continue;
        }
        rows.push(cluster_id, label, hero, pinned, c);
    }
    let unchanged: HashSet<Uuid> = unchanged.into_iter().collect();
    let retired: Vec<Uuid> = previous
        .iter()
        .filter(|p| !unchanged.contains(&p.cluster_id))
        .map(|p| p.row)
        .collect();
    sqlx::query("UPDATE clusters SET until_version = $2 WHERE id = ANY($1)")
        .bind(&retired)
        .bind(version)
        .execute(&mut *tx)
        .await?;
    rows.insert(&mut tx, &r.pet_id, version).await?;
    // A pin lapses when its photo left the cluster, or the cluster id is gone.
    sqlx::query("DELETE FROM hero_pins WHERE pet_id = $1 AND NOT (cluster_id = ANY($2))")
        .bind(&r.pet_id)
        .bind(&pinned_ids)
        .execute(&mut *tx)
        .await?;
    mark_succeeded(&mut tx, &r.job_ids, version).await?;
    // Storage grows with the library and what changes, not with the jobs: versions older
    // than the last `keep_versions` go, and so do the cluster rows (with their members, ON
    // DELETE CASCADE) that no kept version sees. Jobs keep the number of the version that
    // completed them.
    let oldest_kept = version - keep_versions.max(1) + 1;
    sqlx::query("DELETE FROM cluster_versions WHERE pet_id = $1 AND version < $2")
        .bind(&r.pet_id)
        .bind(oldest_kept)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM clusters WHERE pet_id = $1 AND until_version <= $2")
        .bind(&r.pet_id)
        .bind(oldest_kept)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Committed::Version(version))
}

async fn mark_succeeded(
    tx: &mut Transaction<'_, Postgres>,
    job_ids: &[Uuid],
    version: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE jobs SET status = 'succeeded', error = NULL, finished_at = now(), cluster_version = $2
         WHERE id = ANY($1)",
    )
    .bind(job_ids)
    .bind(version)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The hero of a cluster: the owner's pin while the photo is a member; else the cluster's
/// previous hero unless the best-scored member beats it by more than [`HERO_MARGIN`]
/// (hysteresis: near-equal shots do not take turns); else the best-scored member. Whether the
/// hero is a pin.
fn choose_hero(c: &ClusterOut, pin: Option<Uuid>, previous: Option<Uuid>) -> (Uuid, bool) {
    let score = |id: Uuid| {
        c.members
            .iter()
            .find(|m| m.image_id == id)
            .map(|m| m.score.total)
    };
    if let Some(p) = pin
        && score(p).is_some()
    {
        return (p, true);
    }
    if let Some(prev) = previous
        && prev != c.hero_image_id
        && let (Some(old), Some(best)) = (score(prev), score(c.hero_image_id))
        && best <= old * (1.0 + HERO_MARGIN)
    {
        return (prev, false);
    }
    (c.hero_image_id, false)
}

/// The pet's pinned heroes, by cluster id.
async fn hero_pins(
    tx: &mut Transaction<'_, Postgres>,
    pet_id: &str,
) -> Result<HashMap<Uuid, Uuid>, sqlx::Error> {
    let pins: Vec<(Uuid, Uuid)> =
        sqlx::query_as("SELECT cluster_id, image_id FROM hero_pins WHERE pet_id = $1")
            .bind(pet_id)
            .fetch_all(&mut **tx)
            .await?;
    Ok(pins.into_iter().collect())
}

/// A current cluster row: what the next commit compares a new cluster with.
struct PreviousCluster {
    /// The row's own id.
    row: Uuid,
    cluster_id: Uuid,
    hero: Uuid,
    pinned: bool,
    /// `(image id, score, near-duplicate of)`, ordered by image id.
    members: Vec<(Uuid, f64, Option<Uuid>)>,
}

impl PreviousCluster {
    /// Whether the new cluster would write this very row again.
    fn is_same(&self, c: &ClusterOut, hero: Uuid, pinned: bool) -> bool {
        if self.hero != hero || self.pinned != pinned || self.members.len() != c.members.len() {
            return false;
        }
        let mut new: Vec<(Uuid, f64, Option<Uuid>)> = c
            .members
            .iter()
            .map(|m| (m.image_id, m.score.total, m.near_duplicate_of))
            .collect();
        new.sort_by_key(|m| m.0);
        // Scores within rounding: the same members summed in another order are the same score.
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
        new.iter()
            .zip(&self.members)
            .all(|(a, b)| a.0 == b.0 && close(a.1, b.1) && a.2 == b.2)
    }
}

/// The pet's current clusters (the latest version's), in label order, for identity matching,
/// the hero's margin and the comparison that spares rewriting unchanged clusters.
async fn previous_clusters(
    tx: &mut Transaction<'_, Postgres>,
    pet_id: &str,
) -> Result<Vec<PreviousCluster>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.id, c.cluster_id, c.hero_image_id, c.hero_pinned, m.image_id, m.score, m.near_duplicate_of
         FROM clusters c JOIN cluster_members m ON m.cluster = c.id
         WHERE c.pet_id = $1 AND c.until_version IS NULL
         ORDER BY c.first_version, c.label, m.image_id",
    )
    .bind(pet_id)
    .fetch_all(&mut **tx)
    .await?;
    let mut out: Vec<PreviousCluster> = Vec::new();
    for r in rows {
        let cluster_id: Uuid = r.try_get("cluster_id")?;
        let member = (
            r.try_get("image_id")?,
            r.try_get("score")?,
            r.try_get("near_duplicate_of")?,
        );
        match out.last_mut() {
            Some(p) if p.cluster_id == cluster_id => p.members.push(member),
            _ => out.push(PreviousCluster {
                row: r.try_get("id")?,
                cluster_id,

                hero: r.try_get("hero_image_id")?,
                pinned: r.try_get("hero_pinned")?,
                members: vec![member],
            }),
        }
    }
    Ok(out)
}

/// New cluster rows and their members, written with one statement each (arrays unnested).
#[derive(Default)]
struct ClusterRows {
    ids: Vec<Uuid>,
    cluster_ids: Vec<Uuid>,
    labels: Vec<i32>,
    heroes: Vec<Uuid>,
    sizes: Vec<i32>,
    pinned: Vec<bool>,
    m_cluster: Vec<Uuid>,
    m_image: Vec<Uuid>,
    m_score: Vec<f64>,
    m_sharpness: Vec<f64>,
    m_noise: Vec<f64>,
    m_exposure: Vec<f64>,
    m_resolution: Vec<f64>,
    m_centrality: Vec<f64>,
    m_duplicate: Vec<Option<Uuid>>,
}

impl ClusterRows {
    fn push(&mut self, cluster_id: Uuid, label: usize, hero: Uuid, pinned: bool, c: &ClusterOut) {
        let row = Uuid::now_v7();
        self.ids.push(row);
        self.cluster_ids.push(cluster_id);
        self.labels.push(label as i32);
        self.heroes.push(hero);
        self.sizes.push(c.members.len() as i32);
        self.pinned.push(pinned);
        for m in &c.members {
            self.m_cluster.push(row);
            self.m_image.push(m.image_id);
            self.m_score.push(m.score.total);
            self.m_sharpness.push(m.score.sharpness);
            self.m_noise.push(m.score.noise);
            self.m_exposure.push(m.score.exposure);
            self.m_resolution.push(m.score.resolution);
            self.m_centrality.push(m.score.centrality);
            self.m_duplicate.push(m.near_duplicate_of);
        }
    }

    async fn insert(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        pet_id: &str,
        version: i64,
    ) -> Result<(), sqlx::Error> {
        if self.ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO clusters (pet_id, first_version, id, cluster_id, label, hero_image_id, size, hero_pinned)
             SELECT $1, $2, * FROM UNNEST($3::uuid[], $4::uuid[], $5::int4[], $6::uuid[], $7::int4[], $8::bool[])",
        )
        .bind(pet_id)
        .bind(version)
        .bind(&self.ids)
        .bind(&self.cluster_ids)
        .bind(&self.labels)
        .bind(&self.heroes)
        .bind(&self.sizes)
        .bind(&self.pinned)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO cluster_members
                 (cluster, image_id, score, sharpness, noise, exposure, resolution, centrality, near_duplicate_of)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::float8[], $4::float8[], $5::float8[],
                                  $6::float8[], $7::float8[], $8::float8[], $9::uuid[])",
        )
        .bind(&self.m_cluster)
        .bind(&self.m_image)
        .bind(&self.m_score)
        .bind(&self.m_sharpness)
        .bind(&self.m_noise)
        .bind(&self.m_exposure)
        .bind(&self.m_resolution)
        .bind(&self.m_centrality)
        .bind(&self.m_duplicate)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actors::algo::hero::Score;
    use actors::ports::Member;

    fn cluster(scores: &[(Uuid, f64)]) -> ClusterOut {
        let best = scores
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("members")
            .0;
        ClusterOut {
            hero_image_id: best,
            members: scores
                .iter()
                .map(|&(image_id, total)| Member {
                    image_id,
                    score: Score {
                        sharpness: 1.0,
                        noise: 1.0,
                        exposure: 1.0,
                        resolution: 1.0,
                        centrality: total,
                        total,
                    },
                    near_duplicate_of: None,
                })
                .collect(),
        }
    }

    #[test]
    fn the_hero_is_the_pin_then_the_previous_within_the_margin_then_the_best() {
        let (a, b, gone) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        // b scores 3 % above a, the previous hero: within the margin, a stays.
        let close = cluster(&[(a, 0.80), (b, 0.824)]);
        assert_eq!(choose_hero(&close, None, Some(a)), (a, false));
        // 10 % above: b takes over.
        let clear = cluster(&[(a, 0.80), (b, 0.88)]);
        assert_eq!(choose_hero(&clear, None, Some(a)), (b, false));
        // A previous hero that left the cluster, or none: the best.
        assert_eq!(choose_hero(&close, None, Some(gone)), (b, false));
        assert_eq!(choose_hero(&close, None, None), (b, false));
        // The owner's pin wins over both while it is a member; a pin that left lapses.
        assert_eq!(choose_hero(&clear, Some(a), Some(b)), (a, true));
        assert_eq!(choose_hero(&clear, Some(gone), Some(a)), (b, false));
    }
}
