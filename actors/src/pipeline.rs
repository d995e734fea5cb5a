//! Drives jobs from the stream through the actors: read → embed (fanned out
//! across the embedders) → cluster → pick heroes → write → acknowledge.
//!
//! Each job runs in a CONSUMER span continuing the trace whose context came in
//! the entry's `traceparent`; each actor hop is a child span of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::{Actor, Arbiter};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{Instrument, field};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::algo::cluster::ClusterParams;
use crate::algo::embed::ImageEncoder;
use crate::error::PipelineError;
use crate::events::{EntryDeadLettered, JobFailed, JobRetried, JobSucceeded};
use crate::job::JobEntry;
use crate::metrics::metrics;
use crate::ports::{BlobStore, ClusteringResult, Delivery, FinalStatus, JobQueue, JobStart, Store};
use crate::runtime::supervisor::{Supervisor, start_async, start_sync};
use crate::runtime::{ActorKind, Pool};
use crate::stages::*;

/// How many instances of each actor kind run.
#[derive(Debug, Clone, Copy)]
pub struct ActorCounts {
    pub stream_readers: usize,
    pub embedders: usize,
    pub clusterers: usize,
    pub hero_selectors: usize,
    pub postgres_writers: usize,
}

#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub stream: String,
    pub group: String,
    /// Unique per process (`host-pid-random`).
    pub consumer: String,
    pub block_ms: u64,
    /// Entries idle this long in another consumer's hands are reclaimed.
    pub claim_min_idle_ms: u64,
    pub max_deliveries: u32,
    /// First retry backoff; doubles per attempt, with jitter.
    pub retry_base: Duration,
    pub counts: ActorCounts,
    pub mailbox_capacity: usize,
    pub max_inflight_jobs: usize,
    pub params: ClusterParams,
    pub max_pixels: u64,
}

/// The worlds the pipeline talks to.
#[derive(Clone)]
pub struct Ports {
    pub queue: Arc<dyn JobQueue>,
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
}

struct Pipeline {
    settings: PipelineSettings,
    ports: Ports,
    model_version: String,
    readers: Pool<ReadBatch>,
    embedders: Pool<EmbedPhoto>,
    clusterers: Pool<ClusterVectors>,
    heroes: Pool<PickHeroes>,
    writers: Pool<WriteOp>,
    inflight: Arc<Semaphore>,
    pet_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Stream ids being processed here, kept alive against reclaiming.
    in_flight: Mutex<std::collections::HashSet<String>>,
    /// Pets whose cross-process lock this worker holds, kept alive like the entries.
    held_pets: Mutex<std::collections::HashSet<String>>,
    stop: watch::Receiver<bool>,
}

/// A running pipeline; dropping it does not stop it, [`PipelineHandle::shutdown`] does.
pub struct PipelineHandle {
    stop: watch::Sender<bool>,
    inflight: Arc<Semaphore>,
    max_inflight: u32,
    arbiter: Arbiter,
}

impl PipelineHandle {
    /// Stops reading, waits up to `timeout` for in-flight jobs to finish, and returns
    /// whether they all did. Unfinished entries stay pending for another consumer.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        let _ = self.stop.send(true);
        let drained = tokio::time::timeout(timeout, self.inflight.acquire_many(self.max_inflight))
            .await
            .is_ok();
        self.arbiter.stop();
        drained
    }
}

