//! An instrumented, bounded address for all instances of one actor kind.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix::{MailboxError, Recipient};
use tokio::sync::Semaphore;

use super::{ActorKind, Envelope, Request};
use crate::error::PipelineError;

/// Sends to the instances of one actor kind, round-robin.
///
/// At most `capacity` messages wait in the kind's mailboxes; a sender past that
/// waits for a slot, so back-pressure reaches the stream reader, which then
/// reads fewer entries.
pub struct Pool<M: Request> {
    kind: ActorKind,
    instances: Vec<Recipient<Envelope<M>>>,
    next: AtomicUsize,
    capacity: Arc<Semaphore>,
}

impl<M: Request> Pool<M> {
    pub fn new(kind: ActorKind, instances: Vec<Recipient<Envelope<M>>>, capacity: usize) -> Self {
        assert!(!instances.is_empty(), "a pool needs at least one instance");
        Pool {
            kind,
            instances,
            next: AtomicUsize::new(0),
            capacity: Arc::new(Semaphore::new(capacity.max(1))),
        }
    }

    pub fn kind(&self) -> ActorKind {
        self.kind
    }

    /// Sends `msg` and waits for the reply. A closed mailbox (the actor is gone)
    /// is an [`PipelineError::ActorFailed`], so the job is retried or failed, never lost silently.
    pub async fn send(&self, msg: M) -> Result<M::Reply, PipelineError> {
        let permit = self
            .capacity
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PipelineError::ShuttingDown)?;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.instances.len();
        match self.instances[i]
            .send(Envelope::new(msg, self.kind, permit))
            .await
        {
            Ok(reply) => reply,
            Err(MailboxError::Closed) => Err(PipelineError::ActorFailed {
                actor: self.kind.as_str(),
                message: "mailbox closed".into(),
            }),
            Err(MailboxError::Timeout) => Err(PipelineError::ActorFailed {
                actor: self.kind.as_str(),
                message: "timed out".into(),
            }),
        }
    }

    /// Stops accepting messages; senders waiting for a slot get `ShuttingDown`.
    pub fn close(&self) {
        self.capacity.close();
    }
}
