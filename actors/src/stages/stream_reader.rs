//! The stream-reader: every Redis operation of the pipeline (read, reclaim, acknowledge,
//! dead-letter, the pets' locks, keep-alive, depth and trimming) is one of its messages, so
//! `actors.stream_readers` bounds them and each is timed and traced as a hop.

use std::sync::Arc;

use futures::future::BoxFuture;
use tracing::Instrument;

use crate::error::PipelineError;
use crate::job::JobEntry;
use crate::ports::{Delivery, JobQueue, QueueDepth};
use crate::runtime::{ActorKind, AsyncStage, Request, traced};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Entries never delivered to the group.
    New,
    /// Entries other consumers held unacknowledged for `min_idle_ms` (crashed workers').
    Reclaim { min_idle_ms: u64 },
}

/// One Redis operation.
#[derive(Debug)]
pub enum RedisOp {
    /// Up to `count` entries for this consumer (a blocking read for new ones).
    Read {
        count: usize,
        mode: ReadMode,
    },
    /// Acknowledges entries whose results are committed.
    Ack {
        stream_ids: Vec<String>,
    },
    /// Moves an entry to the dead-letter stream with `error`.
    DeadLetter {
        delivery: Delivery,
        error: String,
    },
    /// Takes the pet's lock for this consumer if nobody holds it.
    LockPet {
        pet_id: String,
    },
    UnlockPet {
        pet_id: String,
    },
    /// Keeps entries and pet locks held here from being reclaimed or expiring.
    KeepAlive {
        stream_ids: Vec<String>,
        pets: Vec<String>,
    },
    Depth,
    Trim,
    PruneConsumers {
        idle_ms: u64,
    },
    /// Adds a job's entry unless it has one (the outbox relay).
    Enqueue {
        entry: JobEntry,
    },
    /// Which of these entries are still in the stream.
    EntriesExist {
        stream_ids: Vec<String>,
    },
}

#[derive(Debug)]
pub enum RedisReply {
    Read(Vec<Delivery>),
    Locked(bool),
    /// Pets whose locks this process no longer holds (a keep-alive found them gone).
    LostPets(Vec<String>),
    Enqueued(String),
    Exist(Vec<bool>),
    Depth(QueueDepth),
    Count(u64),
    Done,
}

impl Request for RedisOp {
    type Reply = RedisReply;
}

/// The stream-reader's state: the queue port and this process's consumer name.
pub struct StreamReader {
    pub queue: Arc<dyn JobQueue>,
    pub stream: String,
    pub deadletter_stream: String,
    pub group: String,
    pub consumer: String,
    pub block_ms: u64,
    /// How long a pet's lock lives without a refresh (a crashed worker's expires).
    pub lock_ttl_ms: u64,
}

impl StreamReader {
    fn span(&self, op: &RedisOp) -> tracing::Span {
        if !traced() {
            return tracing::Span::none();
        }
        match op {
            RedisOp::Ack { stream_ids } => tracing::info_span!(
                "redis.ack",
                otel.name = %format_args!("ack {}", self.stream),
                otel.kind = "client",
                messaging.system = "redis",
                messaging.operation.type = "settle",
                messaging.operation.name = "ack",
                messaging.destination.name = %self.stream,
                messaging.consumer.group.name = %self.group,
                messaging.client.id = %self.consumer,
                messaging.batch.message_count = stream_ids.len(),
            ),
            RedisOp::DeadLetter { delivery, .. } => tracing::info_span!(
                "redis.dead_letter",
                otel.name = %format_args!("send {}", self.deadletter_stream),
                otel.kind = "producer",
                messaging.system = "redis",
                messaging.operation.type = "send",
                messaging.operation.name = "send",
                messaging.destination.name = %self.deadletter_stream,
                messaging.client.id = %self.consumer,
                messaging.message.id = %delivery.stream_id,
            ),
            RedisOp::Enqueue { entry } => tracing::info_span!(
                "redis.enqueue",
                otel.name = %format_args!("send {}", self.stream),
                otel.kind = "producer",
                messaging.system = "redis",
                messaging.operation.type = "send",
                messaging.operation.name = "send",
                messaging.destination.name = %self.stream,
                messaging.client.id = %self.consumer,
                job_id = %entry.job_id,
                pet_id = %entry.pet_id,
            ),
            RedisOp::LockPet { .. } | RedisOp::UnlockPet { .. } => tracing::info_span!(
                "redis.pet_lock",
                otel.name = if matches!(op, RedisOp::LockPet { .. }) {
                    "SET pet-lock"
                } else {
                    "EVAL pet-unlock"
                },
                otel.kind = "client",
                db.system.name = "redis",
                db.operation.name = if matches!(op, RedisOp::LockPet { .. }) {
                    "SET"
                } else {
                    "EVAL"
                },
            ),
            _ => tracing::Span::none(),
        }
    }
}

