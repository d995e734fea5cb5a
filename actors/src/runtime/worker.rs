//! The instances of an actor kind: the stage holds the work, the instance measures it, takes
//! one message at a time, and survives a panic by asking the supervisor how long to stay down
//! before it rebuilds its stage (a restart).

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, SyncArbiter, SyncContext,
    WrapFuture,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{Mutex, mpsc};
use tracing::Instrument;

use super::ActorKind;
use super::envelope::{Envelope, Opened, Request};
use super::faults::{FaultPoint, Faults};
use super::pool::{Dispatch, Pool};
use super::supervisor::SupervisorLink;
use crate::error::PipelineError;
use crate::metrics::ActorMetrics;

/// CPU-bound work, run on a `SyncArbiter` thread (never on HTTP or Redis threads).
pub trait SyncStage: Send + Unpin + 'static {
    const KIND: ActorKind;
    type In: Request;
    fn handle(&mut self, msg: Self::In) -> Result<<Self::In as Request>::Reply, PipelineError>;
}

/// I/O-bound work: `handle` returns a future, which the instance awaits before it takes its
/// next message; its whole run counts as handling time.
pub trait AsyncStage: Unpin + 'static {
    const KIND: ActorKind;
    type In: Request;
    fn handle(
        &mut self,
        msg: Self::In,
    ) -> BoxFuture<'static, Result<<Self::In as Request>::Reply, PipelineError>>;
}

type Factory<S> = Arc<dyn Fn() -> S + Send + Sync>;

/// What every instance of a kind shares.
#[derive(Clone)]
pub struct InstanceCx {
    pub metrics: Arc<ActorMetrics>,
    pub supervisor: SupervisorLink,
    pub faults: Arc<Faults>,
}

pub(crate) fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Counts a handled message; its span's trace becomes the handling bucket's exemplar.
fn record<T>(
    m: &ActorMetrics,
    span: &tracing::Span,
    started: Instant,
    r: Option<&Result<T, PipelineError>>,
) {
    m.handling.observe_in(started.elapsed().as_secs_f64(), span);
    match r {
        Some(Ok(_)) => m.ok.inc(),
        Some(Err(_)) => m.error.inc(),
        None => m.panic.inc(),
    }
}

fn failed<R>(kind: ActorKind, message: &str) -> Result<R, PipelineError> {
    Err(PipelineError::ActorFailed {
        actor: kind.as_str(),
        message: message.to_owned(),
    })
}

/// An instance of a CPU-bound kind, one per `SyncArbiter` thread.
pub struct SyncWorker<S: SyncStage> {
    stage: S,
    factory: Factory<S>,
    cx: InstanceCx,
}

impl<S: SyncStage> Actor for SyncWorker<S> {
    type Context = SyncContext<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        self.cx.metrics.instances.inc();
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.cx.metrics.instances.dec();
    }
}

impl<S: SyncStage> Handler<Envelope<S::In>> for SyncWorker<S> {
    type Result = ();

    fn handle(&mut self, env: Envelope<S::In>, _: &mut Self::Context) {
        let Opened { msg, span, reply } = env.open(&self.cx.metrics);
        let started = Instant::now();
        let result = span.in_scope(|| {
            catch_unwind(AssertUnwindSafe(|| {
                self.cx.faults.hit(FaultPoint::Actor(S::KIND));
                self.stage.handle(msg)
            }))
        });
        match result {
            Ok(r) => {
                record(&self.cx.metrics, &span, started, Some(&r));
                reply.send(r);
            }
            Err(p) => {
                record::<()>(&self.cx.metrics, &span, started, None);
                let message = panic_message(p.as_ref());
                reply.send(failed(S::KIND, &message));
                // Down (this thread takes nothing) for as long as the supervisor says.
                self.cx.metrics.instances.dec();
                let wait = self
                    .cx
                    .supervisor
                    .failed_blocking(S::KIND, "instance", message);
                std::thread::sleep(wait);
                self.stage = (self.factory)();
                self.cx.metrics.instances.inc();
            }
        }
    }
}

