//! Every Prometheus metric of the service, defined once.
//!
//! [`Metrics::new`] builds one set of collectors; the process builds it once and hands it to
//! the pipeline, the API and the exporter, and [`Metrics::register`] adds it to the registry
//! that `/internal/metrics` serves. Tests build their own, so every test reads only its own
//! values whatever runs beside it. Names and label values are constants, and no label ever
//! carries a pet, job or image id.

use std::sync::Arc;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::exemplars::{ExemplarStore, TracedHistogram};
use crate::runtime::ActorKind;

pub const JOBS_TOTAL: &str = "media_cluster_jobs_total";
pub const RETRIES_TOTAL: &str = "media_cluster_retries_total";
pub const DEADLETTER_TOTAL: &str = "media_cluster_deadletter_total";
pub const PROCESSING_DURATION: &str = "media_cluster_processing_duration_seconds";
pub const EMBEDDING_DURATION: &str = "media_cluster_embedding_duration_seconds";
pub const POSTGRES_WRITE: &str = "media_cluster_postgres_write_seconds";
pub const PENDING_JOBS: &str = "media_cluster_pending_jobs";
pub const WORKER_INFLIGHT: &str = "media_cluster_worker_inflight";
pub const JOB_QUEUE_WAIT: &str = "media_cluster_job_queue_wait_seconds";
pub const ACTOR_MAILBOX_DEPTH: &str = "media_cluster_actor_mailbox_depth";
pub const ACTOR_MAILBOX_CAPACITY: &str = "media_cluster_actor_mailbox_capacity";
pub const ACTOR_MAILBOX_WAIT: &str = "media_cluster_actor_mailbox_wait_seconds";
pub const ACTOR_SEND_BLOCKED: &str = "media_cluster_actor_send_blocked_seconds";
pub const ACTOR_HANDLING: &str = "media_cluster_actor_handling_seconds";
pub const ACTOR_RESTARTS: &str = "media_cluster_actor_restarts_total";
pub const ACTOR_INSTANCES: &str = "media_cluster_actor_instances";
pub const ACTOR_MESSAGES: &str = "media_cluster_actor_messages_total";
pub const TELEMETRY_DROPPED_SPANS: &str = "media_cluster_telemetry_dropped_spans_total";
pub const EMBEDDER_INPUTS: &str = "media_cluster_embedder_inputs_total";
pub const CLUSTERINGS: &str = "media_cluster_clusterings_total";
pub const CLUSTERINGS_HELD: &str = "media_cluster_clusterings_held";
pub const TELEMETRY_SETUP_ERRORS: &str = "media_cluster_telemetry_setup_errors_total";
pub const TELEMETRY_METRIC_EXPORT_FAILURES: &str =
    "media_cluster_telemetry_metric_export_failures_total";
/// What an embedder got for a photo: what the upload prepared, or the original to decode.
pub const EMBEDDER_INPUT_KINDS: [&str; 2] = ["prepared", "original"];
/// Namespace given to actix-web-prom, which records the two HTTP series below.
pub const HTTP_NAMESPACE: &str = "media_cluster";
pub const HTTP_REQUESTS_TOTAL: &str = "media_cluster_http_requests_total";
pub const HTTP_REQUESTS_DURATION: &str = "media_cluster_http_requests_duration_seconds";

/// Buckets for work that takes milliseconds to a minute.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Buckets for queue waits, which can reach minutes under load.
const WAIT_BUCKETS: &[f64] = &[
    0.00001, 0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0,
];

/// `outcome` label values of [`ACTOR_MESSAGES`].
pub const MESSAGE_OUTCOMES: [&str; 4] = ["ok", "error", "panic", "dropped"];

/// `operation` label values of [`POSTGRES_WRITE`]: one per kind of postgres-writer message.
pub const POSTGRES_OPERATIONS: [&str; 9] = [
    "start_jobs",
    "load_pet",
    "store_embedding",
    "commit_clusters",
    "finish_jobs",
    "requeue_jobs",
    "take_fence",
    "outbox",
    "known_images",
];

/// Closed set of `status` label values of [`JOBS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    Succeeded,
    Failed,
    DeadLettered,
}

impl JobOutcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Succeeded => "succeeded",
            JobOutcome::Failed => "failed",
            JobOutcome::DeadLettered => "dead_lettered",
        }
    }
}

