//! The postgres-writer: every Postgres read and write of a job is one of its messages, so
//! `actors.postgres_writers` bounds them (the queueing shows in its mailbox, not hidden in a
//! connection pool), and each is timed and traced with the database conventions.

use std::sync::Arc;
use std::time::Instant;

use futures::TryFutureExt;
use futures::future::BoxFuture;
use tracing::Instrument;
use uuid::Uuid;

use crate::algo::quality::Quality;
use crate::error::PipelineError;
use crate::events::PostgresWritten;
use crate::metrics::Metrics;
use crate::ports::{ClusteringResult, FinalStatus, JobStart, OutboxJob, PetImage, Store};
use crate::runtime::{ActorKind, AsyncStage, Request, traced};

/// One Postgres operation.
#[derive(Debug)]
pub enum DbOp {
    /// `(job id, stream id)` of each job to start.
    StartJobs {
        jobs: Vec<(Uuid, String)>,
    },
    /// The pet's photos; the vectors of `held` ones are not read.
    LoadPet {
        pet_id: String,
        model_version: String,
        held: Vec<Uuid>,
    },
    StoreEmbedding {
        image_id: Uuid,
        model_version: String,
        vector: Vec<f32>,
        quality: Quality,
    },
    Quarantine {
        image_id: Uuid,
        error: String,
    },
    Commit(Box<ClusteringResult>),
    Finish {
        job_ids: Vec<Uuid>,
        status: FinalStatus,
        error: String,
    },
    Requeue {
        job_ids: Vec<Uuid>,
        error: String,
    },
    /// Takes the pet's next fencing token (its lock is held).
    TakeFence {
        pet_id: String,
    },
    /// Jobs the outbox relay looks at.
    Outbox {
        grace_ms: u64,
        stale_ms: u64,
        check_entries: bool,
        limit: usize,
    },
    SetStreamId {
        job_id: Uuid,
        stream_id: String,
    },
    /// Which of these image ids have a row (the orphan sweeper).
    KnownImages {
        ids: Vec<Uuid>,
    },
}

#[derive(Debug)]
pub enum DbReply {
    Started(Vec<JobStart>),
    Fence(i64),
    Outbox(Vec<OutboxJob>),
    Known(Vec<Uuid>),
    Images(Vec<PetImage>),
    Committed { version: i64 },
    Done,
}

impl Request for DbOp {
    type Reply = DbReply;
}

impl DbOp {
    /// The `operation` label of `media_cluster_postgres_write_seconds`.
    fn operation(&self) -> &'static str {
        match self {
            DbOp::StartJobs { .. } => "start_jobs",
            DbOp::LoadPet { .. } => "load_pet",
            DbOp::StoreEmbedding { .. } | DbOp::Quarantine { .. } => "store_embedding",
            DbOp::Commit(_) => "commit_clusters",
            DbOp::Finish { .. } => "finish_jobs",
            DbOp::Requeue { .. } => "requeue_jobs",
            DbOp::TakeFence { .. } => "take_fence",
            DbOp::Outbox { .. } | DbOp::SetStreamId { .. } => "outbox",
            DbOp::KnownImages { .. } => "known_images",
        }
    }

    /// `db.query.summary`: the operation and the tables it touches.
    fn summary(&self) -> &'static str {
        match self {
            DbOp::StartJobs { .. }
            | DbOp::Finish { .. }
            | DbOp::Requeue { .. }
            | DbOp::SetStreamId { .. } => "UPDATE jobs",
            DbOp::TakeFence { .. } => "INSERT pet_fences",
            DbOp::Outbox { .. } => "SELECT jobs",
            DbOp::KnownImages { .. } => "SELECT images",
            DbOp::LoadPet { .. } => "SELECT images image_embeddings",
            DbOp::StoreEmbedding { .. } => "INSERT image_embeddings",
            DbOp::Quarantine { .. } => "UPDATE images",
            DbOp::Commit(_) => "INSERT cluster_versions clusters cluster_members",
        }
    }
}

