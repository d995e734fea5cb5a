//! The hero score: which photo of a cluster is its best.
//!
//! `score = sharpness_rel × noise_factor × exposure × resolution_rel × centrality`
//!
//! - `sharpness_rel`: sharpness (measured after denoising) over the cluster's highest.
//! - `noise_factor = 1 / (1 + (sigma / 6)²)`: a visible noise std of 6 luminance levels
//!   halves the score.
//! - `exposure`: see [`crate::algo::quality`], in `[0, 1]`.
//! - `resolution_rel = sqrt(pixels / cluster's largest pixels)`: linear size ratio.
//! - `centrality = max(cos(photo, cluster centre), 0)^0.5`: typical shots of the group win ties.
//!
//! A product, not a sum, so that one serious defect (blur, noise, darkness, low
//! resolution) cannot be bought back by the other qualities. Ties break on the
//! smaller image id, so the choice is deterministic.

use crate::algo::quality::Quality;

/// Noise std (luminance levels) at which the noise factor is one half.
pub const NOISE_HALF: f32 = 6.0;

/// Cosine distance within which two members of a cluster are near-duplicates (burst shots
/// of one moment; different framings of a scene are further apart).
pub const NEAR_DUPLICATE_EPS: f32 = 0.027;

/// How much better (relatively) a new hero must score than the cluster's current one to
/// replace it, so that the hero does not flip between near-equal shots from job to job.
pub const HERO_MARGIN: f64 = 0.05;

/// One member of a cluster, as the hero selector sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a, Id> {
    pub id: Id,
    pub vector: &'a [f32],
    pub quality: Quality,
}

/// One member's hero score and its factors, each in `[0, 1]` (`total` is their product).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Score {
    pub sharpness: f64,
    pub noise: f64,
    pub exposure: f64,
    pub resolution: f64,
    pub centrality: f64,
    pub total: f64,
}

