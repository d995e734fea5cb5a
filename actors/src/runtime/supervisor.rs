//! The supervisor: the one place that decides what happens when a child fails.
//!
//! Its children are the instances of every actor kind and the pipeline's loops (read,
//! keep-alive, depth). A failed child (a panic, or a loop that returned an error) is
//! restarted after a backoff that doubles with each failure of its kind inside the restart
//! window. Past the restart intensity (`max_restarts` failures of one kind within `window`)
//! the supervisor escalates: [`Health`] turns not ready, naming the child, and the process
//! drains and exits non-zero so that its orchestrator replaces it (Erlang/OTP's
//! intensity/period).

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, AsyncContext, Context, Handler, Recipient, WrapFuture};
use futures::FutureExt;
use futures::future::LocalBoxFuture;

use super::ActorKind;
use super::envelope::{Envelope, Opened, Request};
use super::health::Health;
use super::worker::panic_message;
use crate::error::PipelineError;
use crate::events::ActorRestarted;
use crate::metrics::{ActorMetrics, Metrics};

/// When to restart and when to give up.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Failures of one kind tolerated within `window`; one more escalates.
    pub max_restarts: u32,
    pub window: Duration,
    /// Wait before the first restart; doubles with each failure inside the window.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(30),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// A child reports that it failed; the reply is how long it stays down before restarting.
pub struct ChildFailed {
    pub kind: ActorKind,
    pub child: &'static str,
    pub reason: String,
}

impl Request for ChildFailed {
    type Reply = Duration;
}

/// How instances reach their supervisor.
#[derive(Clone)]
pub struct SupervisorLink {
    addr: Recipient<Envelope<ChildFailed>>,
    metrics: Arc<ActorMetrics>,
}

impl SupervisorLink {
    /// Reports a failure and returns the supervisor's backoff (none if it is gone).
    pub async fn failed(&self, kind: ActorKind, child: &'static str, reason: String) -> Duration {
        let (env, reply) = Envelope::new(
            ChildFailed {
                kind,
                child,
                reason,
            },
            &self.metrics,
            None,
        );
        self.addr.do_send(env);
        reply.await.ok().and_then(Result::ok).unwrap_or_default()
    }

    /// [`SupervisorLink::failed`] from a thread outside the async runtime.
    pub fn failed_blocking(
        &self,
        kind: ActorKind,
        child: &'static str,
        reason: String,
    ) -> Duration {
        futures::executor::block_on(self.failed(kind, child, reason))
    }
}

/// A loop the supervisor runs and restarts: `start` makes a fresh run. A run returns `Ok(())`
/// when the pipeline stops; an error or a panic is a failure.
#[derive(Clone)]
pub struct LoopSpec {
    pub kind: ActorKind,
    pub name: &'static str,
    pub start: Arc<dyn Fn() -> LocalBoxFuture<'static, Result<(), PipelineError>> + Send + Sync>,
}

pub struct Supervisor {
    policy: RestartPolicy,
    failures: HashMap<ActorKind, VecDeque<Instant>>,
    metrics: Arc<Metrics>,
    own: Arc<ActorMetrics>,
    health: Arc<Health>,
}

impl Supervisor {
    /// Starts the supervisor on `arbiter` with its loops; returns the link its instances use.
    pub fn start(
        arbiter: &actix::ArbiterHandle,
        policy: RestartPolicy,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> (actix::Addr<Supervisor>, SupervisorLink) {
        let own = Arc::new(metrics.actor(ActorKind::Supervisor));
        let own2 = own.clone();
        let addr = Supervisor::start_in_arbiter(arbiter, move |_| Supervisor {
            policy,
            failures: HashMap::new(),
            metrics,
            own: own2,
            health,
        });
        let link = SupervisorLink {
            addr: addr.clone().recipient(),
            metrics: own,
        };
        (addr, link)
    }

    /// Counts the failure and decides: the backoff before the restart; past the intensity,
    /// also the escalation.
    fn on_failure(&mut self, kind: ActorKind, child: &'static str, reason: &str) -> Duration {
        let now = Instant::now();
        let recent = self.failures.entry(kind).or_default();
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.window)
        {
            recent.pop_front();
        }
        let n = recent.len() as u32;
        ActorRestarted {
            kind,
            child,
            reason,
            failures_in_window: n,
        }
        .emit(&self.metrics);
        if n > self.policy.max_restarts {
            self.health.escalate(format!(
                "{kind} ({child}) failed {n} times within {} s, more than actors.max_restarts ({}); last: {reason}",
                self.policy.window.as_secs(),
                self.policy.max_restarts
            ));
        }
        self.policy
            .backoff
            .saturating_mul(1 << n.saturating_sub(1).min(16))
            .min(self.policy.max_backoff)
    }

    fn spawn_loop(&mut self, spec: LoopSpec, ctx: &mut Context<Self>) {
        let run = AssertUnwindSafe((spec.start)()).catch_unwind();
        ctx.spawn(run.into_actor(self).map(move |result, act, ctx| {
            let reason = match result {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(p) => panic_message(p.as_ref()),
            };
            let wait = act.on_failure(spec.kind, spec.name, &reason);
            ctx.run_later(wait, move |act, ctx| act.spawn_loop(spec, ctx));
        }));
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        self.own.instances.inc();
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.own.instances.dec();
    }
}

impl Handler<Envelope<ChildFailed>> for Supervisor {
    type Result = ();

    fn handle(&mut self, env: Envelope<ChildFailed>, _: &mut Self::Context) {
        let Opened { msg, span, reply } = env.open(&self.own);
        let _entered = span.enter();
        let started = Instant::now();
        let wait = self.on_failure(msg.kind, msg.child, &msg.reason);
        self.own.handling.observe(started.elapsed().as_secs_f64());
        self.own.ok.inc();
        reply.send(Ok(wait));
    }
}

/// Adds a loop to the supervisor's children and starts it.
pub struct Supervise(pub LoopSpec);

impl actix::Message for Supervise {
    type Result = ();
}

impl Handler<Supervise> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Supervise, ctx: &mut Self::Context) {
        self.spawn_loop(msg.0, ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_intensity_escalates() {
        let metrics = Metrics::new();
        let health = Health::new();
        let mut s = Supervisor {
            policy: RestartPolicy {
                max_restarts: 3,
                window: Duration::from_secs(30),
                backoff: Duration::from_millis(100),
                max_backoff: Duration::from_millis(350),
            },
            failures: HashMap::new(),
            own: Arc::new(metrics.actor(ActorKind::Supervisor)),
            metrics: metrics.clone(),
            health: health.clone(),
        };
        let waits: Vec<u128> = (0..3)
            .map(|_| {
                s.on_failure(ActorKind::Embedder, "instance", "boom")
                    .as_millis()
            })
            .collect();
        assert_eq!(waits, [100, 200, 350]);
        assert!(
            health.escalation().is_none(),
            "3 failures are within the intensity"
        );
        // Another kind has its own count.
        s.on_failure(ActorKind::Clusterer, "instance", "boom");
        assert!(health.escalation().is_none());
        s.on_failure(ActorKind::Embedder, "instance", "boom");
        let why = health.escalation().expect("the 4th failure escalates");
        assert!(why.contains("embedder") && why.contains("boom"), "{why}");
        assert_eq!(health.problems().len(), 1);
        assert_eq!(metrics.restarts.with_label_values(&["embedder"]).get(), 4);
    }
}
