//! The envelope every inter-actor message travels in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::error::PipelineError;
use crate::metrics::ActorMetrics;

/// A message type an actor kind accepts, with the reply it gives.
pub trait Request: Send + 'static {
    type Reply: Send + 'static;
}

pub(crate) type ReplyResult<M> = Result<<M as Request>::Reply, PipelineError>;

/// A message plus what the runtime needs to observe its hop: the sender's span (which holds
/// its OpenTelemetry context, so the hop becomes a child span), the instant it was sent, its
/// mailbox slot, and where the reply goes.
pub struct Envelope<M: Request> {
    msg: M,
    parent: tracing::Span,
    sent_at: Instant,
    slot: MailboxSlot,
    reply: oneshot::Sender<ReplyResult<M>>,
}

impl<M: Request> actix::Message for Envelope<M> {
    type Result = ();
}

/// The receiving end of an envelope's reply.
pub(crate) type ReplyReceiver<M> = oneshot::Receiver<ReplyResult<M>>;

impl<M: Request> Envelope<M> {
    /// A message counted in `metrics`' depth until it is opened, holding `permit` (a unit of
    /// its mailbox's capacity) until then.
    pub(crate) fn new(
        msg: M,
        metrics: &Arc<ActorMetrics>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> (Self, ReplyReceiver<M>) {
        let (reply, rx) = oneshot::channel();
        let env = Envelope {
            msg,
            parent: tracing::Span::current(),
            sent_at: Instant::now(),
            slot: MailboxSlot::new(metrics, permit),
            reply,
        };
        (env, rx)
    }

    /// Called when an instance starts the message: frees the mailbox slot, records the wait,
    /// and returns the message, the hop's span and the reply handle.
    pub(crate) fn open(mut self, metrics: &ActorMetrics) -> Opened<M> {
        self.slot.release();
        let wait = self.sent_at.elapsed();
        metrics.wait.observe(wait.as_secs_f64());
        Opened {
            span: hop_span(&self.parent, metrics, wait),
            msg: self.msg,
            reply: Reply(self.reply),
        }
    }
}

/// An envelope an instance has started.
pub(crate) struct Opened<M: Request> {
    pub msg: M,
    pub span: tracing::Span,
    pub reply: Reply<M>,
}

/// Where the reply of an opened message goes (the sender may have stopped waiting).
pub(crate) struct Reply<M: Request>(oneshot::Sender<ReplyResult<M>>);

impl<M: Request> Reply<M> {
    pub fn send(self, r: ReplyResult<M>) {
        let _ = self.0.send(r);
    }
}

/// The hop's span: a child of the sender's span. Hops of work that has no span of its own
/// (the read, keep-alive and depth loops) are debug spans, so they never reach the exporter
/// as stray root traces.
fn hop_span(parent: &tracing::Span, m: &ActorMetrics, wait: Duration) -> tracing::Span {
    let kind = m.kind.as_str();
    let wait_ms = wait.as_secs_f64() * 1e3;
    if parent.is_none() {
        tracing::debug_span!(parent: None, "actor.handle", actor = kind, mailbox_wait_ms = wait_ms)
    } else {
        tracing::info_span!(
            parent: parent,
            "actor.handle",
            otel.name = %format_args!("{kind} handle"),
            actor = kind,
            mailbox_wait_ms = wait_ms,
        )
    }
}

/// Whether the current hop is exported: it has a sender with a trace (see [`hop_span`]).
/// Operations the loops issue on their own (the outbox query, depth, trim) are not traced,
/// so they never reach the exporter as a stray root trace per tick; those of a job are.
pub(crate) fn traced() -> bool {
    tracing::Span::current()
        .metadata()
        .is_some_and(|m| *m.level() <= tracing::Level::INFO)
}

/// One place in a mailbox: counted in the depth gauge from send until handling starts, and
/// holding one unit of the mailbox's capacity (when it has one). If the envelope is dropped
/// unhandled (a closed mailbox, a stopped actor), `Drop` corrects the gauge, so it never
/// drifts.
struct MailboxSlot {
    metrics: Option<Arc<ActorMetrics>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl MailboxSlot {
    fn new(metrics: &Arc<ActorMetrics>, permit: Option<OwnedSemaphorePermit>) -> Self {
        metrics.depth.inc();
        MailboxSlot {
            metrics: Some(metrics.clone()),
            permit,
        }
    }

    fn release(&mut self) {
        // The gauge goes down before the slot is freed, so it never reads above capacity.
        if let Some(m) = self.metrics.take() {
            m.depth.dec();
            self.permit.take();
        }
    }
}

impl Drop for MailboxSlot {
    fn drop(&mut self) {
        if let Some(m) = self.metrics.take() {
            m.depth.dec();
            self.permit.take();
            m.dropped.inc();
        }
    }
}
