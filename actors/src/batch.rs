//! One batch: the held entries of one pet, run as one clustering.
//!
//! Each step is a message to an actor, in a span that is a child of the batch's CONSUMER span
//! (which continues the newest entry's trace and links the others): take the pet's lock
//! (stream-reader), start the jobs and load the pet (postgres-writer), for each photo without
//! an embedding reserve an embedder slot, read its bytes and embed it, and store the embedding
//! at once (so a retry embeds nothing twice), cluster, pick heroes, commit one version for
//! every job of the batch, acknowledge. A photo that cannot be processed is quarantined and
//! left out; the pet's other photos cluster.
//!
//! [`BatchGuard`] holds the batch's entries, its pet lock, its slot and its in-flight gauge;
//! whatever happens (success, failure, panic, cancellation) its `Drop` hands them back to
//! the scheduler with the outcome.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::{FutureExt, StreamExt, TryStreamExt};
use tracing::{Instrument, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::algo::dbscan::Clustering;
use crate::algo::quality::Quality;
use crate::error::{FailureClass, PipelineError};
use crate::events::{EntryDeadLettered, JobFailed, JobSucceeded, PhotoQuarantined};
use crate::job::JobKind;
use crate::pet_cache::PetClustering;
use crate::pipeline::{Core, Held, PetLease};
use crate::ports::{ClusterOut, ClusteringResult, Delivery, FinalStatus, JobStart, PetImage};
use crate::runtime::faults::FaultPoint;
use crate::runtime::worker::panic_message;
use crate::scheduler::{SchedulerLink, SchedulerMsg};
use crate::stages::*;

/// How a batch ended, for the scheduler.
#[derive(Debug)]
pub enum Outcome {
    /// Every entry is settled (acknowledged or dead-lettered).
    Done,
    /// Another process holds the pet's lock, or this one lost it: try again shortly (no
    /// attempt is spent).
    LockBusy,
    /// A retryable failure (or a panic, or a cancelled batch): try again after a backoff.
    Retry(String),
}

/// What a batch hands back to the scheduler when it ends.
pub struct BatchEnd {
    pub pet_id: String,
    pub outcome: Outcome,
    /// Entries not settled (for a retry); empty when done.
    pub entries: Vec<Held>,
    pub lease: Option<PetLease>,
}

/// The resources of a running batch, returned to the scheduler by `Drop` on every path.
pub struct BatchGuard {
    scheduler: SchedulerLink,
    pub pet_id: String,
    pub entries: Vec<Held>,
    pub lease: Option<PetLease>,
    pub outcome: Option<Outcome>,
    inflight: prometheus::IntGauge,
    counted: i64,
}

impl BatchGuard {
    pub(crate) fn new(
        core: &Core,
        scheduler: SchedulerLink,
        pet_id: String,
        entries: Vec<Held>,
        lease: Option<PetLease>,
    ) -> Self {
        let counted = entries.len() as i64;
        core.metrics.worker_inflight.add(counted);
        BatchGuard {
            scheduler,
            pet_id,
            entries,
            lease,
            outcome: None,
            inflight: core.metrics.worker_inflight.clone(),
            counted,
        }
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        self.inflight.sub(self.counted);
        let outcome = self
            .outcome
            .take()
            .unwrap_or_else(|| Outcome::Retry("the batch was cancelled".into()));
        self.scheduler.tell(SchedulerMsg::Ended(BatchEnd {
            pet_id: std::mem::take(&mut self.pet_id),
            outcome,
            entries: std::mem::take(&mut self.entries),
            lease: self.lease.take(),
        }));
    }
}

/// Runs the batch; its guard reports the outcome when this returns (or is dropped).
pub(crate) async fn run(core: Arc<Core>, mut guard: BatchGuard) {
    let (span, _others) = batch_spans(&core, &guard.entries);
    let result = AssertUnwindSafe(process(&core, &mut guard).instrument(span.clone()))
        .catch_unwind()
        .await;
    guard.outcome = Some(match result {
        Ok(outcome) => outcome,
        Err(p) => {
            let message = panic_message(p.as_ref());
            span.in_scope(|| tracing::error!(reason = %message, "A job panicked; it is retried."));
            core.metrics
                .messages
                .with_label_values(&["pet_scheduler", "panic"])
                .inc();
            Outcome::Retry(format!("the job panicked: {message}"))
        }
    });
}

/// The batch's CONSUMER span continues the trace of its newest entry and links the others;
/// each other entry gets a CONSUMER span of its own in its own trace, linked to the batch's,
/// so every upload's trace shows the processing that completed it.
fn batch_spans(core: &Core, entries: &[Held]) -> (tracing::Span, Vec<tracing::Span>) {
    let s = &core.settings;
    let newest = entries.iter().max_by_key(|h| h.entry.enqueued_at_ms);
    let make = |h: &Held| {
        let span = tracing::info_span!(
            "process",
            otel.name = %format_args!("process {}", s.stream),
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %s.stream,
            messaging.consumer.group.name = %s.group,
            messaging.client.id = %s.consumer,
            messaging.message.id = %h.delivery.stream_id,
            messaging.redis.delivery_count = h.delivery.deliveries,
            messaging.batch.message_count = entries.len(),
            job_id = %h.entry.job_id,
            pet_id = %h.entry.pet_id,
        );
        let cx = extract(&h.delivery);
        let remote = opentelemetry::trace::TraceContextExt::span(&cx)
            .span_context()
            .clone();
        if remote.is_valid() {
            let _ = span.set_parent(cx);
            span.add_link(remote);
        }
        span
    };
    let Some(newest) = newest else {
        return (tracing::Span::none(), Vec::new());
    };
    let main = make(newest);
    let main_cx = opentelemetry::trace::TraceContextExt::span(&main.context())
        .span_context()
        .clone();
    let mut others = Vec::new();
    for h in entries {
        if std::ptr::eq(h, newest) {
            continue;
        }
        let remote = opentelemetry::trace::TraceContextExt::span(&extract(&h.delivery))
            .span_context()
            .clone();
        if remote.is_valid() {
            main.add_link(remote);
        }
        let other = make(h);
        if main_cx.is_valid() {
            other.add_link(main_cx.clone());
        }
        others.push(other);
    }
    (main, others)
}

fn extract(d: &Delivery) -> opentelemetry::Context {
    if d.fields.contains_key("traceparent") {
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&d.fields))
    } else {
        opentelemetry::Context::new()
    }
}

