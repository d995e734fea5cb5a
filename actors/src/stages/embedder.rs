use std::sync::Arc;
use std::time::Instant;

use uuid::Uuid;

use crate::algo::budget::MemoryBudget;
use crate::algo::decode::DecodeLimits;
use crate::algo::{embed::ImageEncoder, photo, quality};
use crate::error::PipelineError;
use crate::events::PhotoEmbedded;
use crate::metrics::Metrics;
use crate::runtime::{ActorKind, Request, SyncStage};

/// Decode, measure and embed one photo.
pub struct EmbedPhoto {
    pub image_id: Uuid,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Embedded {
    pub vector: Vec<f32>,
    pub quality: quality::Quality,
}

impl Request for EmbedPhoto {
    type Reply = Embedded;
}

/// Runs the CNN on a `SyncArbiter` thread; the optimised model is shared.
pub struct Embedder {
    pub model: Arc<dyn ImageEncoder>,
    pub limits: DecodeLimits,
    /// The process's decoding budget, shared with the API's checks.
    pub budget: Arc<MemoryBudget>,
    pub metrics: Arc<Metrics>,
}

impl SyncStage for Embedder {
    const KIND: ActorKind = ActorKind::Embedder;
    type In = EmbedPhoto;

    fn handle(&mut self, msg: EmbedPhoto) -> Result<Embedded, PipelineError> {
        let _span = tracing::info_span!("embed", image_id = %msg.image_id, model_version = self.model.model_version()).entered();
        let started = Instant::now();
        // What this photo holds is its own problem: it is quarantined, its pet goes on.
        let (vector, quality) =
            photo::analyse(&msg.bytes, self.limits, self.model.as_ref(), &self.budget)
                .map_err(|e| PipelineError::poison(format!("image {}: {e}", msg.image_id)))?;
        PhotoEmbedded {
            image_id: msg.image_id,
            model_version: self.model.model_version(),
            elapsed: started.elapsed(),
        }
        .emit(&self.metrics);
        Ok(Embedded { vector, quality })
    }
}
