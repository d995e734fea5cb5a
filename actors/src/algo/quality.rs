//! Photo quality measures used by the hero score: sharpness that noise does
//! not inflate, the noise level, and exposure.
//!
//! - **Noise** `sigma` is Immerkær's estimator ("Fast noise variance
//!   estimation", 1996) on the luminance at native resolution, where sensor
//!   or added noise is still close to white: the mean absolute response to a
//!   kernel that cancels smooth image structure, scaled to a Gaussian standard
//!   deviation (luminance levels, 0–255). It is then scaled by the downscale
//!   factor to the working size, so that it measures noise as visible there
//!   (averaging `k × k` pixels divides white noise by `k`).
//! - **Sharpness** is the standard deviation of the 4-neighbour Laplacian on a
//!   denoised luminance at a common working size (shorter side
//!   [`WORKING_SHORT_SIDE`]): a 3×3 median filter first removes impulsive and
//!   Gaussian noise while keeping edges, so noise does not read as detail (a
//!   plain Laplacian variance prefers noisy shots). At the working size a
//!   low-resolution photo is upscaled and reads as soft, as it would look.
//! - **Exposure** in `[0, 1]`: a Gaussian preference for a mean luminance near
//!   mid-grey, times the share of pixels that are not crushed to black or
//!   blown to white.

use image::{DynamicImage, GrayImage, imageops::FilterType};

/// Shorter side of the image the measures are taken on.
pub const WORKING_SHORT_SIDE: u32 = 384;

/// Raw measures of one photo, stored with its embedding.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quality {
    pub sharpness: f32,
    pub noise: f32,
    pub exposure: f32,
    /// Width times height of the original (oriented) photo.
    pub pixels: u64,
}

/// Resizes so the shorter side is `short` pixels (at least 3x3).
fn resize_short(g: &GrayImage, short: u32) -> GrayImage {
    let (w, h) = g.dimensions();
    let s = short as f32 / w.min(h).max(1) as f32;
    let (nw, nh) = (
        ((w as f32 * s).round() as u32).max(3),
        ((h as f32 * s).round() as u32).max(3),
    );
    image::imageops::resize(g, nw, nh, FilterType::Triangle)
}

/// 3x3 median filter (borders copied).
fn median3(g: &GrayImage) -> GrayImage {
    let (w, h) = g.dimensions();
    let mut out = g.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let mut win = [0u8; 9];
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let mut k = 0;
            for dy in 0..3 {
                for dx in 0..3 {
                    win[k] = g.get_pixel(x + dx - 1, y + dy - 1).0[0];
                    k += 1;
                }
            }
            win.sort_unstable();
            out.get_pixel_mut(x, y).0[0] = win[4];
        }
    }
    out
}

/// Immerkær's noise standard deviation estimate.
pub fn noise_sigma(g: &GrayImage) -> f32 {
    let (w, h) = g.dimensions();
    if w < 3 || h < 3 {
        return 0.0;
    }
    let p = |x: u32, y: u32| f64::from(g.get_pixel(x, y).0[0]);
    let mut sum = 0.0;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let v = p(x - 1, y - 1) - 2.0 * p(x, y - 1) + p(x + 1, y - 1) - 2.0 * p(x - 1, y)
                + 4.0 * p(x, y)
                - 2.0 * p(x + 1, y)
                + p(x - 1, y + 1)
                - 2.0 * p(x, y + 1)
                + p(x + 1, y + 1);
            sum += v.abs();
        }
    }
    let n = f64::from((w - 2) * (h - 2));
    ((std::f64::consts::FRAC_PI_2).sqrt() * sum / (6.0 * n)) as f32
}

/// Variance of the 4-neighbour Laplacian.
fn laplacian_variance(g: &GrayImage) -> f64 {
    let (w, h) = g.dimensions();
    if w < 3 || h < 3 {
        return 0.0;
    }
    let p = |x: u32, y: u32| f64::from(g.get_pixel(x, y).0[0]);
    let (mut s, mut s2) = (0.0, 0.0);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let v = p(x - 1, y) + p(x + 1, y) + p(x, y - 1) + p(x, y + 1) - 4.0 * p(x, y);
            s += v;
            s2 += v * v;
        }
    }
    let n = f64::from((w - 2) * (h - 2));
    (s2 / n - (s / n).powi(2)).max(0.0)
}