async fn process(core: &Arc<Core>, g: &mut BatchGuard) -> Outcome {
    if g.lease.is_none() {
        match core
            .readers
            .send(RedisOp::LockPet {
                pet_id: g.pet_id.clone(),
            })
            .await
        {
            Ok(RedisReply::Locked(true)) => {
                // The lock is ours; its fencing token makes a commit of a batch that loses
                // it (and whose pet another worker takes) fail instead of overwriting.
                let take = DbOp::TakeFence {
                    pet_id: g.pet_id.clone(),
                };
                let fence = match core.writers.send(take).await {
                    Ok(DbReply::Fence(f)) => f,
                    other => {
                        // Release the lock we just took.
                        drop(PetLease::new(g.pet_id.clone(), 0, core));
                        return Outcome::Retry(format!(
                            "taking the pet's fencing token: {other:?}"
                        ));
                    }
                };
                g.lease = Some(PetLease::new(g.pet_id.clone(), fence, core));
            }
            Ok(RedisReply::Locked(false)) => return Outcome::LockBusy,
            Ok(other) => {
                return Outcome::Retry(format!("unexpected stream-reader reply {other:?}"));
            }
            Err(e) => return Outcome::Retry(e.to_string()),
        }
    }
    core.faults.hit(FaultPoint::Job);
    let deadline = core.settings.job_timeout;
    let error = match tokio::time::timeout(deadline, run_jobs(core, g)).await {
        Ok(Ok(())) => return Outcome::Done,
        Ok(Err(e)) => e,
        Err(_) => PipelineError::DeadlineExceeded(deadline.as_millis() as u64),
    };
    if let PipelineError::LeaseLost(why) = &error {
        tracing::warn!(reason = %why, "The job lost its pet's lock; it gives up and is tried again later.");
        // The lock is not ours any more: releasing it must not touch the holder's.
        return Outcome::LockBusy;
    }
    let ids: Vec<Uuid> = g.entries.iter().map(|h| h.entry.job_id).collect();
    match error.class() {
        FailureClass::Retryable if *core.reading_stopped.borrow() => {
            // Shutting down: hand the jobs back; their entries stay pending in the stream.
            let requeue = DbOp::Requeue {
                job_ids: ids,
                error: error.to_string(),
            };
            if let Err(e) = core.writers.send(requeue).await {
                tracing::warn!(error = %e, "Putting jobs back to queued failed.");
            }
            tracing::warn!(error = %error, "Jobs handed back on shutdown.");
            g.entries.clear();
            Outcome::Done
        }
        FailureClass::Retryable => Outcome::Retry(error.to_string()),
        FailureClass::Permanent | FailureClass::Poison => {
            let message = error.to_string();
            let finish = DbOp::Finish {
                job_ids: ids.clone(),
                status: FinalStatus::Failed,
                error: message.clone(),
            };
            if let Err(e) = core.writers.send(finish).await {
                return Outcome::Retry(e.to_string());
            }
            for id in ids {
                JobFailed {
                    job_id: id,
                    error: &message,
                }
                .emit(&core.metrics);
            }
            ack(core, &std::mem::take(&mut g.entries)).await;
            Outcome::Done
        }
    }
}

