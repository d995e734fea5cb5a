//! Benchmarks the embedder (tract) and the decode + preprocess path, and writes JSON.
//!
//! ```text
//! cargo build --release -p media-clustering-actors --example bench_embed
//! target/release/examples/bench_embed embed  [--model P] [--output NODE] [--photos DIR]
//!                                            [--passes N] [--warmup N] [--threads N]
//!                                            [--dump DIR] [--json FILE]
//! target/release/examples/bench_embed decode [--photo FILE] [--sizes 1,12,24] [--runs N]
//!                                            [--model P] [--work DIR] [--json FILE]
//! target/release/examples/bench_embed threads [--configs 1x1,1x2,2x1] [--passes N]
//!                                             [--model P] [--photos DIR] [--json FILE]
//! ```
//!
//! `embed` decodes every photo in `--photos` with `decode::decode`, preprocesses it with
//! `embed::preprocess` (the "open-nsfw" preset, `Preprocess::OPEN_NSFW`), then times
//! - preprocessing alone, per photo;
//! - inference alone: a tract plan built exactly as `OnnxEmbedder::load` builds it, run on the
//!   prepared tensors, `--passes` passes over all photos after `--warmup` inferences;
//! - `OnnxEmbedder::embed` end to end (preprocess + inference + L2 normalisation).
//!
//! With `--dump DIR` it writes the input tensors (`inputs.f32`, NHWC f32 little-endian, one
//! after another) and the tract embeddings (`tract.f32`, L2-normalised) so that
//! scripts/bench_embed.py can feed ONNX Runtime the very same inputs and compare outputs.
//!
//! `decode` makes JPEGs of 1, 12 and 24 megapixels (quality 90) from a fixture photo
//! (upscaled, with a little deterministic noise so they compress like photos), writes them
//! to `--work`, and times on each (median of runs) decoding, preprocessing and the quality
//! measures along three paths: `before` (full decode, RGB copy and the `image` crate's
//! resize, as the embedder did before), `full` (full decode, today's preprocessing) and
//! `reduced` (`decode::decode_reduced` at the embedder's minimum shorter side, as
//! `photo::analyse` does). With a model (`--model`, default models/open-nsfw.onnx) it also
//! gives the cosine between the embeddings of the reduced and the full decode.
//!
//! `threads` runs `OnnxEmbedder::embed` (preprocess + inference) over the photos from
//! EMBEDDERS threads sharing one model with THREADS intra-op threads each (`embedder.threads`)
//! for each `--configs` entry, and gives photos/s, median latency and photos per CPU-second.
//!
//! CPU time is read from /proc/self/stat (utime + stime of all threads, 100 ticks/s).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use actors::algo::embed::{self, Layout, OnnxEmbedder, Preprocess};
use actors::algo::{decode, photo, quality, resize};
use image::{DynamicImage, GenericImageView, imageops::FilterType};
use serde_json::{Value, json};
use tract_onnx::prelude::*;

/// The service's default `server.max_image_pixels` (config/default.toml).
const MAX_PIXELS: u64 = 50_000_000;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Args(BTreeMap<String, String>);

impl Args {
    fn parse(args: &[String]) -> BoxResult<Self> {
        let mut map = BTreeMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {k}"))?;
            let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            map.insert(key.to_string(), v.clone());
        }
        Ok(Args(map))
    }

    fn str(&self, key: &str, default: &str) -> String {
        self.0
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    fn num(&self, key: &str, default: usize) -> BoxResult<usize> {
        match self.0.get(key) {
            Some(v) => Ok(v.parse().map_err(|e| format!("--{key} {v}: {e}"))?),
            None => Ok(default),
        }
    }
}

/// CPU seconds (user + system, all threads) used by this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name: state is index 0, utime 11, stime 12.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn write_f32s(path: &Path, rows: &[Vec<f32>]) -> BoxResult<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for row in rows {
        for x in row {
            out.write_all(&x.to_le_bytes())?;
        }
    }
    out.flush()?;
    Ok(())
}

fn emit(json_path: &str, value: &Value) -> BoxResult<()> {
    let text = serde_json::to_string_pretty(value)?;
    if json_path.is_empty() || json_path == "-" {
        println!("{text}");
    } else {
        std::fs::write(json_path, text + "\n")?;
        eprintln!("wrote {json_path}");
    }
    Ok(())
}

