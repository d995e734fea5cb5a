//! `media-clustering bench cpu-bound`: what the machine can do without the service around it.
//!
//! The configured model (same backend, same intra-op threads) runs on `actors.embedders`
//! threads over a folder of photos, each photo decoded at the scale the embedder uses and
//! preprocessed and embedded exactly as the embedder stage does, with no HTTP, Redis,
//! Postgres, storage or actors in between. `scripts/bench_e2e.py` divides the service's
//! end-to-end photos/s by this figure.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actors::algo::{decode, photo, quality};
use anyhow::Context;
use serde::Serialize;

use crate::config::Settings;
use crate::startup::load_model;

/// The result, printed as one JSON object.
#[derive(Debug, Serialize)]
pub struct CpuBound {
    pub backend: String,
    pub embedders: usize,
    pub intra_op_threads: usize,
    pub with_quality: bool,
    pub photos: usize,
    pub seconds: f64,
    pub photos_per_second: f64,
    /// User + system CPU seconds of the process during the run.
    pub cpu_seconds: f64,
}

/// The photo files of `dir` (JPEG, PNG, WebP by extension), sorted by name.
pub fn photo_files(dir: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                ["jpg", "jpeg", "png", "webp"].contains(&e.to_ascii_lowercase().as_str())
            })
        })
        .collect();
    paths.sort();
    anyhow::ensure!(!paths.is_empty(), "no photos in {}", dir.display());
    paths
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

/// CPU seconds (user + system) this process has used so far.
pub fn process_cpu_seconds() -> f64 {
    // /proc/self/stat fields 14 and 15 (utime, stime) in clock ticks of 1/100 s.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    tick(11) + tick(12)
}

/// Runs every photo at least once and keeps going until `min_seconds` have passed.
pub fn cpu_bound(
    settings: &Settings,
    dir: &Path,
    min_seconds: f64,
    with_quality: bool,
) -> anyhow::Result<CpuBound> {
    let photos = photo_files(dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let model = rt.block_on(load_model(settings))?;
    let embedders = settings.actors.embedders.max(1);
    let threads = settings.embedder.intra_op_threads(embedders)?;
    let max_pixels = settings.server.decode_limits();
    let min_short = photo::source_short_side(model.input_short_side());
    // One untimed pass per thread loads caches and thread pools.
    for bytes in photos.iter().take(embedders) {
        let d = decode::decode_reduced(bytes, max_pixels, min_short)?;
        model.embed(&d.image)?;
    }
    let next = AtomicUsize::new(0);
    let deadline = Duration::from_secs_f64(min_seconds.max(0.0));
    let cpu0 = process_cpu_seconds();
    let t0 = Instant::now();
    let done: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..embedders)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<usize> {
                    let mut n = 0;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= photos.len() && t0.elapsed() >= deadline {
                            return Ok(n);
                        }
                        let d = decode::decode_reduced(
                            &photos[i % photos.len()],
                            max_pixels,
                            min_short,
                        )?;
                        if with_quality {
                            std::hint::black_box(quality::measure_scaled(&d.image, d.pixels()));
                        }
                        std::hint::black_box(model.embed(&d.image)?);
                        n += 1;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("bench thread"))
            .sum::<anyhow::Result<usize>>()
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(CpuBound {
        backend: model.backend().to_owned(),
        embedders,
        intra_op_threads: threads,
        with_quality,
        photos: done,
        seconds,
        photos_per_second: done as f64 / seconds,
        cpu_seconds: process_cpu_seconds() - cpu0,
    })
}

/// Milliseconds of one thread per photo, stage by stage (`bench stages`).
#[derive(Debug, Serialize)]
pub struct Stages {
    pub backend: String,
    pub intra_op_threads: usize,
    pub photos: usize,
    /// Sniffing the format and reading the header (dimensions, orientation).
    pub probe_ms: f64,
    /// The upload check: the embedder's decode, within the decoding budget.
    pub upload_check_ms: f64,
    /// The upload check that also prepares the photo for the embedder (crop and quality
    /// measures): what the API of a `serve` process does by default.
    pub upload_prepare_ms: f64,
    /// The upload's content hash.
    pub sha256_ms: f64,
    /// The embedder's decode, at the reduced scale the model and quality measures allow.
    pub decode_ms: f64,
    pub quality_ms: f64,
    /// Resize, crop and normalise into the model input.
    pub preprocess_ms: f64,
    /// The model's `embed` (preprocessing included, so inference = embed - preprocess).
    pub embed_ms: f64,
    /// Embedding a prepared photo's crop (normalising and inference): all the embedder
    /// does for a photo prepared at upload.
    pub embed_prepared_ms: f64,
}

