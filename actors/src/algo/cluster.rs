//! Grouping embeddings with DBSCAN (linfa-clustering) over L2-normalised vectors.
//!
//! The threshold is configured as a cosine distance (`1 - cos`); on unit vectors
//! the L2 distance is `sqrt(2 · cosine distance)`, which is what DBSCAN is given.
//! Noise points become singleton clusters, so every photo belongs to exactly one.
//!
//! Neighbours are found with [`GramSearch`], an exact range search through blocked matrix
//! products (see [`super::neighbours`]); it returns the same neighbours as linfa's linear scan,
//! so the clusters are the same, but scales to tens of thousands of 1024-d vectors.

use linfa::traits::Transformer;
use linfa_clustering::Dbscan;
use linfa_nn::{NearestNeighbour, distance::L2Dist};
use ndarray::Array2;

use super::neighbours::GramSearch;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClusterParams {
    /// Largest cosine distance between neighbours.
    pub eps: f32,
    /// Neighbours (the point included) a core point needs.
    pub min_points: usize,
    /// Each vector is two views of its photo, as seen and low-passed, then the photo's detail
    /// ([`LowPass`](super::embed::LowPass)), and pairs with a blurred photo are judged by the
    /// second view; `None`: one view, every pair by `eps`.
    #[serde(default)]
    pub low_pass: Option<LowPassRule>,
}

/// How pairs with a blurred photo are judged when every vector holds two views of its photo
/// (as seen, then low-passed, each L2-normalised) and its detail
/// ([`detail`](super::embed::detail)).
///
/// A photo is *blurred* when its detail is at most `blurred_below`: of what the low-pass took
/// from it, little was fine detail, because it had little fine detail left (out of focus, or
/// upscaled from a small shot), or its fine detail was noise (a photo smoothed for its noise
/// has a detail of 0). Either way its fine detail is no guide to its scene. A blurred and a sharp photo are neighbours
/// when their low-passed views lie within `eps`, two blurred photos within
/// `both_blurred_eps`, and two sharp photos when their own views do, by
/// [`ClusterParams::eps`] (and the time rule). A blurred shot and its sharp siblings differ in
/// the detail only the sharp ones have; low-passed, both lose it. Two sharp photos are never
/// compared low-passed: it would bring different scenes together (on real frames, clean shots
/// of different scenes come within 0.09 when both are low-passed).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LowPassRule {
    /// Largest cosine distance between the low-passed views of a blurred and a sharp photo.
    pub eps: f32,
    /// Largest cosine distance between the low-passed views of two blurred photos.
    pub both_blurred_eps: f32,
    /// A photo whose detail is at most this is blurred.
    pub blurred_below: f32,
}

impl LowPassRule {
    /// Whether a photo with this detail is blurred.
    pub fn is_blurred(&self, detail: f32) -> bool {
        detail <= self.blurred_below
    }

    /// The threshold on the low-passed views of a pair with at least one blurred photo.
    pub fn eps_for(&self, both_blurred: bool) -> f32 {
        if both_blurred {
            self.both_blurred_eps
        } else {
            self.eps
        }
    }

    /// The range a search over low-passed views needs.
    pub fn widest(&self) -> f32 {
        self.eps.max(self.both_blurred_eps)
    }
}

/// L2 distance between unit vectors at the given cosine distance.
pub fn l2_for_cosine(cos_dist: f32) -> f32 {
    (2.0 * cos_dist.max(0.0)).sqrt()
}

/// Clusters `vectors` (each L2-normalised, all the same length). Returns clusters as lists
/// of indices; each list ascending, lists ordered by their first index.
pub fn cluster(vectors: &[Vec<f32>], params: &ClusterParams) -> Vec<Vec<usize>> {
    cluster_with(vectors, params, GramSearch::new())
}