/// The tract plan exactly as `OnnxEmbedder::load` builds it (the field is private there).
/// `batch` > 1 gives the same plan with a batch dimension (a bench-only variant).
fn tract_plan(
    model: &Path,
    output: &str,
    p: &Preprocess,
    batch: usize,
) -> BoxResult<Arc<TypedRunnableModel>> {
    let n = p.input_size as usize;
    let shape: [usize; 4] = match p.layout {
        Layout::Nhwc => [batch, n, n, 3],
        Layout::Nchw => [batch, 3, n, n],
    };
    let mut m = tract_onnx::onnx()
        .model_for_path(model)?
        .with_input_fact(0, f32::fact(shape).into())?;
    if !output.is_empty() {
        m.select_outputs_by_name([output])?;
    }
    Ok(m.into_optimized()?.into_runnable()?)
}

fn run_plan(plan: &Arc<TypedRunnableModel>, input: &Tensor) -> BoxResult<Vec<f32>> {
    let out = plan.run(tvec!(input.clone().into()))?;
    let mut v: Vec<f32> = out[0]
        .to_plain_array_view::<f32>()?
        .iter()
        .copied()
        .collect();
    embed::l2_normalize(&mut v);
    Ok(v)
}

/// The JPEG, PNG and WebP files in `dir`, sorted.
fn photo_paths(dir: &Path) -> BoxResult<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
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
    if paths.is_empty() {
        return Err(format!("no photos in {}", dir.display()).into());
    }

    Ok(paths)
}

/// `embedders` threads embed every photo `passes` times with one shared `OnnxEmbedder`
/// running `intra` intra-op threads per inference, as the service's embedder stage does.
fn bench_threads(a: &Args) -> BoxResult<()> {
    let model = PathBuf::from(a.str("model", "models/open-nsfw.onnx"));
    let output = a.str("output", "Reshape");
    let passes = a.num("passes", 3)?.max(1);
    let configs = a.str("configs", "1x1,1x2,2x1");
    let paths = photo_paths(&PathBuf::from(a.str("photos", "tests/fixtures/photos")))?;
    let images: Vec<DynamicImage> = paths
        .iter()
        .map(|p| Ok(decode::decode(&std::fs::read(p)?, MAX_PIXELS)?))
        .collect::<BoxResult<_>>()?;
    let mut rows = Vec::new();
    for config in configs.split(',') {
        let (e, t) = config
            .split_once('x')
            .ok_or("configs are EMBEDDERSxTHREADS, e.g. 2x1")?;
        let (embedders, intra): (usize, usize) = (e.trim().parse()?, t.trim().parse()?);
        let embedder = OnnxEmbedder::load(&model, "bench", &output, Preprocess::OPEN_NSFW)?
            .with_threads(intra);
        let work = || -> BoxResult<Vec<f64>> {
            // Warm-up: builds this thread's pool and touches the weights.
            embedder.embed(&images[0])?;
            let mut lat = Vec::new();
            for _ in 0..passes {
                for img in &images {
                    let t = Instant::now();
                    std::hint::black_box(embedder.embed(img)?);
                    lat.push(ms(t.elapsed()));
                }
            }
            Ok(lat)
        };
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        let lat: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..embedders)
                .map(|_| s.spawn(|| work().map_err(|e| e.to_string())))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("embedder thread"))
                .collect::<Result<Vec<_>, String>>()
        })?
        .concat();
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
        let n = lat.len() as f64;
        let row = json!({
            "embedders": embedders,
            "intra_op_threads": intra,
            "photos": lat.len(),
            "photos_per_s": n / wall,
            "median_latency_ms": median(&lat),
            "cpu_s": cpu,
            "photos_per_cpu_s": n / cpu,
        });
        eprintln!(
            "{embedders} embedder(s) x {intra} intra-op thread(s): {:.1} photos/s, median latency \
             {:.1} ms, {:.1} photos/CPU-s",
            n / wall,
            median(&lat),
            n / cpu
        );
        rows.push(row);
    }
    emit(
        &a.str("json", "-"),
        &json!({"passes": passes, "rows": rows}),
    )
}

