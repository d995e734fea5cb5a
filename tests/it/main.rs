//! Integration tests against real Redis and Postgres, compiled as one binary.
//! Each test gets its own database, stream names and storage folder.

mod api;
mod auth;
mod capture;
mod chaos;
mod deadletter;
mod faults;
mod helpers;
mod heroes;
mod hostile;
mod incremental;
mod metrics;
mod models;
mod openapi;
mod outbox;
mod pipeline;
mod process;
mod queue;
mod supervision;
mod telemetry;
mod tenancy;
mod traces;
