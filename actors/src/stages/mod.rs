//! The working actor kinds (the supervisor is in the runtime, the pet scheduler in
//! [`crate::scheduler`]): each is a small stage that the runtime's instances wrap.

mod clusterer;
mod embedder;
mod hero_selector;
mod postgres_writer;
mod stream_reader;

pub use clusterer::{ClusterVectors, Clusterer};
pub use embedder::{EmbedPhoto, Embedded, Embedder, PhotoInput};
pub use hero_selector::{HeroSelector, PickHeroes};
pub use postgres_writer::{DbOp, DbReply, DbTarget, PostgresWriter};
pub use stream_reader::{ReadMode, RedisOp, RedisReply, StreamReader};