impl AsyncStage for StreamReader {
    const KIND: ActorKind = ActorKind::StreamReader;
    type In = RedisOp;

    fn handle(&mut self, op: RedisOp) -> BoxFuture<'static, Result<RedisReply, PipelineError>> {
        let span = self.span(&op);
        let (q, consumer, block_ms, ttl) = (
            self.queue.clone(),
            self.consumer.clone(),
            self.block_ms,
            self.lock_ttl_ms,
        );
        Box::pin(
            async move {
                Ok(match op {
                    RedisOp::Read {
                        count,
                        mode: ReadMode::New,
                    } => RedisReply::Read(q.read(&consumer, count, block_ms).await?),
                    RedisOp::Read {
                        count,
                        mode: ReadMode::Reclaim { min_idle_ms },
                    } => {
                        let claimed = q.reclaim(&consumer, min_idle_ms, count).await?;
                        if !claimed.is_empty() {
                            tracing::warn!(
                                entries = claimed.len(),
                                "Reclaimed entries left idle by another consumer."
                            );
                        }
                        RedisReply::Read(claimed)
                    }
                    RedisOp::Ack { stream_ids } => {
                        q.ack(&stream_ids).await?;
                        RedisReply::Done
                    }
                    RedisOp::DeadLetter { delivery, error } => {
                        q.dead_letter(&delivery, &error).await?;
                        RedisReply::Done
                    }
                    RedisOp::LockPet { pet_id } => {
                        RedisReply::Locked(q.lock_pet(&pet_id, &consumer, ttl).await?)
                    }
                    RedisOp::UnlockPet { pet_id } => {
                        q.unlock_pet(&pet_id, &consumer).await?;
                        RedisReply::Done
                    }
                    RedisOp::KeepAlive { stream_ids, pets } => {
                        if !stream_ids.is_empty() {
                            q.keep_alive(&consumer, &stream_ids).await?;
                        }
                        let mut lost = Vec::new();
                        for pet in pets {
                            if !q.refresh_pet(&pet, &consumer, ttl).await? {
                                lost.push(pet);
                            }
                        }
                        RedisReply::LostPets(lost)
                    }
                    RedisOp::Enqueue { mut entry } => {
                        // The relay's own PRODUCER span is the context the entry carries.
                        let mut carrier = std::collections::HashMap::new();
                        opentelemetry::global::get_text_map_propagator(|p| {
                            use tracing_opentelemetry::OpenTelemetrySpanExt;
                            p.inject_context(&tracing::Span::current().context(), &mut carrier)
                        });
                        entry.traceparent = carrier.remove("traceparent");
                        entry.tracestate = carrier.remove("tracestate").filter(|s| !s.is_empty());
                        RedisReply::Enqueued(q.enqueue(&entry).await?)
                    }
                    RedisOp::EntriesExist { stream_ids } => {
                        RedisReply::Exist(q.entries_exist(&stream_ids).await?)
                    }
                    RedisOp::Depth => RedisReply::Depth(q.depth().await?),
                    RedisOp::Trim => RedisReply::Count(q.trim().await?),
                    RedisOp::PruneConsumers { idle_ms } => {
                        RedisReply::Count(q.prune_consumers(&consumer, idle_ms).await? as u64)
                    }
                })
            }
            .instrument(span),
        )
    }
}