/// Starts the actors and the read loops. Must run inside an actix `System`.
pub fn start(
    settings: PipelineSettings,
    ports: Ports,
    model: Arc<dyn ImageEncoder>,
) -> PipelineHandle {
    let c = settings.counts;
    let cap = settings.mailbox_capacity;
    let io = Arbiter::new();
    let handle = io.handle();
    let (q, consumer, block_ms) = (
        ports.queue.clone(),
        settings.consumer.clone(),
        settings.block_ms,
    );
    let readers = start_async(c.stream_readers, cap, &handle, move || StreamReader {
        queue: q.clone(),
        consumer: consumer.clone(),
        block_ms,
    });
    let (m, max_pixels) = (model.clone(), settings.max_pixels);
    let embedders = start_sync(c.embedders, cap, move || Embedder {
        model: m.clone(),
        max_pixels,
    });
    let clusterers = start_sync(c.clusterers, cap, || Clusterer);
    let heroes = start_sync(c.hero_selectors, cap, || HeroSelector);
    let store = ports.store.clone();
    let writers = start_async(c.postgres_writers, cap, &handle, move || PostgresWriter {
        store: store.clone(),
    });
    let expected = vec![
        (ActorKind::StreamReader, c.stream_readers.max(1)),
        (ActorKind::Embedder, c.embedders.max(1)),
        (ActorKind::Clusterer, c.clusterers.max(1)),
        (ActorKind::HeroSelector, c.hero_selectors.max(1)),
        (ActorKind::PostgresWriter, c.postgres_writers.max(1)),
    ];
    Supervisor::start_in_arbiter(&handle, move |_| Supervisor::new(expected));

    crate::metrics::register_model_version(model.model_version());
    let max_inflight = settings.max_inflight_jobs.max(1);
    let inflight = Arc::new(Semaphore::new(max_inflight));
    let (stop_tx, stop_rx) = watch::channel(false);
    let pipeline = Arc::new(Pipeline {
        model_version: model.model_version().to_owned(),
        settings,
        ports,
        readers,
        embedders,
        clusterers,
        heroes,
        writers,
        inflight: inflight.clone(),
        pet_locks: Mutex::default(),
        in_flight: Mutex::default(),
        held_pets: Mutex::default(),
        stop: stop_rx,
    });
    for _ in 0..c.stream_readers.max(1) {
        handle.spawn(read_loop(pipeline.clone()));
    }
    handle.spawn(keep_alive_loop(pipeline.clone()));
    handle.spawn(depth_loop(pipeline));
    PipelineHandle {
        stop: stop_tx,
        inflight,
        max_inflight: max_inflight as u32,
        arbiter: io,
    }
}

/// How often the reaper looks for entries idle in other consumers' hands.
fn reclaim_interval(s: &PipelineSettings) -> Duration {
    Duration::from_millis((s.claim_min_idle_ms / 4).clamp(250, 10_000))
}

async fn read_loop(p: Arc<Pipeline>) {
    let mut stop = p.stop.clone();
    let mut failures = 0u32;
    // Reclaim first: a restarted worker finishes what a crashed one left.
    let mut last_reclaim: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        // Read only as many entries as there are free in-flight slots.
        let first = tokio::select! {
            permit = p.inflight.clone().acquire_owned() => match permit { Ok(x) => x, Err(_) => break },
            _ = stop.changed() => break,
        };
        let mut permits = vec![first];
        while permits.len() < 16 {
            match p.inflight.clone().try_acquire_owned() {
                Ok(x) => permits.push(x),
                Err(_) => break,
            }
        }
        let mode = if last_reclaim.is_none_or(|t| t.elapsed() >= reclaim_interval(&p.settings)) {
            last_reclaim = Some(Instant::now());
            ReadMode::Reclaim {
                min_idle_ms: p.settings.claim_min_idle_ms,
            }
        } else {
            ReadMode::New
        };
        match p
            .readers
            .send(ReadBatch {
                count: permits.len(),
                mode,
            })
            .await
        {
            Ok(batch) => {
                failures = 0;
                for d in batch {
                    if !p
                        .in_flight
                        .lock()
                        .expect("in-flight set")
                        .insert(d.stream_id.clone())
                    {
                        continue; // already being processed here
                    }
                    let Some(permit) = permits.pop() else { break };
                    actix::spawn(process(p.clone(), d, permit));
                }
            }
            Err(e) => {
                failures += 1;
                let backoff = backoff(Duration::from_millis(200), failures.min(6));
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "Reading the jobs stream failed; backing off.");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {},
                    _ = stop.changed() => break,
                }
            }
        }
    }
}