/// Times each stage over every photo `passes` times, on this thread.
pub fn stages(settings: &Settings, dir: &Path, passes: usize) -> anyhow::Result<Stages> {
    use sha2::Digest;

    let photos = photo_files(dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let model = rt.block_on(load_model(settings))?;
    let (_, _, pre) = settings.embedder.resolve()?;
    let decoding = crate::startup::Decoding::from_settings(settings, false)?;
    let min_short = photo::source_short_side(model.input_short_side());
    let mut total = [0.0f64; 9];
    for pass in 0..=passes.max(1) {
        for bytes in &photos {
            let mut t = Instant::now();
            let mut lap = |i: usize, total: &mut [f64; 9]| {
                if pass > 0 {
                    total[i] += t.elapsed().as_secs_f64();
                }
                t = Instant::now();
            };
            std::hint::black_box(decode::probe(bytes, decoding.limits)?);
            lap(0, &mut total);
            std::hint::black_box(photo::check(
                bytes,
                decoding.limits,
                decoding.preprocess.source_short_side(),
                &decoding.budget,
            )?);
            lap(1, &mut total);
            std::hint::black_box(sha2::Sha256::digest(bytes));
            lap(2, &mut total);
            let d = decode::decode_reduced(bytes, decoding.limits, min_short)?;
            lap(3, &mut total);
            let q = std::hint::black_box(quality::measure_scaled(&d.image, d.pixels()));
            lap(4, &mut total);
            // The service knows the noise from the measures; the crop does not estimate it again.
            let crop = actors::algo::embed::crop(&d.image, &pre, q.noise);
            std::hint::black_box(actors::algo::embed::normalise(&crop.pixels, &pre));
            lap(5, &mut total);
            std::hint::black_box(model.embed(&d.image)?);
            lap(6, &mut total);
            let (.., prepared) = photo::prepare(bytes, decoding.limits, &pre, &decoding.budget)?;
            lap(7, &mut total);
            if model.crop_preprocess().is_some() {
                std::hint::black_box(model.embed_crop(&prepared.crop)?);
            }
            lap(8, &mut total);
        }
    }
    let n = photos.len() * passes.max(1);
    let ms = |i: usize| (total[i] * 1000.0 / n as f64 * 1000.0).round() / 1000.0;
    Ok(Stages {
        backend: model.backend().to_owned(),
        intra_op_threads: settings
            .embedder
            .intra_op_threads(settings.actors.embedders.max(1))?,
        photos: n,
        probe_ms: ms(0),
        upload_check_ms: ms(1),
        upload_prepare_ms: ms(7),
        sha256_ms: ms(2),
        decode_ms: ms(3),
        quality_ms: ms(4),
        preprocess_ms: ms(5),
        embed_ms: ms(6),
        embed_prepared_ms: ms(8),
    })
}

/// Serves `bench bare-api`: every request's body is read (up to `server.max_upload_bytes`)
/// and answered with 202 and a small JSON body, on as many workers as the service uses.
pub async fn bare_api(settings: &Settings, bind: &str) -> anyhow::Result<()> {
    use actix_web::{App, HttpResponse, HttpServer, web};

    async fn accept(body: web::Bytes) -> HttpResponse {
        HttpResponse::Accepted()
            .content_type("application/json")
            .body(format!(r#"{{"received":{}}}"#, body.len()))
    }
    let max_body = settings.server.max_upload_bytes as usize;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::PayloadConfig::new(max_body))
            .default_service(web::to(accept))
    })
    .bind(bind)?
    .run();
    eprintln!("bench bare-api: listening on {bind}");
    server.await?;
    Ok(())
}
