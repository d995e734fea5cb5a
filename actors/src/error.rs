//! The pipeline's failure type: whether a failure is worth retrying is part of it.

/// A failure while processing a job.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A dependency (Postgres, Redis, object storage) is unavailable or timed out;
    /// the job is left in the stream and tried again.
    #[error("{dependency} unavailable: {message}")]
    Unavailable {
        dependency: &'static str,
        message: String,
    },
    /// The job cannot succeed whatever is retried (an image that no longer decodes,
    /// a missing object); the job fails with this message.
    #[error("{0}")]
    Permanent(String),
    /// An actor panicked or stopped while handling the job's message.
    #[error("actor {actor} failed: {message}")]
    ActorFailed {
        actor: &'static str,
        message: String,
    },
    /// The worker is shutting down; the job is handed back to the stream.
    #[error("worker is shutting down")]
    ShuttingDown,
}

impl PipelineError {
    pub fn unavailable(dependency: &'static str, e: impl std::fmt::Display) -> Self {
        PipelineError::Unavailable {
            dependency,
            message: e.to_string(),
        }
    }

    pub fn permanent(e: impl std::fmt::Display) -> Self {
        PipelineError::Permanent(e.to_string())
    }

    /// Retryable failures leave the stream entry unacknowledged so that it is delivered again.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, PipelineError::Permanent(_))
    }
}