/// Refreshes the idle time of entries in flight here, so a slow job is never reclaimed
/// and run twice; now and then removes consumers that left nothing pending.
async fn keep_alive_loop(p: Arc<Pipeline>) {
    let mut stop = p.stop.clone();
    let every = Duration::from_millis((p.settings.claim_min_idle_ms / 3).max(100));
    let prune_idle_ms = (p.settings.claim_min_idle_ms * 10).max(60_000);
    let mut last_prune = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {},
            _ = stop.changed() => break,
        }
        let ids: Vec<String> = p
            .in_flight
            .lock()
            .expect("in-flight set")
            .iter()
            .cloned()
            .collect();
        if !ids.is_empty()
            && let Err(e) = p.ports.queue.keep_alive(&p.settings.consumer, &ids).await
        {
            tracing::warn!(error = %e, "Refreshing in-flight entries failed.");
        }
        let pets: Vec<String> = p
            .held_pets
            .lock()
            .expect("held pets")
            .iter()
            .cloned()
            .collect();
        for pet in pets {
            let ttl = p.settings.claim_min_idle_ms;
            if let Err(e) = p
                .ports
                .queue
                .refresh_pet(&pet, &p.settings.consumer, ttl)
                .await
            {
                tracing::warn!(error = %e, "Refreshing a pet's lock failed.");
            }
        }
        if last_prune.elapsed() >= Duration::from_millis(prune_idle_ms) {
            last_prune = Instant::now();
            match p
                .ports
                .queue
                .prune_consumers(&p.settings.consumer, prune_idle_ms)
                .await
            {
                Ok(n) if n > 0 => {
                    tracing::info!(removed = n, "Removed idle consumers with nothing pending.")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "Pruning idle consumers failed."),
            }
        }
    }
}

/// Publishes the stream's lag and pending counts, and trims acknowledged entries.
async fn depth_loop(p: Arc<Pipeline>) {
    let mut stop = p.stop.clone();
    let mut rounds = 0u64;
    loop {
        rounds += 1;
        if rounds % 10 == 1 {
            match p.ports.queue.trim().await {
                Ok(n) if n > 0 => tracing::debug!(removed = n, "Trimmed acknowledged entries."),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "Trimming the jobs stream failed."),
            }
        }
        if let Ok(d) = p.ports.queue.depth().await {
            metrics()
                .pending_jobs
                .with_label_values(&["lag"])
                .set(d.lag);
            metrics()
                .pending_jobs
                .with_label_values(&["pending"])
                .set(d.pending);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {},
            _ = stop.changed() => break,
        }
    }
}

/// Exponential backoff with full jitter between half and the whole step.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let step = base.saturating_mul(1 << attempt.saturating_sub(1).min(10));
    let jitter = rand::random::<f64>() * 0.5 + 0.5;
    step.mul_f64(jitter)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn process(p: Arc<Pipeline>, d: Delivery, _permit: OwnedSemaphorePermit) {
    let span = tracing::info_span!(
        "process media:cluster:jobs",
        otel.kind = "consumer",
        messaging.system = "redis",
        messaging.operation.type = "process",
        messaging.destination.name = %p.settings.stream,
        messaging.consumer.group.name = %p.settings.group,
        messaging.message.id = %d.stream_id,
        messaging.redis.delivery_count = d.deliveries,
        job_id = field::Empty,
        pet_id = field::Empty,
    );
    if d.fields.contains_key("traceparent") {
        let cx = opentelemetry::global::get_text_map_propagator(|prop| prop.extract(&d.fields));
        let _ = span.set_parent(cx);
    }
    metrics().worker_inflight.inc();
    process_entry(&p, &d).instrument(span).await;
    metrics().worker_inflight.dec();
    p.in_flight
        .lock()
        .expect("in-flight set")
        .remove(&d.stream_id);
}

