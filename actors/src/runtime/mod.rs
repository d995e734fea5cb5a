//! The actor runtime: every message travels in an [`Envelope`] through an
//! instrumented [`Pool`] address to a generic stage actor, which measures
//! mailbox depth, mailbox wait, handling time and outcome once for all six
//! actor kinds, runs each hop in a child span of the sender's, and survives
//! panics by rebuilding its stage (a restart, counted and reported to the
//! [`supervisor`]).

mod envelope;
mod pool;
mod stage;
pub mod supervisor;

pub use envelope::{Envelope, Request};
pub use pool::Pool;
pub use stage::{AsyncStage, AsyncStageActor, SyncStage, SyncStageActor};

/// The six actor kinds; their names are the `actor` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorKind {
    Supervisor,
    StreamReader,
    Embedder,
    Clusterer,
    HeroSelector,
    PostgresWriter,
}

impl ActorKind {
    pub const ALL: [ActorKind; 6] = [
        ActorKind::Supervisor,
        ActorKind::StreamReader,
        ActorKind::Embedder,
        ActorKind::Clusterer,
        ActorKind::HeroSelector,
        ActorKind::PostgresWriter,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ActorKind::Supervisor => "supervisor",
            ActorKind::StreamReader => "stream_reader",
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
