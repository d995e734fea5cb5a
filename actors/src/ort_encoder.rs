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
//! ORT returns graph outputs only, and holds a model to the input size it declares. When the
//! configured output is an inner tensor (the pinned model's embedding is the output of node
//! "Relu_48", pooled here), the model is edited in memory at load time: a graph output naming
//! that tensor is appended to the protobuf. When the low-passed view runs at a reduced size
//! ([`LowPass`](crate::algo::embed::LowPass)), the graph is cut to what that output needs and
//! its input is fixed to each size in turn, one pool of sessions per size
//! ([`prepare_model`]). The file on disk is not
//! changed, and `model_version` hashes that file, as the tract backend does.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use image::DynamicImage;
use ort::environment::Environment;
use ort::logging::LogLevel;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;
use tract_onnx::prelude::Framework;

use crate::algo::embed::{
    EmbedError, ImageEncoder, Layout, ModelCrop, Preprocess, embed_views, finish, model_crop,
    model_version,
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

/// An ONNX image encoder run by ONNX Runtime: a small pool of sessions of the same model per
/// input side ([`Preprocess::input_sides`]), shared by the embedder threads.
pub struct OrtEncoder {
    pools: Vec<Pool>,
    input_name: String,
    output_name: String,
    preprocess: Preprocess,
    model_version: String,
}

/// Sessions of the model for inputs of one side. `ort` sessions run with `&mut self`; each
/// inference takes one session.
struct Pool {
    side: u32,
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
}

impl Pool {
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
        let env = environment(&options.library).map_err(load_err)?;
        // One side: the model as it is. Several (the low-passed view at a reduced size): the
        // model cut to the embedding and fixed to each side, which ORT plans fully (a free
        // size costs it about 5 % per inference).
        let sides = preprocess.input_sides();
        let mut pools = Vec::with_capacity(sides.len());
        let mut output_name = String::new();
        let mut input_name = String::new();
        for &side in &sides {
            let fixed = (sides.len() > 1).then_some((preprocess.layout, side));
            let (model, tensor) = prepare_model(&bytes, output, fixed).map_err(load_err)?;
            let sessions = (0..options.sessions.max(1))
                .map(|_| new_session(&env, &model, options.intra_threads).map(Mutex::new))
                .collect::<Result<Vec<_>, String>>()
                .map_err(load_err)?;
            let first = sessions[0].lock().unwrap_or_else(PoisonError::into_inner);
            let input = match first.inputs() {
                [input] => input,
                inputs => {
                    return Err(load_err(format!(
                        "the model must have one input, not {}",
                        inputs.len()
                    )));
                }
            };
            // ORT refuses an input of another size than a fixed one only at the first
            // inference; the size is checked here instead, so a model that cannot take it
            // fails at start-up.
            if let ort::value::ValueType::Tensor { shape, .. } = input.dtype() {
                let want = input_shape(&preprocess, side);
                let fits =
                    shape.len() == 4 && shape.iter().zip(want).all(|(&d, w)| d < 0 || d == w);
                if !fits {
                    return Err(load_err(format!(
                        "the model takes inputs of {shape:?}, not {want:?}"
                    )));
                }
            }
            input_name = input.name().to_owned();
            if !first.outputs().iter().any(|o| o.name() == tensor) {
                return Err(load_err(format!(
                    "ONNX Runtime does not list `{tensor}` among the model's outputs"
                )));
            }
            drop(first);
            output_name = tensor;
            pools.push(Pool {
                side,
                sessions,
                next: AtomicUsize::new(0),
            });
        }
        Ok(OrtEncoder {
            pools,
            input_name,
            output_name,
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

    /// Embeds one decoded photo ([`embed_views`]): each view L2-normalised.
    pub fn embed(&self, img: &DynamicImage) -> Result<Vec<f32>, EmbedError> {
        embed_views(
            &model_crop(img, &self.preprocess),
            &self.preprocess,
            |input, side| self.embed_sized(&input, side),
        )
    }

    /// Embeds an input already made by [`preprocess`](crate::algo::embed::preprocess) with
    /// this encoder's settings (benchmarks time inference alone with it); the result is
    /// L2-normalised.
    pub fn embed_input(&self, input: &[f32]) -> Result<Vec<f32>, EmbedError> {
        self.embed_sized(input, self.preprocess.input_size)
    }

    /// One inference on a normalised input of `side` x `side` pixels.
    fn embed_sized(&self, input: &[f32], side: u32) -> Result<Vec<f32>, EmbedError> {
        let err = |e: ort::Error| EmbedError::Inference(e.to_string());
        let shape = input_shape(&self.preprocess, side);
        let tensor = TensorRef::from_array_view((shape, input)).map_err(err)?;
        let pool =
            self.pools.iter().find(|p| p.side == side).ok_or_else(|| {
                EmbedError::Inference(format!("no session for an input of {side}"))
            })?;
        let mut session = pool.session();
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

/// The input tensor's shape for one image of `side` x `side` pixels, as ORT takes it.
fn input_shape(p: &Preprocess, side: u32) -> [i64; 4] {
    p.layout.image_shape(side).map(|d| d as i64)
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

    fn embed_crop(&self, crop: &ModelCrop) -> Result<Vec<f32>, EmbedError> {
        embed_views(crop, &self.preprocess, |input, side| {
            self.embed_sized(&input, side)
        })
    }
}

/// The model as ORT should load it, and the graph output holding the embedding.
///
/// `output` names a node (its first output is taken, as tract's `select_outputs_by_name`
/// does) or a tensor; empty takes the model's first output. If that tensor is not a graph
/// output, one is appended to the serialised model: protobuf merges a repeated occurrence of
/// the `graph` field into the first, so the appended bytes add one entry to `graph.output`
/// and leave everything else as it was, byte for byte.
///
/// With `size` (a layout and a side: one of several sizes the model runs at), the model is
/// decoded and written again instead: the graph keeps only the nodes the output needs (the
/// pinned model's classifier head pools with a fixed 7 x 7 window, which a smaller input
/// cannot feed), the output is its only one, the input is one image of that side, and the
/// shapes inferred for another size go.
pub fn prepare_model<'a>(
    bytes: &'a [u8],
    output: &str,
    size: Option<(Layout, u32)>,
) -> Result<(Cow<'a, [u8]>, String), String> {
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = proto.graph.as_ref().ok_or("the model has no graph")?;
    let is_output = |t: &str| graph.output.iter().any(|o| o.name == t);
    let is_tensor = |t: &str| graph.node.iter().any(|n| n.output.iter().any(|o| o == t));
    let tensor = if output.is_empty() {
        graph
            .output
            .first()
            .ok_or("the model has no output")?
            .name
            .clone()
    } else {
        match graph.node.iter().find(|n| n.name == output) {
            Some(node) => node
                .output
                .first()
                .cloned()
                .ok_or_else(|| format!("node `{output}` has no output"))?,
            None if is_output(output) || is_tensor(output) => output.to_owned(),
            None => return Err(format!("the model has no node or tensor named `{output}`")),
        }
    };
    if let Some((layout, side)) = size {
        let edited = with_input_size(proto, &tensor, layout, side)?;
        return Ok((Cow::Owned(edited), tensor));
    }
    if is_output(&tensor) {
        return Ok((Cow::Borrowed(bytes), tensor));
    }
    let mut model = Vec::with_capacity(bytes.len() + tensor.len() + 16);
    model.extend_from_slice(bytes);
    model.extend_from_slice(&graph_output_bytes(&tensor));
    Ok((Cow::Owned(model), tensor))
}

/// The model cut to what `tensor` needs, that tensor its only output, its input one image of
/// `side` x `side` pixels, with no inferred intermediate shapes; see [`prepare_model`].
fn with_input_size(
    mut proto: tract_onnx::pb::ModelProto,
    tensor: &str,
    layout: Layout,
    side: u32,
) -> Result<Vec<u8>, String> {
    use prost::Message;
    use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
    use tract_onnx::pb::type_proto::Value as Type;

    let graph = proto.graph.as_mut().ok_or("the model has no graph")?;
    // The nodes the output depends on, found backwards from it.
    let producer: std::collections::HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut needed = vec![false; graph.node.len()];
    let mut todo = vec![tensor];
    while let Some(t) = todo.pop() {
        if let Some(&i) = producer.get(t)
            && !needed[i]
        {
            needed[i] = true;
            todo.extend(graph.node[i].input.iter().map(String::as_str));
        }
    }
    let mut keep = needed.into_iter();
    graph.node.retain(|_| keep.next().unwrap_or(false));
    let used: std::collections::HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    graph.initializer.retain(|t| used.contains(&t.name));
    let initialized: std::collections::HashSet<&String> =
        graph.initializer.iter().map(|t| &t.name).collect();
    // Old exporters list initializers among the inputs; the image is the first other one.
    let image = graph
        .input
        .iter_mut()
        .find(|i| !initialized.contains(&i.name))
        .ok_or("the model has no input")?;
    if let Some(Type::TensorType(t)) = image.r#type.as_mut().and_then(|t| t.value.as_mut())
        && let Some(shape) = t.shape.as_mut()
    {
        let n = shape.dim.len();
        if n != 4 {
            return Err(format!(
                "the model's input has {n} dimensions, not an image batch's 4"
            ));
        }
        shape.dim[0].value = Some(Dim::DimValue(1));
        for axis in layout.spatial_axes() {
            shape.dim[axis].value = Some(Dim::DimValue(i64::from(side)));
        }
    }
    let image_name = image.name.clone();
    graph
        .input
        .retain(|i| i.name == image_name || used.contains(&i.name));
    graph.value_info.clear();
    graph.output = vec![tract_onnx::pb::ValueInfoProto {
        name: tensor.to_owned(),
        r#type: Some(tract_onnx::pb::TypeProto {
            value: Some(Type::TensorType(tract_onnx::pb::type_proto::Tensor {
                elem_type: 1, // FLOAT
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }];
    Ok(proto.encode_to_vec())
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
        assert!(prepare_model(b"\xff\xff\xff", "Reshape", None).is_err());
        // An empty message is a model without a graph.
        let e = prepare_model(b"", "", Some((Layout::Nhwc, 128))).unwrap_err();
        assert!(e.contains("no graph"), "{e}");
    }
}