fn unexpected<T>(actor: &str, reply: impl std::fmt::Debug) -> Result<T, PipelineError> {
    Err(PipelineError::permanent(format!(
        "unexpected {actor} reply {reply:?}"
    )))
}

async fn db(core: &Core, op: DbOp) -> Result<DbReply, PipelineError> {
    core.writers.send(op).await
}

/// The batch's steps; `g.entries` keeps every entry not yet settled, so that a failure hands
/// them all back.
async fn run_jobs(core: &Arc<Core>, g: &mut BatchGuard) -> Result<(), PipelineError> {
    let asked: Vec<(Uuid, String)> = g
        .entries
        .iter()
        .map(|h| (h.entry.job_id, h.delivery.stream_id.clone()))
        .collect();
    let starts = match db(core, DbOp::StartJobs { jobs: asked }).await? {
        DbReply::Started(s) if s.len() == g.entries.len() => s,
        other => return unexpected("postgres-writer", other),
    };
    let mut finished = Vec::new();
    let mut unknown = Vec::new();
    let mut running = Vec::new();
    for (h, start) in std::mem::take(&mut g.entries).into_iter().zip(starts) {
        match start {
            JobStart::Started { .. } => running.push(h),
            JobStart::AlreadyFinished => finished.push(h),
            JobStart::Unknown => unknown.push(h),
        }
    }
    g.entries = running;
    if !finished.is_empty() {
        tracing::info!(
            jobs = finished.len(),
            "Jobs already finished; acknowledging the redelivery."
        );
        ack(core, &finished).await;
    }
    for h in unknown {
        dead_letter_one(core, &h.delivery, None, "no job row with this job_id").await;
    }
    if g.entries.is_empty() {
        return Ok(());
    }

    let model_version = core.model_version.clone();
    let settings = &core.settings;
    let recluster = g.entries.iter().any(|h| h.entry.kind == JobKind::Recluster);
    // The pet's clustering as this process last left it: only the photos it lacks are read
    // and assigned (incremental clustering).
    let held = core.clusterings.take(
        &g.pet_id,
        &model_version,
        &settings.params,
        settings.time_rule.as_ref(),
    );
    let images = match db(
        core,
        DbOp::LoadPet {
            pet_id: g.pet_id.clone(),
            model_version: model_version.clone(),
            held: held.as_ref().map(|h| h.ids.clone()).unwrap_or_default(),
        },
    )
    .await?
    {
        DbReply::Images(i) => i,
        other => return unexpected("postgres-writer", other),
    };
    let fresh = embed_missing(core, &images).await?;

    let still: HashSet<Uuid> = images
        .iter()
        .filter(|i| i.held)
        .map(|i| i.image_id)
        .collect();
    let mut add_ids = Vec::new();
    // Sized once: grown by doubling, a large pet's vectors would be copied and held twice.
    let values: usize = images
        .iter()
        .enumerate()
        .filter_map(|(i, img)| added(img, fresh.get(&i)))
        .map(|(v, _)| v.len())
        .sum();
    let mut add_vectors: Vec<f32> = Vec::with_capacity(values);
    let mut add_qualities = Vec::new();
    let mut add_times = Vec::new();
    // By value, so each photo's stored vector is freed once copied.
    for (i, img) in images.into_iter().enumerate() {
        let Some((v, q)) = added(&img, fresh.get(&i)) else {
            continue;
        };
        add_vectors.extend_from_slice(v);
        add_qualities.push(q);
        add_ids.push(img.image_id);
        add_times.push(img.captured_at_ms);
    }
    // Held photos still the pet's; `keep` lists them when some left.
    let (held_clustering, keep, mut ids, mut qualities, scored) = match held {
        Some(h) => {
            let kept: Vec<usize> = (0..h.ids.len())
                .filter(|&i| still.contains(&h.ids[i]))
                .collect();
            if kept.len() == h.ids.len() {
                (Some(h.clustering), None, h.ids, h.qualities, h.scored)
            } else {
                let ids = kept.iter().map(|&i| h.ids[i]).collect();
                let qualities = kept.iter().map(|&i| h.qualities[i]).collect();
                (Some(h.clustering), Some(kept), ids, qualities, h.scored)
            }
        }
        None => (None, None, Vec::new(), Vec::new(), Vec::new()),
    };
    let dim = held_clustering
        .as_ref()
        .map(Clustering::dim)
        .filter(|_| add_ids.is_empty())
        .unwrap_or_else(|| add_vectors.len() / add_ids.len().max(1));
    ids.extend(add_ids.iter().copied());
    qualities.extend(add_qualities);
    let n_images = ids.len();
    let clusters = if ids.is_empty() {
        Vec::new()
    } else {
        let add = ndarray::Array2::from_shape_vec((add_ids.len(), dim), add_vectors)
            .map_err(|e| PipelineError::permanent(format!("embeddings of one length: {e}")))?;
        let (clustering, assigned) = core
            .clusterers
            .send(ClusterVectors {
                held: held_clustering,
                keep,
                add,
                add_times,
                recluster,
                params: settings.params,
                time_rule: settings.time_rule,
            })
            .await?;
        core.metrics
            .clusterings
            .with_label_values(&[assigned.as_str()])
            .inc();
        // A cluster with exactly the members it had last time has the same scores: only the
        // others go to the hero selector.
        let mut previous: HashMap<Uuid, ClusterOut> = scored
            .into_iter()
            .map(|c| (c.members[0].image_id, c))
            .collect();
        let mut clusters: Vec<Option<ClusterOut>> = Vec::new();
        let mut changed: Vec<Vec<usize>> = Vec::new();
        for group in clustering.groups() {
            let same = previous.remove(&ids[group[0]]).filter(|c| {
                c.members.len() == group.len()
                    && c.members
                        .iter()
                        .zip(&group)
                        .all(|(m, &i)| m.image_id == ids[i])
            });
            if same.is_none() {
                changed.push(group);
            }
            clusters.push(same);
        }
        drop(previous);
        let clustering = Arc::new(clustering);
        let ids = Arc::new(ids);
        let qualities = Arc::new(qualities);
        let mut fresh = core
            .heroes
            .send(PickHeroes {
                ids: ids.clone(),
                clustering: clustering.clone(),
                qualities: qualities.clone(),
                clusters: changed,
            })
            .await?
            .into_iter();
        let clusters: Vec<ClusterOut> = clusters
            .into_iter()
            .map(|c| {
                c.or_else(|| fresh.next())
                    .expect("a score for every changed cluster")
            })
            .collect();
        // The hero selector has let go of its references: keep the clustering for the next job.
        if let (Ok(clustering), Ok(ids), Ok(qualities)) = (
            Arc::try_unwrap(clustering),
            Arc::try_unwrap(ids),
            Arc::try_unwrap(qualities),
        ) {
            core.clusterings.put(
                g.pet_id.clone(),
                PetClustering {
                    model_version: model_version.clone(),
                    ids,
                    qualities,
                    clustering,
                    scored: clusters.clone(),
                },
            );
        }
        clusters
    };
    let n_clusters = clusters.len();
    let newest = g
        .entries
        .iter()
        .max_by_key(|h| h.entry.enqueued_at_ms)
        .map(|h| h.entry.job_id)
        .expect("a batch with running jobs");
    let lease = g
        .lease
        .as_ref()
        .expect("a running batch holds its pet's lease");
    if lease.is_lost() {
        return Err(PipelineError::LeaseLost(
            "a keep-alive found the lock held by another worker or gone".into(),
        ));
    }
    let result = ClusteringResult {
        pet_id: g.pet_id.clone(),
        fence: lease.fence,
        job_ids: g.entries.iter().map(|h| h.entry.job_id).collect(),
        version_job: newest,
        model_version: model_version.clone(),
        params: core.settings.params,
        clusters,
    };
    let version = match db(core, DbOp::Commit(Box::new(result))).await? {
        DbReply::Committed { version } => version,
        other => return unexpected("postgres-writer", other),
    };
    let settled = std::mem::take(&mut g.entries);
    ack(core, &settled).await;
    for h in &settled {
        JobSucceeded {
            job_id: h.entry.job_id,
            model_version: &model_version,
            version,
            batch: settled.len(),
            clusters: n_clusters,
            images: n_images,
            elapsed: h.received.elapsed(),
        }
        .emit(&core.metrics);
    }
    Ok(())
}

