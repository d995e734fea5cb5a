//! `media-clustering upload`: posts photos in batches with a progress bar,
//! waits for the last job, and prints the pet's clusters with each hero marked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

pub struct UploadOptions {
    pub server: String,
    pub token: String,
    pub pet: String,
    pub paths: Vec<PathBuf>,
    pub batch: usize,
    pub wait: bool,
    pub timeout_secs: u64,
}

#[derive(Deserialize)]
struct Accepted {
    job_id: String,
    images: Vec<AcceptedImage>,
}

#[derive(Deserialize)]
struct AcceptedImage {
    image_id: String,
    duplicate: bool,
}

#[derive(Deserialize)]
struct Job {
    status: String,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Clustering {
    version: i64,
    model_version: String,
    clusters: Vec<Cluster>,
}

#[derive(Deserialize)]
struct Cluster {
    cluster_id: String,
    hero_image_id: String,
    image_ids: Vec<String>,
}

const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp"];

/// Files named on the command line, and the photos inside named folders (sorted).
pub fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && has_photo_extension(f))
                .collect();
            inside.sort();
            out.extend(inside);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("{} does not exist", p.display());
        }
    }
    Ok(out)
}

fn has_photo_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

async fn error_text(r: reqwest::Response) -> String {
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    format!("{status}: {body}")
}

pub async fn upload(o: UploadOptions) -> anyhow::Result<()> {
    let files = collect_files(&o.paths)?;
    if files.is_empty() {
        bail!("no photos found (looked for {})", EXTENSIONS.join(", "));
    }
    // Idle connections are dropped before the server's keep-alive ends, so a request
    // never races the server closing the connection it reuses.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_idle_timeout(Duration::from_secs(2))
        .build()?;
    let base = o.server.trim_end_matches('/');
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} photos ({elapsed})")?
            .progress_chars("=> "),
    );
    bar.set_message("uploading");
    let mut names: HashMap<String, String> = HashMap::new();
    let mut last_job = None;
    let mut duplicates = 0;
    for chunk in files.chunks(o.batch.max(1)) {
        let mut form = reqwest::multipart::Form::new();
        for f in chunk {
            let bytes = tokio::fs::read(f)
                .await
                .with_context(|| format!("reading {}", f.display()))?;
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            form = form.part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name(name),
            );
        }
        let r = http
            .post(format!("{base}/v1/pets/{}/images", o.pet))
            .bearer_auth(&o.token)
            .multipart(form)
            .send()
            .await
            .with_context(|| format!("posting to {base}"))?;
        if r.status() != reqwest::StatusCode::ACCEPTED {
            bar.abandon();
            bail!("upload refused: {}", error_text(r).await);
        }
        let a: Accepted = r.json().await?;
        for (f, img) in chunk.iter().zip(&a.images) {
            duplicates += usize::from(img.duplicate);
            names.insert(
                img.image_id.clone(),
                f.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
        last_job = Some(a.job_id);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_with_message("uploaded");
    let job = last_job.expect("at least one batch");
    println!(
        "{} photos uploaded ({duplicates} already known); job {job}",
        files.len()
    );
    if !o.wait {
        return Ok(());
    }

    let spinner = ProgressBar::new_spinner();
    spinner.set_message(format!("waiting for job {job}"));
    let deadline = Instant::now() + Duration::from_secs(o.timeout_secs);
    let status = loop {
        let r = http
            .get(format!("{base}/v1/jobs/{job}"))
            .bearer_auth(&o.token)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("job status: {}", error_text(r).await);
        }
        let j: Job = r.json().await?;
        spinner.set_message(format!("job {job}: {}", j.status));
        if ["succeeded", "failed", "dead_lettered"].contains(&j.status.as_str()) {
            break j;
        }
        if Instant::now() > deadline {
            bail!("job {job} still {} after {} s", j.status, o.timeout_secs);
        }
        spinner.tick();
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    spinner.finish_and_clear();
    if status.status != "succeeded" {
        bail!(
            "job {job} {}: {}",
            status.status,
            status.error.unwrap_or_default()
        );
    }

    let r = http
        .get(format!("{base}/v1/pets/{}/clusters", o.pet))
        .bearer_auth(&o.token)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("clusters: {}", error_text(r).await);
    }
    let c: Clustering = r.json().await?;
    println!(
        "pet {}: {} clusters (version {}, model {})",
        o.pet,
        c.clusters.len(),
        c.version,
        c.model_version
    );
    for (i, cl) in c.clusters.iter().enumerate() {
        println!(
            "\ncluster {} ({}) - {} photos",
            i + 1,
            cl.cluster_id,
            cl.image_ids.len()
        );
        for id in &cl.image_ids {
            let name = names.get(id).map(String::as_str).unwrap_or(id);
            let mark = if *id == cl.hero_image_id {
                "  * hero"
            } else {
                ""
            };
            println!("  {name}{mark}");
        }
    }
    Ok(())
}
