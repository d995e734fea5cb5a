//! In-memory fakes of the pipeline's ports, and a harness that runs a pipeline on them with
//! its own metrics handle (so tests never read each other's values, under nextest or plain
//! `cargo test`).

#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Cursor;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use actors::algo::cluster::ClusterParams;
use actors::algo::embed::{EmbedError, ImageEncoder};
use actors::algo::quality::Quality;
use actors::error::PipelineError;
use actors::job::{JobEntry, JobKind};
use actors::metrics::Metrics;
use actors::pipeline::{self, ActorCounts, PipelineHandle, PipelineSettings, Ports};
use actors::ports::*;
use actors::runtime::supervisor::RestartPolicy;
use actors::runtime::{Faults, Health};
use actors::stages::DbTarget;
use async_trait::async_trait;
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use uuid::Uuid;

/// Takes one from a countdown; true while it lasts.
pub fn take_one(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

#[derive(Default)]
pub struct FakeQueue {
    pub entries: Mutex<VecDeque<Delivery>>,
    pub acked: Mutex<Vec<String>>,
    pub dead: Mutex<Vec<(Delivery, String)>>,
    /// Pet locks: pet -> owner.
    pub locks: Mutex<HashMap<String, String>>,
    /// Entries the relay added.
    pub enqueued: Mutex<Vec<JobEntry>>,
}

#[async_trait]
impl JobQueue for FakeQueue {
    async fn read(&self, _: &str, count: usize, _: u64) -> Result<Vec<Delivery>, PipelineError> {
        let batch: Vec<Delivery> = {
            let mut q = self.entries.lock().unwrap();
            let n = count.min(q.len());
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(batch)
    }
    async fn ack(&self, ids: &[String]) -> Result<(), PipelineError> {
        self.acked.lock().unwrap().extend_from_slice(ids);
        Ok(())
    }
    async fn dead_letter(&self, d: &Delivery, error: &str) -> Result<(), PipelineError> {
        self.dead
            .lock()
            .unwrap()
            .push((d.clone(), error.to_owned()));
        self.ack(std::slice::from_ref(&d.stream_id)).await
    }
    async fn depth(&self) -> Result<QueueDepth, PipelineError> {
        Ok(QueueDepth {
            lag: self.entries.lock().unwrap().len() as i64,
            group_exists: true,
            ..QueueDepth::default()
        })
    }
    async fn reclaim(&self, _: &str, _: u64, _: usize) -> Result<Vec<Delivery>, PipelineError> {
        Ok(vec![])
    }
    async fn keep_alive(&self, _: &str, _: &[String]) -> Result<(), PipelineError> {
        Ok(())
    }
    async fn trim(&self) -> Result<u64, PipelineError> {
        Ok(0)
    }
    async fn lock_pet(&self, pet: &str, owner: &str, _: u64) -> Result<bool, PipelineError> {
        let mut locks = self.locks.lock().unwrap();
        match locks.get(pet) {
            Some(o) => Ok(o == owner),
            None => {
                locks.insert(pet.to_owned(), owner.to_owned());
                Ok(true)
            }
        }
    }
    async fn unlock_pet(&self, pet: &str, owner: &str) -> Result<(), PipelineError> {
        let mut locks = self.locks.lock().unwrap();
        if locks.get(pet).is_some_and(|o| o == owner) {
            locks.remove(pet);
        }
        Ok(())
    }
    async fn prune_consumers(&self, _: &str, _: u64) -> Result<usize, PipelineError> {
        Ok(0)
    }
    async fn refresh_pet(&self, pet: &str, owner: &str, _: u64) -> Result<bool, PipelineError> {
        Ok(self
            .locks
            .lock()
            .unwrap()
            .get(pet)
            .is_some_and(|o| o == owner))
    }
    async fn enqueue(&self, entry: &JobEntry) -> Result<String, PipelineError> {
        let mut enq = self.enqueued.lock().unwrap();
        enq.push(entry.clone());
        Ok(format!("relayed-{}", enq.len()))
    }
    async fn entries_exist(&self, ids: &[String]) -> Result<Vec<bool>, PipelineError> {
        let acked = self.acked.lock().unwrap();
        Ok(ids.iter().map(|id| !acked.contains(id)).collect())
    }
}

/// One photo of the fake store.
#[derive(Clone)]
pub struct Photo {
    pub id: Uuid,
    pub embedding: Option<(Vec<f32>, Quality)>,
    pub error: Option<String>,
    pub captured_at_ms: Option<i64>,
}

/// Called with each result a commit is about to write.
pub type CommitHook = Box<dyn FnMut(&ClusteringResult) + Send>;

#[derive(Default)]
pub struct FakeStore {
    pub jobs: Mutex<HashMap<Uuid, String>>,
    pub photos: Mutex<HashMap<String, Vec<Photo>>>,
    pub commits: Mutex<Vec<ClusteringResult>>,
    /// Commits that panic before any that succeeds.
    pub panics: AtomicU32,
    /// Commits that fail with a retryable error before any that succeeds.
    pub failures: AtomicU32,
    /// How long every operation takes.
    pub delay: Duration,
    pub active: AtomicUsize,
    pub max_active: AtomicUsize,
    pub fences: Mutex<HashMap<String, i64>>,
    /// Jobs committed but never enqueued, for the relay: `(entry, stream id)`.
    pub outbox: Mutex<Vec<(JobEntry, Option<String>)>>,
    /// Outbox queries the relay has made.
    pub outbox_polls: AtomicU32,
    /// Runs before each commit completes (to act while a job is about to commit).
    pub before_commit: Mutex<Option<CommitHook>>,
}

impl FakeStore {
    /// Counts an operation in flight while it sleeps `delay`.
    async fn op(&self) {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn commits_for(&self, pet: &str) -> usize {
        self.commits
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.pet_id == pet)
            .count()
    }

    pub fn quarantined(&self) -> Vec<(Uuid, String)> {
        self.photos
            .lock()
            .unwrap()
            .values()
            .flatten()
            .filter_map(|p| p.error.clone().map(|e| (p.id, e)))
            .collect()
    }
}

#[async_trait]
impl Store for FakeStore {
    async fn start_jobs(&self, jobs: &[(Uuid, String)]) -> Result<Vec<JobStart>, PipelineError> {
        self.op().await;
        let mut all = self.jobs.lock().unwrap();
        Ok(jobs
            .iter()
            .map(|(id, _)| match all.get_mut(id) {
                Some(s) if s == "queued" || s == "running" => {
                    *s = "running".into();
                    JobStart::Started { attempts: 1 }
                }
                Some(_) => JobStart::AlreadyFinished,
                None => JobStart::Unknown,
            })
            .collect())
    }
    async fn pet_images(
        &self,
        pet_id: &str,
        _: &str,
        held: &[Uuid],
    ) -> Result<Vec<PetImage>, PipelineError> {
        self.op().await;
        let photos = self.photos.lock().unwrap();
        Ok(photos
            .get(pet_id)
            .map(|ps| {
                ps.iter()
                    .filter(|p| p.error.is_none())
                    .map(|p| PetImage {
                        image_id: p.id,
                        storage_key: actors::ports::image_key(p.id),
                        cached: p.embedding.clone().filter(|_| !held.contains(&p.id)),
                        held: held.contains(&p.id),
                        captured_at_ms: p.captured_at_ms,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
    async fn store_embedding(
        &self,
        image_id: Uuid,
        _: &str,
        vector: &[f32],
        quality: &Quality,
    ) -> Result<(), PipelineError> {
        self.op().await;
        for p in self.photos.lock().unwrap().values_mut().flatten() {
            if p.id == image_id && p.embedding.is_none() {
                p.embedding = Some((vector.to_vec(), *quality));
            }
        }
        Ok(())
    }
    async fn quarantine(&self, image_id: Uuid, error: &str) -> Result<(), PipelineError> {
        self.op().await;
        for p in self.photos.lock().unwrap().values_mut().flatten() {
            if p.id == image_id {
                p.error = Some(error.to_owned());
            }
        }
        Ok(())
    }
    async fn commit(&self, result: &ClusteringResult) -> Result<i64, PipelineError> {
        self.op().await;
        if let Some(f) = self.before_commit.lock().unwrap().as_mut() {
            f(result);
        }
        if take_one(&self.panics) {
            panic!("injected panic in commit");
        }
        if take_one(&self.failures) {
            return Err(PipelineError::unavailable("postgres", "injected outage"));
        }
        let latest = self.fences.lock().unwrap().get(&result.pet_id).copied();
        if latest.is_some_and(|l| l != result.fence) {
            return Err(PipelineError::LeaseLost(format!(
                "fence {} is not {latest:?}",
                result.fence
            )));
        }
        let mut jobs = self.jobs.lock().unwrap();
        for id in &result.job_ids {
            jobs.insert(*id, "succeeded".into());
        }
        let mut commits = self.commits.lock().unwrap();
        commits.push(result.clone());
        Ok(commits.len() as i64)
    }
    async fn finish_unsuccessful(
        &self,
        job_ids: &[Uuid],
        status: FinalStatus,
        _: &str,
    ) -> Result<(), PipelineError> {
        self.op().await;
        let mut jobs = self.jobs.lock().unwrap();
        for id in job_ids {
            jobs.insert(*id, status.as_str().into());
        }
        Ok(())
    }
    async fn requeue(&self, job_ids: &[Uuid], _: &str) -> Result<(), PipelineError> {
        let mut jobs = self.jobs.lock().unwrap();
        for id in job_ids {
            jobs.insert(*id, "queued".into());
        }
        Ok(())
    }
    async fn take_fence(&self, pet_id: &str) -> Result<i64, PipelineError> {
        let mut f = self.fences.lock().unwrap();
        let t = f.entry(pet_id.to_owned()).or_insert(0);
        *t += 1;
        Ok(*t)
    }
    async fn outbox(
        &self,
        _: u64,
        _: u64,
        check: bool,
        _: usize,
    ) -> Result<Vec<OutboxJob>, PipelineError> {
        self.outbox_polls.fetch_add(1, Ordering::SeqCst);
        Ok(self
            .outbox
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, sid)| sid.is_none() || check)
            .map(|(entry, stream_id)| OutboxJob {
                entry: entry.clone(),
                stream_id: stream_id.clone(),
                trace_id: None,
            })
            .collect())
    }
    async fn set_stream_id(&self, job_id: Uuid, stream_id: &str) -> Result<(), PipelineError> {
        for (e, sid) in self.outbox.lock().unwrap().iter_mut() {
            if e.job_id == job_id {
                *sid = Some(stream_id.to_owned());
            }
        }
        Ok(())
    }
    async fn known_images(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, PipelineError> {
        let photos = self.photos.lock().unwrap();
        let all: HashSet<Uuid> = photos.values().flatten().map(|p| p.id).collect();
        Ok(ids.iter().filter(|i| all.contains(i)).copied().collect())
    }
}

/// Photos fetched and not yet embedded, at most, over the run.
#[derive(Default)]
pub struct PhotoCount {
    pub fetched: AtomicUsize,
    pub finished: AtomicUsize,
    pub max_live: AtomicUsize,
}

#[derive(Default)]
pub struct FakeBlobs {
    pub bytes: Mutex<HashMap<String, Vec<u8>>>,
    /// When each key was written.
    pub written: Mutex<HashMap<String, SystemTime>>,
    pub count: Arc<PhotoCount>,
}

#[async_trait]
impl BlobStore for FakeBlobs {
    async fn get(&self, key: &str) -> Result<Vec<u8>, PipelineError> {
        let b = self
            .bytes
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .ok_or_else(|| PipelineError::poison("missing"))?;
        let c = &self.count;
        let fetched = c.fetched.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_live.fetch_max(
            fetched - c.finished.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
        Ok(b)
    }
    async fn list_written(
        &self,
        from: Option<SystemTime>,
        until: SystemTime,
    ) -> Result<Vec<String>, PipelineError> {
        let prefix = format!("{}/", actors::ports::IMAGES_PREFIX);

        Ok(self
            .written
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter(|(_, t)| from.is_none_or(|f| **t > f) && **t <= until)
            .map(|(k, _)| k.clone())
            .collect())
    }
    async fn delete(&self, key: &str) -> Result<(), PipelineError> {
        self.bytes.lock().unwrap().remove(key);
        self.written.lock().unwrap().remove(key);
        Ok(())
    }
}

/// Embeds a photo as its mean colour; optionally slow; counts its embeddings.
pub struct ColourEncoder {
    pub delay: Duration,
    pub embedded: AtomicUsize,
    pub count: Arc<PhotoCount>,
}

impl ImageEncoder for ColourEncoder {
    fn model_version(&self) -> &str {
        "colour-test"
    }
    fn embed(&self, img: &DynamicImage) -> Result<Vec<f32>, EmbedError> {
        std::thread::sleep(self.delay);
        let rgb = img.to_rgb8();
        let n = (rgb.width() * rgb.height()) as f32;
        let mut v = vec![0f32; 3];
        for p in rgb.pixels() {
            for (acc, channel) in v.iter_mut().zip(p.0) {
                *acc += f32::from(channel) / n;
            }
        }
        actors::algo::embed::l2_normalize(&mut v);
        self.embedded.fetch_add(1, Ordering::SeqCst);
        self.count.finished.fetch_add(1, Ordering::SeqCst);
        Ok(v)
    }
}

pub fn png(colour: [u8; 3]) -> Vec<u8> {
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(32, 24, Rgb(colour)));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

pub const RED: [u8; 3] = [200, 10, 10];
pub const BLUE: [u8; 3] = [10, 10, 200];

pub fn settings(embedders: usize, capacity: usize, max_deliveries: u32) -> PipelineSettings {
    PipelineSettings {
        stream: "test:jobs".into(),
        group: "test".into(),
        deadletter_stream: "test:deadletter".into(),
        consumer: "test-consumer".into(),
        block_ms: 10,
        claim_min_idle_ms: 60_000,
        max_deliveries,
        retry_base: Duration::from_millis(5),
        counts: ActorCounts {
            stream_readers: 2,
            embedders,
            clusterers: 1,
            hero_selectors: 1,
            postgres_writers: 2,
        },
        mailbox_capacity: capacity,
        max_inflight_jobs: 4,
        max_queued_jobs: 64,
        restart: RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(30),
            backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(50),
        },
        job_timeout: Duration::from_secs(30),
        relay_interval: Duration::from_millis(20),
        relay_grace: Duration::ZERO,
        sweep_interval: Duration::from_millis(20),
        orphan_grace: Duration::from_millis(50),
        time_rule: None,
        cluster_cache_bytes: 64 << 20,
        params: ClusterParams {
            eps: 0.01,
            min_points: 2,
            low_pass: None,
        },
        limits: 1_000_000.into(),
    }
}

pub struct Harness {
    pub queue: Arc<FakeQueue>,
    pub store: Arc<FakeStore>,
    pub blobs: Arc<FakeBlobs>,
    pub encoder: Arc<ColourEncoder>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub faults: Arc<Faults>,
    pub settings: PipelineSettings,
    handle: Option<PipelineHandle>,
    next_id: u32,
}

impl Harness {
    pub fn start(s: PipelineSettings, store: FakeStore, delay: Duration) -> Self {
        let blobs = Arc::new(FakeBlobs::default());
        let encoder = Arc::new(ColourEncoder {
            delay,
            embedded: AtomicUsize::new(0),
            count: blobs.count.clone(),
        });
        let (queue, store) = (Arc::new(FakeQueue::default()), Arc::new(store));
        let ports = Ports {
            queue: queue.clone(),
            store: store.clone(),
            blobs: blobs.clone(),
            db_target: DbTarget::default(),
            budget: std::sync::Arc::new(actors::algo::budget::MemoryBudget::unlimited()),
            prepared: None,
        };
        let (metrics, health, faults) =
            (Metrics::new(), Health::new(), Arc::new(Faults::default()));
        let handle = pipeline::start(
            s.clone(),
            ports,
            encoder.clone(),
            metrics.clone(),
            health.clone(),
            faults.clone(),
        );
        Harness {
            queue,
            store,
            blobs,
            encoder,
            metrics,
            health,
            faults,
            settings: s,
            handle: Some(handle),
            next_id: 0,
        }
    }

    /// Adds photos of the given colours to a pet (bytes in the blob store, rows in the store).
    pub fn add_photos(&self, pet: &str, colours: &[[u8; 3]]) -> Vec<Uuid> {
        self.add_photo_bytes(pet, colours.iter().map(|c| png(*c)).collect())
    }

    pub fn add_photo_bytes(&self, pet: &str, bytes: Vec<Vec<u8>>) -> Vec<Uuid> {
        let ids: Vec<Uuid> = bytes.iter().map(|_| Uuid::now_v7()).collect();
        for (id, b) in ids.iter().zip(bytes) {
            self.blobs
                .bytes
                .lock()
                .unwrap()
                .insert(actors::ports::image_key(*id), b);
            self.blobs
                .written
                .lock()
                .unwrap()
                .insert(actors::ports::image_key(*id), SystemTime::now());
        }
        self.store
            .photos
            .lock()
            .unwrap()
            .entry(pet.into())
            .or_default()
            .extend(ids.iter().map(|id| Photo {
                id: *id,
                embedding: None,
                error: None,
                captured_at_ms: None,
            }));
        ids
    }

    /// Sets the capture time of a photo.
    pub fn set_captured_at(&self, id: Uuid, ms: i64) {
        for p in self.store.photos.lock().unwrap().values_mut().flatten() {
            if p.id == id {
                p.captured_at_ms = Some(ms);
            }
        }
    }

    /// Adds a pet's photos and enqueues its job; returns the job id and stream id.
    pub fn enqueue(&mut self, pet: &str, colours: &[[u8; 3]]) -> (Uuid, String) {
        let ids = self.add_photos(pet, colours);
        self.enqueue_job(pet, ids)
    }

    pub fn enqueue_job(&mut self, pet: &str, image_ids: Vec<Uuid>) -> (Uuid, String) {
        let job_id = Uuid::now_v7();
        self.store
            .jobs
            .lock()
            .unwrap()
            .insert(job_id, "queued".into());
        let entry = JobEntry {
            job_id,
            pet_id: pet.into(),
            kind: JobKind::ImageAdded,
            image_ids,
            enqueued_at_ms: 0,
            attempt: 1,
            traceparent: None,
            tracestate: None,
        };
        let sid = self.push(
            entry
                .to_fields()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        );
        (job_id, sid)
    }

    pub fn push(&mut self, fields: HashMap<String, String>) -> String {
        self.next_id += 1;
        let stream_id = format!("{}-0", self.next_id);
        self.queue.entries.lock().unwrap().push_back(Delivery {
            stream_id: stream_id.clone(),
            fields,
            deliveries: 1,
        });
        stream_id
    }

    pub fn is_acked(&self, stream_id: &str) -> bool {
        self.queue
            .acked
            .lock()
            .unwrap()
            .iter()
            .any(|a| a == stream_id)
    }

    pub async fn wait_acked(&self, stream_id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.is_acked(stream_id) {
            assert!(
                Instant::now() < deadline,
                "entry {stream_id} never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Polls `f` until it is true (30 s at most).
    pub async fn until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn status(&self, job: Uuid) -> String {
        self.store.jobs.lock().unwrap()[&job].clone()
    }

    pub fn gauge_depth(&self, actor: &str) -> i64 {
        self.metrics.mailbox_depth.with_label_values(&[actor]).get()
    }

    pub fn instances(&self, actor: &str) -> i64 {
        self.metrics.instances.with_label_values(&[actor]).get()
    }

    pub fn restarts(&self, actor: &str) -> u64 {
        self.metrics.restarts.with_label_values(&[actor]).get()
    }

    pub fn locked_pets(&self) -> HashSet<String> {
        self.queue.locks.lock().unwrap().keys().cloned().collect()
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            assert!(
                h.shutdown(Duration::from_secs(10)).await,
                "in-flight jobs did not drain"
            );
        }
    }
}
