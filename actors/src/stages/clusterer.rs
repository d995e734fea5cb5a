use ndarray::{Array2, Axis};

use crate::algo::cluster::{ClusterParams, TimeRule};
use crate::algo::dbscan::{Assigned, Clustering, FullReason};
use crate::error::PipelineError;
use crate::runtime::{ActorKind, Request, SyncStage};

/// Cluster a pet: the clustering this process holds for it (if any) with `add` appended,
/// assigned incrementally when it can be ([`Clustering::insert`]), else re-clustered whole.
/// The reply is the new clustering and how it was made.
pub struct ClusterVectors {
    /// The pet's clustering as this process last left it; `None`: `add` holds every photo.
    pub held: Option<Clustering>,
    /// Held points that are still the pet's (ascending); `None`: all of them.
    pub keep: Option<Vec<usize>>,
    /// New photos' vectors, one per row, and their capture times (Unix ms), where known.
    pub add: Array2<f32>,
    pub add_times: Vec<Option<i64>>,
    /// A `recluster` job: re-cluster every photo whatever is held.
    pub recluster: bool,
    pub params: ClusterParams,
    /// How capture time moves a pair's threshold; `None`: times are not used.
    pub time_rule: Option<TimeRule>,
}

impl Request for ClusterVectors {
    type Reply = (Clustering, Assigned);
}

pub struct Clusterer;

impl SyncStage for Clusterer {
    const KIND: ActorKind = ActorKind::Clusterer;
    type In = ClusterVectors;

    fn handle(&mut self, msg: ClusterVectors) -> Result<(Clustering, Assigned), PipelineError> {
        let span = tracing::info_span!(
            "cluster",
            held = msg.held.as_ref().map_or(0, Clustering::len),
            added = msg.add.nrows(),
            eps = msg.params.eps,
            assigned = tracing::field::Empty,
        );
        let _entered = span.enter();
        // The sender holds a clustering only if it was made with these parameters.
        debug_assert!(
            msg.held
                .as_ref()
                .is_none_or(|c| c.made_with(&msg.params, msg.time_rule.as_ref()))
        );
        let (clustering, assigned) = match (msg.held, msg.keep, msg.recluster) {
            (Some(mut c), None, false) => {
                let how = c.insert(msg.add.view(), &msg.add_times);
                (c, how)
            }
            (held, keep, recluster) => {
                let reason = match (&held, &keep) {
                    (None, _) => FullReason::NotHeld,
                    _ if recluster => FullReason::Asked,
                    _ => FullReason::Removed,
                };
                let (mut vectors, mut times) = match held {
                    Some(c) => c.into_parts(),
                    None => (Array2::zeros((0, msg.add.ncols())), Vec::new()),
                };
                if let Some(keep) = keep {
                    vectors = vectors.select(Axis(0), &keep);
                    times = keep.iter().map(|&i| times[i]).collect();
                }
                // Nothing held (a pet's first job in this process): the new vectors are the
                // pet's, taken as they are rather than copied (a 50,000-photo pet's are 400 MB).
                if vectors.nrows() == 0 {
                    vectors = msg.add;
                } else {
                    vectors.append(Axis(0), msg.add.view()).map_err(|e| {
                        PipelineError::permanent(format!("vectors of the pet: {e}"))
                    })?;
                }
                times.extend(msg.add_times);
                let c = Clustering::full(vectors, times, msg.params, msg.time_rule);
                (c, Assigned::Full(reason))
            }
        };
        span.record("assigned", assigned.as_str());
        Ok((clustering, assigned))
    }
}
