use std::sync::Arc;

use uuid::Uuid;

use crate::algo::dbscan::Clustering;
use crate::algo::hero::{Candidate, NEAR_DUPLICATE_EPS, near_duplicates, score_cluster};
use crate::algo::quality::Quality;
use crate::error::PipelineError;
use crate::ports::{ClusterOut, Member};
use crate::runtime::{ActorKind, Request, SyncStage};

/// Pick the hero of each cluster; indices refer to `ids`, the clustering's points and
/// `qualities`.
pub struct PickHeroes {
    pub ids: Arc<Vec<Uuid>>,
    pub clustering: Arc<Clustering>,
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
                        vector: msg.clustering.vector(i),
                        quality: msg.qualities[i],
                    })
                    .collect();
                let (scores, hero) = score_cluster(&candidates);
                let dups = near_duplicates(&candidates, &scores, NEAR_DUPLICATE_EPS);
                ClusterOut {
                    hero_image_id: candidates[hero].id,
                    members: candidates
                        .iter()
                        .zip(scores)
                        .zip(dups)
                        .map(|((c, score), near_duplicate_of)| Member {
                            image_id: c.id,
                            score,
                            near_duplicate_of,
                        })
                        .collect(),
                }
            })
            .collect())
    }
}
