use std::sync::Arc;

use futures::future::BoxFuture;

use crate::error::PipelineError;
use crate::ports::{Delivery, JobQueue};
use crate::runtime::{ActorKind, AsyncStage, Request};

/// Reads up to `count` entries from the jobs stream.
pub struct ReadBatch {
    pub count: usize,
    pub mode: ReadMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// Entries never delivered to the group.
    New,
    /// Entries other consumers held unacknowledged for `min_idle_ms` (crashed workers').
    Reclaim { min_idle_ms: u64 },
}

impl Request for ReadBatch {
    type Reply = Vec<Delivery>;
}

/// Reads the jobs stream for this process's consumer in the group.
pub struct StreamReader {
    pub queue: Arc<dyn JobQueue>,
    pub consumer: String,
    pub block_ms: u64,
}

impl AsyncStage for StreamReader {
    const KIND: ActorKind = ActorKind::StreamReader;
    type In = ReadBatch;

    fn handle(
        &mut self,
        msg: ReadBatch,
    ) -> BoxFuture<'static, Result<Vec<Delivery>, PipelineError>> {
        let (queue, consumer, block_ms) =
            (self.queue.clone(), self.consumer.clone(), self.block_ms);
        Box::pin(async move {
            match msg.mode {
                ReadMode::New => queue.read(&consumer, msg.count, block_ms).await,
                ReadMode::Reclaim { min_idle_ms } => {
                    let claimed = queue.reclaim(&consumer, min_idle_ms, msg.count).await?;
                    if !claimed.is_empty() {
                        tracing::warn!(
                            entries = claimed.len(),
                            "Reclaimed entries left idle by another consumer."
                        );
                    }
                    Ok(claimed)
                }
            }
        })
    }
}
