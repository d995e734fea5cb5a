//! Things worth counting, one type each: `emit()` writes the log line and
//! updates the metric together, so logs and counters never disagree.

use std::time::Duration;

use uuid::Uuid;

use crate::metrics::{JobOutcome, metrics};
use crate::runtime::ActorKind;

pub struct ActorRestarted<'a> {
    pub kind: ActorKind,
    pub reason: &'a str,
}

impl ActorRestarted<'_> {
    pub fn emit(self) {
        tracing::error!(
            actor = self.kind.as_str(),
            reason = self.reason,
            "Actor failed and was restarted."
        );
        metrics()
            .restarts
            .with_label_values(&[self.kind.as_str()])
            .inc();
    }
}

pub struct ActorStateChanged {
    pub kind: ActorKind,
    pub running: bool,
}

impl ActorStateChanged {
    pub fn emit(self) {
        let g = metrics().instances.with_label_values(&[self.kind.as_str()]);
        if self.running {
            g.inc();
            tracing::debug!(actor = self.kind.as_str(), "Actor started.");
        } else {
            g.dec();
            tracing::debug!(actor = self.kind.as_str(), "Actor stopped.");
        }
    }
}

pub struct InstanceCountDrift {
    pub kind: ActorKind,
    pub expected: usize,
    pub running: i64,
}

impl InstanceCountDrift {
    pub fn emit(self) {
        tracing::warn!(
            actor = self.kind.as_str(),
            expected = self.expected,
            running = self.running,
            "Actor instance count differs from the configuration."
        );
    }
}

pub struct JobSucceeded<'a> {
    pub job_id: Uuid,
    pub model_version: &'a str,
    pub version: i64,
    pub clusters: usize,
    pub images: usize,
    pub elapsed: Duration,
}

impl JobSucceeded<'_> {
    pub fn emit(self) {
        tracing::info!(
            job_id = %self.job_id,
            cluster_version = self.version,
            clusters = self.clusters,
            images = self.images,
            elapsed_ms = self.elapsed.as_millis() as u64,
            "Job succeeded."
        );
        let m = metrics();
        m.jobs
            .with_label_values(&[JobOutcome::Succeeded.as_str()])
            .inc();
        m.processing
            .with_label_values(&[self.model_version])
            .observe(self.elapsed.as_secs_f64());
    }
}

pub struct JobFailed<'a> {
    pub job_id: Uuid,
    pub error: &'a str,
}

impl JobFailed<'_> {
    pub fn emit(self) {
        tracing::error!(job_id = %self.job_id, error = self.error, "Job failed permanently.");
        metrics()
            .jobs
            .with_label_values(&[JobOutcome::Failed.as_str()])
            .inc();
    }
}

pub struct EntryDeadLettered<'a> {
    pub stream_id: &'a str,
    pub job_id: Option<Uuid>,
    pub deliveries: u64,
    pub error: &'a str,
}

impl EntryDeadLettered<'_> {
    pub fn emit(self) {
        tracing::error!(
            stream_id = self.stream_id,
            job_id = self.job_id.map(|j| j.to_string()),
            deliveries = self.deliveries,
            error = self.error,
            "Stream entry moved to the dead-letter stream."
        );
        let m = metrics();
        m.deadletters.inc();
        if self.job_id.is_some() {
            m.jobs
                .with_label_values(&[JobOutcome::DeadLettered.as_str()])
                .inc();
        }
    }
}

pub struct JobRetried<'a> {
    pub job_id: Uuid,
    pub attempt: u32,
    pub backoff: Duration,
    pub error: &'a str,
}

impl JobRetried<'_> {
    pub fn emit(self) {
        tracing::warn!(
            job_id = %self.job_id,
            attempt = self.attempt,
            backoff_ms = self.backoff.as_millis() as u64,
            error = self.error,
            "Job attempt failed with a retryable error; retrying after a backoff."
        );
        metrics().retries.inc();
    }
}

pub struct PhotoEmbedded<'a> {
    pub image_id: Uuid,
    pub model_version: &'a str,
    pub elapsed: Duration,
}

impl PhotoEmbedded<'_> {
    pub fn emit(self) {
        tracing::debug!(image_id = %self.image_id, elapsed_ms = self.elapsed.as_secs_f64() * 1e3, "Photo embedded.");
        metrics()
            .embedding
            .with_label_values(&[self.model_version])
            .observe(self.elapsed.as_secs_f64());
    }
}

pub struct PostgresWritten {
    pub operation: &'static str,
    pub elapsed: Duration,
}

impl PostgresWritten {
    pub fn emit(self) {
        tracing::debug!(
            operation = self.operation,
            elapsed_ms = self.elapsed.as_secs_f64() * 1e3,
            "Postgres write committed."
        );
        metrics()
            .postgres_write
            .with_label_values(&[self.operation])
            .observe(self.elapsed.as_secs_f64());
    }
}
