//! The supervisor: starts every actor kind with its configured count and keeps
//! it there, and reports the instance counts.

use std::sync::Arc;
use std::time::Duration;

use actix::{
    Actor, ArbiterHandle, AsyncContext, Context, Supervisor as ActixSupervisor, SyncArbiter,
};

use super::{ActorKind, AsyncStage, AsyncStageActor, Pool, SyncStage, SyncStageActor};
use crate::events::InstanceCountDrift;
use crate::metrics::metrics;

/// Starts `count` threads of a CPU-bound stage.
pub fn start_sync<S: SyncStage>(
    count: usize,
    capacity: usize,
    factory: impl Fn() -> S + Send + Sync + 'static,
) -> Pool<S::In> {
    let factory: Arc<dyn Fn() -> S + Send + Sync> = Arc::new(factory);
    let addr = SyncArbiter::start(count.max(1), move || SyncStageActor::new(factory.clone()));
    Pool::new(S::KIND, vec![addr.recipient()], capacity)
}

/// Starts `count` supervised instances of an I/O-bound stage on `arbiter`.
pub fn start_async<S: AsyncStage>(
    count: usize,
    capacity: usize,
    arbiter: &ArbiterHandle,
    factory: impl Fn() -> S + Send + Sync + 'static,
) -> Pool<S::In>
where
    <S::In as super::Request>::Reply: Send,
{
    let factory: Arc<dyn Fn() -> S + Send + Sync> = Arc::new(factory);
    let instances = (0..count.max(1))
        .map(|_| {
            let f = factory.clone();
            ActixSupervisor::start_in_arbiter(arbiter, move |_| AsyncStageActor::new(f)).recipient()
        })
        .collect();
    Pool::new(S::KIND, instances, capacity)
}

/// Watches the instance counts of every kind against the configuration.
pub struct Supervisor {
    expected: Vec<(ActorKind, usize)>,
}

impl Supervisor {
    pub fn new(expected: Vec<(ActorKind, usize)>) -> Self {
        Supervisor { expected }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        metrics()
            .instances
            .with_label_values(&[ActorKind::Supervisor.as_str()])
            .inc();
        ctx.run_interval(Duration::from_secs(5), |this, _| {
            for (kind, want) in &this.expected {
                let have = metrics()
                    .instances
                    .with_label_values(&[kind.as_str()])
                    .get();
                if have != *want as i64 {
                    InstanceCountDrift {
                        kind: *kind,
                        expected: *want,
                        running: have,
                    }
                    .emit();
                }
            }
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        metrics()
            .instances
            .with_label_values(&[ActorKind::Supervisor.as_str()])
            .dec();
    }
}
