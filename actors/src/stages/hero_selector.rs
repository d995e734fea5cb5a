use std::sync::Arc;

use uuid::Uuid;

use crate::algo::hero::{Candidate, score_cluster};
use crate::algo::quality::Quality;
use crate::error::PipelineError;
use crate::ports::ClusterOut;
use crate::runtime::{ActorKind, Request, SyncStage};

/// Pick the hero of each cluster; indices refer to `ids`, `vectors` and `qualities`.
pub struct PickHeroes {
    pub ids: Arc<Vec<Uuid>>,
    pub vectors: Arc<Vec<Vec<f32>>>,
    pub qualities: Arc<Vec<Quality>>,
    pub clusters: Vec<Vec<usize>>,
}

impl Request for PickHeroes {
    type Reply = Vec<ClusterOut>;
}

pub struct HeroSelector;

impl SyncStage for HeroSelector {
    const KIND: ActorKind = ActorKind::HeroSelector;
    type In = PickHeroes;

    fn handle(&mut self, msg: PickHeroes) -> Result<Vec<ClusterOut>, PipelineError> {
        let _span = tracing::info_span!("hero.select", clusters = msg.clusters.len()).entered();
        Ok(msg
            .clusters
            .iter()
            .map(|members| {
                let candidates: Vec<Candidate<'_, Uuid>> = members
                    .iter()
                    .map(|&i| Candidate {
                        id: msg.ids[i],
                        vector: &msg.vectors[i],
                        quality: msg.qualities[i],
                    })
                    .collect();
                let (scores, hero) = score_cluster(&candidates);
                ClusterOut {
                    hero_image_id: candidates[hero].id,
                    members: candidates
                        .iter()
                        .zip(scores)
                        .map(|(c, s)| (c.id, s))
                        .collect(),
                }
            })
            .collect())
    }
}