pub struct Metrics {
    pub jobs: IntCounterVec,
    pub retries: IntCounter,
    pub deadletters: IntCounter,
    pub processing: HistogramVec,
    pub embedding: HistogramVec,
    pub postgres_write: HistogramVec,
    pub pending_jobs: IntGaugeVec,
    pub worker_inflight: IntGauge,
    pub job_queue_wait: Histogram,
    pub mailbox_depth: IntGaugeVec,
    pub mailbox_capacity: IntGaugeVec,
    pub mailbox_wait: HistogramVec,
    pub send_blocked: HistogramVec,
    pub handling: HistogramVec,
    pub restarts: IntCounterVec,
    pub instances: IntGaugeVec,
    pub messages: IntCounterVec,
    pub dropped_spans: IntCounter,
    pub embedder_inputs: IntCounterVec,
    pub clusterings: IntCounterVec,
    pub clusterings_held: IntGaugeVec,
    pub telemetry_setup_errors: IntCounter,
    pub metric_export_failures: IntCounter,
    /// Exemplars of the traced histograms (processing, embedding, Postgres, actor handling).
    pub exemplars: ExemplarStore,
}

fn hist(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid histogram definition")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge definition")
}

impl Metrics {
    /// A fresh set of collectors, every closed label set created so that each series exists
    /// from the first scrape.
    pub fn new() -> Arc<Self> {
        let m = Metrics {
            jobs: counter_vec(JOBS_TOTAL, "Jobs finished, by final status.", &["status"]),
            retries: IntCounter::new(
                RETRIES_TOTAL,
                "Job attempts retried after a retryable failure.",
            )
            .expect("valid counter"),
            deadletters: IntCounter::new(
                DEADLETTER_TOTAL,
                "Stream entries moved to the dead-letter stream.",
            )
            .expect("valid counter"),
            processing: hist(
                PROCESSING_DURATION,
                "Time from a job's delivery to its committed result.",
                &["model_version"],
                SECONDS_BUCKETS,
            ),
            embedding: hist(
                EMBEDDING_DURATION,
                "Time to decode, preprocess and embed one photo.",
                &["model_version"],
                SECONDS_BUCKETS,
            ),
            postgres_write: hist(
                POSTGRES_WRITE,
                "Time of one Postgres operation of the pipeline, by operation.",
                &["operation"],
                SECONDS_BUCKETS,
            ),
            pending_jobs: gauge_vec(
                PENDING_JOBS,
                "Jobs in the stream: lag = not yet delivered, pending = delivered but not acknowledged.",
                &["state"],
            ),
            worker_inflight: IntGauge::new(
                WORKER_INFLIGHT,
                "Jobs being processed by this worker now.",
            )
            .expect("valid gauge"),
            job_queue_wait: Histogram::with_opts(
                HistogramOpts::new(
                    JOB_QUEUE_WAIT,
                    "Time a job waited in the stream before delivery.",
                )
                .buckets(WAIT_BUCKETS.to_vec()),
            )
            .expect("valid histogram"),
            mailbox_depth: gauge_vec(
                ACTOR_MAILBOX_DEPTH,
                "Messages accepted by an actor kind and not yet started by an instance.",
                &["actor"],
            ),
            mailbox_capacity: gauge_vec(
                ACTOR_MAILBOX_CAPACITY,
                "Messages an actor kind's mailbox holds before senders wait.",
                &["actor"],
            ),
            mailbox_wait: hist(
                ACTOR_MAILBOX_WAIT,
                "Time a message waited in an actor kind's mailbox before an instance started it.",
                &["actor"],
                WAIT_BUCKETS,
            ),
            send_blocked: hist(
                ACTOR_SEND_BLOCKED,
                "Time a sender waited for a free slot in an actor kind's mailbox (back-pressure).",
                &["actor"],
                WAIT_BUCKETS,
            ),
            handling: hist(
                ACTOR_HANDLING,
                "Time an instance was busy with one message.",
                &["actor"],
                SECONDS_BUCKETS,
            ),
            restarts: counter_vec(
                ACTOR_RESTARTS,
                "Restarts of a failed actor instance or loop, by actor kind.",
                &["actor"],
            ),
            instances: gauge_vec(
                ACTOR_INSTANCES,
                "Running instances of each actor kind.",
                &["actor"],
            ),
            messages: counter_vec(
                ACTOR_MESSAGES,
                "Messages handled by actors, by outcome (ok, error, panic, dropped).",
                &["actor", "outcome"],
            ),
            dropped_spans: IntCounter::new(
                TELEMETRY_DROPPED_SPANS,
                "Spans the exporter could not deliver and dropped.",
            )
            .expect("valid counter"),
            embedder_inputs: counter_vec(
                EMBEDDER_INPUTS,
                "Photos given to an embedder, by input: prepared at upload, or the original.",
                &["input"],
            ),
            clusterings: counter_vec(
                CLUSTERINGS,
                "Pet clusterings, by how they were made: incremental, or full with the reason (not_held, asked, ambiguous, removed, time_rule).",
                &["assigned"],
            ),
            clusterings_held: gauge_vec(
                CLUSTERINGS_HELD,
                "Pet clusterings this worker keeps between jobs: pets, and bytes (at most clustering.cache_mib).",
                &["measure"],
            ),
            telemetry_setup_errors: IntCounter::new(
                TELEMETRY_SETUP_ERRORS,
                "Telemetry settings that could not be used and exporters that could not be built, at start-up.",
            )
            .expect("valid counter"),
            metric_export_failures: IntCounter::new(
                TELEMETRY_METRIC_EXPORT_FAILURES,
                "OTLP metric exports (OTEL_METRICS_EXPORTER=otlp) the collector did not accept.",
            )
            .expect("valid counter"),
            exemplars: ExemplarStore::default(),
        };
        for i in EMBEDDER_INPUT_KINDS {
            m.embedder_inputs.with_label_values(&[i]);
        }
        for a in crate::algo::dbscan::Assigned::ALL {
            m.clusterings.with_label_values(&[a.as_str()]);
        }
        for s in ["pets", "bytes"] {
            m.clusterings_held.with_label_values(&[s]);
        }
        for s in [
            JobOutcome::Succeeded,
            JobOutcome::Failed,
            JobOutcome::DeadLettered,
        ] {
            m.jobs.with_label_values(&[s.as_str()]);
        }
        for s in ["lag", "pending"] {
            m.pending_jobs.with_label_values(&[s]);
        }
        for a in ActorKind::ALL {
            let a = a.as_str();
            m.mailbox_depth.with_label_values(&[a]);
            m.mailbox_capacity.with_label_values(&[a]);
            m.mailbox_wait.with_label_values(&[a]);
            m.send_blocked.with_label_values(&[a]);
            m.traced(&m.handling, ACTOR_HANDLING, a);
            m.restarts.with_label_values(&[a]);
            m.instances.with_label_values(&[a]);
            for outcome in MESSAGE_OUTCOMES {
                m.messages.with_label_values(&[a, outcome]);
            }
        }
        for op in POSTGRES_OPERATIONS {
            m.postgres_write_for(op);
        }
        Arc::new(m)
    }

