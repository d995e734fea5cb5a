use std::sync::Arc;

use crate::algo::cluster::{ClusterParams, cluster};
use crate::error::PipelineError;
use crate::runtime::{ActorKind, Request, SyncStage};

/// Cluster the pet's embeddings; the reply lists member indices per cluster.
pub struct ClusterVectors {
    pub vectors: Arc<Vec<Vec<f32>>>,
    pub params: ClusterParams,
}

impl Request for ClusterVectors {
    type Reply = Vec<Vec<usize>>;
}

pub struct Clusterer;

impl SyncStage for Clusterer {
    const KIND: ActorKind = ActorKind::Clusterer;
    type In = ClusterVectors;

    fn handle(&mut self, msg: ClusterVectors) -> Result<Vec<Vec<usize>>, PipelineError> {
        let _span =
            tracing::info_span!("cluster", vectors = msg.vectors.len(), eps = msg.params.eps)
                .entered();
        Ok(cluster(&msg.vectors, &msg.params))
    }
}
