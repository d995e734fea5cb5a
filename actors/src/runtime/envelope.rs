//! The envelope every inter-actor message travels in.

use std::time::Instant;

use prometheus::IntGauge;
use tokio::sync::OwnedSemaphorePermit;

use super::ActorKind;
use crate::error::PipelineError;
use crate::metrics::metrics;

/// A message type a stage accepts, with the reply it gives.
pub trait Request: Send + 'static {
    type Reply: Send + 'static;
}

/// A message plus what the runtime needs to observe its hop: the sender's span
/// (which holds its OpenTelemetry context, so the hop becomes a child span),
/// the instant it was sent, and its mailbox slot.
pub struct Envelope<M> {
    msg: M,
    parent: tracing::Span,
    sent_at: Instant,
    slot: MailboxSlot,
}

impl<M: Request> actix::Message for Envelope<M> {
    type Result = Result<M::Reply, PipelineError>;
}

impl<M> Envelope<M> {
    pub(crate) fn new(msg: M, kind: ActorKind, permit: OwnedSemaphorePermit) -> Self {
        Envelope {
            msg,
            parent: tracing::Span::current(),
            sent_at: Instant::now(),
            slot: MailboxSlot::new(kind, permit),
        }
    }

    /// Called when handling starts: frees the mailbox slot, records the wait, and
    /// returns the message with the hop's span.
    pub(crate) fn open(mut self, kind: ActorKind) -> (M, tracing::Span) {
        self.slot.release();
        let wait = self.sent_at.elapsed();
        metrics()
            .mailbox_wait
            .with_label_values(&[kind.as_str()])
            .observe(wait.as_secs_f64());
        let span = tracing::info_span!(
            parent: &self.parent,
            "actor.handle",
            otel.name = %format_args!("{kind} handle"),
            actor = kind.as_str(),
            mailbox_wait_ms = wait.as_secs_f64() * 1e3,
        );
        (self.msg, span)
    }
}

/// One place in a mailbox: counted in the depth gauge from send until handling
/// starts, and holding one unit of the mailbox's capacity. If the envelope is
/// dropped unhandled (a closed mailbox, a stopped actor), `Drop` corrects the
/// gauge, so it never drifts.
struct MailboxSlot {
    kind: ActorKind,
    depth: IntGauge,
    permit: Option<OwnedSemaphorePermit>,
}

impl MailboxSlot {
    fn new(kind: ActorKind, permit: OwnedSemaphorePermit) -> Self {
        let depth = metrics().mailbox_depth.with_label_values(&[kind.as_str()]);
        depth.inc();
        MailboxSlot {
            kind,
            depth,
            permit: Some(permit),
        }
    }

    fn release(&mut self) {
        // The gauge goes down before the slot is freed, so it never reads above capacity.
        if let Some(permit) = self.permit.take() {
            self.depth.dec();
            drop(permit);
        }
    }
}

impl Drop for MailboxSlot {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.depth.dec();
            drop(permit);
            metrics()
                .messages
                .with_label_values(&[self.kind.as_str(), "dropped"])
                .inc();
        }
    }
}
