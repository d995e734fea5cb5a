//! One photo from upload bytes to what clustering and the hero score need: decoded once,
//! at the smallest scale the model and the quality measures allow, then measured and
//! embedded.

use super::budget::MemoryBudget;
use super::decode::{self, DecodeError, DecodeLimits, Decoded};
use super::embed::{self, EmbedError, ImageEncoder, Preprocess};
use super::prepared::Prepared;
use super::quality::{self, Quality};

#[derive(Debug, thiserror::Error)]
pub enum PhotoError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
}

/// The shorter side a photo is decoded to at least, for a model that resizes photos to a
/// shorter side of `model_side` ([`ImageEncoder::input_short_side`]).
pub fn source_short_side(model_side: u32) -> u32 {
    model_side.max(quality::SOURCE_SHORT_SIDE)
}

/// Decodes a photo the way the embedder does, within `budget`: the one decode path, so that
/// what the API accepts (it checks uploads with this) the embedder can decode. The image is
/// dropped at once; what it cost is known from its header.
pub fn check(
    bytes: &[u8],
    limits: DecodeLimits,
    model_side: u32,
    budget: &MemoryBudget,
) -> Result<Decoded, DecodeError> {
    decode::decode_within(bytes, limits, source_short_side(model_side), budget).map(|(d, _)| d)
}

/// Checks a photo as [`check`] does and keeps what the embedder needs of it (see
/// [`super::prepared`]): its header's format and size, and the prepared photo.
pub fn prepare(
    bytes: &[u8],
    limits: DecodeLimits,
    pre: &Preprocess,
    budget: &MemoryBudget,
) -> Result<(decode::Format, u32, u32, Prepared), DecodeError> {
    let (d, _reserved) = decode::decode_within(
        bytes,
        limits,
        source_short_side(pre.source_short_side()),
        budget,
    )?;
    let prepared = Prepared::from_decoded(&d.image, d.pixels(), pre);
    Ok((d.format, d.width, d.height, prepared))
}

/// Decodes, measures and embeds one photo, holding its share of `budget` meanwhile.
pub fn analyse(
    bytes: &[u8],
    limits: DecodeLimits,
    model: &dyn ImageEncoder,
    budget: &MemoryBudget,
) -> Result<(Vec<f32>, Quality), PhotoError> {
    let (decoded, _reserved) = decode::decode_within(
        bytes,
        limits,
        source_short_side(model.input_short_side()),
        budget,
    )?;
    let quality = quality::measure_scaled(&decoded.image, decoded.pixels());
    // With the crop path the noise just measured decides the smoothing, not a second estimate.
    let vector = match model.crop_preprocess() {
        Some(p) => model.embed_crop(&embed::crop(&decoded.image, p, quality.noise))?,
        None => model.embed(&decoded.image)?,
    };
    Ok((vector, quality))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::sync::Mutex;

    use image::{DynamicImage, ImageFormat};

    use super::*;
    use crate::algo::quality::tests::{add_noise, scene};

    /// Records the size of what it is asked to embed.
    struct Probe {
        side: u32,
        seen: Mutex<Vec<(u32, u32)>>,
    }

    impl ImageEncoder for Probe {
        fn model_version(&self) -> &str {
            "probe"
        }
        fn embed(&self, img: &DynamicImage) -> Result<Vec<f32>, EmbedError> {
            self.seen.lock().unwrap().push((img.width(), img.height()));
            Ok(vec![1.0, 0.0])
        }
        fn input_short_side(&self) -> u32 {
            self.side
        }
    }

    fn jpeg(img: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(img.to_rgb8())
            .write_to(&mut out, ImageFormat::Jpeg)
            .unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_at_the_scale_the_model_and_the_measures_need() {
        let bytes = jpeg(&scene(2400, 1800));
        // The measures need a shorter side of SOURCE_SHORT_SIDE (672): 1800 / 2 = 900 is
        // the smallest DCT reduction that keeps it.
        let model = Probe {
            side: 256,
            seen: Mutex::default(),
        };
        let (_, q) = analyse(
            &bytes,
            50_000_000.into(),
            &model,
            &MemoryBudget::unlimited(),
        )
        .unwrap();
        assert_eq!(model.seen.lock().unwrap().as_slice(), &[(1200, 900)]);
        assert_eq!(
            q.pixels,
            2400 * 1800,
            "resolution counts the original's pixels"
        );
        // A model that wants more detail gets it.
        let model = Probe {
            side: 1000,
            seen: Mutex::default(),
        };
        analyse(
            &bytes,
            50_000_000.into(),
            &model,
            &MemoryBudget::unlimited(),
        )
        .unwrap();
        assert_eq!(model.seen.lock().unwrap().as_slice(), &[(2400, 1800)]);
    }

    #[test]
    fn reduced_scale_measures_agree_with_full_scale_ones() {
        let model = Probe {
            side: 256,
            seen: Mutex::default(),
        };
        let clean = scene(3200, 2400);
        let noisy = add_noise(&clean, 18.0);
        let measure_both = |img: &DynamicImage| {
            let bytes = jpeg(img);
            let (_, reduced) = analyse(
                &bytes,
                50_000_000.into(),
                &model,
                &MemoryBudget::unlimited(),
            )
            .unwrap();
            let full = quality::measure(&decode::decode(&bytes, 50_000_000).unwrap());
            (reduced, full)
        };
        let (clean_r, clean_f) = measure_both(&clean);
        let (noisy_r, noisy_f) = measure_both(&noisy);
        let close = |a: f32, b: f32, tol: f32| (a - b).abs() <= tol * a.abs().max(b.abs());
        for (r, f) in [(clean_r, clean_f), (noisy_r, noisy_f)] {
            assert!(close(r.sharpness, f.sharpness, 0.05), "{r:?} vs {f:?}");
            assert!(close(r.exposure, f.exposure, 0.05), "{r:?} vs {f:?}");
            assert_eq!(r.pixels, f.pixels);
        }
        assert!(
            close(noisy_r.noise, noisy_f.noise, 0.15),
            "{noisy_r:?} vs {noisy_f:?}"
        );
        // What the hero score relies on survives: the noisy shot reads as noisier.
        assert!(
            noisy_r.noise > 2.0 * clean_r.noise,
            "{noisy_r:?} vs {clean_r:?}"
        );
    }
}
