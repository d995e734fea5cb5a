//! The pet scheduler: one queue of held entries per pet, one batch per pet at a time, at most
//! `max_inflight_jobs` batches at once, pets taken round-robin.
//!
//! A pet whose batch is running, whose lock another process holds, or whose batch waits for
//! a retry holds no slot: its entries wait in its queue while other pets' batches run. When
//! its turn comes, every entry in its queue goes into one batch, which clusters the pet once
//! and completes all of those jobs with one cluster version (coalescing). Retry decisions are
//! made here, from the batch's outcome: back into the queue after a backoff, or to the
//! dead-letter stream once `max_deliveries` attempts are spent.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, AsyncContext, Context, Handler, WrapFuture};
use tokio::sync::watch;

use crate::batch::{self, BatchEnd, BatchGuard, Outcome};
use crate::events::JobRetried;
use crate::metrics::ActorMetrics;
use crate::pipeline::{Core, Held, PetLease};
use crate::runtime::ActorKind;
use crate::runtime::{Envelope, Opened, Request};

/// What the scheduler is told.
pub enum SchedulerMsg {
    /// Entries read from the stream.
    Submit(Vec<Held>),
    /// A batch ended (sent by its guard on every path).
    Ended(BatchEnd),
    /// Stop starting batches; hand back what waits.
    Drain,
}

impl Request for SchedulerMsg {
    type Reply = ();
}

/// How the batches and the pipeline handle reach the scheduler.
#[derive(Clone)]
pub(crate) struct SchedulerLink {
    addr: Addr<PetScheduler>,
    metrics: Arc<ActorMetrics>,
}

impl SchedulerLink {
    /// Sends without waiting (from `Drop` too); a stopped scheduler drops the message.
    pub fn tell(&self, msg: SchedulerMsg) {
        let (env, _) = Envelope::new(msg, &self.metrics, None);
        self.addr.do_send(env);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PetState {
    Idle,
    Running,
    Waiting,
}

struct PetQueue {
    queue: VecDeque<Held>,
    state: PetState,
    in_ready: bool,
    /// A lock kept from the pet's last batch for its next one.
    lease: Option<PetLease>,
    /// Wait before asking for the lock again while another process holds it.
    lock_backoff: Duration,
}

impl PetQueue {
    fn new() -> Self {
        PetQueue {
            queue: VecDeque::new(),
            state: PetState::Idle,
            in_ready: false,
            lease: None,
            lock_backoff: LOCK_RETRY_MIN,
        }
    }
}

const LOCK_RETRY_MIN: Duration = Duration::from_millis(50);
const LOCK_RETRY_MAX: Duration = Duration::from_secs(1);

pub struct PetScheduler {
    core: Arc<Core>,
    me: SchedulerLink,
    own: Arc<ActorMetrics>,
    pets: HashMap<String, PetQueue>,
    ready: VecDeque<String>,
    free_slots: usize,
    running: usize,
    draining: bool,
    drained: watch::Sender<bool>,
}

impl PetScheduler {
    /// Starts the scheduler on `arbiter`; `drained` turns true once it drains and no batch runs.
    pub(crate) fn start(
        arbiter: &actix::ArbiterHandle,
        core: Arc<Core>,
        drained: watch::Sender<bool>,
    ) -> SchedulerLink {
        let own = Arc::new(core.metrics.actor(ActorKind::PetScheduler));
        let metrics = own.clone();
        let addr = PetScheduler::start_in_arbiter(arbiter, move |ctx| {
            let me = SchedulerLink {
                addr: ctx.address(),
                metrics: own.clone(),
            };
            PetScheduler::new(core, me, own, drained)
        });
        SchedulerLink { addr, metrics }
    }

    fn new(
        core: Arc<Core>,
        me: SchedulerLink,
        own: Arc<ActorMetrics>,
        drained: watch::Sender<bool>,
    ) -> Self {
        // Its mailbox holds at most one message per held entry and per running batch.
        own.capacity
            .set((core.settings.max_queued_jobs + core.settings.max_inflight_jobs) as i64);
        PetScheduler {
            free_slots: core.settings.max_inflight_jobs.max(1),
            core,
            me,
            own,
            pets: HashMap::new(),
            ready: VecDeque::new(),
            running: 0,
            draining: false,
            drained,
        }
    }

    fn enqueue_ready(&mut self, pet: &str) {
        if let Some(q) = self.pets.get_mut(pet)
            && q.state == PetState::Idle
            && !q.queue.is_empty()
            && !q.in_ready
        {
            q.in_ready = true;
            self.ready.push_back(pet.to_owned());
        }
    }

    /// Starts batches while there are free slots and pets ready, in round-robin order.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        while self.free_slots > 0 && !self.draining {
            let Some(pet) = self.ready.pop_front() else {
                break;
            };
            let Some(q) = self.pets.get_mut(&pet) else {
                continue;
            };
            q.in_ready = false;
            if q.state != PetState::Idle || q.queue.is_empty() {
                continue;
            }
            let entries: Vec<Held> = q.queue.drain(..).collect();
            q.state = PetState::Running;
            let lease = q.lease.take();
            self.free_slots -= 1;
            self.running += 1;
            let guard = BatchGuard::new(&self.core, self.me.clone(), pet, entries, lease);
            ctx.spawn(batch::run(self.core.clone(), guard).into_actor(self));
        }
        self.check_drained();
    }

