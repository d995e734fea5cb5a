use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::PipelineError;
use crate::events::PostgresWritten;
use crate::ports::{ClusteringResult, FinalStatus, JobStart, Store};
use crate::runtime::{ActorKind, AsyncStage, Request};

/// Every write the pipeline makes goes through the postgres-writer.
pub enum WriteOp {
    StartJob {
        job_id: Uuid,
        stream_id: String,
    },
    Commit(Box<ClusteringResult>),
    Finish {
        job_id: Uuid,
        status: FinalStatus,
        error: String,
    },
    Requeue {
        job_id: Uuid,
        error: String,
    },
}

#[derive(Debug)]
pub enum WriteReply {
    Started(JobStart),
    Committed { version: i64 },
    Done,
}

impl Request for WriteOp {
    type Reply = WriteReply;
}

impl WriteOp {
    fn operation(&self) -> &'static str {
        match self {
            WriteOp::StartJob { .. } => "start_job",
            WriteOp::Commit(_) => "commit_clusters",
            WriteOp::Finish { .. } => "finish_job",
            WriteOp::Requeue { .. } => "requeue_job",
        }
    }
}

pub struct PostgresWriter {
    pub store: Arc<dyn Store>,
}

impl AsyncStage for PostgresWriter {
    const KIND: ActorKind = ActorKind::PostgresWriter;
    type In = WriteOp;

    fn handle(&mut self, op: WriteOp) -> BoxFuture<'static, Result<WriteReply, PipelineError>> {
        let store = self.store.clone();
        let operation = op.operation();
        let span = tracing::info_span!(
            "postgres.write",
            otel.kind = "client",
            db.system.name = "postgresql",
            db.operation.name = operation,
        );
        Box::pin(
            async move {
                let started = Instant::now();
                let reply = match op {
                    WriteOp::StartJob { job_id, stream_id } => {
                        WriteReply::Started(store.start_job(job_id, &stream_id).await?)
                    }
                    WriteOp::Commit(result) => WriteReply::Committed {
                        version: store.commit(&result).await?,
                    },
                    WriteOp::Finish {
                        job_id,
                        status,
                        error,
                    } => {
                        store.finish_unsuccessful(job_id, status, &error).await?;
                        WriteReply::Done
                    }
                    WriteOp::Requeue { job_id, error } => {
                        store.requeue(job_id, &error).await?;
                        WriteReply::Done
                    }
                };
                PostgresWritten {
                    operation,
                    elapsed: started.elapsed(),
                }
                .emit();
                Ok(reply)
            }
            .instrument(span),
        )
    }
}
