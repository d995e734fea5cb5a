//! The five working actor kinds (the sixth, the supervisor, is in the runtime):
//! each is a small stage that the generic runtime actors wrap.

mod clusterer;
mod embedder;
mod hero_selector;
mod postgres_writer;
mod stream_reader;

pub use clusterer::{ClusterVectors, Clusterer};
pub use embedder::{EmbedPhoto, Embedded, Embedder};
pub use hero_selector::{HeroSelector, PickHeroes};
pub use postgres_writer::{PostgresWriter, WriteOp, WriteReply};
pub use stream_reader::{ReadBatch, ReadMode, StreamReader};