    /// Creates the series labelled with a model version, so rates see its first job too.
    pub fn register_model_version(&self, model_version: &str) {
        self.processing_for(model_version);
        self.embedding_for(model_version);
    }

    fn traced(&self, vec: &HistogramVec, family: &str, label: &str) -> TracedHistogram {
        TracedHistogram::of(&self.exemplars, vec, family, SECONDS_BUCKETS, &[label])
    }

    /// [`PROCESSING_DURATION`] of a model version, with exemplars.
    pub fn processing_for(&self, model_version: &str) -> TracedHistogram {
        self.traced(&self.processing, PROCESSING_DURATION, model_version)
    }

    /// [`EMBEDDING_DURATION`] of a model version, with exemplars.
    pub fn embedding_for(&self, model_version: &str) -> TracedHistogram {
        self.traced(&self.embedding, EMBEDDING_DURATION, model_version)
    }

    /// [`POSTGRES_WRITE`] of an operation, with exemplars.
    pub fn postgres_write_for(&self, operation: &str) -> TracedHistogram {
        self.traced(&self.postgres_write, POSTGRES_WRITE, operation)
    }

    /// The series of one actor kind, resolved once.
    pub fn actor(&self, kind: ActorKind) -> ActorMetrics {
        let a = kind.as_str();
        let outcome = |o: &str| self.messages.with_label_values(&[a, o]);
        ActorMetrics {
            kind,
            depth: self.mailbox_depth.with_label_values(&[a]),
            capacity: self.mailbox_capacity.with_label_values(&[a]),
            wait: self.mailbox_wait.with_label_values(&[a]),
            send_blocked: self.send_blocked.with_label_values(&[a]),
            handling: self.traced(&self.handling, ACTOR_HANDLING, a),
            restarts: self.restarts.with_label_values(&[a]),
            instances: self.instances.with_label_values(&[a]),
            ok: outcome("ok"),
            error: outcome("error"),
            panic: outcome("panic"),
            dropped: outcome("dropped"),
        }
    }