fn exposure(g: &GrayImage) -> f32 {
    let n = (g.width() * g.height()).max(1) as f64;
    let (mut sum, mut clipped) = (0.0f64, 0u64);
    for p in g.pixels() {
        let v = p.0[0];
        sum += f64::from(v);
        if v <= 8 || v >= 247 {
            clipped += 1;
        }
    }
    let mean = sum / n / 255.0;
    let centred = (-((mean - 0.5) / 0.25).powi(2) / 2.0).exp();
    (centred * (1.0 - clipped as f64 / n)) as f32
}

/// Measures one decoded (and oriented) photo.
pub fn measure(img: &DynamicImage) -> Quality {
    let luma = img.to_luma8();
    let short = luma.width().min(luma.height()).max(1);
    let downscale = (WORKING_SHORT_SIDE as f32 / short as f32).min(1.0);
    let noise = noise_sigma(&luma) * downscale;
    // Very large photos are first brought to twice the working size; the median there
    // removes what is noise at the working size and costs a fraction of a full-size pass.
    let base = if short > 2 * WORKING_SHORT_SIDE {
        resize_short(&luma, 2 * WORKING_SHORT_SIDE)
    } else {
        luma
    };
    let work = resize_short(&median3(&base), WORKING_SHORT_SIDE);
    let sharpness = laplacian_variance(&work).sqrt() as f32;
    Quality {
        sharpness,
        noise,
        exposure: exposure(&work),
        pixels: u64::from(img.width()) * u64::from(img.height()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::{ImageBuffer, Luma};

    /// A deterministic textured scene: soft shapes with hard edges.
    pub(crate) fn scene(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageLuma8(ImageBuffer::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let base = 110.0 + 60.0 * (fx * 9.0).sin() * (fy * 7.0).cos();
            let square = if (x / (w / 8).max(1) + y / (h / 6).max(1)).is_multiple_of(2) {
                35.0
            } else {
                -35.0
            };
            Luma([(base + square).clamp(0.0, 255.0) as u8])
        }))
    }

    /// Deterministic pseudo-random noise (xorshift), roughly Gaussian by summing uniforms.
    pub(crate) fn add_noise(img: &DynamicImage, sigma: f32) -> DynamicImage {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut uni = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f32 / (1u64 << 53) as f32
        };
        let mut g = img.to_luma8();
        for p in g.pixels_mut() {
            let n: f32 = (0..12).map(|_| uni()).sum::<f32>() - 6.0;
            p.0[0] = (f32::from(p.0[0]) + n * sigma).clamp(0.0, 255.0) as u8;
        }
        DynamicImage::ImageLuma8(g)
    }

    pub(crate) fn darken(img: &DynamicImage, f: f32) -> DynamicImage {
        let mut g = img.to_luma8();
        g.pixels_mut()
            .for_each(|p| p.0[0] = (f32::from(p.0[0]) * f) as u8);
        DynamicImage::ImageLuma8(g)
    }

    #[test]
    fn blur_lowers_sharpness() {
        let img = scene(600, 400);
        assert!(measure(&img.blur(3.0)).sharpness < 0.5 * measure(&img).sharpness);
    }

    #[test]
    fn noise_does_not_read_as_sharpness() {
        let img = scene(600, 400);
        let clean = measure(&img);
        let noisy = measure(&add_noise(&img, 20.0));
        assert!(
            noisy.noise > 3.0 * clean.noise.max(1.0),
            "noise {} vs {}",
            noisy.noise,
            clean.noise
        );
        assert!(
            noisy.sharpness < 1.5 * clean.sharpness,
            "sharpness {} vs {}",
            noisy.sharpness,
            clean.sharpness
        );
    }

    #[test]
    fn noise_estimate_tracks_the_added_noise() {
        // At or below the working size the estimate is the added noise itself.
        let flat = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(500, 384, Luma([128])));
        let sigma = measure(&add_noise(&flat, 10.0)).noise;
        assert!((8.5..=11.5).contains(&sigma), "sigma {sigma}");
        // Twice the working size: averaging 2x2 pixels halves it.
        let big = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(1000, 768, Luma([128])));
        let sigma = measure(&add_noise(&big, 10.0)).noise;
        assert!((4.0..=6.0).contains(&sigma), "sigma {sigma}");
    }

    #[test]
    fn darkness_lowers_exposure() {
        let img = scene(600, 400);
        assert!(measure(&darken(&img, 0.3)).exposure < 0.6 * measure(&img).exposure);
    }

    #[test]
    fn small_photos_read_as_soft_at_working_scale() {
        let img = scene(900, 600);
        let small = img.resize(150, 100, FilterType::Triangle);
        let (q, qs) = (measure(&img), measure(&small));
        assert!(qs.sharpness < q.sharpness);
        assert_eq!(qs.pixels, 150 * 100);
    }
}