/// Starts `count` threads of a CPU-bound kind, named `<kind>-<n>`.
pub fn start_sync<S: SyncStage>(
    count: usize,
    capacity: usize,
    cx: InstanceCx,
    factory: impl Fn() -> S + Send + Sync + 'static,
) -> Pool<S::In> {
    let factory: Factory<S> = Arc::new(factory);
    let metrics = cx.metrics.clone();
    let mut n = 0;
    let addr = SyncArbiter::start_with_thread_builder(
        count.max(1),
        move || {
            n += 1;
            std::thread::Builder::new().name(format!("{}-{n}", S::KIND.as_str()))
        },
        move || SyncWorker {
            stage: factory(),
            factory: factory.clone(),
            cx: cx.clone(),
        },
    );
    Pool::new(metrics, capacity, Dispatch::Sync(addr.recipient()))
}

type SharedQueue<M> = Arc<Mutex<mpsc::UnboundedReceiver<Envelope<M>>>>;

/// An instance of an I/O-bound kind: an actor on the I/O arbiter that takes the kind's next
/// message from the shared queue only when it has finished the last one (its loop runs inside
/// its own context, never detached), so `N` instances mean at most `N` at a time.
pub struct AsyncWorker<S: AsyncStage> {
    run: Option<WorkerLoop<S>>,
}

struct WorkerLoop<S: AsyncStage> {
    stage: S,
    factory: Factory<S>,
    queue: SharedQueue<S::In>,
    cx: InstanceCx,
}

/// Counts a running instance while it lives.
struct Running(prometheus::IntGauge);

impl Running {
    fn new(g: &prometheus::IntGauge) -> Self {
        g.inc();
        Running(g.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl<S: AsyncStage> Actor for AsyncWorker<S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(run) = self.run.take() {
            // The queue closes when the pool is dropped; then the instance stops.
            ctx.spawn(run.run().into_actor(self).map(|_, _, ctx| ctx.stop()));
        }
    }
}

impl<S: AsyncStage> WorkerLoop<S> {
    async fn run(mut self) {
        let mut running = Some(Running::new(&self.cx.metrics.instances));
        loop {
            let next = {
                let mut q = self.queue.lock().await;
                q.recv().await
            };
            let Some(env) = next else { return };
            let Opened { msg, span, reply } = env.open(&self.cx.metrics);
            let started = Instant::now();
            let fut = span.in_scope(|| {
                catch_unwind(AssertUnwindSafe(|| {
                    self.cx.faults.hit(FaultPoint::Actor(S::KIND));
                    self.stage.handle(msg)
                }))
            });
            let result = match fut {
                Ok(fut) => {
                    AssertUnwindSafe(fut.instrument(span.clone()))
                        .catch_unwind()
                        .await
                }
                Err(p) => Err(p),
            };
            match result {
                Ok(r) => {
                    record(&self.cx.metrics, &span, started, Some(&r));
                    reply.send(r);
                }
                Err(p) => {
                    record::<()>(&self.cx.metrics, &span, started, None);
                    let message = panic_message(p.as_ref());
                    reply.send(failed(S::KIND, &message));
                    running.take();
                    let wait = self
                        .cx
                        .supervisor
                        .failed(S::KIND, "instance", message)
                        .await;
                    tokio::time::sleep(wait).await;
                    self.stage = (self.factory)();
                    running = Some(Running::new(&self.cx.metrics.instances));
                }
            }
        }
    }
}

/// Starts `count` instances of an I/O-bound kind on `arbiter`.
pub fn start_async<S: AsyncStage>(
    count: usize,
    capacity: usize,
    arbiter: &actix::ArbiterHandle,
    cx: InstanceCx,
    factory: impl Fn() -> S + Send + Sync + 'static,
) -> Pool<S::In>
where
    S::In: Send,
{
    let factory: Factory<S> = Arc::new(factory);
    let (tx, rx) = mpsc::unbounded_channel();
    let queue: SharedQueue<S::In> = Arc::new(Mutex::new(rx));
    for _ in 0..count.max(1) {
        let (factory, queue, cx) = (factory.clone(), queue.clone(), cx.clone());
        AsyncWorker::start_in_arbiter(arbiter, move |_| AsyncWorker {
            run: Some(WorkerLoop {
                stage: factory(),
                factory,
                queue,
                cx,
            }),
        });
    }
    Pool::new(cx.metrics, capacity, Dispatch::Queue(tx))
}