/// Embeds every photo without a cached embedding; `None` for a photo that was quarantined.
/// At most `embedders + 1` of a batch's photos are in the embedders' mailbox or in their
/// hands at once (every embedder busy and one photo ready behind them, so batches of other
/// pets interleave instead of queueing behind a big one), and a photo's bytes are read only
/// once it has a mailbox slot (so all batches together hold at most `embedders +
/// mailbox_capacity` photos).
/// The vector and quality a job adds to its clustering for one of the pet's photos: stored, or
/// embedded by this job (`fresh`, [`embed_missing`]); none for a photo the clustering holds
/// already or one quarantined.
fn added<'a>(
    img: &'a PetImage,
    fresh: Option<&'a Option<Embedded>>,
) -> Option<(&'a [f32], Quality)> {
    match (&img.cached, fresh) {
        _ if img.held => None,
        (Some((v, q)), _) => Some((v, *q)),
        (None, Some(Some(e))) => Some((&e.vector, e.quality)),
        (None, _) => None, // quarantined
    }
}

async fn embed_missing(
    core: &Arc<Core>,
    images: &[PetImage],
) -> Result<HashMap<usize, Option<Embedded>>, PipelineError> {
    let window = core.settings.counts.embedders.max(1) + 1;
    futures::stream::iter(
        images
            .iter()
            .enumerate()
            .filter(|(_, i)| i.cached.is_none() && !i.held),
    )
    .map(|(i, img)| async move {
        let slot = core.embedders.reserve().await?;
        let input = match photo_input(core, img).await {
            Ok(input) => input,

            Err(e) if e.class() == FailureClass::Poison => {
                drop(slot);
                quarantine(core, img.image_id, &e.to_string()).await?;
                return Ok((i, None));
            }
            Err(e) => return Err(e),
        };
        let embedded = slot
            .send(EmbedPhoto {
                image_id: img.image_id,
                input,
            })
            .await;
        match embedded {
            Ok(e) => {
                let store = DbOp::StoreEmbedding {
                    image_id: img.image_id,
                    model_version: core.model_version.clone(),
                    vector: e.vector.clone(),
                    quality: e.quality,
                };
                db(core, store).await?;
                Ok((i, Some(e)))
            }
            Err(e) if e.class() == FailureClass::Poison => {
                quarantine(core, img.image_id, &e.to_string()).await?;
                Ok((i, None))
            }
            Err(e) => Err(e),
        }
    })
    .buffer_unordered(window)
    .try_collect()
    .await
}

