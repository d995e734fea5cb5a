use std::sync::Arc;

use futures::future::BoxFuture;

use crate::error::PipelineError;
use crate::ports::{Delivery, JobQueue};
use crate::runtime::{ActorKind, AsyncStage, Request};

/// Reads up to `count` new entries from the jobs stream.
pub struct ReadBatch {
    pub count: usize,
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
        Box::pin(async move { queue.read(&consumer, msg.count, block_ms).await })
    }
}
