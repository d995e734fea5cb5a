//! Per-message cost of the instrumented runtime against a plain actix send:
//! `cargo bench -p media-clustering-actors --bench envelope`.
//!
//! Both sides send to an actor on another arbiter that does nothing and await the
//! reply, one message at a time, so the difference is the envelope, the mailbox
//! slot (depth gauge and capacity), the wait and handling histograms, the hop span
//! and the panic guard.

use std::time::{Duration, Instant};

use actix::{Actor, Arbiter, Context, Handler, Message};
use actors::error::PipelineError;
use actors::runtime::supervisor::start_async;
use actors::runtime::{ActorKind, AsyncStage, Request};
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

struct Noop;

impl AsyncStage for Noop {
    const KIND: ActorKind = ActorKind::Clusterer;
    type In = Ping;
    fn handle(&mut self, _: Ping) -> BoxFuture<'static, Result<u64, PipelineError>> {
        Box::pin(async { Ok(1) })
    }
}

fn plain(iters: u64) -> Duration {
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

fn instrumented(iters: u64) -> Duration {
    actix::System::new().block_on(async move {
        let arbiter = Arbiter::new();
        let pool = start_async(1, 64, &arbiter.handle(), || Noop);
        let _ = pool.send(Ping).await;
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(pool.send(Ping).await.unwrap());
        }
        let elapsed = t.elapsed();
        arbiter.stop();
        elapsed
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("send_and_reply");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("plain_actix_addr", |b| b.iter_custom(plain));
    g.bench_function("instrumented_pool", |b| b.iter_custom(instrumented));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