async fn process_entry(p: &Pipeline, d: &Delivery) {
    let entry = match JobEntry::parse(&d.fields) {
        Ok(e) => e,
        Err(e) => {
            dead_letter(p, d, None, &format!("malformed entry: {e}")).await;
            return;
        }
    };
    let span = tracing::Span::current();
    span.record("job_id", field::display(entry.job_id));
    span.record("pet_id", entry.pet_id.as_str());
    if d.deliveries > u64::from(p.settings.max_deliveries) {
        let msg = format!(
            "delivered {} times, more than redis.max_deliveries ({})",
            d.deliveries, p.settings.max_deliveries
        );
        dead_letter(p, d, Some(entry.job_id), &msg).await;
        return;
    }
    if d.deliveries == 1 {
        metrics()
            .job_queue_wait
            .observe((now_ms() - entry.enqueued_at_ms).max(0) as f64 / 1e3);
    }

    // Jobs of one pet never run at once in this process.
    let lock = p
        .pet_locks
        .lock()
        .expect("pet lock map")
        .entry(entry.pet_id.clone())
        .or_default()
        .clone();
    let guard = lock.lock().await;
    // Nor across processes: the pet's lock in the queue, held while the job runs. When the
    // worker stops while waiting for it, the entry stays pending for another consumer.
    let locked = take_pet_lock(p, &entry.pet_id).await;
    let started = Instant::now();
    let mut attempt = (d.deliveries as u32).max(1);
    loop {
        if !locked {
            break;
        }
        match run_once(p, &entry, d).await {
            Ok(Some((version, clusters, images))) => {
                if ack(p, d).await {
                    JobSucceeded {
                        job_id: entry.job_id,
                        model_version: &p.model_version,
                        version,
                        clusters,
                        images,
                        elapsed: started.elapsed(),
                    }
                    .emit();
                }
                break;
            }
            Ok(None) => {
                ack(p, d).await;
                break;
            }
            Err(e)
                if e.is_retryable() && attempt < p.settings.max_deliveries && !*p.stop.borrow() =>
            {
                let wait = backoff(p.settings.retry_base, attempt);
                JobRetried {
                    job_id: entry.job_id,
                    attempt,
                    backoff: wait,
                    error: &e.to_string(),
                }
                .emit();
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(e) if e.is_retryable() && *p.stop.borrow() => {
                // Handed back: the entry stays pending and another consumer reclaims it.
                let _ = p
                    .writers
                    .send(WriteOp::Requeue {
                        job_id: entry.job_id,
                        error: e.to_string(),
                    })
                    .await;
                tracing::warn!(job_id = %entry.job_id, error = %e, "Job handed back on shutdown.");
                break;
            }
            Err(e) if e.is_retryable() => {
                let msg = format!("gave up after {attempt} attempts: {e}");
                dead_letter(p, d, Some(entry.job_id), &msg).await;
                break;
            }
            Err(e) => {
                let msg = e.to_string();
                let finish = WriteOp::Finish {
                    job_id: entry.job_id,
                    status: FinalStatus::Failed,
                    error: msg.clone(),
                };
                if p.writers.send(finish).await.is_ok() && ack(p, d).await {
                    JobFailed {
                        job_id: entry.job_id,
                        error: &msg,
                    }
                    .emit();
                }
                break;
            }
        }
    }
    if locked {
        p.held_pets.lock().expect("held pets").remove(&entry.pet_id);
        if let Err(e) = p
            .ports
            .queue
            .unlock_pet(&entry.pet_id, &p.settings.consumer)
            .await
        {
            tracing::warn!(error = %e, "Releasing the pet's lock failed; it expires on its own.");
        }
    }
    drop(guard);
    let mut locks = p.pet_locks.lock().expect("pet lock map");
    if Arc::strong_count(&lock) == 2 {
        locks.remove(&entry.pet_id);
    }
}

/// Waits for the pet's cross-process lock; false if the worker stops first.
async fn take_pet_lock(p: &Pipeline, pet_id: &str) -> bool {
    let mut wait = Duration::from_millis(50);
    loop {
        match p
            .ports
            .queue
            .lock_pet(pet_id, &p.settings.consumer, p.settings.claim_min_idle_ms)
            .await
        {
            Ok(true) => {
                p.held_pets
                    .lock()
                    .expect("held pets")
                    .insert(pet_id.to_owned());
                return true;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "Taking the pet's lock failed; retrying."),
        }
        if *p.stop.borrow() {
            return false;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

async fn ack(p: &Pipeline, d: &Delivery) -> bool {
    match p.ports.queue.ack(&d.stream_id).await {
        Ok(()) => true,
        Err(e) => {
            // The result is committed; a redelivery finds the job finished and only acknowledges.
            tracing::warn!(stream_id = %d.stream_id, error = %e, "Acknowledging the entry failed.");
            false
        }
    }
}

async fn dead_letter(p: &Pipeline, d: &Delivery, job_id: Option<Uuid>, error: &str) {
    if let Some(job_id) = job_id {
        let finish = WriteOp::Finish {
            job_id,
            status: FinalStatus::DeadLettered,
            error: error.to_owned(),
        };
        if let Err(e) = p.writers.send(finish).await {
            tracing::warn!(job_id = %job_id, error = %e, "Marking the job dead-lettered failed.");
        }
    }
    match p.ports.queue.dead_letter(d, error).await {
        Ok(()) => EntryDeadLettered {
            stream_id: &d.stream_id,
            job_id,
            deliveries: d.deliveries,
            error,
        }
        .emit(),
        Err(e) => {
            tracing::error!(stream_id = %d.stream_id, error = %e, "Dead-lettering the entry failed; it stays pending.")
        }
    }
}

/// One attempt. `Ok(None)`: nothing to do (already finished, or unknown job handled).
async fn run_once(
    p: &Pipeline,
    entry: &JobEntry,
    d: &Delivery,
) -> Result<Option<(i64, usize, usize)>, PipelineError> {
    let start = WriteOp::StartJob {
        job_id: entry.job_id,
        stream_id: d.stream_id.clone(),
    };
    match p.writers.send(start).await? {
        WriteReply::Started(JobStart::Started { .. }) => {}
        WriteReply::Started(JobStart::AlreadyFinished) => {
            tracing::info!(job_id = %entry.job_id, "Job already finished; acknowledging the redelivery.");
            return Ok(None);
        }
        WriteReply::Started(JobStart::Unknown) => {
            dead_letter(p, d, None, "no job row with this job_id").await;
            return Ok(None);
        }
        other => {
            return Err(PipelineError::permanent(format!(
                "unexpected writer reply {other:?}"
            )));
        }
    }

    let images = p
        .ports
        .store
        .pet_images(&entry.pet_id, &p.model_version)
        .await?;
    let ids: Vec<Uuid> = images.iter().map(|i| i.image_id).collect();
    let concurrency = p.settings.counts.embedders.max(1) * 2 + p.settings.mailbox_capacity;
    let embedded: Vec<(usize, Embedded)> = futures::stream::iter(images.iter().enumerate())
        .filter(|(_, img)| futures::future::ready(img.cached.is_none()))
        .map(|(i, img)| async move {
            let bytes = p.ports.blobs.get(&img.storage_key).await?;
            let e = p
                .embedders
                .send(EmbedPhoto {
                    image_id: img.image_id,
                    bytes,
                })
                .await?;
            Ok::<_, PipelineError>((i, e))
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;

    let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(images.len());
    let mut qualities = Vec::with_capacity(images.len());
    let fresh: HashMap<usize, &Embedded> = embedded.iter().map(|(i, e)| (*i, e)).collect();
    for (i, img) in images.iter().enumerate() {
        let (v, q) = match (&img.cached, fresh.get(&i)) {
            (Some((v, q)), _) => (v.clone(), *q),
            (None, Some(e)) => (e.vector.clone(), e.quality),
            (None, None) => {
                return Err(PipelineError::permanent(format!(
                    "image {} was not embedded",
                    img.image_id
                )));
            }
        };
        vectors.push(v);
        qualities.push(q);
    }
    let new_embeddings = embedded
        .into_iter()
        .map(|(i, e)| (images[i].image_id, e.vector, e.quality))
        .collect();

    let vectors = Arc::new(vectors);
    let clusters = p
        .clusterers
        .send(ClusterVectors {
            vectors: vectors.clone(),
            params: p.settings.params,
        })
        .await?;
    let clusters = p
        .heroes
        .send(PickHeroes {
            ids: Arc::new(ids),
            vectors,
            qualities: Arc::new(qualities),
            clusters,
        })
        .await?;
    let n_clusters = clusters.len();
    let result = ClusteringResult {
        job: entry.clone(),
        model_version: p.model_version.clone(),
        params: p.settings.params,
        new_embeddings,
        clusters,
    };
    match p.writers.send(WriteOp::Commit(Box::new(result))).await? {
        WriteReply::Committed { version } => Ok(Some((version, n_clusters, images.len()))),
        other => Err(PipelineError::permanent(format!(
            "unexpected writer reply {other:?}"
        ))),
    }
}
