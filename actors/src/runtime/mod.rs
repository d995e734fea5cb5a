//! The actor runtime.
//!
//! Every message travels in an [`Envelope`] (the sender's span, the instant it was sent, its
//! mailbox slot and the reply channel) through the [`Pool`] of its actor kind: one bounded
//! mailbox per kind that every instance of the kind takes its next message from, so that
//! `N` instances handle at most `N` messages at once and a message waiting for a busy
//! instance is in the kind's mailbox depth. CPU-bound kinds run their instances on threads
//! of a `SyncArbiter` ([`SyncWorker`]); I/O-bound kinds run them as actors on the I/O
//! arbiter, each awaiting one message at a time inside its own context ([`AsyncWorker`]).
//! The [`supervisor`] decides what happens when an instance or a loop fails: restart after
//! a backoff, and past the restart intensity, escalation (not ready, drain, exit).

mod envelope;
pub mod faults;
pub mod health;
mod pool;
pub mod supervisor;
pub mod worker;

pub use envelope::{Envelope, Request};
pub(crate) use envelope::{Opened, traced};
pub use faults::Faults;
pub use health::Health;
pub use pool::{Pool, SendPermit};
pub use worker::{AsyncStage, AsyncWorker, SyncStage, SyncWorker};

/// The actor kinds; their names are the `actor` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorKind {
    Supervisor,
    StreamReader,
    PetScheduler,
    Embedder,
    Clusterer,
    HeroSelector,
    PostgresWriter,
}

impl ActorKind {
    pub const ALL: [ActorKind; 7] = [
        ActorKind::Supervisor,
        ActorKind::StreamReader,
        ActorKind::PetScheduler,
        ActorKind::Embedder,
        ActorKind::Clusterer,
        ActorKind::HeroSelector,
        ActorKind::PostgresWriter,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ActorKind::Supervisor => "supervisor",
            ActorKind::StreamReader => "stream_reader",
            ActorKind::PetScheduler => "pet_scheduler",
            ActorKind::Embedder => "embedder",
            ActorKind::Clusterer => "clusterer",
            ActorKind::HeroSelector => "hero_selector",
            ActorKind::PostgresWriter => "postgres_writer",
        }
    }
}

impl std::fmt::Display for ActorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