/// Where the writer's database is, for the span attributes.
#[derive(Debug, Clone, Default)]
pub struct DbTarget {
    pub namespace: String,
    pub address: String,
    pub port: u16,
}

pub struct PostgresWriter {
    pub store: Arc<dyn Store>,
    pub target: DbTarget,
    pub metrics: Arc<Metrics>,
}

impl AsyncStage for PostgresWriter {
    const KIND: ActorKind = ActorKind::PostgresWriter;
    type In = DbOp;

    fn handle(&mut self, op: DbOp) -> BoxFuture<'static, Result<DbReply, PipelineError>> {
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let operation = op.operation();
        let t = &self.target;
        // A query of a job is a span of its trace; one a loop issues on its own is not.
        let span = if traced() {
            tracing::info_span!(
                "postgres",
                otel.name = op.summary(),
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                db.system.name = "postgresql",
                db.namespace = %t.namespace,
                db.operation.name = operation,
                db.query.summary = op.summary(),
                server.address = %t.address,
                server.port = t.port,
                error.type = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        Box::pin(
            async move {
                let started = Instant::now();
                let reply = match op {
                    DbOp::StartJobs { jobs } => DbReply::Started(store.start_jobs(&jobs).await?),
                    DbOp::LoadPet {
                        pet_id,
                        model_version,
                        held,
                    } => DbReply::Images(store.pet_images(&pet_id, &model_version, &held).await?),
                    DbOp::StoreEmbedding {
                        image_id,
                        model_version,
                        vector,
                        quality,
                    } => {
                        store
                            .store_embedding(image_id, &model_version, &vector, &quality)
                            .await?;
                        DbReply::Done
                    }
                    DbOp::Quarantine { image_id, error } => {
                        store.quarantine(image_id, &error).await?;
                        DbReply::Done
                    }
                    DbOp::Commit(result) => DbReply::Committed {
                        version: store.commit(&result).await?,
                    },
                    DbOp::Finish {
                        job_ids,
                        status,
                        error,
                    } => {
                        store.finish_unsuccessful(&job_ids, status, &error).await?;
                        DbReply::Done
                    }
                    DbOp::Requeue { job_ids, error } => {
                        store.requeue(&job_ids, &error).await?;
                        DbReply::Done
                    }
                    DbOp::TakeFence { pet_id } => DbReply::Fence(store.take_fence(&pet_id).await?),
                    DbOp::Outbox {
                        grace_ms,
                        stale_ms,
                        check_entries,
                        limit,
                    } => DbReply::Outbox(
                        store
                            .outbox(grace_ms, stale_ms, check_entries, limit)
                            .await?,
                    ),
                    DbOp::SetStreamId { job_id, stream_id } => {
                        store.set_stream_id(job_id, &stream_id).await?;
                        DbReply::Done
                    }
                    DbOp::KnownImages { ids } => DbReply::Known(store.known_images(&ids).await?),
                };
                PostgresWritten {
                    operation,
                    elapsed: started.elapsed(),
                }
                .emit(&metrics);
                Ok(reply)
            }
            .instrument(span.clone())
            .inspect_err(move |e: &PipelineError| {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", error_type(e));
            }),
        )
    }
}

/// `error.type`: the failure class, low-cardinality.
fn error_type(e: &PipelineError) -> &'static str {
    match e {
        PipelineError::Unavailable { .. } => "unavailable",
        PipelineError::Permanent(_) => "permanent",
        PipelineError::Poison(_) => "poison",
        PipelineError::ActorFailed { .. } => "actor_failed",
        PipelineError::ShuttingDown => "shutting_down",
        PipelineError::LeaseLost(_) => "lease_lost",
        PipelineError::DeadlineExceeded(_) => "deadline_exceeded",
    }
}
