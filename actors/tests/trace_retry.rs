//! A job whose first attempt fails still lands, retries included, in the trace
//! whose context came in its stream entry.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actors::algo::cluster::ClusterParams;
use actors::algo::embed::{EmbedError, ImageEncoder};
use actors::error::PipelineError;
use actors::job::{JobEntry, JobKind};
use actors::pipeline::{self, ActorCounts, PipelineSettings, Ports};
use actors::ports::*;
use async_trait::async_trait;
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;
use uuid::Uuid;

#[derive(Debug, Clone, Default)]
struct Memory(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Memory {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

#[derive(Default)]
struct Queue {
    entries: Mutex<Vec<Delivery>>,
    acked: Mutex<Vec<String>>,
}

#[async_trait]
impl JobQueue for Queue {
    async fn read(&self, _: &str, _: usize, _: u64) -> Result<Vec<Delivery>, PipelineError> {
        let batch: Vec<Delivery> = self.entries.lock().unwrap().drain(..).collect();
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(batch)
    }
    async fn ack(&self, id: &str) -> Result<(), PipelineError> {
        self.acked.lock().unwrap().push(id.to_owned());
        Ok(())
    }
    async fn dead_letter(&self, _: &Delivery, _: &str) -> Result<(), PipelineError> {
        unreachable!("nothing is dead-lettered here")
    }
    async fn depth(&self) -> Result<QueueDepth, PipelineError> {
        Ok(QueueDepth::default())
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

/// One pet with two photos; the first commit fails with a retryable error.
struct Store {
    images: Vec<Uuid>,
    failed_once: Mutex<bool>,
    done: Mutex<bool>,
}

#[async_trait]
impl actors::ports::Store for Store {
    async fn start_job(&self, _: Uuid, _: &str) -> Result<JobStart, PipelineError> {
        Ok(if *self.done.lock().unwrap() {
            JobStart::AlreadyFinished
        } else {
            JobStart::Started { attempts: 1 }
        })
    }
    async fn pet_images(&self, _: &str, _: &str) -> Result<Vec<PetImage>, PipelineError> {
        Ok(self
            .images
            .iter()
            .map(|id| PetImage {
                image_id: *id,
                storage_key: id.to_string(),
                cached: None,
            })
            .collect())
    }
    async fn commit(&self, _: &ClusteringResult) -> Result<i64, PipelineError> {
        let mut failed = self.failed_once.lock().unwrap();
        if !*failed {
            *failed = true;
            return Err(PipelineError::unavailable("postgres", "injected outage"));
        }
        *self.done.lock().unwrap() = true;
        Ok(1)
    }
    async fn finish_unsuccessful(
        &self,
        _: Uuid,
        _: FinalStatus,
        _: &str,
    ) -> Result<(), PipelineError> {
        Ok(())
    }
    async fn requeue(&self, _: Uuid, _: &str) -> Result<(), PipelineError> {
        Ok(())
    }
}

struct Blobs;

#[async_trait]
impl BlobStore for Blobs {
    async fn get(&self, _: &str) -> Result<Vec<u8>, PipelineError> {
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(16, 16, Rgb([90, 20, 200])));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        Ok(out.into_inner())
    }
}

struct Flat;

impl ImageEncoder for Flat {
    fn model_version(&self) -> &str {
        "flat-test"
    }
    fn embed(&self, _: &DynamicImage) -> Result<Vec<f32>, EmbedError> {
        Ok(vec![1.0, 0.0])
    }
}

#[actix_rt::test]
async fn a_retried_job_stays_in_the_trace_of_its_upload() {
    let memory = Memory::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(memory.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let queue = Arc::new(Queue::default());
    let store = Arc::new(Store {
        images: vec![Uuid::now_v7(), Uuid::now_v7()],
        failed_once: Mutex::default(),
        done: Mutex::default(),
    });
    let settings = PipelineSettings {
        stream: "s".into(),
        group: "g".into(),
        consumer: "c".into(),
        block_ms: 10,
        claim_min_idle_ms: 60_000,
        max_deliveries: 5,
        retry_base: Duration::from_millis(5),
        counts: ActorCounts {
            stream_readers: 1,
            embedders: 2,
            clusterers: 1,
            hero_selectors: 1,
            postgres_writers: 1,
        },
        mailbox_capacity: 8,
        max_inflight_jobs: 2,
        params: ClusterParams {
            eps: 0.1,
            min_points: 2,
        },
        max_pixels: 1_000_000,
    };
    let handle = pipeline::start(
        settings,
        Ports {
            queue: queue.clone(),
            store: store.clone(),
            blobs: Arc::new(Blobs),
        },
        Arc::new(Flat),
    );

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let entry = JobEntry {
        job_id: Uuid::now_v7(),
        pet_id: "traced".into(),
        kind: JobKind::ImageAdded,
        image_ids: store.images.clone(),
        enqueued_at_ms: 0,
        attempt: 1,
        traceparent: Some(format!("00-{trace_id}-00f067aa0ba902b7-01")),
        tracestate: None,
    };
    let fields: HashMap<String, String> = entry
        .to_fields()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    queue.entries.lock().unwrap().push(Delivery {
        stream_id: "1-0".into(),
        fields,
        deliveries: 1,
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while queue.acked.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "job never acknowledged");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(handle.shutdown(Duration::from_secs(5)).await);
    provider.force_flush().unwrap();

    let spans = memory.0.lock().unwrap().clone();
    let in_trace = |name: &str| {
        spans
            .iter()
            .filter(|s| s.name == name && s.span_context.trace_id().to_string() == trace_id)
            .count()
    };
    let commits = spans
        .iter()
        .filter(|s| {
            s.name == "postgres.write"
                && s.attributes
                    .iter()
                    .any(|a| a.value.as_str() == "commit_clusters")
        })
        .collect::<Vec<_>>();
    let described: Vec<String> = commits
        .iter()
        .map(|c| {
            format!(
                "{} {:?} {:?}",
                c.name,
                c.span_context.span_id(),
                c.attributes
            )
        })
        .collect();
    assert_eq!(
        commits.len(),
        2,
        "one failed and one retried commit: {described:#?}"
    );
    for c in &commits {
        assert_eq!(
            c.span_context.trace_id().to_string(),
            trace_id,
            "a commit left the trace"
        );
    }
    assert_eq!(in_trace("process media:cluster:jobs"), 1);
    // Embeddings are stored with the commit, so the retried attempt embeds both photos again.
    assert_eq!(in_trace("embed"), 4);
    assert!(
        in_trace("postgres_writer handle") >= 3,
        "start, failed commit, retried commit"
    );
    for s in spans.iter().filter(|s| s.name != "stream_reader handle") {
        assert_eq!(
            s.span_context.trace_id().to_string(),
            trace_id,
            "span {} is in another trace",
            s.name
        );
    }
}
