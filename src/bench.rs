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
        backend: settings.embedder.backend.clone(),
        embedders,
        intra_op_threads: threads,
        with_quality,
        photos: done,
        seconds,
        photos_per_second: done as f64 / seconds,
        cpu_seconds: process_cpu_seconds() - cpu0,
    })
}
