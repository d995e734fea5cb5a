//! The mailbox of one actor kind, shared by all its instances.

use std::sync::Arc;
use std::time::Instant;

use actix::Recipient;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};

use super::ActorKind;
use super::envelope::{Envelope, Request};
use crate::error::PipelineError;
use crate::metrics::ActorMetrics;

/// Where accepted envelopes wait for an instance.
pub(crate) enum Dispatch<M: Request> {
    /// A `SyncArbiter`'s queue: each of its threads takes the next envelope when it is free.
    Sync(Recipient<Envelope<M>>),
    /// The queue the async instances of the kind take their next envelope from.
    Queue(mpsc::UnboundedSender<Envelope<M>>),
}

/// Sends to the instances of one actor kind.
///
/// At most `capacity` messages wait in the kind's mailbox (accepted, not yet started by an
/// instance); a sender past that waits for a slot (`send_blocked_seconds`), so back-pressure
/// reaches whoever produces the work. Whichever instance is free takes the next message, so
/// no message waits behind a busy instance while another is idle.
pub struct Pool<M: Request> {
    metrics: Arc<ActorMetrics>,
    capacity: Arc<Semaphore>,
    dispatch: Dispatch<M>,
}

impl<M: Request> Pool<M> {
    pub(crate) fn new(metrics: Arc<ActorMetrics>, capacity: usize, dispatch: Dispatch<M>) -> Self {
        let capacity = capacity.max(1);
        metrics.capacity.set(capacity as i64);
        Pool {
            metrics,
            capacity: Arc::new(Semaphore::new(capacity)),
            dispatch,
        }
    }

    pub fn kind(&self) -> ActorKind {
        self.metrics.kind
    }

    /// Waits for a free slot in the mailbox. Taking the slot before building the message lets
    /// a sender bound what it holds in memory by the mailbox (fetch a photo only once it has
    /// a place to go).
    pub async fn reserve(&self) -> Result<SendPermit<'_, M>, PipelineError> {
        let permit = match self.capacity.clone().try_acquire_owned() {
            Ok(p) => {
                self.metrics.send_blocked.observe(0.0);
                p
            }
            Err(TryAcquireError::Closed) => return Err(PipelineError::ShuttingDown),
            Err(TryAcquireError::NoPermits) => {
                let t = Instant::now();
                let p = self
                    .capacity
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| PipelineError::ShuttingDown)?;
                self.metrics.send_blocked.observe(t.elapsed().as_secs_f64());
                p
            }
        };
        Ok(SendPermit { pool: self, permit })
    }

    /// Sends `msg` and waits for the reply. A closed mailbox or a vanished instance is an
    /// [`PipelineError::ActorFailed`], so the job is retried or failed, never lost silently.
    pub async fn send(&self, msg: M) -> Result<M::Reply, PipelineError> {
        self.reserve().await?.send(msg).await
    }

    /// Stops accepting messages; senders waiting for a slot get `ShuttingDown`.
    pub fn close(&self) {
        self.capacity.close();
    }
}

/// A reserved slot in a mailbox.
pub struct SendPermit<'a, M: Request> {
    pool: &'a Pool<M>,
    permit: OwnedSemaphorePermit,
}

impl<M: Request> SendPermit<'_, M> {
    /// Puts `msg` in the slot and waits for the reply.
    pub async fn send(self, msg: M) -> Result<M::Reply, PipelineError> {
        let pool = self.pool;
        let (env, reply) = Envelope::new(msg, &pool.metrics, Some(self.permit));
        match &pool.dispatch {
            // An envelope that cannot be delivered is dropped here, which closes its reply.
            Dispatch::Sync(r) => r.do_send(env),
            Dispatch::Queue(q) => drop(q.send(env)),
        }
        reply.await.unwrap_or_else(|_| {
            Err(PipelineError::ActorFailed {
                actor: pool.kind().as_str(),
                message: "mailbox closed".into(),
            })
        })
    }
}
