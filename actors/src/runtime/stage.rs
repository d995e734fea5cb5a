//! Generic actors around stages: the stage holds the work, the actor measures it.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use actix::{
    Actor, ActorContext, AsyncContext, Context, Handler, Message, ResponseFuture, Supervised,
    SyncContext,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use tracing::Instrument;

use super::{ActorKind, Envelope, Request};
use crate::error::PipelineError;
use crate::events::{ActorRestarted, ActorStateChanged};
use crate::metrics::metrics;

/// CPU-bound work, run on a `SyncArbiter` thread (never on HTTP or Redis threads).
pub trait SyncStage: Send + Unpin + 'static {
    const KIND: ActorKind;
    type In: Request;
    fn handle(&mut self, msg: Self::In) -> Result<<Self::In as Request>::Reply, PipelineError>;
}

/// I/O-bound work: `handle` returns a future; its whole run counts as handling time.
pub trait AsyncStage: Unpin + 'static {
    const KIND: ActorKind;
    type In: Request;
    fn handle(
        &mut self,
        msg: Self::In,
    ) -> BoxFuture<'static, Result<<Self::In as Request>::Reply, PipelineError>>;
}

type Factory<S> = Arc<dyn Fn() -> S + Send + Sync>;

fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn record(kind: ActorKind, started: Instant, outcome: &'static str) {
    let m = metrics();
    m.handling
        .with_label_values(&[kind.as_str()])
        .observe(started.elapsed().as_secs_f64());
    m.messages
        .with_label_values(&[kind.as_str(), outcome])
        .inc();
}

fn outcome<T>(r: &Result<T, PipelineError>) -> &'static str {
    if r.is_ok() { "ok" } else { "error" }
}

/// The actor around a [`SyncStage`]. A panic in `handle` is caught, the stage is
/// rebuilt from its factory (the restart), and the message's sender gets an error.
pub struct SyncStageActor<S: SyncStage> {
    stage: S,
    factory: Factory<S>,
}

impl<S: SyncStage> SyncStageActor<S> {
    pub fn new(factory: Factory<S>) -> Self {
        SyncStageActor {
            stage: factory(),
            factory,
        }
    }
}

impl<S: SyncStage> Actor for SyncStageActor<S> {
    type Context = SyncContext<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        ActorStateChanged {
            kind: S::KIND,
            running: true,
        }
        .emit();
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        ActorStateChanged {
            kind: S::KIND,
            running: false,
        }
        .emit();
    }
}

impl<S: SyncStage> Handler<Envelope<S::In>> for SyncStageActor<S> {
    type Result = Result<<S::In as Request>::Reply, PipelineError>;

    fn handle(&mut self, env: Envelope<S::In>, _: &mut Self::Context) -> Self::Result {
        let (msg, span) = env.open(S::KIND);
        let _entered = span.enter();
        let started = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| self.stage.handle(msg))) {
            Ok(r) => {
                record(S::KIND, started, outcome(&r));
                r
            }
            Err(p) => {
                record(S::KIND, started, "panic");
                let message = panic_message(p.as_ref());
                self.stage = (self.factory)();
                ActorRestarted {
                    kind: S::KIND,
                    reason: &message,
                }
                .emit();
                Err(PipelineError::ActorFailed {
                    actor: S::KIND.as_str(),
                    message,
                })
            }
        }
    }
}

/// The actor around an [`AsyncStage`], started under `actix::Supervisor`: a panic
/// (in `handle` or in its future) stops the actor, and the supervisor restarts it
/// with a fresh stage from the factory.
pub struct AsyncStageActor<S: AsyncStage> {
    stage: S,
    factory: Factory<S>,
}

impl<S: AsyncStage> AsyncStageActor<S> {
    pub fn new(factory: Factory<S>) -> Self {
        AsyncStageActor {
            stage: factory(),
            factory,
        }
    }
}

impl<S: AsyncStage> Actor for AsyncStageActor<S> {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        ActorStateChanged {
            kind: S::KIND,
            running: true,
        }
        .emit();
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        ActorStateChanged {
            kind: S::KIND,
            running: false,
        }
        .emit();
    }
}

impl<S: AsyncStage> Supervised for AsyncStageActor<S> {
    fn restarting(&mut self, _: &mut Self::Context) {
        self.stage = (self.factory)();
    }
}

/// Sent by a failed future back to its actor, which then stops to be restarted.
struct Crashed(String);

impl Message for Crashed {
    type Result = ();
}

impl<S: AsyncStage> Handler<Crashed> for AsyncStageActor<S> {
    type Result = ();

    fn handle(&mut self, msg: Crashed, ctx: &mut Self::Context) {
        ActorRestarted {
            kind: S::KIND,
            reason: &msg.0,
        }
        .emit();
        ctx.stop();
    }
}

impl<S: AsyncStage> Handler<Envelope<S::In>> for AsyncStageActor<S>
where
    <S::In as Request>::Reply: Send,
{
    type Result = ResponseFuture<Result<<S::In as Request>::Reply, PipelineError>>;

    fn handle(&mut self, env: Envelope<S::In>, ctx: &mut Self::Context) -> Self::Result {
        let (msg, span) = env.open(S::KIND);
        let started = Instant::now();
        let me = ctx.address();
        let fut = match catch_unwind(AssertUnwindSafe(|| {
            span.in_scope(|| self.stage.handle(msg))
        })) {
            Ok(fut) => fut,
            Err(p) => {
                record(S::KIND, started, "panic");
                let message = panic_message(p.as_ref());
                me.do_send(Crashed(message.clone()));
                return Box::pin(async move {
                    Err(PipelineError::ActorFailed {
                        actor: S::KIND.as_str(),
                        message,
                    })
                });
            }
        };
        Box::pin(
            async move {
                match AssertUnwindSafe(fut).catch_unwind().await {
                    Ok(r) => {
                        record(S::KIND, started, outcome(&r));
                        r
                    }
                    Err(p) => {
                        record(S::KIND, started, "panic");
                        let message = panic_message(p.as_ref());
                        me.do_send(Crashed(message.clone()));
                        Err(PipelineError::ActorFailed {
                            actor: S::KIND.as_str(),
                            message,
                        })
                    }
                }
            }
            .instrument(span),
        )
    }
}