/// What the embedder gets for a photo: what this process's API prepared of it
/// ([`crate::algo::prepared`]) when that is still there and made for this model, else the
/// original's bytes.
async fn photo_input(core: &Core, img: &PetImage) -> Result<PhotoInput, PipelineError> {
    let prepared = core
        .prepared
        .as_ref()
        .zip(core.crop_preprocess.as_ref())
        .and_then(|(cache, pre)| cache.take(img.image_id, pre));
    let input = |kind: &str| {
        core.metrics
            .embedder_inputs
            .with_label_values(&[kind])
            .inc()
    };
    if let Some(p) = prepared {
        input("prepared");
        return Ok(PhotoInput::Prepared(p));
    }
    input("original");
    let bytes = core
        .blobs
        .get(&img.storage_key)
        .instrument(tracing::info_span!(
            "blob.get",
            otel.name = "GET object",
            otel.kind = "client",
            image_id = %img.image_id,
            bytes = field::Empty,
        ))
        .await?;
    Ok(PhotoInput::Encoded(bytes))
}

async fn quarantine(core: &Core, image_id: Uuid, error: &str) -> Result<(), PipelineError> {
    db(
        core,
        DbOp::Quarantine {
            image_id,
            error: error.to_owned(),
        },
    )
    .await?;
    PhotoQuarantined { image_id, error }.emit();
    Ok(())
}