    fn check_drained(&self) {
        if self.draining && self.running == 0 {
            self.drained.send_replace(true);
        }
    }

    fn wake_later(&self, pet: String, after: Duration, ctx: &mut Context<Self>) {
        ctx.run_later(after, move |act, ctx| {
            act.on_wake(&pet);
            act.dispatch(ctx);
        });
    }

    fn on_wake(&mut self, pet: &str) {
        if let Some(q) = self.pets.get_mut(pet)
            && q.state == PetState::Waiting
        {
            q.state = PetState::Idle;
        }
        self.enqueue_ready(pet);
    }

    fn on_submit(&mut self, held: Vec<Held>) {
        for h in held {
            if self.draining {
                continue; // handed back: it stays pending in the stream
            }
            let pet = h.entry.pet_id.clone();
            self.pets
                .entry(pet.clone())
                .or_insert_with(PetQueue::new)
                .queue
                .push_back(h);
            self.enqueue_ready(&pet);
        }
    }

    fn on_ended(&mut self, end: BatchEnd, ctx: &mut Context<Self>) {
        self.free_slots += 1;
        self.running -= 1;
        let BatchEnd {
            pet_id,
            outcome,
            entries,
            lease,
        } = end;
        let (max_deliveries, retry_base) = (
            self.core.settings.max_deliveries,
            self.core.settings.retry_base,
        );
        let draining = self.draining;
        let mut exhausted = Vec::new();
        let mut wait = None;
        let mut reason = String::new();
        let q = self
            .pets
            .entry(pet_id.clone())
            .or_insert_with(PetQueue::new);
        q.state = PetState::Idle;
        let requeue = match outcome {
            Outcome::Done => {
                q.lock_backoff = LOCK_RETRY_MIN;
                entries
            }
            Outcome::LockBusy => {
                wait = Some(q.lock_backoff);
                q.lock_backoff = (q.lock_backoff * 2).min(LOCK_RETRY_MAX);
                entries
            }
            Outcome::Retry(why) => {
                let mut keep = Vec::new();
                for mut h in entries {
                    h.attempts += 1;
                    if h.attempts > max_deliveries {
                        exhausted.push(h);
                    } else {
                        keep.push(h);
                    }
                }
                if let Some(attempt) = keep.iter().map(|h| h.attempts).min() {
                    let after = backoff(retry_base, attempt - 1);
                    for h in &keep {
                        JobRetried {
                            job_id: h.entry.job_id,
                            attempt: h.attempts - 1,
                            backoff: after,
                            error: &why,
                        }
                        .emit(&self.core.metrics);
                    }
                    wait = Some(after);
                }
                reason = why;
                keep
            }
        };
        for h in requeue.into_iter().rev() {
            q.queue.push_front(h);
        }
        // The lock goes to the pet's next batch when that can start now; else it is released.
        if wait.is_none() && !q.queue.is_empty() && !draining {
            q.lease = lease;
        }
        let waiting = wait.is_some() && !draining;
        if waiting {
            q.state = PetState::Waiting;
        }
        let forget = !waiting && q.queue.is_empty() && q.lease.is_none();
        if !exhausted.is_empty() {
            let why = format!(
                "gave up after {} attempts: {reason}",
                exhausted[0].attempts - 1
            );
            let core = self.core.clone();
            ctx.spawn(
                async move { batch::dead_letter(&core, exhausted, &why).await }.into_actor(self),
            );
        }
        match wait {
            Some(after) if waiting => self.wake_later(pet_id, after, ctx),
            _ if forget => {
                self.pets.remove(&pet_id);
            }
            _ => self.enqueue_ready(&pet_id),
        }
        if draining {
            self.hand_back_queued();
        }
    }

    /// Drops every entry no batch has started: they stay pending for another consumer.
    fn hand_back_queued(&mut self) {
        self.ready.clear();
        for q in self.pets.values_mut() {
            q.queue.clear();
            q.lease = None;
        }
        self.pets.retain(|_, q| q.state == PetState::Running);
    }
}

/// Exponential backoff with jitter between half and the whole step.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    let step = base.saturating_mul(1 << attempt.saturating_sub(1).min(10));
    let jitter = rand::random::<f64>() * 0.5 + 0.5;
    step.mul_f64(jitter)
}

impl Actor for PetScheduler {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        self.own.instances.inc();
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.own.instances.dec();
    }
}

impl Handler<Envelope<SchedulerMsg>> for PetScheduler {
    type Result = ();

    fn handle(&mut self, env: Envelope<SchedulerMsg>, ctx: &mut Self::Context) {
        let Opened { msg, span, reply } = env.open(&self.own);
        let _entered = span.enter();
        let started = Instant::now();
        match msg {
            SchedulerMsg::Submit(held) => self.on_submit(held),
            SchedulerMsg::Ended(end) => self.on_ended(end, ctx),
            SchedulerMsg::Drain => {
                self.draining = true;
                self.hand_back_queued();
            }
        }
        self.dispatch(ctx);
        self.own.handling.observe(started.elapsed().as_secs_f64());
        self.own.ok.inc();
        reply.send(Ok(()));
    }
}
