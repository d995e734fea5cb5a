//! The actor runtime and the six actors of the media-clustering pipeline.
//!
//! - [`runtime`]: envelope, instrumented bounded pools, generic stage actors, supervisor.
//! - [`stages`]: stream-reader, embedder, clusterer, hero-selector, postgres-writer.
//! - [`pipeline`]: drives one job through the stages and acknowledges it.
//! - [`algo`]: decoding, embedding, quality, clustering and hero score, as plain functions.
//! - [`ort_encoder`]: the ONNX Runtime embedder backend, loaded at run time.
//! - [`ports`]: the traits through which the actors reach Redis, Postgres and storage.
//! - [`job`]: the jobs-stream entry and its strict parser.
//! - [`metrics`] and [`events`]: every metric, and the events that update them with a log line.
//! - [`error`]: the pipeline's failure type, retryable or permanent.

pub mod algo;
pub mod error;
pub mod events;
pub mod job;
pub mod metrics;
pub mod ort_encoder;
pub mod pipeline;
pub mod ports;
pub mod runtime;
pub mod stages;
