//! Photo quality measures used by the hero score: sharpness that noise does
//! not inflate, the noise level, and exposure.
//!
//! - **Noise** `sigma` is Immerkær's estimator ("Fast noise variance
//!   estimation", 1996) on the luminance at the decoded resolution (native, or
//!   at most 1/8 of it for a large JPEG decoded at reduced scale, never below
//!   [`SOURCE_SHORT_SIDE`]), where sensor or added noise is still close to
//!   white: the mean absolute response to a
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

use image::{DynamicImage, GrayImage};

use super::resize;

/// Shorter side of the image the measures are taken on.
pub const WORKING_SHORT_SIDE: u32 = 384;

/// The smallest shorter side the measures need from the decoder. The median filter runs
/// at up to twice the working size, so a photo may be decoded at reduced scale down to
/// about that; 7/8 of it lets the usual 12 Mpx phone photo (4032x3024) decode at 1/4.
pub const SOURCE_SHORT_SIDE: u32 = 2 * WORKING_SHORT_SIDE * 7 / 8;

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
    let (nw, nh) = resize::short_side_size(g.dimensions(), short, 3);
    resize::gray(g, nw, nh)
}

/// RGB to luminance with `image`'s Rec. 709 weights, in integers over the whole buffer
/// (within one level of `to_luma8`, which goes through f32 per pixel and costs tens of
/// milliseconds at 12 Mpx).
fn rgb_to_luma(rgb: &image::RgbImage) -> GrayImage {
    let luma = rgb
        .as_raw()
        .chunks_exact(3)
        .map(|p| {
            ((2126 * u32::from(p[0]) + 7152 * u32::from(p[1]) + 722 * u32::from(p[2]) + 5000)
                / 10000) as u8
        })
        .collect();
    GrayImage::from_raw(rgb.width(), rgb.height(), luma).expect("one byte per pixel")
}

/// 3x3 median filter (borders copied).
///
/// Each column of the window is sorted first (low, middle, high); the median of the nine
/// is then the median of {largest low, median of middles, smallest high}, an exact identity
/// that needs only `min`/`max` on whole rows, which the compiler vectorises.
fn median3(g: &GrayImage) -> GrayImage {
    let (w, h) = (g.width() as usize, g.height() as usize);
    let mut out = g.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let px = g.as_raw();
    let (mut lo, mut mid, mut hi) = (vec![0u8; w], vec![0u8; w], vec![0u8; w]);
    let dst = out.as_mut();
    for y in 1..h - 1 {
        let (a, b, c) = (
            &px[(y - 1) * w..y * w],
            &px[y * w..(y + 1) * w],
            &px[(y + 1) * w..(y + 2) * w],
        );
        for x in 0..w {
            let (p, q, r) = (a[x], b[x], c[x]);
            let (l, m) = (p.min(q), p.max(q));
            lo[x] = l.min(r);
            hi[x] = m.max(r);
            mid[x] = l.max(m.min(r));
        }
        let row = &mut dst[y * w..(y + 1) * w];
        for x in 1..w - 1 {
            let max_lo = lo[x - 1].max(lo[x]).max(lo[x + 1]);
            let min_hi = hi[x - 1].min(hi[x]).min(hi[x + 1]);
            let (m0, m1, m2) = (mid[x - 1], mid[x], mid[x + 1]);
            let med_mid = m0.min(m1).max(m0.max(m1).min(m2));
            let (l, m) = (max_lo.min(med_mid), max_lo.max(med_mid));
            row[x] = l.max(m.min(min_hi));
        }
    }
    out
}

/// Immerkær's noise standard deviation estimate.
pub fn noise_sigma(g: &GrayImage) -> f32 {
    let (w, h) = (g.width() as usize, g.height() as usize);
    if w < 3 || h < 3 {
        return 0.0;
    }
    let px = g.as_raw();
    let mut sum = 0u64;
    for y in 1..h - 1 {
        let (up, row, down) = (
            &px[(y - 1) * w..y * w],
            &px[y * w..(y + 1) * w],
            &px[(y + 1) * w..(y + 2) * w],
        );
        // |v| <= 16 x 255 fits i16: narrow lanes vectorise well.
        let row_sum: u64 = up
            .windows(3)
            .zip(row.windows(3))
            .zip(down.windows(3))
            .map(|((u, r), d)| {
                let p = |v: u8| i16::from(v);
                let v = p(u[0]) - 2 * p(u[1]) + p(u[2]) - 2 * p(r[0]) + 4 * p(r[1]) - 2 * p(r[2])
                    + p(d[0])
                    - 2 * p(d[1])
                    + p(d[2]);
                u64::from(v.unsigned_abs())
            })
            .sum();
        sum += row_sum;
    }
    let n = ((w - 2) * (h - 2)) as f64;
    ((std::f64::consts::FRAC_PI_2).sqrt() * sum as f64 / (6.0 * n)) as f32
}

