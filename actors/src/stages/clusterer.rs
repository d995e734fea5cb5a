use std::sync::Arc;

use crate::algo::cluster::{ClusterParams, TimeRule, cluster_timed};
use crate::error::PipelineError;
use crate::runtime::{ActorKind, Request, SyncStage};

/// Cluster the pet's embeddings; the reply lists member indices per cluster.
pub struct ClusterVectors {
    pub vectors: Arc<Vec<Vec<f32>>>,
    /// Capture times (Unix ms) of the same photos, where known.
    pub times: Arc<Vec<Option<i64>>>,
    pub params: ClusterParams,
    /// How capture time moves a pair's threshold; `None`: times are not used.
    pub time_rule: Option<TimeRule>,
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
        Ok(cluster_timed(
            &msg.vectors,
            &msg.times,
            &msg.params,
            msg.time_rule.as_ref(),
        ))
    }
}
