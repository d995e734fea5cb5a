//! The ONNX Runtime embedder backend (`embedder.backend = "onnxruntime"`).
//!
//! [`OrtEncoder`] is a drop-in alternative to [`OnnxEmbedder`](crate::algo::embed::OnnxEmbedder)
//! (tract). It uses the same preprocessing, output selection, L2 normalisation and
//! `model_version`, so both backends give the same embeddings up to rounding and share the
//! embedding cache. On the default model it takes about half of tract's inference time
//! (BENCHMARKS.md, "Embedding benchmark").
//!
//! ONNX Runtime is not linked at build time: the `ort` crate's `load-dynamic` feature opens
//! `libonnxruntime.so` (1.31 or newer) at run time from the path the operator gives. The
//! PyPI `onnxruntime` wheel ships one in `onnxruntime/capi/`.
//!
//! ORT returns graph outputs only. When the configured output is an inner tensor (the default
//! model's embedding is the output of node "Reshape"), the model is edited in memory at load
//! time: a graph output naming that tensor is appended to the protobuf. The file on disk is
//! not changed, and `model_version` hashes that file, as the tract backend does.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use image::{DynamicImage, RgbImage};
use ort::environment::Environment;
use ort::logging::LogLevel;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;
use tract_onnx::prelude::Framework;

use crate::algo::embed::{
    EmbedError, ImageEncoder, Layout, Preprocess, embed_views, finish, model_crop, model_version,
};

/// The variable that `ort` itself reads for the library's path.
pub const ORT_DYLIB_PATH: &str = "ORT_DYLIB_PATH";

/// How ONNX Runtime is loaded and run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrtOptions {
    /// Path to `libonnxruntime.so` (version 1.31 or newer).
    pub library: PathBuf,
    /// Intra-op threads per inference. 1 suits the service, which runs several embedder
    /// threads (`actors.embedders`) instead.
    pub intra_threads: usize,
    /// Sessions in the pool: inferences that can run at once. A session runs one inference
    /// at a time, so this should match the number of threads that call `embed`.
    pub sessions: usize,
}

impl OrtOptions {
    /// One intra-op thread and one session per caller thread.
    pub fn new(library: impl Into<PathBuf>, sessions: usize) -> Self {
        OrtOptions {
            library: library.into(),
            intra_threads: 1,
            sessions,
        }
    }
}

/// An ONNX image encoder run by ONNX Runtime: a small pool of sessions of the same model,
/// shared by the embedder threads.
pub struct OrtEncoder {
    /// `ort` sessions run with `&mut self`; each inference takes one session.
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    input_name: String,
    output_name: String,
    shape: [i64; 4],
    preprocess: Preprocess,
    model_version: String,
}

/// The process's single ONNX Runtime environment, and the library it came from. ORT allows
/// one environment per process, so it is created once and kept; a failed attempt (a wrong
/// path, say) leaves nothing behind, so a later one may succeed.
static ENVIRONMENT: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

fn environment(library: &Path) -> Result<Environment, String> {
    let mut current = ENVIRONMENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((loaded, env)) = current.as_ref() {
        return if loaded == library {
            Ok(env.clone())
        } else {
            Err(format!(
                "ONNX Runtime is already loaded from {} in this process",
                loaded.display()
            ))
        };
    }
    let env = ort::init_from(library)
        .map_err(|e| format!("cannot load ONNX Runtime: {e}"))?
        .with_name("media-clustering")
        .build()
        .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", library.display()))?;
    // Warnings and errors reach `tracing`; ORT's info and verbose chatter is not even formatted.
    env.set_log_level(LogLevel::Warning);
    *current = Some((library.to_path_buf(), env.clone()));
    Ok(env)
}

