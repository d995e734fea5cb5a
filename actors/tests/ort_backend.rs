//! The embedder backends on fixture photos and the real model: ONNX Runtime against tract,
//! tract with intra-op threads against tract without, and the smoothing of noisy photos.
//!
//! Needs `libonnxruntime.so` 1.31 or newer: `ORT_DYLIB_PATH`, else
//! `models/libonnxruntime.so.1.32.0`; the pinned model `models/open-nsfw.onnx`; and the
//! service's default model derived from it, `MODEL_PATH`, else `models/open-nsfw-int8.onnx`.
//! `make model` fetches and makes all three.

use std::path::{Path, PathBuf};

use actors::algo::decode;
use actors::algo::embed::{Layout, LowPass, OnnxEmbedder, Preprocess};
use actors::ort_encoder::{ORT_DYLIB_PATH, OrtEncoder, OrtOptions, prepare_model};
use image::{DynamicImage, GenericImageView};
use tract_onnx::prelude::Framework;

const MAX_PIXELS: u64 = 50_000_000;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The service's default model, derived from the pinned one (scripts/prepare_model.py): its
/// trunk, any input size, 8-bit convolutions. `MODEL_PATH`, else `models/open-nsfw-int8.onnx`.
fn prepared_model() -> PathBuf {
    let path = std::env::var_os("MODEL_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("models/open-nsfw-int8.onnx"));
    assert!(
        path.is_file(),
        "no model at {} (run `make model` or set MODEL_PATH)",
        path.display()
    );
    path
}

/// The ORT library: `ORT_DYLIB_PATH`, else the one `make model` fetches.
fn library() -> PathBuf {
    let p = std::env::var_os(ORT_DYLIB_PATH)
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| workspace().join("models/libonnxruntime.so.1.32.0"));
    assert!(
        p.is_file(),
        "no ONNX Runtime library at {} (run `make model`, or set {ORT_DYLIB_PATH})",
        p.display()
    );
    p
}

/// The pinned model as published (a classifier whose inner tensors give the embedding).
fn model() -> PathBuf {
    let path = workspace().join("models/open-nsfw.onnx");
    assert!(
        path.is_file(),
        "no model at {} (run `make model`)",
        path.display()
    );
    path
}

/// `count` fixture photos spread over the subjects and their variants, decoded.
fn photos(count: usize) -> Vec<(String, DynamicImage)> {
    let dir = workspace().join("tests/fixtures/photos");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("jpg" | "png")))
        .collect();
    paths.sort();
    let step = (paths.len() / count).max(1) + 1;
    (0..count)
        .map(|i| &paths[(i * step) % paths.len()])
        .map(|p| {
            let img = decode::decode(&std::fs::read(p).unwrap(), MAX_PIXELS).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), img)
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// This process's threads named as tract's intra-op pools are (Linux: /proc/self/task).
fn pool_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("tract-intra-op"))
        .count()
}

#[test]
fn tract_with_intra_op_threads_embeds_as_without() {
    let model = model();
    let one = OnnxEmbedder::load(&model, "open-nsfw", "Reshape", Preprocess::OPEN_NSFW).unwrap();
    let two = OnnxEmbedder::load(&model, "open-nsfw", "Reshape", Preprocess::OPEN_NSFW)
        .unwrap()
        .with_threads(2);
    assert_eq!((one.threads(), two.threads()), (1, 2));
    let (_, img) = photos(1).remove(0);
    two.embed(&img).unwrap();
    assert_eq!(
        pool_threads(),
        2,
        "this thread's inference ran on a pool of 2 intra-op threads"
    );
    // Threads run in a pool per calling thread: embed from two callers at once.
    std::thread::scope(|s| {
        let run = |photos: Vec<(String, DynamicImage)>| {
            for (name, img) in &photos {
                let c = cosine(&one.embed(img).unwrap(), &two.embed(img).unwrap());
                assert!(c > 0.99999, "{name}: cosine(1 thread, 2 threads) = {c}");
            }
        };
        let (a, b) = (photos(3), photos(3));
        s.spawn(move || run(a));
        s.spawn(move || run(b));
    });
}