/// Scores every member of one cluster; returns the scores in input order and the hero's index.
pub fn score_cluster<Id: Ord>(members: &[Candidate<'_, Id>]) -> (Vec<Score>, usize) {
    assert!(!members.is_empty(), "a cluster has at least one member");
    let dim = members[0].vector.len();
    let mut centre = vec![0f64; dim];
    for m in members {
        centre
            .iter_mut()
            .zip(m.vector)
            .for_each(|(c, v)| *c += f64::from(*v));
    }
    let cn = centre.iter().map(|c| c * c).sum::<f64>().sqrt();
    let max_sharp = members
        .iter()
        .map(|m| f64::from(m.quality.sharpness))
        .fold(0.0, f64::max);
    let max_pixels = members
        .iter()
        .map(|m| m.quality.pixels)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let scores: Vec<Score> = members
        .iter()
        .map(|m| {
            let q = &m.quality;
            let sharp = if max_sharp > 0.0 {
                f64::from(q.sharpness) / max_sharp
            } else {
                1.0
            };
            let noise = 1.0 / (1.0 + (f64::from(q.noise) / f64::from(NOISE_HALF)).powi(2));
            let res = (q.pixels as f64 / max_pixels).sqrt();
            let vn = m
                .vector
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt();
            let cos = if cn > 0.0 && vn > 0.0 {
                centre
                    .iter()
                    .zip(m.vector)
                    .map(|(c, v)| c * f64::from(*v))
                    .sum::<f64>()
                    / (cn * vn)
            } else {
                1.0
            };
            let exposure = f64::from(q.exposure.clamp(0.0, 1.0));
            let centrality = cos.max(0.0).sqrt();
            Score {
                sharpness: sharp,
                noise,
                exposure,
                resolution: res,
                centrality,
                total: sharp * noise * exposure * res * centrality,
            }
        })
        .collect();
    let hero = (0..members.len())
        .max_by(|&a, &b| {
            scores[a]
                .total
                .total_cmp(&scores[b].total)
                .then_with(|| members[b].id.cmp(&members[a].id))
        })
        .expect("non-empty");
    (scores, hero)
}

/// For each member, the best-scored other member it nearly duplicates (cosine distance at
/// most `eps` and a better score, ties to the smaller id), if any: what a client can offer
/// to archive, keeping the better shot. Quadratic in the cluster's size, which is the
/// hero selector's cost already (the centre and scores are linear, this is the one pass over
/// pairs).
pub fn near_duplicates<Id: Ord + Copy>(
    members: &[Candidate<'_, Id>],
    scores: &[Score],
    eps: f32,
) -> Vec<Option<Id>> {
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let norms: Vec<f64> = members.iter().map(|m| norm(m.vector)).collect();
    let better = |a: usize, b: usize| {
        scores[a]
            .total
            .total_cmp(&scores[b].total)
            .then_with(|| members[b].id.cmp(&members[a].id))
            .is_gt()
    };
    (0..members.len())
        .map(|i| {
            (0..members.len())
                .filter(|&j| j != i && better(j, i))
                .filter(|&j| {
                    let dot: f64 = members[i]
                        .vector
                        .iter()
                        .zip(members[j].vector)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    let cos = if norms[i] > 0.0 && norms[j] > 0.0 {
                        dot / (norms[i] * norms[j])
                    } else {
                        0.0
                    };
                    1.0 - cos <= f64::from(eps)
                })
                .max_by(|&a, &b| {
                    if better(a, b) {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Less
                    }
                })
                .map(|j| members[j].id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::quality::{measure, tests::*};
    use image::imageops::FilterType;

    #[test]
    fn degraded_shots_never_win() {
        let orig = scene(640, 430);
        let variants = [
            ("orig", orig.clone()),
            ("flip", orig.fliph()),
            ("blur", orig.blur(2.5)),
            ("noise", add_noise(&orig, 18.0)),
            ("dark", darken(&orig, 0.3)),
            ("small", orig.resize(213, 143, FilterType::Triangle)),
        ];
        let v = vec![1.0f32, 0.0];
        let members: Vec<Candidate<'_, usize>> = variants
            .iter()
            .enumerate()
            .map(|(i, (_, img))| Candidate {
                id: i,
                vector: &v,
                quality: measure(img),
            })
            .collect();
        let (scores, hero) = score_cluster(&members);
        assert!(
            ["orig", "flip"].contains(&variants[hero].0),
            "hero {} scores {scores:?}",
            variants[hero].0
        );
        for bad in 2..6 {
            assert!(
                scores[bad].total < scores[0].total,
                "{} scored {} >= orig {}",
                variants[bad].0,
                scores[bad].total,
                scores[0].total
            );
        }
    }

    #[test]
    fn ties_break_on_the_smaller_id() {
        let q = Quality {
            sharpness: 1.0,
            noise: 0.0,
            exposure: 1.0,
            pixels: 100,
        };
        let v = [1.0f32];
        let members = [
            Candidate {
                id: 7,
                vector: &v,
                quality: q,
            },
            Candidate {
                id: 3,
                vector: &v,
                quality: q,
            },
        ];
        assert_eq!(score_cluster(&members).1, 1);
    }

    #[test]
    fn closeness_to_the_centre_counts() {
        let q = Quality {
            sharpness: 1.0,
            noise: 0.0,
            exposure: 1.0,
            pixels: 100,
        };
        let (a, b, c) = ([1.0f32, 0.0], [0.9f32, 0.436], [0.6f32, 0.8]);
        let members = [
            Candidate {
                id: 0,
                vector: &c[..],
                quality: q,
            },
            Candidate {
                id: 1,
                vector: &a[..],
                quality: q,
            },
            Candidate {
                id: 2,
                vector: &b[..],
                quality: q,
            },
        ];
        assert_eq!(score_cluster(&members).1, 2);
    }

    #[test]
    fn near_duplicates_point_at_the_better_shot() {
        let q = |sharpness: f32| Quality {
            sharpness,
            noise: 0.0,
            exposure: 1.0,
            pixels: 100,
        };
        // 0 and 1 nearly the same look (1 sharper), 2 another look.
        let (a, b, c) = ([1.0f32, 0.0], [0.999f32, 0.045], [0.6f32, 0.8]);
        let members = [
            Candidate {
                id: 10,
                vector: &a[..],
                quality: q(0.5),
            },
            Candidate {
                id: 11,
                vector: &b[..],
                quality: q(1.0),
            },
            Candidate {
                id: 12,
                vector: &c[..],
                quality: q(1.0),
            },
        ];
        let (scores, _) = score_cluster(&members);
        let dups = near_duplicates(&members, &scores, 0.01);
        assert_eq!(dups, vec![Some(11), None, None]);
        assert_eq!(
            near_duplicates(&members, &scores, 0.0),
            vec![None, None, None]
        );
    }
}
