//! Times the embedder backends from Rust, one thread: ONNX Runtime (`OrtEncoder`) against
//! tract (a plan built as `OnnxEmbedder::load` builds it), on the same photos and inputs.
//!
//! ```text
//! cargo build --release -p media-clustering-actors --example bench_ort
//! ORT_DYLIB_PATH=/path/to/libonnxruntime.so.1.32.0 target/release/examples/bench_ort \
//!     [--model models/open-nsfw.onnx] [--output Reshape] [--photos tests/fixtures/photos]
//!     [--rounds 5] [--passes 3] [--warmup 3] [--library PATH]
//! ```
//!
//! Every photo is decoded and preprocessed once. Each round runs tract, then ORT: `--warmup`
//! inferences, then `--passes` passes over all photos timing inference alone (tensor in,
//! L2-normalised embedding out), then one pass of the full `embed` (preprocess + inference +
//! normalise). Rounds alternate so that changes in machine load hit both backends alike.
//! CPU time (utime + stime from /proc/self/stat, 100 ticks/s) is recorded per pass.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use actors::algo::decode;
use actors::algo::embed::{self, OnnxEmbedder, Preprocess};
use actors::ort_encoder::{ORT_DYLIB_PATH, OrtEncoder, OrtOptions};
use image::DynamicImage;
use tract_onnx::prelude::*;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the parenthesised command name: state is field 0, utime 11, stime 12.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Per-backend samples over all rounds.
#[derive(Default)]
struct Samples {
    /// Inference alone, ms per photo.
    infer_ms: Vec<f64>,
    /// Median inference ms of each round.
    round_ms: Vec<f64>,
    /// Photos per CPU-second, per pass.
    per_cpu_s: Vec<f64>,
    /// Full `embed`, ms per photo.
    e2e_ms: Vec<f64>,
}