/// Acknowledges settled entries. A failure is only logged: the results are committed, and a
/// redelivery finds the jobs finished and acknowledges them then.
async fn ack(core: &Core, entries: &[Held]) {
    if entries.is_empty() {
        return;
    }
    let stream_ids = entries
        .iter()
        .map(|h| h.delivery.stream_id.clone())
        .collect();
    if let Err(e) = core.readers.send(RedisOp::Ack { stream_ids }).await {
        tracing::warn!(error = %e, "Acknowledging entries failed; a redelivery acknowledges them.");
    }
}

/// Marks the entries' jobs dead-lettered and moves the entries to the dead-letter stream.
pub(crate) async fn dead_letter(core: &Core, entries: Vec<Held>, error: &str) {
    let ids: Vec<Uuid> = entries.iter().map(|h| h.entry.job_id).collect();
    let finish = DbOp::Finish {
        job_ids: ids,
        status: FinalStatus::DeadLettered,
        error: error.to_owned(),
    };
    if let Err(e) = core.writers.send(finish).await {
        tracing::warn!(error = %e, "Marking jobs dead-lettered failed.");
    }
    for h in entries {
        dead_letter_one(core, &h.delivery, Some(h.entry.job_id), error).await;
    }
}

/// Moves one entry to the dead-letter stream (its job row, if any, is the caller's).
pub(crate) async fn dead_letter_one(core: &Core, d: &Delivery, job_id: Option<Uuid>, error: &str) {
    let op = RedisOp::DeadLetter {
        delivery: d.clone(),
        error: error.to_owned(),
    };
    match core.readers.send(op).await {
        Ok(_) => EntryDeadLettered {
            stream_id: &d.stream_id,
            job_id,
            deliveries: d.deliveries,
            error,
        }
        .emit(&core.metrics),
        Err(e) => {
            tracing::error!(stream_id = %d.stream_id, error = %e, "Dead-lettering the entry failed; it stays pending.")
        }
    }
}
