//! The actor runtime through its ports, with in-memory fakes: restarts after a
//! panic, mailbox depth under a slow stage, back-pressure, retries and dead letters.

use std::collections::{HashMap, VecDeque};
use std::io::Cursor;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actors::algo::cluster::ClusterParams;
use actors::algo::embed::{EmbedError, ImageEncoder};
use actors::error::PipelineError;
use actors::job::{JobEntry, JobKind};
use actors::metrics::metrics;
use actors::pipeline::{self, ActorCounts, PipelineHandle, PipelineSettings, Ports};
use actors::ports::*;
use async_trait::async_trait;
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use uuid::Uuid;

#[derive(Default)]
struct FakeQueue {
    entries: Mutex<VecDeque<Delivery>>,
    acked: Mutex<Vec<String>>,
    dead: Mutex<Vec<(Delivery, String)>>,
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
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(batch)
    }
    async fn ack(&self, id: &str) -> Result<(), PipelineError> {
        self.acked.lock().unwrap().push(id.to_owned());
        Ok(())
    }
    async fn dead_letter(&self, d: &Delivery, error: &str) -> Result<(), PipelineError> {
        self.dead
            .lock()
            .unwrap()
            .push((d.clone(), error.to_owned()));
        self.ack(&d.stream_id).await
    }
    async fn depth(&self) -> Result<QueueDepth, PipelineError> {
        Ok(QueueDepth {
            lag: self.entries.lock().unwrap().len() as i64,
            pending: 0,
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
    async fn prune_consumers(&self, _: &str, _: u64) -> Result<usize, PipelineError> {
        Ok(0)
    }
}

#[derive(Default)]
struct FakeStore {
    jobs: Mutex<HashMap<Uuid, String>>,
    images: Mutex<HashMap<String, Vec<Uuid>>>,
    commits: Mutex<Vec<ClusteringResult>>,
    /// Commits that panic before any that succeeds.
    panics: AtomicU32,
    /// Commits that fail with a retryable error before any that succeeds.
    failures: AtomicU32,
}

fn take_one(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl Store for FakeStore {
    async fn start_job(&self, job_id: Uuid, _: &str) -> Result<JobStart, PipelineError> {
        let mut jobs = self.jobs.lock().unwrap();
        Ok(match jobs.get_mut(&job_id) {
            Some(s) if s == "queued" || s == "running" => {
                *s = "running".into();
                JobStart::Started { attempts: 1 }
            }
            Some(_) => JobStart::AlreadyFinished,
            None => JobStart::Unknown,
        })
    }
    async fn pet_images(&self, pet_id: &str, _: &str) -> Result<Vec<PetImage>, PipelineError> {
        let images = self.images.lock().unwrap();
        Ok(images
            .get(pet_id)
            .map(|ids| {
                ids.iter()
                    .map(|id| PetImage {
                        image_id: *id,
                        storage_key: id.to_string(),
                        cached: None,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
    async fn commit(&self, result: &ClusteringResult) -> Result<i64, PipelineError> {
        if take_one(&self.panics) {
            panic!("injected panic in commit");
        }
        if take_one(&self.failures) {
            return Err(PipelineError::unavailable("postgres", "injected outage"));
        }
        self.jobs
            .lock()
            .unwrap()
            .insert(result.job.job_id, "succeeded".into());
        let mut commits = self.commits.lock().unwrap();
        commits.push(result.clone());
        Ok(commits.len() as i64)
    }
    async fn finish_unsuccessful(
        &self,
        job_id: Uuid,
        status: FinalStatus,
        _: &str,
    ) -> Result<(), PipelineError> {
        self.jobs
            .lock()
            .unwrap()
            .insert(job_id, status.as_str().into());
        Ok(())
    }
    async fn requeue(&self, job_id: Uuid, _: &str) -> Result<(), PipelineError> {
        self.jobs.lock().unwrap().insert(job_id, "queued".into());
        Ok(())
    }
}

#[derive(Default)]
struct FakeBlobs(Mutex<HashMap<String, Vec<u8>>>);

#[async_trait]
impl BlobStore for FakeBlobs {
    async fn get(&self, key: &str) -> Result<Vec<u8>, PipelineError> {
        self.0
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .ok_or_else(|| PipelineError::permanent("missing"))
    }
}

/// Embeds a photo as its mean colour; optionally slow, to back up its mailbox.
struct ColourEncoder {
    delay: Duration,
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
        Ok(v)
    }
}

fn png(colour: [u8; 3]) -> Vec<u8> {
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(32, 24, Rgb(colour)));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

struct Harness {
    queue: Arc<FakeQueue>,
    store: Arc<FakeStore>,
    blobs: Arc<FakeBlobs>,
    handle: Option<PipelineHandle>,
    next_id: u32,
}

fn settings(embedders: usize, capacity: usize, max_deliveries: u32) -> PipelineSettings {
    PipelineSettings {
        stream: "test:jobs".into(),
        group: "test".into(),
        consumer: "test-consumer".into(),
        block_ms: 10,
        claim_min_idle_ms: 60_000,
        max_deliveries,
        retry_base: Duration::from_millis(5),
        counts: ActorCounts {
            stream_readers: 1,
            embedders,
            clusterers: 1,
            hero_selectors: 1,
            postgres_writers: 2,
        },
        mailbox_capacity: capacity,
        max_inflight_jobs: 4,
        params: ClusterParams {
            eps: 0.01,
            min_points: 2,
        },
        max_pixels: 1_000_000,
    }
}

impl Harness {
    fn start(s: PipelineSettings, store: FakeStore, delay: Duration) -> Self {
        let (queue, store, blobs) = (
            Arc::new(FakeQueue::default()),
            Arc::new(store),
            Arc::new(FakeBlobs::default()),
        );
        let ports = Ports {
            queue: queue.clone(),
            store: store.clone(),
            blobs: blobs.clone(),
        };
        let handle = pipeline::start(s, ports, Arc::new(ColourEncoder { delay }));
        Harness {
            queue,
            store,
            blobs,
            handle: Some(handle),
            next_id: 0,
        }
    }

    /// Adds a pet with photos of the given colours and enqueues its job; returns the stream id.
    fn enqueue(&mut self, pet: &str, colours: &[[u8; 3]]) -> (Uuid, String) {
        let ids: Vec<Uuid> = colours.iter().map(|_| Uuid::now_v7()).collect();
        for (id, c) in ids.iter().zip(colours) {
            self.blobs.0.lock().unwrap().insert(id.to_string(), png(*c));
        }
        self.store
            .images
            .lock()
            .unwrap()
            .entry(pet.into())
            .or_default()
            .extend(&ids);
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
            image_ids: ids,
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

    fn push(&mut self, fields: HashMap<String, String>) -> String {
        self.next_id += 1;
        let stream_id = format!("{}-0", self.next_id);
        self.queue.entries.lock().unwrap().push_back(Delivery {
            stream_id: stream_id.clone(),
            fields,
            deliveries: 1,
        });
        stream_id
    }

    async fn wait_acked(&self, stream_id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .queue
            .acked
            .lock()
            .unwrap()
            .iter()
            .any(|a| a == stream_id)
        {
            assert!(
                Instant::now() < deadline,
                "entry {stream_id} never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn status(&self, job: Uuid) -> String {
        self.store.jobs.lock().unwrap()[&job].clone()
    }

    async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            assert!(
                h.shutdown(Duration::from_secs(5)).await,
                "in-flight jobs did not drain"
            );
        }
    }
}

fn gauge(name: &str, actor: &str) -> i64 {
    match name {
        "depth" => metrics().mailbox_depth.with_label_values(&[actor]).get(),
        _ => metrics().instances.with_label_values(&[actor]).get(),
    }
}

const RED: [u8; 3] = [200, 10, 10];
const BLUE: [u8; 3] = [10, 10, 200];

#[actix_rt::test]
async fn a_panicking_actor_is_restarted_and_its_job_still_succeeds() {
    let store = FakeStore {
        panics: AtomicU32::new(1),
        ..Default::default()
    };
    let mut h = Harness::start(settings(2, 16, 5), store, Duration::ZERO);
    let restarts = metrics()
        .restarts
        .with_label_values(&["postgres_writer"])
        .get();
    let (job, sid) = h.enqueue("rex", &[RED, RED, BLUE]);
    h.wait_acked(&sid).await;

    assert_eq!(h.status(job), "succeeded");
    assert_eq!(
        metrics()
            .restarts
            .with_label_values(&["postgres_writer"])
            .get(),
        restarts + 1
    );
    assert_eq!(
        metrics()
            .messages
            .with_label_values(&["postgres_writer", "panic"])
            .get(),
        1
    );
    assert!(
        metrics().retries.get() >= 1,
        "the failed attempt was retried"
    );
    let commits = h.store.commits.lock().unwrap().clone();
    assert_eq!(commits.len(), 1);
    assert_eq!(commits[0].clusters.len(), 2, "red pair and blue singleton");
    // The supervisor restores the configured count.
    let deadline = Instant::now() + Duration::from_secs(5);
    while gauge("instances", "postgres_writer") != 2 {
        assert!(
            Instant::now() < deadline,
            "postgres_writer instances {}",
            gauge("instances", "postgres_writer")
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // And the pipeline keeps working.
    let (job2, sid2) = h.enqueue("rex", &[BLUE]);
    h.wait_acked(&sid2).await;
    assert_eq!(h.status(job2), "succeeded");
    h.stop().await;
}

#[actix_rt::test]
async fn mailbox_depth_rises_behind_a_slow_stage_and_drains_to_zero() {
    let capacity = 4;
    let mut h = Harness::start(
        settings(1, capacity, 5),
        FakeStore::default(),
        Duration::from_millis(15),
    );
    let colours: Vec<[u8; 3]> = (0..24u8).map(|i| [i * 10, 100, 50]).collect();
    let (job, sid) = h.enqueue("burst", &colours);
    let mut max_depth = 0;
    while !h.queue.acked.lock().unwrap().contains(&sid) {
        let d = gauge("depth", "embedder");
        max_depth = max_depth.max(d);
        assert!(
            d <= capacity as i64,
            "depth {d} above the mailbox capacity {capacity}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(h.status(job), "succeeded");
    assert!(max_depth > 0, "the embedder's mailbox never filled");
    for actor in [
        "stream_reader",
        "embedder",
        "clusterer",
        "hero_selector",
        "postgres_writer",
    ] {
        assert_eq!(gauge("depth", actor), 0, "{actor} depth after draining");
    }
    let handled = metrics()
        .handling
        .with_label_values(&["embedder"])
        .get_sample_count();
    assert_eq!(handled, 24);
    h.stop().await;
}

#[actix_rt::test]
async fn retryable_failures_are_retried_and_the_job_succeeds() {
    let store = FakeStore {
        failures: AtomicU32::new(2),
        ..Default::default()
    };
    let mut h = Harness::start(settings(2, 16, 5), store, Duration::ZERO);
    let (job, sid) = h.enqueue("milo", &[RED, BLUE]);
    h.wait_acked(&sid).await;
    assert_eq!(h.status(job), "succeeded");
    assert_eq!(metrics().retries.get(), 2);
    assert_eq!(metrics().jobs.with_label_values(&["succeeded"]).get(), 1);
    h.stop().await;
}

#[actix_rt::test]
async fn poison_and_exhausted_entries_are_dead_lettered_while_others_proceed() {
    let store = FakeStore {
        failures: AtomicU32::new(3),
        ..Default::default()
    };
    let mut h = Harness::start(settings(2, 16, 3), store, Duration::ZERO);
    let poison: HashMap<String, String> = [
        ("schema", "1"),
        ("job_id", "not-a-uuid"),
        ("pet_id", "../../etc"),
        ("kind", "bogus"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let poison_id = h.push(poison);
    let (doomed, doomed_sid) = h.enqueue("luna", &[RED]);
    h.wait_acked(&poison_id).await;
    h.wait_acked(&doomed_sid).await;
    // The store recovers; the next job goes through.
    let (fine, fine_sid) = h.enqueue("luna", &[BLUE]);
    h.wait_acked(&fine_sid).await;

    assert_eq!(h.status(doomed), "dead_lettered");
    assert_eq!(h.status(fine), "succeeded");
    let dead = h.queue.dead.lock().unwrap().clone();
    assert_eq!(dead.len(), 2);
    assert!(dead[0].1.contains("malformed entry"), "{}", dead[0].1);
    assert!(
        dead[1].1.contains("gave up after 3 attempts"),
        "{}",
        dead[1].1
    );
    assert_eq!(metrics().deadletters.get(), 2);
    assert_eq!(
        metrics().jobs.with_label_values(&["dead_lettered"]).get(),
        1
    );
    h.stop().await;
}