/// Variance of the 4-neighbour Laplacian.
fn laplacian_variance(g: &GrayImage) -> f64 {
    let (w, h) = (g.width() as usize, g.height() as usize);
    if w < 3 || h < 3 {
        return 0.0;
    }
    let px = g.as_raw();
    let (mut s, mut s2) = (0i64, 0u64);
    for y in 1..h - 1 {
        let (up, row, down) = (
            &px[(y - 1) * w..y * w],
            &px[y * w..(y + 1) * w],
            &px[(y + 1) * w..(y + 2) * w],
        );
        for x in 1..w - 1 {
            let v = i32::from(row[x - 1])
                + i32::from(row[x + 1])
                + i32::from(up[x])
                + i32::from(down[x])
                - 4 * i32::from(row[x]);
            s += i64::from(v);
            s2 += u64::from(v.unsigned_abs()).pow(2);
        }
    }
    let n = ((w - 2) * (h - 2)) as f64;
    (s2 as f64 / n - (s as f64 / n).powi(2)).max(0.0)
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

/// The photo's luminance: borrowed when it is one, else converted into `converted`.
fn luma_of<'a>(img: &'a DynamicImage, converted: &'a mut GrayImage) -> &'a GrayImage {
    match (img.as_luma8(), img.as_rgb8()) {
        (Some(l), _) => l,
        (None, Some(rgb)) => {
            *converted = rgb_to_luma(rgb);
            converted
        }
        (None, None) => {
            *converted = img.to_luma8();
            converted
        }
    }
}

/// Noise at the working size (see the module documentation) of a luminance image.
fn working_noise(luma: &GrayImage) -> f32 {
    let short = luma.width().min(luma.height()).max(1);
    noise_sigma(luma) * (WORKING_SHORT_SIDE as f32 / short as f32).min(1.0)
}

/// [`Quality::noise`] of a decoded photo, alone (what [`measure_scaled`] gives).
pub fn noise_of(img: &DynamicImage) -> f32 {
    let mut converted = GrayImage::default();
    working_noise(luma_of(img, &mut converted))
}

/// Measures one decoded (and oriented) photo.
pub fn measure(img: &DynamicImage) -> Quality {
    measure_scaled(img, u64::from(img.width()) * u64::from(img.height()))
}

/// Measures a photo that may have been decoded at a reduced scale (see
/// [`SOURCE_SHORT_SIDE`]); `pixels` is the original photo's pixel count. The noise
/// estimate is taken at the decoded scale and expressed at the working size like a
/// full-size one: reduced-scale decoding averages `k × k` pixels, which divides white
/// noise by `k`, as the working-size factor would.
pub fn measure_scaled(img: &DynamicImage, pixels: u64) -> Quality {
    let mut converted = GrayImage::default();
    let luma = luma_of(img, &mut converted);
    let short = luma.width().min(luma.height()).max(1);
    let noise = working_noise(luma);
    // Very large photos are first brought to twice the working size; the median there
    // removes what is noise at the working size and costs a fraction of a full-size pass.
    let reduced;
    let base = if short > 2 * WORKING_SHORT_SIDE {
        reduced = resize_short(luma, 2 * WORKING_SHORT_SIDE);
        &reduced
    } else {
        luma
    };
    let work = resize_short(&median3(base), WORKING_SHORT_SIDE);
    let sharpness = laplacian_variance(&work).sqrt() as f32;
    Quality {
        sharpness,
        noise,
        exposure: exposure(&work),
        pixels,
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
    fn rgb_to_luma_matches_the_image_crate() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let rgb = image::RgbImage::from_fn(61, 17, |_, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
        });
        // image converts through f32 with its own rounding: at most one level apart.
        let expected = DynamicImage::ImageRgb8(rgb.clone()).to_luma8();
        let ours = rgb_to_luma(&rgb);
        assert_eq!(ours.dimensions(), expected.dimensions());
        let diffs: Vec<u8> = ours
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        assert!(diffs.iter().all(|d| *d <= 1), "{diffs:?}");
    }

    #[test]
    fn median3_matches_sorting_each_window() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let g = GrayImage::from_fn(37, 23, |_, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            Luma([(state % 256) as u8])
        });
        let fast = median3(&g);
        for y in 0..g.height() {
            for x in 0..g.width() {
                let border = x == 0 || y == 0 || x == g.width() - 1 || y == g.height() - 1;
                let expect = if border {
                    g.get_pixel(x, y).0[0]
                } else {
                    let mut win: Vec<u8> = (0..9)
                        .map(|k| g.get_pixel(x + k % 3 - 1, y + k / 3 - 1).0[0])
                        .collect();
                    win.sort_unstable();
                    win[4]
                };
                assert_eq!(fast.get_pixel(x, y).0[0], expect, "({x}, {y})");
            }
        }
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
        let small = img.resize(150, 100, image::imageops::FilterType::Triangle);
        let (q, qs) = (measure(&img), measure(&small));
        assert!(qs.sharpness < q.sharpness);
        assert_eq!(qs.pixels, 150 * 100);
    }
}