impl OrtEncoder {
    /// Loads `path` into `options.sessions` ORT sessions, fixes the input shape from
    /// `preprocess`, and takes `output` (a node name, whose first output is used, or a tensor
    /// name; the model's first output when empty) as the embedding.
    pub fn load(
        path: &Path,
        name: &str,
        output: &str,
        preprocess: Preprocess,
        options: &OrtOptions,
    ) -> Result<Self, EmbedError> {
        let load_err = |message: String| EmbedError::Load {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| load_err(e.to_string()))?;
        let (model, output_name) = prepare_model(&bytes, output).map_err(load_err)?;
        let env = environment(&options.library).map_err(load_err)?;
        let sessions = (0..options.sessions.max(1))
            .map(|_| new_session(&env, &model, options.intra_threads).map(Mutex::new))
            .collect::<Result<Vec<_>, String>>()
            .map_err(load_err)?;
        let first = sessions[0].lock().unwrap_or_else(PoisonError::into_inner);
        let input_name = match first.inputs() {
            [input] => input.name().to_owned(),
            inputs => {
                return Err(load_err(format!(
                    "the model must have one input, not {}",
                    inputs.len()
                )));
            }
        };
        if !first.outputs().iter().any(|o| o.name() == output_name) {
            return Err(load_err(format!(
                "ONNX Runtime does not list `{output_name}` among the model's outputs"
            )));
        }
        drop(first);
        let n = i64::from(preprocess.input_size);
        let shape = match preprocess.layout {
            Layout::Nhwc => [1, n, n, 3],
            Layout::Nchw => [1, 3, n, n],
        };
        Ok(OrtEncoder {
            sessions,
            next: AtomicUsize::new(0),
            input_name,
            output_name,
            shape,
            model_version: model_version(name, &bytes, &preprocess),
            preprocess,
        })
    }

    pub fn model_version(&self) -> &str {
        &self.model_version
    }

    pub fn preprocess_config(&self) -> &Preprocess {
        &self.preprocess
    }

    /// The graph output fetched as the embedding.
    pub fn output_name(&self) -> &str {
        &self.output_name
    }

    /// A free session if there is one, else waits for one (taken in turn).
    fn session(&self) -> MutexGuard<'_, Session> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.sessions.len();
        for k in 0..n {
            if let Ok(s) = self.sessions[(start + k) % n].try_lock() {
                return s;
            }
        }
        // A panic during a run leaves the session usable: ORT holds no state between runs.
        self.sessions[start % n]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Embeds one decoded photo ([`embed_views`]): each view L2-normalised.
    pub fn embed(&self, img: &DynamicImage) -> Result<Vec<f32>, EmbedError> {
        embed_views(
            &model_crop(img, &self.preprocess),
            &self.preprocess,
            |input| self.embed_input(&input),
        )
    }

    /// Embeds an input already made by [`preprocess`] with this encoder's settings
    /// (benchmarks time inference alone with it); the result is L2-normalised.
    pub fn embed_input(&self, input: &[f32]) -> Result<Vec<f32>, EmbedError> {
        let err = |e: ort::Error| EmbedError::Inference(e.to_string());
        let tensor = TensorRef::from_array_view((self.shape, input)).map_err(err)?;
        let mut session = self.session();
        let outputs = session
            .run(ort::inputs![self.input_name.as_str() => tensor])
            .map_err(err)?;
        let value = outputs.get(&self.output_name).ok_or_else(|| {
            EmbedError::Inference(format!("no output named `{}`", self.output_name))
        })?;
        let (shape, data) = value.try_extract_tensor::<f32>().map_err(err)?;
        let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
        let v = data.to_vec();
        drop(outputs);
        drop(session);
        finish(v, &dims, &self.preprocess)
    }
}

/// One session: all graph optimisations, `intra_threads` intra-op threads, sequential.
fn new_session(env: &Environment, model: &[u8], intra_threads: usize) -> Result<Session, String> {
    let e = |e: ort::Error<_>| e.to_string();
    Session::builder(env)
        .map_err(|e| e.to_string())?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(e)?
        .with_log_level(LogLevel::Warning)
        .map_err(e)?
        .with_intra_threads(intra_threads.max(1))
        .map_err(e)?
        .with_inter_threads(1)
        .map_err(e)?
        .with_parallel_execution(false)
        .map_err(e)?
        .commit_from_memory(model)
        .map_err(|e| e.to_string())
}

impl ImageEncoder for OrtEncoder {
    fn model_version(&self) -> &str {
        OrtEncoder::model_version(self)
    }

    fn embed(&self, img: &DynamicImage) -> Result<Vec<f32>, EmbedError> {
        OrtEncoder::embed(self, img)
    }

    fn input_short_side(&self) -> u32 {
        self.preprocess.source_short_side()
    }