fn main() -> BoxResult<()> {
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        match pair {
            [k, v] if k.starts_with("--") => {
                args.insert(k[2..].to_owned(), v.clone());
            }
            _ => return Err(format!("expected `--key value` pairs, got {pair:?}").into()),
        }
    }
    let arg = |k: &str, d: &str| args.get(k).cloned().unwrap_or_else(|| d.to_owned());
    let num = |k: &str, d: usize| -> BoxResult<usize> { Ok(arg(k, &d.to_string()).parse()?) };
    let model = PathBuf::from(arg("model", "models/open-nsfw.onnx"));
    let output = arg("output", "Reshape");
    let photos = PathBuf::from(arg("photos", "tests/fixtures/photos"));
    let (rounds, passes, warmup) = (num("rounds", 5)?, num("passes", 3)?, num("warmup", 3)?);
    let library = match args.get("library") {
        Some(l) => PathBuf::from(l),
        None => std::env::var_os(ORT_DYLIB_PATH)
            .map(PathBuf::from)
            .ok_or("give --library or set ORT_DYLIB_PATH to libonnxruntime.so")?,
    };
    let p = Preprocess::OPEN_NSFW;

    let mut paths: Vec<PathBuf> = std::fs::read_dir(&photos)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            matches!(
                ext.to_ascii_lowercase().as_str(),
                "jpg" | "jpeg" | "png" | "webp"
            )
        })
        .collect();
    paths.sort();
    let images: Vec<DynamicImage> = paths
        .iter()
        .map(|path| Ok(decode::decode(&std::fs::read(path)?, 50_000_000)?))
        .collect::<BoxResult<_>>()?;
    let inputs: Vec<Vec<f32>> = images.iter().map(|i| embed::preprocess(i, &p)).collect();
    let n = p.input_size as usize;
    let tensors: Vec<Tensor> = inputs
        .iter()
        .map(|x| Tensor::from_shape(&[1, n, n, 3], x.as_slice()))
        .collect::<Result<_, _>>()?;

    let t = Instant::now();
    let plan = tract_plan(&model, &output, n)?;
    let tract_embedder = OnnxEmbedder::load(&model, "bench", &output, p.clone())?;
    eprintln!(
        "tract loaded in {:.2} s (plan + embedder)",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let ort = OrtEncoder::load(
        &model,
        "bench",
        &output,
        p.clone(),
        &OrtOptions::new(&library, 1),
    )?;
    eprintln!("ort loaded in {:.2} s", t.elapsed().as_secs_f64());

    // Agreement on every photo.
    let mut cosines = Vec::new();
    for (x, input) in tensors.iter().zip(&inputs) {
        let a = run_tract(&plan, x)?;
        let b = ort.embed_input(input)?;
        cosines.push(f64::from(a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()));
    }

    let (mut tract, mut onnx) = (Samples::default(), Samples::default());
    let photos_n = tensors.len() as f64;
    for round in 0..rounds {
        for backend in ["tract", "ort"] {
            let infer = |i: usize| -> BoxResult<Vec<f32>> {
                match backend {
                    "tract" => run_tract(&plan, &tensors[i]),
                    _ => Ok(ort.embed_input(&inputs[i])?),
                }
            };
            let s = if backend == "tract" {
                &mut tract
            } else {
                &mut onnx
            };
            for i in 0..warmup {
                std::hint::black_box(infer(i % tensors.len())?);
            }
            let mut this_round = Vec::new();
            for _ in 0..passes {
                let cpu0 = cpu_seconds();
                for i in 0..tensors.len() {
                    let t = Instant::now();
                    std::hint::black_box(infer(i)?);
                    this_round.push(ms(t));
                }
                s.per_cpu_s.push(photos_n / (cpu_seconds() - cpu0));
            }
            for img in &images {
                let t = Instant::now();
                match backend {
                    "tract" => std::hint::black_box(tract_embedder.embed(img)?),
                    _ => std::hint::black_box(ort.embed(img)?),
                };
                s.e2e_ms.push(ms(t));
            }
            eprintln!(
                "round {round} {backend}: {:.1} ms/photo (median of {})",
                median(&this_round),
                this_round.len()
            );
            s.round_ms.push(median(&this_round));
            s.infer_ms.extend(this_round);
        }
    }

    println!(
        "{} photos, {rounds} rounds x {passes} passes, 1 thread, ORT from {}",
        tensors.len(),
        library.display()
    );
    println!(
        "| backend | inference ms/photo (median of {}) | median of round medians | round medians | photos/CPU-s (median pass) | `embed` end to end, ms/photo (median of {}) |",
        tract.infer_ms.len(),
        tract.e2e_ms.len()
    );
    println!("|---|---:|---:|---|---:|---:|");
    for (name, s) in [("tract 0.23.9", &tract), ("ONNX Runtime (ort)", &onnx)] {
        let rounds: Vec<String> = s.round_ms.iter().map(|m| format!("{m:.1}")).collect();
        println!(
            "| {name} | {:.1} | {:.1} | {} | {:.1} | {:.1} |",
            median(&s.infer_ms),
            median(&s.round_ms),
            rounds.join(" / "),
            median(&s.per_cpu_s),
            median(&s.e2e_ms)
        );
    }
    println!(
        "tract / ORT: {:.2}x by median latency, {:.2}x by CPU time, {:.2}x end to end",
        median(&tract.infer_ms) / median(&onnx.infer_ms),
        median(&onnx.per_cpu_s) / median(&tract.per_cpu_s),
        median(&tract.e2e_ms) / median(&onnx.e2e_ms)
    );
    let min = cosines.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "cosine(tract, ORT) over {} photos: min {min:.7}, median {:.7}",
        cosines.len(),
        median(&cosines)
    );
    Ok(())
}

/// A plan built as `OnnxEmbedder::load` builds it.
fn tract_plan(model: &Path, output: &str, n: usize) -> BoxResult<Arc<TypedRunnableModel>> {
    let mut m = tract_onnx::onnx()
        .model_for_path(model)?
        .with_input_fact(0, f32::fact([1, n, n, 3]).into())?;
    if !output.is_empty() {
        m.select_outputs_by_name([output])?;
    }
    Ok(m.into_optimized()?.into_runnable()?)
}

fn run_tract(plan: &Arc<TypedRunnableModel>, x: &Tensor) -> BoxResult<Vec<f32>> {
    let out = plan.run(tvec!(x.clone().into()))?;
    let mut v: Vec<f32> = out[0]
        .to_plain_array_view::<f32>()?
        .iter()
        .copied()
        .collect();
    embed::l2_normalize(&mut v);
    Ok(v)
}