#[test]
fn ort_and_tract_embeddings_agree() {
    let lib = library();
    let model = model();
    let tract = OnnxEmbedder::load(&model, "open-nsfw", "Reshape", Preprocess::OPEN_NSFW).unwrap();
    let ort = OrtEncoder::load(
        &model,
        "open-nsfw",
        "Reshape",
        Preprocess::OPEN_NSFW,
        &OrtOptions::new(&lib, 1),
    )
    .unwrap();
    assert_eq!(ort.output_name(), "Reshape:0");
    // Same file, same name: the backends share the embedding cache.
    assert_eq!(ort.model_version(), tract.model_version());
    let photos = photos(5);
    assert_eq!(photos.len(), 5);
    for (name, img) in &photos {
        let (a, b) = (tract.embed(img).unwrap(), ort.embed(img).unwrap());
        assert_eq!((a.len(), b.len()), (1024, 1024), "{name}");
        let norm = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{name}: |ort| = {norm}");
        let c = cosine(&a, &b);
        eprintln!("{name}: cosine(tract, ort) = {c:.7}");
        assert!(c > 0.999, "{name}: cosine(tract, ort) = {c}");
    }
}

#[test]
fn gem_pooling_of_the_last_block_agrees_across_backends_and_with_the_models_average() {
    let lib = library();
    let model = model();
    let with_p = |p: f32| Preprocess {
        gem_p: Some(p),
        ..Preprocess::OPEN_NSFW
    };
    // The model's own "Reshape" is the average pool of "Relu_48", a ReLU: GeM with p = 1.
    let average = OnnxEmbedder::load(&model, "m", "Reshape", Preprocess::OPEN_NSFW).unwrap();
    let gem1 = OnnxEmbedder::load(&model, "m", "Relu_48", with_p(1.0)).unwrap();
    let tract = OnnxEmbedder::load(&model, "m", "Relu_48", with_p(2.0)).unwrap();
    let ort = OrtEncoder::load(
        &model,
        "m",
        "Relu_48",
        with_p(2.0),
        &OrtOptions::new(&lib, 1),
    )
    .unwrap();
    assert_eq!(ort.model_version(), tract.model_version());
    assert!(tract.model_version().ends_with("-gem2"));
    for (name, img) in &photos(5) {
        let a = average.embed(img).unwrap();
        let g1 = gem1.embed(img).unwrap();
        assert_eq!(g1.len(), 1024, "{name}");
        let c = cosine(&a, &g1);
        assert!(c > 0.99999, "{name}: cosine(average, GeM p=1) = {c}");
        let (t, o) = (tract.embed(img).unwrap(), ort.embed(img).unwrap());
        let c = cosine(&t, &o);
        assert!(c > 0.999, "{name}: cosine(tract, ort) with GeM = {c}");
        // p = 2 weighs strong responses more: a different embedding, not a rounding of it.
        assert!(cosine(&a, &t) < 0.999, "{name}");
    }
}

#[test]
fn ort_sessions_serve_several_threads() {
    let lib = library();
    let model = model();
    let ort = OrtEncoder::load(
        &model,
        "open-nsfw",
        "Reshape",
        Preprocess::OPEN_NSFW,
        &OrtOptions::new(&lib, 2),
    )
    .unwrap();
    let photos = photos(4);
    let alone: Vec<Vec<f32>> = photos.iter().map(|(_, i)| ort.embed(i).unwrap()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| photos.iter().map(|(_, i)| ort.embed(i).unwrap()).collect()))
            .collect();
        for h in handles {
            let got: Vec<Vec<f32>> = h.join().unwrap();
            assert_eq!(got, alone);
        }
    });
}

#[test]
fn ort_takes_the_model_output_when_none_is_named() {
    let lib = library();
    let ort = OrtEncoder::load(
        &model(),
        "m",
        "",
        Preprocess::OPEN_NSFW,
        &OrtOptions::new(&lib, 1),
    )
    .unwrap();
    // open_nsfw's own output: two class probabilities.
    let v = ort.embed(&photos(1)[0].1).unwrap();
    assert_eq!(v.len(), 2);
}

