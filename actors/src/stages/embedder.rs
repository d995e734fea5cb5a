use std::sync::Arc;
use std::time::Instant;

use uuid::Uuid;

use crate::algo::budget::MemoryBudget;
use crate::algo::decode::DecodeLimits;
use crate::algo::prepared::Prepared;
use crate::algo::{embed::ImageEncoder, photo, quality};
use crate::error::PipelineError;
use crate::events::PhotoEmbedded;
use crate::metrics::Metrics;
use crate::runtime::{ActorKind, Request, SyncStage};

/// Embed one photo: from its original bytes (decoded and measured here), or from what the
/// upload prepared of it.
pub struct EmbedPhoto {
    pub image_id: Uuid,
    pub input: PhotoInput,
}

pub enum PhotoInput {
    /// The photo as uploaded.
    Encoded(Vec<u8>),
    /// Its crop and measures, made at upload for this model's preprocessing.
    Prepared(Prepared),
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
        let poison = |e: &dyn std::fmt::Display| {
            PipelineError::poison(format!("image {}: {e}", msg.image_id))
        };
        let (vector, quality) = match msg.input {
            PhotoInput::Encoded(bytes) => {
                photo::analyse(&bytes, self.limits, self.model.as_ref(), &self.budget)
                    .map_err(|e| poison(&e))?
            }
            PhotoInput::Prepared(p) => (
                self.model.embed_crop(&p.crop).map_err(|e| poison(&e))?,
                p.quality,
            ),
        };
        PhotoEmbedded {
            image_id: msg.image_id,
            model_version: self.model.model_version(),
            elapsed: started.elapsed(),
        }
        .emit(&self.metrics);
        Ok(Embedded { vector, quality })
    }
}
