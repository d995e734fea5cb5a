//! Pets' clusterings kept between jobs, so that a job adding photos to a pet reads and
//! clusters only the new ones ([`crate::algo::dbscan`]).
//!
//! A batch takes its pet's entry out (only one batch of a pet runs at a time in a process, so
//! it has it to itself) and puts the updated one back after its commit. Entries are evicted
//! least recently used first to stay within `clustering.cache_mib`; a pet bigger than the
//! whole budget is not kept (each of its jobs re-clusters it). An entry is only valid for the
//! model version and clustering parameters it was made with. Held photos that left the pet
//! (quarantined, removed) are dropped and the rest re-clustered; photos another worker added
//! arrive as new ones.

use std::collections::HashMap;
use std::sync::Mutex;

use uuid::Uuid;

use crate::algo::cluster::{ClusterParams, TimeRule};
use crate::algo::dbscan::Clustering;
use crate::algo::quality::Quality;
use crate::metrics::Metrics;
use crate::ports::{ClusterOut, Member};

/// One pet's photos, in the clustering's point order.
pub struct PetClustering {
    pub model_version: String,
    pub ids: Vec<Uuid>,
    pub qualities: Vec<Quality>,
    pub clustering: Clustering,
    /// The clusters as last scored: a cluster whose members are the same again keeps them.
    pub scored: Vec<ClusterOut>,
}

impl PetClustering {
    fn bytes(&self) -> usize {
        self.clustering.bytes()
            + self.ids.capacity() * size_of::<Uuid>()
            + self.qualities.capacity() * size_of::<Quality>()
            + self
                .scored
                .iter()
                .map(|c| size_of::<ClusterOut>() + c.members.capacity() * size_of::<Member>())
                .sum::<usize>()
    }
}

/// The process's held clusterings; see the module documentation.
pub struct PetClusterings {
    budget: usize,
    inner: Mutex<Inner>,
    pets_gauge: prometheus::IntGauge,
    bytes_gauge: prometheus::IntGauge,
}

#[derive(Default)]
struct Inner {
    pets: HashMap<String, (u64, usize, PetClustering)>,
    bytes: usize,
    clock: u64,
}

impl PetClusterings {
    /// At most `budget` bytes held; 0 keeps nothing.
    pub fn new(budget: usize, metrics: &Metrics) -> Self {
        PetClusterings {
            budget,
            inner: Mutex::default(),
            pets_gauge: metrics.clusterings_held.with_label_values(&["pets"]),
            bytes_gauge: metrics.clusterings_held.with_label_values(&["bytes"]),
        }
    }

    /// Takes the pet's entry if it was made for this model and these parameters (an entry
    /// made otherwise is dropped).
    pub fn take(
        &self,
        pet_id: &str,
        model_version: &str,
        params: &ClusterParams,
        time_rule: Option<&TimeRule>,
    ) -> Option<PetClustering> {
        let mut inner = self.inner.lock().expect("held clusterings");
        let (_, bytes, entry) = inner.pets.remove(pet_id)?;
        inner.bytes -= bytes;
        self.publish(&inner);
        (entry.model_version == model_version && entry.clustering.made_with(params, time_rule))
            .then_some(entry)
    }

    /// Keeps the pet's entry, evicting the least recently used ones to make room.
    pub fn put(&self, pet_id: String, entry: PetClustering) {
        let bytes = entry.bytes();
        if bytes > self.budget {
            return;
        }
        let mut inner = self.inner.lock().expect("held clusterings");
        if let Some((_, old, _)) = inner.pets.remove(&pet_id) {
            inner.bytes -= old;
        }
        while inner.bytes + bytes > self.budget {
            let Some(oldest) = inner
                .pets
                .iter()
                .min_by_key(|(_, (used, _, _))| *used)
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            if let Some((_, b, _)) = inner.pets.remove(&oldest) {
                inner.bytes -= b;
                tracing::debug!(pet_id = %oldest, bytes = b, "Evicted a held clustering.");
            }
        }
        inner.clock += 1;
        let used = inner.clock;
        inner.bytes += bytes;
        inner.pets.insert(pet_id, (used, bytes, entry));
        self.publish(&inner);
    }

    fn publish(&self, inner: &Inner) {
        self.pets_gauge.set(inner.pets.len() as i64);
        self.bytes_gauge.set(inner.bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn entry(n: usize) -> PetClustering {
        let params = ClusterParams {
            eps: 0.1,
            min_points: 2,
            low_pass: None,
        };
        let mut v = Array2::<f32>::zeros((n, 4));
        for i in 0..n {
            v[[i, i % 4]] = 1.0;
        }
        PetClustering {
            model_version: "m".into(),
            ids: (0..n).map(|_| Uuid::new_v4()).collect(),
            qualities: vec![
                Quality {
                    sharpness: 1.0,
                    noise: 0.0,
                    exposure: 1.0,
                    pixels: 1,
                };
                n
            ],
            clustering: Clustering::full(v, vec![None; n], params, None),
            scored: Vec::new(),
        }
    }

    const P: ClusterParams = ClusterParams {
        eps: 0.1,
        min_points: 2,
        low_pass: None,
    };

    #[test]
    fn entries_are_kept_within_the_budget_least_recently_used_out_first() {
        let size = entry(100).bytes();
        let metrics = Metrics::new();
        let cache = PetClusterings::new(size * 2 + size / 2, &metrics);
        cache.put("a".into(), entry(100));
        cache.put("b".into(), entry(100));
        assert_eq!(
            metrics.clusterings_held.with_label_values(&["pets"]).get(),
            2
        );
        // Using a refreshes it; c then evicts b.
        let a = cache.take("a", "m", &P, None).expect("held");
        cache.put("a".into(), a);
        cache.put("c".into(), entry(100));
        assert!(cache.take("b", "m", &P, None).is_none());
        assert!(cache.take("a", "m", &P, None).is_some());
        assert!(cache.take("c", "m", &P, None).is_some());
        assert_eq!(
            metrics.clusterings_held.with_label_values(&["bytes"]).get(),
            0
        );
        // A pet bigger than the budget is not kept.
        cache.put("big".into(), entry(1000));
        assert!(cache.take("big", "m", &P, None).is_none());
    }

    #[test]
    fn an_entry_is_only_given_for_its_model_and_parameters() {
        let metrics = Metrics::new();
        let cache = PetClusterings::new(1 << 30, &metrics);
        cache.put("a".into(), entry(10));
        assert!(cache.take("a", "other-model", &P, None).is_none());
        // The mismatched entry was dropped, not kept.
        assert!(cache.take("a", "m", &P, None).is_none());
        cache.put("a".into(), entry(10));
        let wider = ClusterParams { eps: 0.2, ..P };
        assert!(cache.take("a", "m", &wider, None).is_none());
    }
}
