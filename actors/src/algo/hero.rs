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

/// One member of a cluster, as the hero selector sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a, Id> {
    pub id: Id,
    pub vector: &'a [f32],
    pub quality: Quality,
}

/// Scores every member of one cluster; returns the scores in input order and the hero's index.
pub fn score_cluster<Id: Ord>(members: &[Candidate<'_, Id>]) -> (Vec<f64>, usize) {
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
    let scores: Vec<f64> = members
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
            sharp * noise * f64::from(q.exposure.clamp(0.0, 1.0)) * res * cos.max(0.0).sqrt()
        })
        .collect();
    let hero = (0..members.len())
        .max_by(|&a, &b| {
            scores[a]
                .total_cmp(&scores[b])
                .then_with(|| members[b].id.cmp(&members[a].id))
        })
        .expect("non-empty");
    (scores, hero)
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
                scores[bad] < scores[0],
                "{} scored {} >= orig {}",
                variants[bad].0,
                scores[bad],
                scores[0]
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
}
