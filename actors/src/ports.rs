//! The small traits through which the actors reach the world. `src/`
//! implements them over Redis, Postgres and object storage; unit tests hand in
//! in-memory fakes.

use std::collections::HashMap;

use async_trait::async_trait;
use uuid::Uuid;

use crate::algo::cluster::ClusterParams;
use crate::algo::quality::Quality;
use crate::error::PipelineError;
use crate::job::JobEntry;

/// One entry delivered from the jobs stream.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub stream_id: String,
    pub fields: HashMap<String, String>,
    /// How many times the entry has been delivered, this delivery included.
    pub deliveries: u64,
}

/// Depth of the jobs stream for the consumer group, and the state around it.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueDepth {
    /// Entries not yet delivered to the group.
    pub lag: i64,
    /// Entries delivered and not yet acknowledged.
    pub pending: i64,
    /// Whether the consumer group existed and was not lost since the last reading (the queue
    /// recreates a lost one).
    pub group_exists: bool,
    /// Entries in the dead-letter stream, and the most it keeps.
    pub deadletters: i64,
    pub deadletter_cap: i64,
}

#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Reads up to `count` new entries for `consumer`, blocking up to `block_ms`.
    async fn read(
        &self,
        consumer: &str,
        count: usize,
        block_ms: u64,
    ) -> Result<Vec<Delivery>, PipelineError>;
    /// Acknowledges entries once their results are committed.
    async fn ack(&self, stream_ids: &[String]) -> Result<(), PipelineError>;
    /// Copies the entry to the dead-letter stream with `error`, then acknowledges it.
    async fn dead_letter(&self, delivery: &Delivery, error: &str) -> Result<(), PipelineError>;
    async fn depth(&self) -> Result<QueueDepth, PipelineError>;
    /// Takes over entries that any consumer has held unacknowledged for at least
    /// `min_idle_ms` (a crashed worker's), up to `count`, with their delivery counts.
    async fn reclaim(
        &self,
        consumer: &str,
        min_idle_ms: u64,
        count: usize,
    ) -> Result<Vec<Delivery>, PipelineError>;
    /// Resets the idle time of entries `consumer` still owns, so a long job is not
    /// reclaimed while it runs; entries another consumer took over are left alone.
    async fn keep_alive(&self, consumer: &str, stream_ids: &[String]) -> Result<(), PipelineError>;
    /// Trims acknowledged entries from the head of the stream (never an entry that is
    /// pending or not yet delivered); returns how many were removed.
    async fn trim(&self) -> Result<u64, PipelineError>;
    /// Takes the pet's lock for `owner` for `ttl_ms` if nobody holds it, so that two jobs
    /// of one pet never run at once across worker processes. Queues without shared
    /// state (tests' fakes) need no lock.
    async fn lock_pet(
        &self,
        _pet_id: &str,
        _owner: &str,
        _ttl_ms: u64,
    ) -> Result<bool, PipelineError> {
        Ok(true)
    }
    /// Extends the pet's lock while `owner` still holds it; false if it no longer does.
    async fn refresh_pet(
        &self,
        _pet_id: &str,
        _owner: &str,
        _ttl_ms: u64,
    ) -> Result<bool, PipelineError> {
        Ok(true)
    }
    /// Releases the pet's lock if `owner` holds it.
    async fn unlock_pet(&self, _pet_id: &str, _owner: &str) -> Result<(), PipelineError> {
        Ok(())
    }
    /// Removes consumers (other than `consumer`) idle for `idle_ms` with nothing pending.
    async fn prune_consumers(&self, consumer: &str, idle_ms: u64) -> Result<usize, PipelineError>;
    /// Adds a job's entry unless it already has one in the stream (never twice); returns
    /// the entry's id.
    async fn enqueue(&self, entry: &JobEntry) -> Result<String, PipelineError>;
    /// For each stream id, whether its entry is still in the stream.
    async fn entries_exist(&self, stream_ids: &[String]) -> Result<Vec<bool>, PipelineError>;
}

/// Where photos are stored: `images/<image id>`.
pub const IMAGES_PREFIX: &str = "images";

/// The object key of a photo: derived from its id only, never from a client's file name.
pub fn image_key(image_id: Uuid) -> String {
    format!("{IMAGES_PREFIX}/{image_id}")
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// An object that must be there (a photo whose row exists): missing is poison.
    async fn get(&self, key: &str) -> Result<Vec<u8>, PipelineError>;
    /// Keys of photo objects ([`IMAGES_PREFIX`]) last written after `from` (when given) and
    /// no later than `until`. Objects are never rewritten, so a caller that advances `from`
    /// to its last `until` sees each object once.
    async fn list_written(
        &self,
        from: Option<std::time::SystemTime>,
        until: std::time::SystemTime,
    ) -> Result<Vec<String>, PipelineError>;
    async fn delete(&self, key: &str) -> Result<(), PipelineError>;
}