fn bench_embed(a: &Args) -> BoxResult<()> {
    let model = PathBuf::from(a.str("model", "models/open-nsfw.onnx"));
    let output = a.str("output", "Reshape");
    let photos = PathBuf::from(a.str("photos", "tests/fixtures/photos"));
    let passes = a.num("passes", 3)?.max(1);
    let warmup = a.num("warmup", 3)?;
    let threads = a.num("threads", 1)?.max(1);
    let p = Preprocess::OPEN_NSFW;

    let paths = photo_paths(&photos)?;

    // Decode once (timed, for information) and keep the decoded photos.
    let mut images = Vec::new();
    let mut decode_ms = Vec::new();
    for path in &paths {
        let bytes = std::fs::read(path)?;
        let t = Instant::now();
        let img = decode::decode(&bytes, MAX_PIXELS).map_err(|e| format!("{path:?}: {e}"))?;
        decode_ms.push(ms(t.elapsed()));
        images.push(img);
    }

    // Preprocessing alone: `passes` passes over all photos, median per photo.
    let mut inputs: Vec<Vec<f32>> = images
        .iter()
        .map(|img| embed::preprocess(img, &p))
        .collect();
    let mut pre_ms = Vec::new();
    for _ in 0..passes {
        for (i, img) in images.iter().enumerate() {
            let t = Instant::now();
            inputs[i] = embed::preprocess(img, &p);
            pre_ms.push(ms(t.elapsed()));
        }
    }

    let t = Instant::now();
    let plan = tract_plan(&model, &output, &p, 1)?;
    let load_plan_s = t.elapsed().as_secs_f64();
    let n = p.input_size as usize;
    let tensors: Vec<Tensor> = inputs
        .iter()
        .map(|x| Tensor::from_shape(&[1, n, n, 3], x.as_slice()))
        .collect::<Result<_, _>>()?;

    for i in 0..warmup {
        run_plan(&plan, &tensors[i % tensors.len()])?;
    }

    // Inference alone: each pass runs every prepared tensor once, split over `threads`.
    let mut pass_rows = Vec::new();
    let mut infer_ms = Vec::new();
    let mut embeddings: Vec<Vec<f32>> = vec![Vec::new(); tensors.len()];
    for pass in 0..passes {
        let cpu0 = cpu_seconds();
        let t = Instant::now();
        type Got = Result<Vec<(usize, Vec<f32>, f64)>, String>;
        let results: Vec<Got> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|k| {
                    let (plan, tensors) = (&plan, &tensors);
                    s.spawn(move || -> Got {
                        let mut got = Vec::new();
                        for i in (k..tensors.len()).step_by(threads) {
                            let t = Instant::now();
                            let v = run_plan(plan, &tensors[i]).map_err(|e| e.to_string())?;
                            got.push((i, v, ms(t.elapsed())));
                        }
                        Ok(got)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
                .collect()
        });
        let wall = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        for r in results {
            for (i, v, m) in r? {
                infer_ms.push(m);
                embeddings[i] = v;
            }
        }
        let row = json!({
            "pass": pass,
            "wall_s": wall,
            "cpu_s": cpu,
            "photos_per_s": tensors.len() as f64 / wall,
            "photos_per_cpu_s": tensors.len() as f64 / cpu,
        });
        eprintln!(
            "tract pass {pass}: {:.2} photos/s wall, {:.2} photos/cpu-s ({} threads)",
            tensors.len() as f64 / wall,
            tensors.len() as f64 / cpu,
            threads
        );
        pass_rows.push(row);
    }
    let per_s: Vec<f64> = pass_rows
        .iter()
        .filter_map(|r| r["photos_per_s"].as_f64())
        .collect();
    let per_cpu_s: Vec<f64> = pass_rows
        .iter()
        .filter_map(|r| r["photos_per_cpu_s"].as_f64())
        .collect();

    // The production path: OnnxEmbedder::embed (preprocess + inference + normalise).
    let t = Instant::now();
    let embedder = OnnxEmbedder::load(&model, "bench", &output, p.clone())?;
    let load_embedder_s = t.elapsed().as_secs_f64();
    let mut e2e_ms = Vec::new();
    let mut max_diff = 0f32;
    embedder.embed(&images[0])?;
    for (i, img) in images.iter().enumerate() {
        let t = Instant::now();
        let v = embedder.embed(img)?;
        e2e_ms.push(ms(t.elapsed()));
        for (x, y) in v.iter().zip(&embeddings[i]) {
            max_diff = max_diff.max((x - y).abs());
        }
    }

    let extras = extras(a, &model, &output, &p, &plan, &inputs, &tensors, passes)?;

    let dump = a.str("dump", "");
    if !dump.is_empty() {
        std::fs::create_dir_all(&dump)?;
        write_f32s(&Path::new(&dump).join("inputs.f32"), &inputs)?;
        write_f32s(&Path::new(&dump).join("tract.f32"), &embeddings)?;
        eprintln!("dumped inputs and embeddings to {dump}");
    }

    let names: Vec<String> = paths
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let value = json!({
        "backend": "tract",
        "tract_onnx_version": "0.23.9",
        "model": model.display().to_string(),
        "output": output,
        "photos": names,
        "input_shape": [1, n, n, 3],
        "embedding_dim": embeddings[0].len(),
        "threads": threads,
        "passes": passes,
        "warmup": warmup,
        "load_plan_s": load_plan_s,
        "load_embedder_s": load_embedder_s,
        "decode_ms_median": median(&decode_ms),
        "preprocess_ms_median": median(&pre_ms),
        "inference_ms_median": median(&infer_ms),
        "inference_photos_per_s_median": median(&per_s),
        "inference_photos_per_cpu_s_median": median(&per_cpu_s),
        "embed_e2e_ms_median": median(&e2e_ms),
        "embedder_vs_plan_max_abs_diff": max_diff,
        "pass_rows": pass_rows,
        "extras": extras,
    });
    emit(&a.str("json", "-"), &value)
}

/// Options that might help, measured: reusing one `SimpleState` across inferences
/// (`plan.run` spawns a fresh one each call), batched inference (`--batch N`), and a
/// per-operator profile over `--profile N` inferences.
fn extras(
    a: &Args,
    model: &Path,
    output: &str,
    p: &Preprocess,
    plan: &Arc<TypedRunnableModel>,
    inputs: &[Vec<f32>],
    tensors: &[Tensor],
    passes: usize,
) -> BoxResult<Value> {
    use tract_onnx::tract_core::plan::{SimpleState, eval};
    let batch = a.num("batch", 0)?;
    let profile = a.num("profile", 0)?;
    let mut out = serde_json::Map::new();
    if batch == 0 && profile == 0 {
        return Ok(Value::Object(out));
    }
    let photos = tensors.len() as f64;

    // One state reused for every inference of a pass.
    let mut state = SimpleState::new(plan)?;
    let mut reuse = Vec::new();
    for _ in 0..passes {
        let (cpu0, t) = (cpu_seconds(), Instant::now());
        for x in tensors {
            std::hint::black_box(state.run(tvec!(x.clone().into()))?);
        }
        let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
        reuse.push(json!({"photos_per_s": photos / wall, "photos_per_cpu_s": photos / cpu}));
        eprintln!("tract reused state: {:.2} photos/s", photos / wall);
    }
    out.insert("reused_state".into(), Value::Array(reuse));

    if batch > 1 {
        let n = p.input_size as usize;
        let bplan = tract_plan(model, output, p, batch)?;
        // Batches of `batch` photos; the last one is padded by wrapping around.
        let batches: Vec<Tensor> = (0..inputs.len().div_ceil(batch))
            .map(|b| {
                let mut data = Vec::with_capacity(batch * 3 * n * n);
                for k in 0..batch {
                    data.extend_from_slice(&inputs[(b * batch + k) % inputs.len()]);
                }
                Tensor::from_shape(&[batch, n, n, 3], &data)
            })
            .collect::<Result<_, _>>()?;
        std::hint::black_box(bplan.run(tvec!(batches[0].clone().into()))?);
        let mut rows = Vec::new();
        let done = (batches.len() * batch) as f64;
        for _ in 0..passes {
            let (cpu0, t) = (cpu_seconds(), Instant::now());
            for x in &batches {
                std::hint::black_box(bplan.run(tvec!(x.clone().into()))?);
            }
            let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
            rows.push(json!({"photos_per_s": done / wall, "photos_per_cpu_s": done / cpu}));
            eprintln!("tract batch {batch}: {:.2} photos/s", done / wall);
        }
        out.insert("batch".into(), json!({"size": batch, "passes": rows}));
    }

    if profile > 0 {
        // Time spent per operator type, summed over `profile` inferences.
        let mut by_op: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        let t = Instant::now();
        for i in 0..profile {
            let x = tensors[i % tensors.len()].clone();
            state.run_plan_with_eval(tvec!(x.into()), |ctx, st, node, ins| {
                let t = Instant::now();
                let r = eval(ctx, st, node, ins);
                let e = by_op.entry(node.op().name().to_string()).or_default();
                e.0 += ms(t.elapsed());
                e.1 += 1;
                r
            })?;
        }
        let total = ms(t.elapsed()) / profile as f64;
        let mut rows: Vec<(String, f64, usize)> = by_op
            .into_iter()
            .map(|(k, (m, c))| (k, m / profile as f64, c / profile))
            .collect();
        rows.sort_by(|x, y| y.1.total_cmp(&x.1));
        let ops: Vec<Value> = rows
            .iter()
            .map(|(k, m, c)| json!({"op": k, "ms_per_inference": m, "nodes": c}))
            .collect();
        out.insert(
            "profile".into(),
            json!({"inferences": profile, "ms_per_inference": total, "ops": ops,
                   "optimized_nodes": plan.model().nodes().len()}),
        );
    }
    Ok(Value::Object(out))
}

/// A fixture photo upscaled to about `mp` megapixels (3:2) with a little deterministic noise.
fn synthetic(src: &DynamicImage, mp: u32) -> DynamicImage {
    let h = ((f64::from(mp) * 1e6 / 1.5).sqrt()).round() as u32;
    let w = (f64::from(h) * 1.5).round() as u32;
    let mut img = image::imageops::resize(&src.to_rgb8(), w, h, FilterType::Triangle);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for px in img.pixels_mut() {
        for c in px.0.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state % 13) as i16 - 6;
            *c = (i16::from(*c) + noise).clamp(0, 255) as u8;
        }
    }
    DynamicImage::ImageRgb8(img)
}

