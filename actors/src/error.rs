//! The pipeline's failure type. Which class a failure belongs to is part of the type, so the
//! scheduler and the supervisor decide from it, never from a message.

/// How a failure is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Infrastructure: try the job again later (backoff, then the dead-letter stream).
    Retryable,
    /// This job cannot succeed whatever is retried: it fails with its reason.
    Permanent,
    /// This photo can never be processed: it is quarantined and its pet goes on without it.
    Poison,
}

/// A failure while processing a job.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A dependency (Postgres, Redis, object storage) is unavailable or timed out.
    #[error("{dependency} unavailable: {message}")]
    Unavailable {
        dependency: &'static str,
        message: String,
    },
    /// The job cannot succeed whatever is retried.
    #[error("{0}")]
    Permanent(String),
    /// One photo cannot be decoded or embedded (bad data, over a limit); the job goes on
    /// without it.
    #[error("{0}")]
    Poison(String),
    /// An actor panicked or stopped while handling the job's message.
    #[error("actor {actor} failed: {message}")]
    ActorFailed {
        actor: &'static str,
        message: String,
    },
    /// The worker is shutting down; the job is handed back to the stream.
    #[error("worker is shutting down")]
    ShuttingDown,
    /// The pet's lock was lost (it expired, or another worker holds a later lease): the job
    /// gives up without committing and lets the holder go on.
    #[error("lost the pet's lock: {0}")]
    LeaseLost(String),
    /// The job ran longer than `actors.job_timeout_ms`; it is retried.
    #[error("the job ran longer than its deadline of {0} ms")]
    DeadlineExceeded(u64),
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

    pub fn poison(e: impl std::fmt::Display) -> Self {
        PipelineError::Poison(e.to_string())
    }

    pub fn class(&self) -> FailureClass {
        match self {
            PipelineError::Permanent(_) => FailureClass::Permanent,
            PipelineError::Poison(_) => FailureClass::Poison,
            PipelineError::Unavailable { .. }
            | PipelineError::ActorFailed { .. }
            | PipelineError::ShuttingDown
            | PipelineError::LeaseLost(_)
            | PipelineError::DeadlineExceeded(_) => FailureClass::Retryable,
        }
    }

    /// Retryable failures leave the stream entry unacknowledged so that it is tried again.
    pub fn is_retryable(&self) -> bool {
        self.class() == FailureClass::Retryable
    }
}
