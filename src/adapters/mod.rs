//! Implementations of the actors' ports over real services.

pub mod batcher;
pub mod postgres;
pub mod redis_queue;
pub mod storage;