/// Times of one way of getting from JPEG bytes to the model input and the quality measures.
#[derive(Default)]
struct PathTimes {
    decode: Vec<f64>,
    preprocess: Vec<f64>,
    quality: Vec<f64>,
    decoded_size: (u32, u32),
}

impl PathTimes {
    fn json(&self) -> Value {
        let (d, p, q) = (
            median(&self.decode),
            median(&self.preprocess),
            median(&self.quality),
        );
        json!({
            "decode_ms": d,
            "preprocess_ms": p,
            "quality_ms": q,
            "total_ms": d + p + q,
            "decoded_size": [self.decoded_size.0, self.decoded_size.1],
        })
    }
}

/// The preprocessing as it was before SIMD resizing: an RGB copy, then the `image` crate's
/// Triangle resize, centre crop and normalisation.
fn preprocess_before(img: &DynamicImage, p: &Preprocess) -> Vec<f32> {
    let rgb = img.to_rgb8();
    let (rw, rh) = resize::short_side_size(rgb.dimensions(), p.resize_to, p.input_size);
    let small = image::imageops::resize(&rgb, rw, rh, FilterType::Triangle);
    embed::preprocess(&DynamicImage::ImageRgb8(small), p)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

fn bench_decode(a: &Args) -> BoxResult<()> {
    let photo = a.str("photo", "tests/fixtures/photos/motorcycle_left__orig.png");
    let sizes = a.str("sizes", "1,12,24");
    let runs = a.num("runs", 5)?.max(1);
    let work = PathBuf::from(a.str("work", "/tmp/bench-embed"));
    let model = a.str("model", "models/open-nsfw.onnx");
    std::fs::create_dir_all(&work)?;
    let p = Preprocess::OPEN_NSFW;
    // What the embedder stage asks the decoder for with this preset.
    let min_short = photo::source_short_side(p.source_short_side());
    let embedder = if Path::new(&model).is_file() {
        Some(OnnxEmbedder::load(
            Path::new(&model),
            "bench",
            &a.str("output", "Reshape"),
            p.clone(),
        )?)
    } else {
        eprintln!("no model at {model}: embeddings of the reduced and full decodes not compared");
        None
    };
    let src = decode::decode(&std::fs::read(&photo)?, MAX_PIXELS)?;

    let mut rows = Vec::new();
    for mp in sizes.split(',') {
        let mp: u32 = mp.trim().parse()?;
        let path = work.join(format!("photo_{mp}mp.jpg"));
        let img = synthetic(&src, mp);
        let mut bytes = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90);
        img.write_with_encoder(enc)?;
        std::fs::write(&path, &bytes)?;
        let (w, h) = (img.width(), img.height());
        drop(img);

        let (mut before, mut full, mut reduced) = Default::default();
        let mut check = Vec::new();
        // One untimed round first (page faults, caches), then `runs` timed ones. The three
        // paths alternate within a round so that changes in load hit them alike.
        for run in 0..=runs {
            let keep = run > 0;
            // Before: full decode, RGB copy + `image` Triangle resize, measures at full size.
            let t = Instant::now();
            let img = decode::decode(&bytes, MAX_PIXELS)?;
            let d = ms(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(preprocess_before(&img, &p));
            let pr = ms(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(quality::measure(&img));
            let q = ms(t.elapsed());
            record(&mut before, keep, (d, pr, q), img.dimensions());
            drop(img);
            // Full decode with today's preprocessing (borrowed RGB, SIMD resize).
            let t = Instant::now();
            let img = decode::decode(&bytes, MAX_PIXELS)?;
            let d = ms(t.elapsed());
            let t = Instant::now();
            let x = embed::preprocess(&img, &p);
            let pr = ms(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(quality::measure(&img));
            let q = ms(t.elapsed());
            record(&mut full, keep, (d, pr, q), img.dimensions());
            std::hint::black_box(x);
            drop(img);
            // The embedder stage's path (photo::analyse without inference).
            let t = Instant::now();
            let dec = decode::decode_reduced(&bytes, MAX_PIXELS, min_short)?;
            let d = ms(t.elapsed());
            let t = Instant::now();
            let x = embed::preprocess(&dec.image, &p);
            let pr = ms(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(quality::measure_scaled(&dec.image, dec.pixels()));
            let q = ms(t.elapsed());
            record(&mut reduced, keep, (d, pr, q), dec.image.dimensions());
            std::hint::black_box(x);
            // The API's upload check (src/api/images.rs): the smallest decode there is.
            let t = Instant::now();
            std::hint::black_box(decode::decode_reduced(&bytes, MAX_PIXELS, 1)?);
            let c = ms(t.elapsed());
            if keep {
                check.push(c);
            }
        }
        let cos = match &embedder {
            Some(e) => {
                let full_img = decode::decode(&bytes, MAX_PIXELS)?;
                let red = decode::decode_reduced(&bytes, MAX_PIXELS, min_short)?;
                json!(cosine(&e.embed(&full_img)?, &e.embed(&red.image)?))
            }
            None => Value::Null,
        };
        let row = json!({
            "megapixels": mp,
            "width": w,
            "height": h,
            "file": path.display().to_string(),
            "bytes": bytes.len(),
            "min_short": min_short,
            "before": before.json(),
            "full": full.json(),
            "reduced": reduced.json(),
            "reduced_vs_full_cos": cos,
            "upload_check_ms": median(&check),
        });
        eprintln!(
            "{mp} MP ({w}x{h}, {} bytes): before {:.1} ms, full decode {:.1} ms, reduced {:.1} ms \
             (decoded at {}x{}; cosine to full {cos})",
            bytes.len(),
            row["before"]["total_ms"].as_f64().unwrap_or_default(),
            row["full"]["total_ms"].as_f64().unwrap_or_default(),
            row["reduced"]["total_ms"].as_f64().unwrap_or_default(),
            reduced.decoded_size.0,
            reduced.decoded_size.1,
        );
        rows.push(row);
    }
    emit(
        &a.str("json", "-"),
        &json!({"runs": runs, "source": photo, "rows": rows}),
    )
}

fn record(t: &mut PathTimes, keep: bool, (d, p, q): (f64, f64, f64), size: (u32, u32)) {
    t.decoded_size = size;
    if keep {
        t.decode.push(d);
        t.preprocess.push(p);
        t.quality.push(q);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("embed") => Args::parse(&args[1..]).and_then(|a| bench_embed(&a)),
        Some("decode") => Args::parse(&args[1..]).and_then(|a| bench_decode(&a)),
        Some("threads") => Args::parse(&args[1..]).and_then(|a| bench_threads(&a)),
        _ => Err(
            "usage: bench_embed embed|decode|threads [--key value ...] (see the file's header)"
                .into(),
        ),
    };
    if let Err(e) = result {
        eprintln!("bench_embed: {e}");
        std::process::exit(1);
    }
}
