//! `media-clustering reembed [--pet ID]`: embeds, with the configured model, every
//! photo that has no embedding for its model version yet, with a progress bar.
//! Jobs do this lazily for their pet; this does it ahead of time for all pets.

use std::sync::atomic::{AtomicUsize, Ordering};

use actors::algo::photo;
use anyhow::Context;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

use crate::adapters::postgres;
use crate::adapters::storage::Storage;
use crate::config::Settings;
use crate::startup::load_model;

pub async fn reembed(settings: &Settings, pet: Option<&str>) -> anyhow::Result<()> {
    let db = postgres::pool(&settings.postgres)?;
    let storage = Storage::from_url(&settings.storage.url).context("opening storage.url")?;
    let model = load_model(settings).await?;
    let version = model.model_version().to_owned();
    let todo = postgres::images_without_embedding(&db, &version, pet).await?;
    println!("model {version}: {} photos to embed", todo.len());
    if todo.is_empty() {
        return Ok(());
    }
    let bar = ProgressBar::new(todo.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("embedding [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")?
            .progress_chars("=> "),
    );
    let failed = AtomicUsize::new(0);
    let decoding = crate::startup::Decoding::from_settings(settings, false)?;
    let threads = settings.actors.embedders.max(1);
    futures::stream::iter(todo)
        .map(|(image_id, key): (Uuid, String)| {
            let (storage, model, db, version, bar, failed) =
                (&storage, model.clone(), &db, &version, &bar, &failed);
            let decoding = decoding.clone();
            async move {
                let result = async {
                    let bytes = storage.get(&key).await?;
                    let (vector, q) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                        Ok(photo::analyse(
                            &bytes,
                            decoding.limits,
                            model.as_ref(),
                            &decoding.budget,
                        )?)
                    })
                    .await??;
                    postgres::insert_embedding(db, image_id, version, &vector, &q).await?;
                    anyhow::Ok(())
                }
                .await;
                if let Err(e) = result {
                    failed.fetch_add(1, Ordering::Relaxed);
                    bar.println(format!("image {image_id}: {e:#}"));
                }
                bar.inc(1);
            }
        })
        .buffer_unordered(threads)
        .collect::<()>()
        .await;
    bar.finish();
    let failed = failed.into_inner();
    if failed > 0 {
        anyhow::bail!("{failed} photos could not be embedded");
    }
    println!("done; the next job of each pet clusters with {version}");
    Ok(())
}
