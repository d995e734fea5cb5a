//! Grouping embeddings with DBSCAN (linfa-clustering) over L2-normalised vectors.
//!
//! The threshold is configured as a cosine distance (`1 - cos`); on unit vectors
//! the L2 distance is `sqrt(2 · cosine distance)`, which is what DBSCAN is given.
//! Noise points become singleton clusters, so every photo belongs to exactly one.

use linfa::traits::Transformer;
use linfa_clustering::Dbscan;
use linfa_nn::{CommonNearestNeighbour, distance::L2Dist};
use ndarray::Array2;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClusterParams {
    /// Largest cosine distance between neighbours.
    pub eps: f32,
    /// Neighbours (the point included) a core point needs.
    pub min_points: usize,
}

/// L2 distance between unit vectors at the given cosine distance.
pub fn l2_for_cosine(cos_dist: f32) -> f32 {
    (2.0 * cos_dist.max(0.0)).sqrt()
}

/// Clusters `vectors` (each L2-normalised, all the same length). Returns clusters as lists
/// of indices; each list ascending, lists ordered by their first index.
pub fn cluster(vectors: &[Vec<f32>], params: &ClusterParams) -> Vec<Vec<usize>> {
    let n = vectors.len();
    if n == 0 {
        return Vec::new();
    }
    let dim = vectors[0].len();
    let flat: Vec<f32> = vectors.iter().flat_map(|v| v.iter().copied()).collect();
    let records = Array2::from_shape_vec((n, dim), flat).expect("vectors share one length");
    let labels = Dbscan::params_with(
        params.min_points.max(1),
        L2Dist,
        CommonNearestNeighbour::LinearSearch,
    )
    .tolerance(l2_for_cosine(params.eps))
    .transform(&records)
    .expect("valid DBSCAN parameters");
    let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    let mut out = Vec::new();
    for (i, label) in labels.iter().enumerate() {
        match label {
            Some(l) => groups.entry(*l).or_default().push(i),
            None => out.push(vec![i]),
        }
    }
    out.extend(groups.into_values());
    out.sort_by_key(|c| c[0]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn groups_close_vectors_and_keeps_noise_as_singletons() {
        let v = vec![
            unit(&[1.0, 0.05, 0.0]),
            unit(&[0.0, 1.0, 0.0]),
            unit(&[1.0, 0.0, 0.05]),
            unit(&[0.0, 1.0, 0.04]),
            unit(&[0.0, 0.0, 1.0]),
        ];
        let c = cluster(
            &v,
            &ClusterParams {
                eps: 0.05,
                min_points: 2,
            },
        );
        assert_eq!(c, vec![vec![0, 2], vec![1, 3], vec![4]]);
    }

    #[test]
    fn every_point_belongs_to_exactly_one_cluster() {
        let v: Vec<Vec<f32>> = (0..40)
            .map(|i| unit(&[(i as f32 * 0.7).sin(), (i as f32 * 1.3).cos(), 0.3]))
            .collect();
        let c = cluster(
            &v,
            &ClusterParams {
                eps: 0.02,
                min_points: 2,
            },
        );
        let mut all: Vec<usize> = c.concat();
        all.sort();
        assert_eq!(all, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn cosine_threshold_maps_to_l2() {
        assert!((l2_for_cosine(0.18) - 0.6).abs() < 1e-6);
        assert!(
            cluster(
                &[],
                &ClusterParams {
                    eps: 0.1,
                    min_points: 2
                }
            )
            .is_empty()
        );
    }
}
