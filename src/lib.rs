//! media-clustering: groups each pet's photos into clusters of similar shots,
//! picks a hero photo per cluster, and stores the result in Postgres.
//!
//! - [`cli`]: the `media-clustering` subcommands.
//! - [`config`]: layered, validated settings; secrets never print.
//! - [`startup`]: builds the application for `serve`, `api` or `worker`.
//! - [`api`]: the HTTP API, auth and the JSON errors.
//! - [`adapters`]: Postgres, Redis Streams and object storage behind the actors' ports.
//! - [`telemetry`]: JSON logs joined to traces, and the OTLP exporter.
//! - [`otlp_metrics`]: the optional OTLP export of the metrics registry.
//! - [`client`]: the bulk upload client.
//! - [`reembed`]: embeds photos ahead of jobs after a model change.
//! - [`bench`]: the CPU bound of `media-clustering bench cpu-bound`.
//!
//! The actor runtime, the six actors and the algorithms live in the `actors` crate.

pub mod adapters;
pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod otlp_metrics;
pub mod reembed;
pub mod startup;
pub mod telemetry;