#[test]
fn a_wrong_library_is_a_load_error() {
    let err = OrtEncoder::load(
        &model(),
        "m",
        "Reshape",
        Preprocess::OPEN_NSFW,
        &OrtOptions::new("/nonexistent/libonnxruntime.so", 1),
    )
    .err()
    .expect("a missing library fails to load");
    let text = err.to_string();
    assert!(text.contains("ONNX Runtime"), "{text}");
}

#[test]
fn inner_outputs_are_added_as_graph_outputs() {
    let bytes = std::fs::read(model()).unwrap();
    let (edited, tensor) = prepare_model(&bytes, "Reshape", None).unwrap();
    assert_eq!(tensor, "Reshape:0");
    assert!(edited.len() > bytes.len() && edited.starts_with(&bytes));
    // The node's tensor name selects the same output.
    assert_eq!(
        prepare_model(&bytes, "Reshape:0", None).unwrap().1,
        "Reshape:0"
    );
    // The model's own output needs no edit.
    let (same, first) = prepare_model(&bytes, "", None).unwrap();
    assert_eq!((same.len(), first.is_empty()), (bytes.len(), false));
    let e = prepare_model(&bytes, "NoSuchNode", None).unwrap_err();
    assert!(e.contains("NoSuchNode"), "{e}");
}