/// [`cluster`] with the given neighbour search, e.g. linfa's
/// [`CommonNearestNeighbour`](linfa_nn::CommonNearestNeighbour) to compare against.
pub fn cluster_with<N: NearestNeighbour>(
    vectors: &[Vec<f32>],
    params: &ClusterParams,
    neighbours: N,
) -> Vec<Vec<usize>> {
    let n = vectors.len();
    if n == 0 {
        return Vec::new();
    }
    let dim = vectors[0].len();
    let flat: Vec<f32> = vectors.iter().flat_map(|v| v.iter().copied()).collect();
    let records = Array2::from_shape_vec((n, dim), flat).expect("vectors share one length");
    // linfa rejects min_points < 2. With noise kept as singletons, 1 and 2 give the same
    // partition: either way the clusters are the connected components of the eps-graph.
    let labels = Dbscan::params_with(params.min_points.max(2), L2Dist, neighbours)
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

/// How capture time moves the threshold of a pair of photos that both have one (EXIF
/// `DateTimeOriginal`, see [`super::capture`]): shots seconds apart with a similar look are one
/// burst, shots days apart need a closer look to be one scene.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimeRule {
    /// Shots at most this many milliseconds apart join at [`TimeRule::burst_eps`].
    pub burst_ms: i64,
    /// Cosine distance for a burst; at least the general eps.
    pub burst_eps: f32,
    /// Shots at least this many milliseconds apart join only at [`TimeRule::apart_eps`].
    pub apart_ms: i64,
    /// Cosine distance for shots far apart in time; at most the general eps.
    pub apart_eps: f32,
}

impl TimeRule {
    /// The threshold of one pair.
    pub fn eps_for(&self, eps: f32, a: Option<i64>, b: Option<i64>) -> f32 {
        match (a, b) {
            (Some(a), Some(b)) => {
                let dt = a.abs_diff(b);
                if dt <= self.burst_ms.unsigned_abs() {
                    self.burst_eps
                } else if dt >= self.apart_ms.unsigned_abs() {
                    self.apart_eps
                } else {
                    eps
                }
            }
            _ => eps,
        }
    }
}

/// [`cluster`] with capture times (`times[i]` of `vectors[i]`, Unix ms): each pair's threshold
/// is [`TimeRule::eps_for`]. With no rule, or fewer than two photos with a time, the partition
/// is [`cluster`]'s, so photos without EXIF cluster exactly as before.
///
/// DBSCAN runs over exact neighbour lists ([`super::dbscan::Clustering::full`]): every pair
/// within the widest threshold, kept if within its own, expanded in linfa's order.
pub fn cluster_timed(
    vectors: &[Vec<f32>],
    times: &[Option<i64>],
    params: &ClusterParams,
    rule: Option<&TimeRule>,
) -> Vec<Vec<usize>> {
    if vectors.is_empty() {
        return Vec::new();
    }
    let flat: Vec<f32> = vectors.iter().flat_map(|v| v.iter().copied()).collect();
    let records = Array2::from_shape_vec((vectors.len(), vectors[0].len()), flat)
        .expect("vectors share one length");
    super::dbscan::Clustering::full(records, times.to_vec(), *params, rule.copied()).groups()
}

/// Seeded test data shared by the clustering tests.
#[cfg(test)]
pub(crate) mod testdata {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Seeded embeddings like the pipeline's: tight groups of 3–30 around random unit centres
    /// (angular spread varying per group, some wider than eps), plus ~15% noise points.
    pub(crate) fn clustered_with_noise(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let random_unit = |rng: &mut StdRng| -> Vec<f32> {
            unit(
                &(0..dim)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>(),
            )
        };
        let mut out: Vec<Vec<f32>> = (0..n * 15 / 100).map(|_| random_unit(&mut rng)).collect();
        while out.len() < n {
            let centre = random_unit(&mut rng);
            let spread: f32 = rng.random_range(0.005..0.05);
            for _ in 0..rng.random_range(3..=30).min(n - out.len()) {
                let v: Vec<f32> = centre
                    .iter()
                    .map(|c| c + spread * rng.random_range(-1.0f32..1.0))
                    .collect();
                out.push(unit(&v));
            }
        }
        // Interleave the groups, as photos arrive in no particular order.
        for i in (1..n).rev() {
            out.swap(i, rng.random_range(0..=i));
        }
        out
    }