    /// Registers every metric in `registry` (clones share their values).
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.jobs.clone()))?;
        registry.register(Box::new(self.retries.clone()))?;
        registry.register(Box::new(self.deadletters.clone()))?;
        registry.register(Box::new(self.processing.clone()))?;
        registry.register(Box::new(self.embedding.clone()))?;
        registry.register(Box::new(self.postgres_write.clone()))?;
        registry.register(Box::new(self.pending_jobs.clone()))?;
        registry.register(Box::new(self.worker_inflight.clone()))?;
        registry.register(Box::new(self.job_queue_wait.clone()))?;
        registry.register(Box::new(self.mailbox_depth.clone()))?;
        registry.register(Box::new(self.mailbox_capacity.clone()))?;
        registry.register(Box::new(self.mailbox_wait.clone()))?;
        registry.register(Box::new(self.send_blocked.clone()))?;
        registry.register(Box::new(self.handling.clone()))?;
        registry.register(Box::new(self.restarts.clone()))?;
        registry.register(Box::new(self.instances.clone()))?;
        registry.register(Box::new(self.messages.clone()))?;
        registry.register(Box::new(self.dropped_spans.clone()))?;
        registry.register(Box::new(self.embedder_inputs.clone()))?;
        registry.register(Box::new(self.clusterings.clone()))?;
        registry.register(Box::new(self.clusterings_held.clone()))?;
        registry.register(Box::new(self.telemetry_setup_errors.clone()))?;
        registry.register(Box::new(self.metric_export_failures.clone()))?;
        Ok(())
    }
}

/// The series of one actor kind (clones of the labelled children: updating one updates the
/// registered family).
#[derive(Clone)]
pub struct ActorMetrics {
    pub kind: ActorKind,
    pub depth: IntGauge,
    pub capacity: IntGauge,
    pub wait: Histogram,
    pub send_blocked: Histogram,
    pub handling: TracedHistogram,
    pub restarts: IntCounter,
    pub instances: IntGauge,
    pub ok: IntCounter,
    pub error: IntCounter,
    pub panic: IntCounter,
    pub dropped: IntCounter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_series_names_follow_from_the_namespace() {
        // actix-web-prom names its series `<namespace>_http_requests_total` and
        // `<namespace>_http_requests_duration_seconds`.
        assert_eq!(
            format!("{HTTP_NAMESPACE}_http_requests_total"),
            HTTP_REQUESTS_TOTAL
        );
        assert_eq!(
            format!("{HTTP_NAMESPACE}_http_requests_duration_seconds"),
            HTTP_REQUESTS_DURATION
        );
    }

    #[test]
    fn every_metric_registers_once() {
        let registry = Registry::new();
        Metrics::new().register(&registry).unwrap();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for n in [
            JOBS_TOTAL,
            ACTOR_MAILBOX_DEPTH,
            ACTOR_MAILBOX_CAPACITY,
            ACTOR_SEND_BLOCKED,
            ACTOR_HANDLING,
            PENDING_JOBS,
            TELEMETRY_DROPPED_SPANS,
            EMBEDDER_INPUTS,
            TELEMETRY_SETUP_ERRORS,
        ] {
            assert!(names.iter().any(|x| x == n), "{n} not registered");
        }
    }

    #[test]
    fn two_handles_do_not_share_values() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.retries.inc();
        a.actor(ActorKind::Embedder).depth.inc();
        assert_eq!(a.retries.get(), 1);
        assert_eq!(b.retries.get(), 0);
        assert_eq!(b.actor(ActorKind::Embedder).depth.get(), 0);
        assert_eq!(a.mailbox_depth.with_label_values(&["embedder"]).get(), 1);
    }
}
