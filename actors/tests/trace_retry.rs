//! A job whose first commit fails still lands, retries included, in the trace whose context
//! came in its stream entry, and every I/O of the job is a span in it: the pet's lock, the
//! job rows, the pet's photos, each blob read, each stored embedding, the commit and the
//! acknowledgement. The loops' own queries (the outbox relay's) start no trace.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actors::job::{JobEntry, JobKind};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use support::*;
use tracing_subscriber::Layer;
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

#[actix_rt::test]
async fn a_retried_job_stays_in_the_trace_of_its_upload() {
    let memory = Memory::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(memory.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // As in the service: spans are exported from `info` up.
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("test"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
    );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let store = FakeStore {
        failures: AtomicU32::new(1),
        ..Default::default()
    };
    let mut h = Harness::start(settings(2, 8, 5), store, Duration::ZERO);
    let images = h.add_photos("traced", &[RED, BLUE]);
    let job_id = Uuid::now_v7();
    h.store.jobs.lock().unwrap().insert(job_id, "queued".into());
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let entry = JobEntry {
        job_id,
        pet_id: "traced".into(),
        kind: JobKind::ImageAdded,
        image_ids: images,
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
    let sid = h.push(fields);
    h.wait_acked(&sid).await;
    // The relay's own queries (every 20 ms here) run during and after the job: none of them
    // may start a trace of its own.
    let polls = h.store.outbox_polls.load(Ordering::SeqCst);
    h.until("the relay polled the outbox twice more", || {
        h.store.outbox_polls.load(Ordering::SeqCst) >= polls + 2
    })
    .await;
    let embedded = h.encoder.embedded.load(Ordering::SeqCst);
    h.stop().await;
    provider.force_flush().unwrap();

    let spans = memory.0.lock().unwrap().clone();
    let in_trace = |name: &str| {
        spans
            .iter()
            .filter(|s| s.name == name && s.span_context.trace_id().to_string() == trace_id)
            .count()
    };
    let commit = "INSERT cluster_versions clusters cluster_members";
    assert_eq!(in_trace(commit), 2, "one failed and one retried commit");
    let failed: Vec<_> = spans
        .iter()
        .filter(|s| {
            s.name == commit && matches!(s.status, opentelemetry::trace::Status::Error { .. })
        })
        .collect();
    assert_eq!(failed.len(), 1, "the failed commit is marked as an error");
    assert!(
        failed[0]
            .attributes
            .iter()
            .any(|a| a.key.as_str() == "error.type" && a.value.as_str() == "unavailable"),
        "{:?}",
        failed[0].attributes
    );
    // Two attempts, one process span each.
    assert_eq!(in_trace("process test:jobs"), 2);
    // The embeddings were stored at once, so the retry embedded nothing again.
    assert_eq!(in_trace("embed"), 2);
    assert_eq!(embedded, 2);
    assert_eq!(in_trace("INSERT image_embeddings"), 2);
    assert_eq!(in_trace("GET object"), 2);
    assert!(in_trace("UPDATE jobs") >= 2, "the job started twice");
    assert_eq!(in_trace("SELECT images image_embeddings"), 2);
    assert_eq!(in_trace("SET pet-lock"), 2);
    assert_eq!(in_trace("ack test:jobs"), 1);
    assert!(in_trace("postgres_writer handle") >= 8);
    for s in &spans {
        assert_eq!(
            s.span_context.trace_id().to_string(),
            trace_id,
            "span {} is in another trace",
            s.name
        );
    }
}