/// A job the outbox relay looks at: committed and `queued` (or `running` for long) with no
/// entry in the stream, or with one that may be lost.
#[derive(Debug, Clone)]
pub struct OutboxJob {
    pub entry: JobEntry,
    /// The stream entry the job row records, if any.
    pub stream_id: Option<String>,
    /// The trace its upload started.
    pub trace_id: Option<String>,
}

/// What the job row said when the worker took the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStart {
    /// Now `running`; `attempts` counts this one.
    Started { attempts: i32 },
    /// Already finished (a redelivery): acknowledge without doing it again.
    AlreadyFinished,
    /// No such job row.
    Unknown,
}

/// One processable photo of a pet with its cached embedding, if any, for the current model.
#[derive(Debug, Clone)]
pub struct PetImage {
    pub image_id: Uuid,
    pub storage_key: String,
    /// Its stored embedding, unless the caller said it holds it (`held`).
    pub cached: Option<(Vec<f32>, Quality)>,
    /// The caller holds this photo's embedding ([`Store::pet_images`]'s `held`): nothing but
    /// `image_id` is read (`storage_key` is empty, `captured_at_ms` none).
    pub held: bool,
    /// EXIF capture time, Unix ms ([`crate::algo::capture`]), when the upload had one.
    pub captured_at_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct ClusterOut {
    pub hero_image_id: Uuid,
    /// Members with their hero scores.
    pub members: Vec<Member>,
}

/// One photo of a cluster: its hero score with the factors, and the better-scored member
/// it nearly duplicates, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Member {
    pub image_id: Uuid,
    pub score: crate::algo::hero::Score,
    pub near_duplicate_of: Option<Uuid>,
}

/// What one clustering of a pet writes, in one transaction. It completes every job of its
/// batch (a pet's jobs that waited while another of its jobs ran are coalesced into one
/// clustering); the cluster version is recorded under `version_job`, the batch's newest.
#[derive(Debug, Clone)]
pub struct ClusteringResult {
    pub pet_id: String,
    /// The fencing token of the pet's lease this batch holds: the commit is refused if a
    /// later lease of the pet has been taken since (the lock was lost).
    pub fence: i64,
    pub job_ids: Vec<Uuid>,
    pub version_job: Uuid,
    pub model_version: String,
    pub params: ClusterParams,
    pub clusters: Vec<ClusterOut>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Marks each job `running` (counting the attempt) unless it already finished; answers
    /// in the order asked. `jobs` are `(job id, stream id)`.
    async fn start_jobs(&self, jobs: &[(Uuid, String)]) -> Result<Vec<JobStart>, PipelineError>;
    /// Every photo of the pet that is not quarantined, oldest first, with embeddings cached
    /// for `model_version`, except those of `held` (photos whose embedding the caller already
    /// holds), which come back marked `held` without it.
    async fn pet_images(
        &self,
        pet_id: &str,
        model_version: &str,
        held: &[Uuid],
    ) -> Result<Vec<PetImage>, PipelineError>;
    /// Stores one photo's embedding and quality measures (kept if already there).
    async fn store_embedding(
        &self,
        image_id: Uuid,
        model_version: &str,
        vector: &[f32],
        quality: &Quality,
    ) -> Result<(), PipelineError>;
    /// Marks a photo unprocessable with its reason: it is left out of clustering from now on.
    async fn quarantine(&self, image_id: Uuid, error: &str) -> Result<(), PipelineError>;
    /// Writes a new cluster version with its clusters and members and marks every job of the
    /// batch `succeeded`, in one transaction. Idempotent: a batch whose `version_job` already
    /// has a version gets that version back and nothing is written.
    async fn commit(&self, result: &ClusteringResult) -> Result<i64, PipelineError>;
    /// Marks jobs `failed` or `dead_lettered` with `error`.
    async fn finish_unsuccessful(
        &self,
        job_ids: &[Uuid],
        status: FinalStatus,
        error: &str,
    ) -> Result<(), PipelineError>;
    /// Puts jobs back to `queued` (handed back on shutdown), recording the error.
    async fn requeue(&self, job_ids: &[Uuid], error: &str) -> Result<(), PipelineError>;
    /// Takes the next fencing token of a pet (once its lock is held): a commit with an older
    /// token is refused.
    async fn take_fence(&self, pet_id: &str) -> Result<i64, PipelineError>;
    /// Jobs the relay must look at, oldest first: `queued` for more than `grace_ms` with no
    /// stream id; with `check_entries`, also `queued` ones with a stream id and `running`
    /// ones started more than `stale_ms` ago (whose entries may be lost).
    async fn outbox(
        &self,
        grace_ms: u64,
        stale_ms: u64,
        check_entries: bool,
        limit: usize,
    ) -> Result<Vec<OutboxJob>, PipelineError>;
    /// Records the stream entry of a job the relay enqueued.
    async fn set_stream_id(&self, job_id: Uuid, stream_id: &str) -> Result<(), PipelineError>;
    /// Which of these image ids have a row.
    async fn known_images(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, PipelineError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalStatus {
    Failed,
    DeadLettered,
}

impl FinalStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Failed => "failed",
            FinalStatus::DeadLettered => "dead_lettered",
        }
    }
}