    fn backend(&self) -> &'static str {
        "onnxruntime"
    }

    fn crop_preprocess(&self) -> Option<&Preprocess> {
        Some(&self.preprocess)
    }

    fn embed_crop(&self, crop: &RgbImage) -> Result<Vec<f32>, EmbedError> {
        embed_views(crop, &self.preprocess, |input| self.embed_input(&input))
    }
}

/// The model as ORT should load it, and the graph output holding the embedding.
///
/// `output` names a node (its first output is taken, as tract's `select_outputs_by_name`
/// does) or a tensor; empty takes the model's first output. If that tensor is not a graph
/// output, one is appended to the serialised model: protobuf merges a repeated occurrence of
/// the `graph` field into the first, so the appended bytes add one entry to `graph.output`
/// and leave everything else as it was, byte for byte.
pub fn prepare_model<'a>(bytes: &'a [u8], output: &str) -> Result<(Cow<'a, [u8]>, String), String> {
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = proto.graph.ok_or("the model has no graph")?;
    let is_output = |t: &str| graph.output.iter().any(|o| o.name == t);
    let is_tensor = |t: &str| graph.node.iter().any(|n| n.output.iter().any(|o| o == t));
    if output.is_empty() {
        let first = graph.output.first().ok_or("the model has no output")?;
        return Ok((Cow::Borrowed(bytes), first.name.clone()));
    }
    let tensor = match graph.node.iter().find(|n| n.name == output) {
        Some(node) => node
            .output
            .first()
            .cloned()
            .ok_or_else(|| format!("node `{output}` has no output"))?,
        None if is_output(output) || is_tensor(output) => output.to_owned(),
        None => return Err(format!("the model has no node or tensor named `{output}`")),
    };
    if is_output(&tensor) {
        return Ok((Cow::Borrowed(bytes), tensor));
    }
    let mut model = Vec::with_capacity(bytes.len() + tensor.len() + 16);
    model.extend_from_slice(bytes);
    model.extend_from_slice(&graph_output_bytes(&tensor));
    Ok((Cow::Owned(model), tensor))
}

/// `ModelProto { graph: GraphProto { output: [ValueInfoProto { name, type: float tensor }] } }`
/// in protobuf wire format (field numbers from onnx.proto).
fn graph_output_bytes(name: &str) -> Vec<u8> {
    const FLOAT: u64 = 1;
    let mut tensor_type = Vec::new();
    put_varint(&mut tensor_type, 1 << 3); // Tensor.elem_type = 1, varint
    put_varint(&mut tensor_type, FLOAT);
    let mut type_proto = Vec::new();
    put_field(&mut type_proto, 1, &tensor_type); // TypeProto.tensor_type = 1
    let mut value_info = Vec::new();
    put_field(&mut value_info, 1, name.as_bytes()); // ValueInfoProto.name = 1
    put_field(&mut value_info, 2, &type_proto); // ValueInfoProto.type = 2
    let mut graph = Vec::new();
    put_field(&mut graph, 12, &value_info); // GraphProto.output = 12
    let mut model = Vec::new();
    put_field(&mut model, 7, &graph); // ModelProto.graph = 7
    model
}

/// A length-delimited field (wire type 2).
fn put_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_base_128() {
        let mut v = Vec::new();
        put_varint(&mut v, 1);
        put_varint(&mut v, 300);
        assert_eq!(v, [0x01, 0xAC, 0x02]);
    }

    #[test]
    fn appended_bytes_decode_as_a_float_graph_output() {
        let name = "Reshape:0".repeat(20); // long enough for two-byte lengths
        let bytes = graph_output_bytes(&name);
        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut &bytes[..])
            .unwrap();
        let outputs = proto.graph.unwrap().output;
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].name, name);
        use tract_onnx::pb::type_proto::Value;
        match outputs[0].r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(Value::TensorType(t)) => assert_eq!(t.elem_type, 1, "FLOAT"),
            other => panic!("not a tensor type: {other:?}"),
        }
    }

    #[test]
    fn prepare_model_rejects_non_models() {
        assert!(prepare_model(b"\xff\xff\xff", "Reshape").is_err());
        // An empty message is a model without a graph.
        let e = prepare_model(b"", "").unwrap_err();
        assert!(e.contains("no graph"), "{e}");
    }
}