    pub(crate) fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testdata::{clustered_with_noise, unit};
    use super::*;
    use linfa_nn::CommonNearestNeighbour;

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
                low_pass: None,
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
                low_pass: None,
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
                    min_points: 2,
                    low_pass: None,
                }
            )
            .is_empty()
        );
    }

    #[test]
    fn gram_search_gives_the_same_partition_as_linear_search() {
        for (seed, dim) in [(1, 64), (2, 256)] {
            let v = clustered_with_noise(400, dim, seed);
            // The data has both groups and noise at a typical eps.
            let typical = cluster(
                &v,
                &ClusterParams {
                    eps: 0.1,
                    min_points: 2,
                    low_pass: None,
                },
            );
            assert!(typical.iter().filter(|c| c.len() > 1).count() >= 10);
            assert!(typical.iter().filter(|c| c.len() == 1).count() >= 10);
            for eps in [0.001, 0.01, 0.03, 0.05, 0.1, 0.18, 0.3, 0.6, 1.0] {
                for min_points in [2, 3, 5] {
                    let params = ClusterParams {
                        eps,
                        min_points,
                        low_pass: None,
                    };
                    let fast = cluster(&v, &params);
                    let exact = cluster_with(&v, &params, CommonNearestNeighbour::LinearSearch);
                    assert_eq!(
                        fast, exact,
                        "seed {seed}, dim {dim}, eps {eps}, min {min_points}"
                    );
                }
            }
        }
    }

    #[test]
    fn min_points_of_one_gives_the_partition_of_two() {
        let v = clustered_with_noise(200, 32, 3);
        let one = ClusterParams {
            eps: 0.05,
            min_points: 1,
            low_pass: None,
        };
        let two = ClusterParams {
            eps: 0.05,
            min_points: 2,
            low_pass: None,
        };
        assert_eq!(cluster(&v, &one), cluster(&v, &two));
    }

    const RULE: TimeRule = TimeRule {
        burst_ms: 10_000,
        burst_eps: 0.25,
        apart_ms: 72 * 3600 * 1000,
        apart_eps: 0.12,
    };

    /// Two unit vectors (in 8 dimensions) at cosine distance `d`.
    fn pair_at(d: f32) -> Vec<Vec<f32>> {
        let c = 1.0 - d;
        let mut a = vec![0.0; 8];
        a[0] = 1.0;
        let mut b = vec![0.0; 8];
        b[0] = c;
        b[1] = (1.0 - c * c).sqrt();
        vec![a, b]
    }

    #[test]
    fn without_times_or_between_the_windows_it_is_plain_dbscan() {
        let params = ClusterParams {
            eps: 0.18,
            min_points: 2,
            low_pass: None,
        };
        for seed in 0..4 {
            let v = clustered_with_noise(300, 32, seed);
            let plain = cluster(&v, &params);
            assert_eq!(
                cluster_timed(&v, &vec![None; v.len()], &params, Some(&RULE)),
                plain
            );
            // Every photo dated, ten minutes apart each (at most 50 hours in all): no pair is a
            // burst or days apart, so the hand-run DBSCAN must give linfa's partition.
            let hourly: Vec<Option<i64>> = (0..v.len() as i64).map(|i| Some(i * 600_000)).collect();
            assert_eq!(
                cluster_timed(&v, &hourly, &params, Some(&RULE)),
                plain,
                "seed {seed}"
            );
            assert_eq!(cluster_timed(&v, &hourly, &params, None), plain);
        }
    }

    #[test]
    fn a_burst_joins_at_the_wider_threshold_and_days_apart_need_the_closer_one() {
        let params = ClusterParams {
            eps: 0.18,
            min_points: 2,
            low_pass: None,
        };
        let t0 = 1_717_245_005_000;
        // 0.22 apart: beyond eps, within the burst threshold.
        let v = pair_at(0.22);
        assert_eq!(cluster(&v, &params).len(), 2);
        assert_eq!(
            cluster_timed(&v, &[Some(t0), Some(t0 + 2_000)], &params, Some(&RULE)).len(),
            1
        );
        assert_eq!(
            cluster_timed(&v, &[Some(t0), Some(t0 + 60_000)], &params, Some(&RULE)).len(),
            2
        );
        assert_eq!(
            cluster_timed(&v, &[Some(t0), None], &params, Some(&RULE)).len(),
            2
        );
        // 0.15 apart: within eps, beyond the threshold for shots days apart.
        let v = pair_at(0.15);
        assert_eq!(cluster(&v, &params).len(), 1);
        let day = 24 * 3_600_000;
        assert_eq!(
            cluster_timed(&v, &[Some(t0), Some(t0 + 10 * day)], &params, Some(&RULE)).len(),
            2
        );
        assert_eq!(
            cluster_timed(&v, &[Some(t0 + 10 * day), Some(t0)], &params, Some(&RULE)).len(),
            2
        );
        assert_eq!(
            cluster_timed(&v, &[Some(t0), Some(t0 + day)], &params, Some(&RULE)).len(),
            1
        );
        // Switched off, times change nothing.
        assert_eq!(
            cluster_timed(&v, &[Some(t0), Some(t0 + 10 * day)], &params, None).len(),
            1
        );
    }
}
