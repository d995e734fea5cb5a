//! Per-message cost of the instrumented runtime against a plain actix send:
//! `cargo bench -p media-clustering-actors --bench envelope`.
//!
//! Each side sends to one instance that does nothing and awaits the reply, one message at a
//! time: an actor on another arbiter (`async`) and a `SyncArbiter` thread (`sync`). The
//! difference is the envelope and its reply channel, the mailbox slot (capacity permit and
//! depth gauge), the send-blocked, wait and handling histograms, the outcome counter, the hop
//! span, the shared queue the instances take messages from, and the panic guard.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Arbiter, Context, Handler, Message, SyncArbiter, SyncContext};
use actors::error::PipelineError;
use actors::metrics::Metrics;
use actors::runtime::supervisor::{RestartPolicy, Supervisor};
use actors::runtime::worker::{InstanceCx, start_async, start_sync};
use actors::runtime::{ActorKind, AsyncStage, Health, Pool, Request, SyncStage};
use criterion::{Criterion, criterion_group, criterion_main};
use futures::future::BoxFuture;

struct Ping;

impl Message for Ping {
    type Result = u64;
}

impl Request for Ping {
    type Reply = u64;
}

struct Plain;

impl Actor for Plain {
    type Context = Context<Self>;
}

impl Handler<Ping> for Plain {
    type Result = u64;
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> u64 {
        1
    }
}

struct PlainSync;

impl Actor for PlainSync {
    type Context = SyncContext<Self>;
}

impl Handler<Ping> for PlainSync {
    type Result = u64;
    fn handle(&mut self, _: Ping, _: &mut SyncContext<Self>) -> u64 {
        1
    }
}

struct Noop;

impl AsyncStage for Noop {
    const KIND: ActorKind = ActorKind::Clusterer;
    type In = Ping;
    fn handle(&mut self, _: Ping) -> BoxFuture<'static, Result<u64, PipelineError>> {
        Box::pin(async { Ok(1) })
    }
}

struct NoopSync;

impl SyncStage for NoopSync {
    const KIND: ActorKind = ActorKind::Clusterer;
    type In = Ping;
    fn handle(&mut self, _: Ping) -> Result<u64, PipelineError> {
        Ok(1)
    }
}

fn cx(arbiter: &Arbiter) -> InstanceCx {
    let metrics = Metrics::new();
    let (_, supervisor) = Supervisor::start(
        &arbiter.handle(),
        RestartPolicy::default(),
        metrics.clone(),
        Health::new(),
    );
    InstanceCx {
        metrics: Arc::new(metrics.actor(ActorKind::Clusterer)),
        supervisor,
        faults: Arc::default(),
    }
}

async fn time_pool(pool: &Pool<Ping>, iters: u64) -> Duration {
    let _ = pool.send(Ping).await;
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(pool.send(Ping).await.unwrap());
    }
    t.elapsed()
}

fn plain_async(iters: u64) -> Duration {
    actix::System::new().block_on(async move {
        let arbiter = Arbiter::new();
        let addr = Plain::start_in_arbiter(&arbiter.handle(), |_| Plain);
        let _ = addr.send(Ping).await;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(addr.send(Ping).await.unwrap());
        }
        let elapsed = t.elapsed();
        arbiter.stop();
        elapsed
    })
}

fn instrumented_async(iters: u64) -> Duration {
    actix::System::new().block_on(async move {
        let arbiter = Arbiter::new();
        let pool = start_async(1, 64, &arbiter.handle(), cx(&arbiter), || Noop);
        let elapsed = time_pool(&pool, iters).await;
        arbiter.stop();
        elapsed
    })
}

fn plain_sync(iters: u64) -> Duration {
    actix::System::new().block_on(async move {
        let addr = SyncArbiter::start(1, || PlainSync);
        let _ = addr.send(Ping).await;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(addr.send(Ping).await.unwrap());
        }
        t.elapsed()
    })
}

fn instrumented_sync(iters: u64) -> Duration {
    actix::System::new().block_on(async move {
        let arbiter = Arbiter::new();
        let pool = start_sync(1, 64, cx(&arbiter), || NoopSync);
        let elapsed = time_pool(&pool, iters).await;
        arbiter.stop();
        elapsed
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("send_and_reply");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("async/plain_actix_addr", |b| b.iter_custom(plain_async));
    g.bench_function("async/instrumented_pool", |b| {
        b.iter_custom(instrumented_async)
    });
    g.bench_function("sync/plain_sync_arbiter", |b| b.iter_custom(plain_sync));
    g.bench_function("sync/instrumented_pool", |b| {
        b.iter_custom(instrumented_sync)
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
