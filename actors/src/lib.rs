//! The actor runtime and the actors of the media-clustering pipeline.
//!
//! - [`runtime`]: envelope, bounded mailboxes shared by a kind's instances, sync and async
//!   instances, the supervisor, fault injection, readiness.
//! - [`stages`]: stream-reader, embedder, clusterer, hero-selector, postgres-writer.
//! - `scheduler`: the pet scheduler (a queue per pet, one batch per pet at a time).
//! - `batch`: one batch of a pet's jobs through the stages, and the guard that releases it.
//! - `loops`: the read, keep-alive and depth loops the supervisor runs.
//! - `pet_cache`: pets' clusterings kept between jobs (incremental clustering), under a budget.
//! - [`pipeline`]: wires all of it and gives the handle that drains it.
//! - [`algo`]: decoding, embedding, quality, clustering and hero score, as plain functions.
//! - [`ort_encoder`]: the ONNX Runtime embedder backend, loaded at run time.
//! - [`ports`]: the traits through which the actors reach Redis, Postgres and storage.
//! - [`job`]: the jobs-stream entry and its strict parser.
//! - [`metrics`] and [`events`]: every metric, and the events that update them with a log line.
//! - [`exemplars`]: trace ids of recent observations per histogram bucket, and the OpenMetrics encoder.
//! - [`error`]: the pipeline's failure type: retryable, permanent or poison.

pub mod algo;
mod batch;
pub mod error;
pub mod events;
pub mod exemplars;
pub mod job;
mod loops;
pub mod metrics;
pub mod ort_encoder;
mod pet_cache;
pub mod pipeline;
pub mod ports;
pub mod runtime;
mod scheduler;
pub mod stages;