/// `img` with seeded Gaussian noise of `sigma` levels on every channel (clipped), as a
/// high-ISO sensor adds it.
fn with_noise(img: &DynamicImage, sigma: f32, seed: u64) -> DynamicImage {
    let mut s = seed | 1;
    let mut uniform = move || {
        // xorshift64*: enough for test noise, and the same on every machine.
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut rgb = img.to_rgb8();
    for v in rgb.iter_mut() {
        let g = (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos();
        *v = (f64::from(*v) + g * f64::from(sigma))
            .round()
            .clamp(0.0, 255.0) as u8;
    }
    DynamicImage::ImageRgb8(rgb)
}

#[test]
fn smoothing_brings_noisy_copies_closer_to_their_photo() {
    use actors::algo::quality;
    // The default embedding: the last block pooled by GeM (p = 2), with and without smoothing.
    let gem = Preprocess {
        gem_p: Some(2.0),
        ..Preprocess::OPEN_NSFW
    };
    let smoothing = OnnxEmbedder::load(&model(), "m", "Relu_48", gem.clone()).unwrap();
    let plain = OnnxEmbedder::load(
        &model(),
        "m",
        "Relu_48",
        Preprocess {
            denoise: None,
            ..gem
        },
    )
    .unwrap();
    let originals: Vec<_> = photos(45)
        .into_iter()
        .filter(|(name, _)| name.contains("__orig"))
        .collect();
    assert_eq!(originals.len(), 5);
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for (i, (name, img)) in originals.iter().enumerate() {
        // A clean photo is embedded as without smoothing.
        assert!(quality::noise_of(img) < 6.0, "{name} reads as noisy");
        let clean = plain.embed(img).unwrap();
        assert_eq!(smoothing.embed(img).unwrap(), clean, "{name}");
        // Noisy copies at full size and as a 176x144 shot.
        let tiny = img.resize_exact(176, 144, image::imageops::FilterType::Triangle);
        for (what, copy) in [
            ("sigma 20", with_noise(img, 20.0, 1 + i as u64)),
            ("sigma 30", with_noise(img, 30.0, 11 + i as u64)),
            ("176x144 sigma 20", with_noise(&tiny, 20.0, 21 + i as u64)),
        ] {
            assert!(
                quality::noise_of(&copy) > 6.0,
                "{name} {what} reads as clean"
            );
            let d0 = 1.0 - cosine(&plain.embed(&copy).unwrap(), &clean);
            let d1 = 1.0 - cosine(&smoothing.embed(&copy).unwrap(), &clean);
            eprintln!(
                "{name} {what} {:?} noise {:.1}: {d0:.3} -> {d1:.3}",
                copy.dimensions(),
                quality::noise_of(&copy)
            );
            before.push(d0);
            after.push(d1);
        }
    }
    // Smoothing costs a little detail, so a copy well inside the threshold may drift a
    // little; what matters for clustering is the copies near or beyond it.
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    eprintln!("mean {:.3} -> {:.3}", mean(&before), mean(&after));
    assert!(mean(&after) < 0.95 * mean(&before));
    let (eps, far) = (0.14, 0.8 * 0.14);
    for (b, a) in before.iter().zip(&after) {
        if *b > far {
            assert!(a < b, "a far copy went from {b:.3} to {a:.3}");
        }
        if *b <= eps {
            assert!(*a <= eps, "a copy within eps went from {b:.3} to {a:.3}");
        }
    }
    assert!(before.iter().filter(|&&b| b > far).count() >= 4);
}

/// The service's default preprocessing (src/config.rs, preset "open-nsfw"): GeM (p = 2) with
/// smoothing, and the view low-passed by sigma 5 at 128 pixels.
fn default_embedding() -> Preprocess {
    Preprocess {
        gem_p: Some(2.0),
        low_pass: Some(LowPass {
            sigma: 5.0,
            size: 128,
        }),
        ..Preprocess::OPEN_NSFW
    }
}

/// `model` in ONNX Runtime with one session, the embedding its block "Relu_48" pooled as `p`
/// says.
fn ort_relu48(model: &Path, p: Preprocess) -> OrtEncoder {
    OrtEncoder::load(model, "m", "Relu_48", p, &OrtOptions::new(library(), 1)).unwrap()
}

/// The fixture subjects, each with an original photo (`{subject}__orig.png`).
const SUBJECTS: [&str; 5] = [
    "astronaut",
    "chelsea",
    "coffee",
    "motorcycle_left",
    "rocket",
];

/// A fixture subject's original photo.
fn original(subject: &str) -> DynamicImage {
    let path = workspace().join(format!("tests/fixtures/photos/{subject}__orig.png"));
    decode::decode(&std::fs::read(path).unwrap(), MAX_PIXELS).unwrap()
}

#[test]
fn the_low_passed_view_marks_blurred_copies_and_brings_them_back_to_their_photo() {
    use actors::algo::cluster::LowPassRule;
    // `[clustering.low_pass]`'s defaults (src/config.rs).
    let rule = LowPassRule {
        eps: 0.16,
        both_blurred_eps: 0.16,
        blurred_below: 0.015,
    };
    let tract = OnnxEmbedder::load(&model(), "m", "Relu_48", default_embedding()).unwrap();
    let ort = ort_relu48(&model(), default_embedding());
    assert!(ort.model_version().ends_with("-gem2-lp5x128"));
    assert_eq!(ort.model_version(), tract.model_version());
    // `clustering.eps`'s default.
    const EPS: f32 = 0.14;
    let mut blurred = 0;
    for subject in SUBJECTS {
        let original = original(subject);
        // Out of focus: a Gaussian of 1.2 % of the shorter side (3 pixels at the model's
        // scale, where the shorter side is 256).
        let sigma = original.width().min(original.height()) as f32 * 0.012;
        let copy = DynamicImage::ImageRgb8(image::imageops::blur(&original.to_rgb8(), sigma));
        let (o, c) = (ort.embed(&original).unwrap(), ort.embed(&copy).unwrap());
        assert_eq!(
            (o.len(), c.len()),
            (2049, 2049),
            "{subject}: two views of 1024 and the detail"
        );
        for (img, v) in [(&original, &o), (&copy, &c)] {
            let t = tract.embed(img).unwrap();
            for (view, (a, b)) in [(&v[..1024], &t[..1024]), (&v[1024..2048], &t[1024..2048])]
                .into_iter()
                .enumerate()
            {
                let cos = cosine(a, b);
                assert!(
                    cos > 0.999,
                    "{subject}, view {view}: cosine(ort, tract) = {cos}"
                );
            }
            assert_eq!(
                v[2048], t[2048],
                "{subject}: the detail is the crop's, not the model's"
            );
        }
        let (o_seen, o_low, c_seen, c_low) =
            (&o[..1024], &o[1024..2048], &c[..1024], &c[1024..2048]);
        eprintln!(
            "{subject}: detail {:.4} original, {:.4} copy",
            o[2048], c[2048]
        );
        assert!(
            !rule.is_blurred(o[2048]),
            "{subject}: the original is sharp"
        );
        assert!(
            c[2048] < o[2048] / 2.0,
            "{subject}: the blur took most of the detail"
        );
        let (seen, low) = (1.0 - cosine(o_seen, c_seen), 1.0 - cosine(o_low, c_low));
        eprintln!("{subject}: copy to original, as seen {seen:.3}, low-passed {low:.3}");
        assert!(
            low < seen,
            "{subject}: low-passed {low} against as seen {seen}"
        );
        // The pair rule makes them neighbours: by the low-passed views when the copy reads
        // as blurred, else (it kept enough detail) by the views as seen, within eps.
        if rule.is_blurred(c[2048]) {
            blurred += 1;
            assert!(low < rule.eps, "{subject}: low-passed {low}");
        } else {
            assert!(seen < EPS, "{subject}: as seen {seen}");
        }
    }
    assert!(blurred >= 3, "most copies read as blurred: {blurred} of 5");
}

#[test]
fn a_noisy_copy_is_compared_by_its_low_passed_view_and_lies_near_its_photo_there() {
    // Sensor noise of sigma 20 and 30 grey levels on real photos, and on a 176x144 copy: each
    // copy is smoothed, so it has no fine detail to go by (detail 0, blurred for the rule), and
    // low-passed it lies within the rule's eps of its photo, nearer than as seen.
    let ort = ort_relu48(&model(), default_embedding());
    let mut nearer = 0;
    for (k, subject) in SUBJECTS.into_iter().enumerate() {
        let original = original(subject);
        let o = ort.embed(&original).unwrap();
        assert!(o[2048] > 0.015, "{subject}: the original has its detail");
        for sigma in [20.0, 30.0] {
            let copy = with_noise(&original, sigma, 7 + k as u64);
            let c = ort.embed(&copy).unwrap();
            assert_eq!(c[2048], 0.0, "{subject} {sigma}: smoothed, no detail");
            let seen = 1.0 - cosine(&o[..1024], &c[..1024]);
            let low = 1.0 - cosine(&o[1024..2048], &c[1024..2048]);
            eprintln!("{subject} noise {sigma}: as seen {seen:.3}, low-passed {low:.3}");
            assert!(low < 0.16, "{subject} {sigma}: low-passed {low}");
            nearer += usize::from(low < seen);
        }
        // The hardest: a 176x144-sized copy (a phone's video frame), noisy.
        let small = original.resize(176, 144, image::imageops::FilterType::Triangle);
        let c = ort.embed(&with_noise(&small, 20.0, 70 + k as u64)).unwrap();
        let seen = 1.0 - cosine(&o[..1024], &c[..1024]);
        let low = 1.0 - cosine(&o[1024..2048], &c[1024..2048]);
        eprintln!("{subject} small, noise 20: as seen {seen:.3}, low-passed {low:.3}");
        assert!(low < 0.16, "{subject} small: low-passed {low}");
        nearer += usize::from(low < seen);
    }
    assert!(
        nearer >= 12,
        "low-passed, most copies are nearer: {nearer} of 15"
    );
}

#[test]
fn the_prepared_model_embeds_as_the_pinned_one_within_eight_bit_rounding() {
    // The pinned model's view as seen (GeM of its last block) against the prepared model's,
    // which is the same network with 8-bit convolutions.
    let lib = library();
    let seen_only = Preprocess {
        low_pass: None,
        ..default_embedding()
    };
    let options = OrtOptions::new(&lib, 1);
    let pinned = OrtEncoder::load(&model(), "m", "Relu_48", seen_only.clone(), &options).unwrap();
    let prepared =
        OrtEncoder::load(&prepared_model(), "m", "Relu_48", seen_only, &options).unwrap();
    let photos = photos(20);
    let a: Vec<Vec<f32>> = photos
        .iter()
        .map(|(_, i)| pinned.embed(i).unwrap())
        .collect();
    let b: Vec<Vec<f32>> = photos
        .iter()
        .map(|(_, i)| prepared.embed(i).unwrap())
        .collect();
    for ((name, _), (x, y)) in photos.iter().zip(a.iter().zip(&b)) {
        let c = cosine(x, y);
        assert!(c > 0.97, "{name}: cosine(pinned, prepared) = {c}");
    }
    // What clustering reads, the distance between two photos, moves by little.
    let mut moved = Vec::new();
    for i in 0..a.len() {
        for j in i + 1..a.len() {
            moved.push(((1.0 - cosine(&a[i], &a[j])) - (1.0 - cosine(&b[i], &b[j]))).abs());
        }
    }
    moved.sort_by(f32::total_cmp);
    let median = moved[moved.len() / 2];
    let worst = moved[moved.len() - 1];
    eprintln!("pair distances moved: median {median:.4}, most {worst:.4}");
    assert!(
        median < 0.015 && worst < 0.06,
        "median {median}, most {worst}"
    );
}

#[test]
fn the_pinned_model_takes_the_reduced_low_passed_view_cut_to_its_trunk_at_each_size() {
    // The pinned model declares 224 x 224 inputs and ends in a 7 x 7 average pool: ORT gets
    // the graph cut at "Relu_48" and fixed to each size, tract the shape it is given; the two
    // agree, and agree with the prepared model within its 8-bit rounding.
    let bytes = std::fs::read(model()).unwrap();
    let (cut, tensor) = prepare_model(&bytes, "Relu_48", Some((Layout::Nhwc, 128))).unwrap();
    assert_eq!(tensor, "Relu_48:0");
    assert!(cut.len() < bytes.len(), "the classifier head is gone");
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &cut[..])
        .unwrap();
    let graph = proto.graph.unwrap();
    assert_eq!(graph.output.len(), 1);
    use tract_onnx::pb::{tensor_shape_proto::dimension::Value, type_proto::Value as Type};
    let Some(Type::TensorType(t)) = graph.input[0]
        .r#type
        .as_ref()
        .and_then(|t| t.value.as_ref())
    else {
        panic!("the input is a tensor")
    };
    let dims: Vec<_> = t
        .shape
        .as_ref()
        .unwrap()
        .dim
        .iter()
        .map(|d| d.value.clone())
        .collect();
    assert_eq!(
        dims,
        [1, 128, 128, 3].map(|v| Some(Value::DimValue(v))),
        "one image of 128 x 128"
    );
    assert!(
        graph
            .node
            .iter()
            .all(|n| n.op_type != "Softmax" && n.op_type != "AveragePool")
    );
    let ort = ort_relu48(&model(), default_embedding());
    let tract = OnnxEmbedder::load(&model(), "m", "Relu_48", default_embedding()).unwrap();
    let prepared = ort_relu48(&prepared_model(), default_embedding());
    assert!(ort.model_version().ends_with("-gem2-lp5x128"));
    assert_ne!(
        ort.model_version(),
        prepared.model_version(),
        "another file"
    );
    for (name, img) in photos(4) {
        let (o, t, p) = (
            ort.embed(&img).unwrap(),
            tract.embed(&img).unwrap(),
            prepared.embed(&img).unwrap(),
        );
        assert_eq!((o.len(), t.len(), p.len()), (2049, 2049, 2049));
        for (view, range) in [(0, 0..1024), (1, 1024..2048)] {
            let c = cosine(&o[range.clone()], &t[range.clone()]);
            assert!(c > 0.999, "{name}, view {view}: cosine(ort, tract) = {c}");
            let c = cosine(&o[range.clone()], &p[range]);
            assert!(
                c > 0.95,
                "{name}, view {view}: cosine(pinned, prepared) = {c}"
            );
        }
    }
}
