//! Things worth counting, one type each: `emit()` writes the log line and updates the metric
//! together, so logs and counters never disagree.

use std::time::Duration;

use uuid::Uuid;

use crate::metrics::{JobOutcome, Metrics};
use crate::runtime::ActorKind;

pub struct ActorRestarted<'a> {
    pub kind: ActorKind,
    /// Which child of the kind: `instance`, or the name of a loop.
    pub child: &'static str,
    pub reason: &'a str,
    pub failures_in_window: u32,
}

impl ActorRestarted<'_> {
    pub fn emit(self, m: &Metrics) {
        tracing::error!(
            actor = self.kind.as_str(),
            child = self.child,
            reason = self.reason,
            failures_in_window = self.failures_in_window,
            "Actor failed; the supervisor restarts it after a backoff."
        );
        m.restarts.with_label_values(&[self.kind.as_str()]).inc();
    }
}

pub struct JobSucceeded<'a> {
    pub job_id: Uuid,
    pub model_version: &'a str,
    pub version: i64,
    /// Jobs of the pet this one clustering completed (1 when not coalesced).
    pub batch: usize,
    pub clusters: usize,
    pub images: usize,
    pub elapsed: Duration,
}

impl JobSucceeded<'_> {
    pub fn emit(self, m: &Metrics) {
        tracing::info!(
            job_id = %self.job_id,
            cluster_version = self.version,
            batch = self.batch,
            clusters = self.clusters,
            images = self.images,
            elapsed_ms = self.elapsed.as_millis() as u64,
            "Job succeeded."
        );
        m.jobs
            .with_label_values(&[JobOutcome::Succeeded.as_str()])
            .inc();
        m.processing_for(self.model_version)
            .observe(self.elapsed.as_secs_f64());
    }
}

pub struct JobFailed<'a> {
    pub job_id: Uuid,
    pub error: &'a str,
}

impl JobFailed<'_> {
    pub fn emit(self, m: &Metrics) {
        tracing::error!(job_id = %self.job_id, error = self.error, "Job failed permanently.");
        m.jobs
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
    pub fn emit(self, m: &Metrics) {
        tracing::error!(
            stream_id = self.stream_id,
            job_id = self.job_id.map(|j| j.to_string()),
            deliveries = self.deliveries,
            error = self.error,
            "Stream entry moved to the dead-letter stream."
        );
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
    pub fn emit(self, m: &Metrics) {
        tracing::warn!(
            job_id = %self.job_id,
            attempt = self.attempt,
            backoff_ms = self.backoff.as_millis() as u64,
            error = self.error,
            "Job attempt failed with a retryable error; retrying after a backoff."
        );
        m.retries.inc();
    }
}

pub struct PhotoEmbedded<'a> {
    pub image_id: Uuid,
    pub model_version: &'a str,
    pub elapsed: Duration,
}

impl PhotoEmbedded<'_> {
    pub fn emit(self, m: &Metrics) {
        tracing::debug!(image_id = %self.image_id, elapsed_ms = self.elapsed.as_secs_f64() * 1e3, "Photo embedded.");
        m.embedding_for(self.model_version)
            .observe(self.elapsed.as_secs_f64());
    }
}

pub struct PhotoQuarantined<'a> {
    pub image_id: Uuid,
    pub error: &'a str,
}

impl PhotoQuarantined<'_> {
    pub fn emit(self) {
        tracing::warn!(
            image_id = %self.image_id,
            error = self.error,
            "Photo cannot be processed; it is left out of clustering and listed as unprocessable."
        );
    }
}

pub struct PostgresWritten {
    pub operation: &'static str,
    pub elapsed: Duration,
}

impl PostgresWritten {
    pub fn emit(self, m: &Metrics) {
        tracing::debug!(
            operation = self.operation,
            elapsed_ms = self.elapsed.as_secs_f64() * 1e3,
            "Postgres operation done."
        );
        m.postgres_write_for(self.operation)
            .observe(self.elapsed.as_secs_f64());
    }
}
