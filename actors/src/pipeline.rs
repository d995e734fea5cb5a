//! Wires the pipeline: the supervisor, the pools of every actor kind, the pet scheduler and
//! the loops, and the handle that drains and stops them.
//!
//! ```text
//! Supervisor ── restarts instances and loops (backoff; past the intensity: Health not ready)
//! ├── read loop ──RedisOp::Read──▶ StreamReader ×N ──▶ PetScheduler ×1 (a queue per pet)
//! │                                                      │ one batch per pet at a time,
//! │                                                      │ round-robin, ≤ max_inflight_jobs
//! │                                                      ▼
//! │     batch: LockPet ─▶ StreamReader · StartJobs/LoadPet ─▶ PostgresWriter ×N
//! │            per new photo: reserve an Embedder slot, read the blob, EmbedPhoto ─▶ Embedder ×N
//! │                           StoreEmbedding ─▶ PostgresWriter (kept at once)
//! │            ClusterVectors ─▶ Clusterer ×N · PickHeroes ─▶ HeroSelector ×N
//! │            Commit ─▶ PostgresWriter · Ack ─▶ StreamReader · UnlockPet ─▶ StreamReader
//! ├── keep-alive loop ─▶ StreamReader (held entries' idle time, pet locks' TTL)
//! ├── depth loop ─▶ StreamReader (lag and pending gauges, the group, trimming)
//! ├── relay loop ─▶ PostgresWriter (committed jobs without an entry) ─▶ StreamReader (enqueue)
//! └── sweep loop ─▶ storage (old objects) ─▶ PostgresWriter (which have rows)
//! ```

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::Arbiter;
use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::algo::budget::MemoryBudget;
use crate::algo::cluster::ClusterParams;
use crate::algo::decode::DecodeLimits;
use crate::algo::embed::{ImageEncoder, Preprocess};
use crate::algo::prepared::PreparedCache;
use crate::job::JobEntry;
use crate::loops;
use crate::metrics::Metrics;
use crate::ports::{BlobStore, Delivery, JobQueue, Store};
use crate::runtime::supervisor::{LoopSpec, RestartPolicy, Supervise, Supervisor};
use crate::runtime::worker::{InstanceCx, start_async, start_sync};
use crate::runtime::{ActorKind, Faults, Health, Pool};
use crate::scheduler::{PetScheduler, SchedulerLink, SchedulerMsg};
use crate::stages::*;

/// How many instances of each actor kind run.
#[derive(Debug, Clone, Copy)]
pub struct ActorCounts {
    pub stream_readers: usize,
    pub embedders: usize,
    pub clusterers: usize,
    pub hero_selectors: usize,
    pub postgres_writers: usize,
}

#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub stream: String,
    pub group: String,
    pub deadletter_stream: String,
    /// Unique per process (`host-pid-random`).
    pub consumer: String,
    pub block_ms: u64,
    /// Entries idle this long in another consumer's hands are reclaimed; also the lifetime
    /// of a pet's lock without a refresh.
    pub claim_min_idle_ms: u64,
    pub max_deliveries: u32,
    /// First retry backoff; doubles per attempt, with jitter.
    pub retry_base: Duration,
    pub counts: ActorCounts,
    pub mailbox_capacity: usize,
    /// Pets processed at once (each batch may complete several coalesced jobs).
    pub max_inflight_jobs: usize,
    /// Entries read from the stream and held here (waiting for their pet or running).
    pub max_queued_jobs: usize,
    pub restart: RestartPolicy,
    /// A job running longer than this gives up its slot and lock and is retried.
    pub job_timeout: Duration,
    /// How often the outbox relay looks for committed jobs without a stream entry, and how
    /// old such a job must be (an upload still enqueueing it is not one).
    pub relay_interval: Duration,
    pub relay_grace: Duration,
    /// How often the sweeper looks for objects no row names, and how old they must be.
    pub sweep_interval: Duration,
    pub orphan_grace: Duration,
    pub params: ClusterParams,
    /// Capture time as a second clustering signal (`clustering.capture_time`); `None`: off.
    pub time_rule: Option<crate::algo::cluster::TimeRule>,
    /// Bytes of pets' clusterings kept between jobs (`clustering.cache_mib`); 0: none, every
    /// job re-clusters its pet.
    pub cluster_cache_bytes: usize,
    pub limits: DecodeLimits,
}

/// The worlds the pipeline talks to.
#[derive(Clone)]
pub struct Ports {
    pub queue: Arc<dyn JobQueue>,
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    /// Where the store's database is (span attributes).
    pub db_target: DbTarget,
    /// The process's decoding memory budget (shared with the API's checks).
    pub budget: Arc<MemoryBudget>,
    /// What the API of this process prepared of uploads for the embedders, if it runs here.
    pub prepared: Option<Arc<PreparedCache>>,
}

/// What the scheduler, the batches and the loops share.
pub(crate) struct Core {
    pub settings: PipelineSettings,
    pub model_version: String,
    /// The model's preprocessing, when it embeds prepared photos' crops.
    pub crop_preprocess: Option<Preprocess>,
    pub prepared: Option<Arc<PreparedCache>>,

    pub metrics: Arc<Metrics>,
    pub readers: Pool<RedisOp>,
    pub writers: Pool<DbOp>,
    pub embedders: Pool<EmbedPhoto>,
    pub clusterers: Pool<ClusterVectors>,
    pub heroes: Pool<PickHeroes>,
    /// Pets' clusterings kept between jobs.
    pub clusterings: crate::pet_cache::PetClusterings,
    pub blobs: Arc<dyn BlobStore>,
    pub tracked: Arc<Tracked>,
    pub faults: Arc<Faults>,
    pub health: Arc<Health>,
    /// Permits for held entries (`max_queued_jobs`).
    pub held: Arc<Semaphore>,
    /// True once the pipeline stops reading (shutdown or escalation).
    pub reading_stopped: watch::Receiver<bool>,
    /// True once everything stops.
    pub stopped: watch::Receiver<bool>,
}

/// Entries and pet locks held by this process: the keep-alive loop refreshes them.
#[derive(Default)]
pub(crate) struct Tracked {
    entries: Mutex<HashSet<String>>,
    pets: Mutex<HashSet<String>>,
    /// Pets whose lock a keep-alive found held by someone else (or gone).
    lost: Mutex<HashSet<String>>,
}

impl Tracked {
    pub fn holds_entry(&self, id: &str) -> bool {
        self.entries.lock().expect("tracked entries").contains(id)
    }

    pub fn entries(&self) -> Vec<String> {
        self.entries
            .lock()
            .expect("tracked entries")
            .iter()
            .cloned()
            .collect()
    }

    pub fn pets(&self) -> Vec<String> {
        self.pets
            .lock()
            .expect("tracked pets")
            .iter()
            .cloned()
            .collect()
    }

    pub fn mark_lost(&self, pets: Vec<String>) {
        let held = self.pets.lock().expect("tracked pets");
        let mut lost = self.lost.lock().expect("lost pets");
        for p in pets.into_iter().filter(|p| held.contains(p)) {
            tracing::warn!(pet_id = %p, "This worker no longer holds the pet's lock; its job gives up before committing.");
            lost.insert(p);
        }
    }
}

/// One stream entry read by this process, until it is acknowledged, dead-lettered or handed
/// back. While it lives, its idle time is kept fresh (no other consumer reclaims it) and it
/// holds one of the `max_queued_jobs` permits; dropped without an acknowledgement (a panic,
/// a shutdown) it simply stays pending in the stream for whoever reclaims it.
pub(crate) struct Held {
    pub delivery: Delivery,
    pub entry: JobEntry,
    /// Deliveries so far plus attempts made in this process.
    pub attempts: u32,
    pub received: Instant,
    tracked: Arc<Tracked>,
    _permit: OwnedSemaphorePermit,
}

impl Held {
    pub fn new(
        delivery: Delivery,
        entry: JobEntry,
        permit: OwnedSemaphorePermit,
        tracked: &Arc<Tracked>,
    ) -> Self {
        tracked
            .entries
            .lock()
            .expect("tracked entries")
            .insert(delivery.stream_id.clone());
        Held {
            attempts: (delivery.deliveries as u32).max(1),
            delivery,
            entry,
            received: Instant::now(),
            tracked: tracked.clone(),
            _permit: permit,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.tracked
            .entries
            .lock()
            .expect("tracked entries")
            .remove(&self.delivery.stream_id);
    }
}

/// This process holds a pet's cross-process lock, with the fencing token taken when it got
/// it. Dropping it releases the lock (through the stream-reader, in the background); a
/// crashed process's lock expires after `claim_min_idle_ms` without refresh.
pub(crate) struct PetLease {
    pub pet_id: String,
    pub fence: i64,
    core: Arc<Core>,
}

impl PetLease {
    pub fn new(pet_id: String, fence: i64, core: &Arc<Core>) -> Self {
        core.tracked
            .pets
            .lock()
            .expect("tracked pets")
            .insert(pet_id.clone());
        PetLease {
            pet_id,
            fence,
            core: core.clone(),
        }
    }

    /// Whether a keep-alive found the lock no longer ours.
    pub fn is_lost(&self) -> bool {
        self.core
            .tracked
            .lost
            .lock()
            .expect("lost pets")
            .contains(&self.pet_id)
    }
}

impl Drop for PetLease {
    fn drop(&mut self) {
        self.core
            .tracked
            .pets
            .lock()
            .expect("tracked pets")
            .remove(&self.pet_id);
        self.core
            .tracked
            .lost
            .lock()
            .expect("lost pets")
            .remove(&self.pet_id);
        let (core, pet_id) = (self.core.clone(), std::mem::take(&mut self.pet_id));
        if tokio::runtime::Handle::try_current().is_ok() {
            actix::spawn(async move {
                if let Err(e) = core.readers.send(RedisOp::UnlockPet { pet_id }).await {
                    tracing::warn!(error = %e, "Releasing a pet's lock failed; it expires on its own.");
                }
            });
        }
    }
}

/// A running pipeline; dropping it does not stop it, [`PipelineHandle::shutdown`] does.
pub struct PipelineHandle {
    stop_reading: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    scheduler: SchedulerLink,
    drained: watch::Receiver<bool>,
    health: Arc<Health>,
    arbiter: Arbiter,
}

impl PipelineHandle {
    /// Stops reading, hands back entries no job has started, waits up to `timeout` for the
    /// running ones to finish, and returns whether they all did. Unfinished entries stay
    /// pending for another consumer.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        let _ = self.stop_reading.send(true);
        self.scheduler.tell(SchedulerMsg::Drain);
        let mut drained = self.drained.clone();
        let done = tokio::time::timeout(timeout, drained.wait_for(|d| *d))
            .await
            .is_ok_and(|r| r.is_ok());
        let _ = self.stop.send(true);
        self.arbiter.stop();
        done
    }

    /// The pipeline's readiness, shared with `/readyz`.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }
}

/// Starts the actors and the loops. Must run inside an actix `System`.
pub fn start(
    settings: PipelineSettings,
    ports: Ports,
    model: Arc<dyn ImageEncoder>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    faults: Arc<Faults>,
) -> PipelineHandle {
    let c = settings.counts;
    let cap = settings.mailbox_capacity;
    let io = Arbiter::new();
    let handle = io.handle();
    let (supervisor, link) =
        Supervisor::start(&handle, settings.restart, metrics.clone(), health.clone());
    let cx = |kind| InstanceCx {
        metrics: Arc::new(metrics.actor(kind)),
        supervisor: link.clone(),
        faults: faults.clone(),
    };

    let reader = StreamReader {
        queue: ports.queue.clone(),
        stream: settings.stream.clone(),
        deadletter_stream: settings.deadletter_stream.clone(),
        group: settings.group.clone(),
        consumer: settings.consumer.clone(),
        block_ms: settings.block_ms,
        lock_ttl_ms: settings.claim_min_idle_ms,
    };
    let readers = start_async(
        c.stream_readers,
        cap,
        &handle,
        cx(ActorKind::StreamReader),
        move || StreamReader {
            queue: reader.queue.clone(),
            stream: reader.stream.clone(),
            deadletter_stream: reader.deadletter_stream.clone(),
            group: reader.group.clone(),
            consumer: reader.consumer.clone(),
            block_ms: reader.block_ms,
            lock_ttl_ms: reader.lock_ttl_ms,
        },
    );
    let (store, target, m) = (
        ports.store.clone(),
        ports.db_target.clone(),
        metrics.clone(),
    );
    let writers = start_async(
        c.postgres_writers,
        cap,
        &handle,
        cx(ActorKind::PostgresWriter),
        move || PostgresWriter {
            store: store.clone(),
            target: target.clone(),
            metrics: m.clone(),
        },
    );
    let (enc, limits, m) = (model.clone(), settings.limits, metrics.clone());
    let budget = ports.budget.clone();
    let embedders = start_sync(c.embedders, cap, cx(ActorKind::Embedder), move || {
        Embedder {
            model: enc.clone(),
            limits,
            budget: budget.clone(),
            metrics: m.clone(),
        }
    });
    let clusterers = start_sync(c.clusterers, cap, cx(ActorKind::Clusterer), || Clusterer);
    let heroes = start_sync(c.hero_selectors, cap, cx(ActorKind::HeroSelector), || {
        HeroSelector
    });

    metrics.register_model_version(model.model_version());
    let (stop_reading, reading_stopped) = watch::channel(false);
    let (stop, stopped) = watch::channel(false);
    let core = Arc::new(Core {
        model_version: model.model_version().to_owned(),
        crop_preprocess: model.crop_preprocess().cloned(),
        held: Arc::new(Semaphore::new(settings.max_queued_jobs.max(1))),
        clusterings: crate::pet_cache::PetClusterings::new(settings.cluster_cache_bytes, &metrics),
        settings,
        metrics: metrics.clone(),
        readers,
        writers,
        embedders,
        clusterers,
        heroes,
        blobs: ports.blobs.clone(),
        prepared: ports.prepared.clone(),
        tracked: Arc::default(),

        faults,
        health: health.clone(),
        reading_stopped,
        stopped,
    });
    let (drained_tx, drained) = watch::channel(false);
    let scheduler = PetScheduler::start(&handle, core.clone(), drained_tx);

    let supervise = |kind,
                     name,
                     start: Arc<
        dyn Fn() -> futures::future::LocalBoxFuture<'static, _> + Send + Sync,
    >| {
        supervisor.do_send(Supervise(LoopSpec { kind, name, start }));
    };
    let (cr, sr) = (core.clone(), scheduler.clone());
    supervise(
        ActorKind::StreamReader,
        "read_loop",
        Arc::new(move || loops::read_loop(cr.clone(), sr.clone()).boxed_local()),
    );
    let ck = core.clone();
    supervise(
        ActorKind::StreamReader,
        "keep_alive_loop",
        Arc::new(move || loops::keep_alive_loop(ck.clone()).boxed_local()),
    );
    let cd = core.clone();
    supervise(
        ActorKind::StreamReader,
        "depth_loop",
        Arc::new(move || loops::depth_loop(cd.clone()).boxed_local()),
    );
    let cr = core.clone();
    supervise(
        ActorKind::StreamReader,
        "relay_loop",
        Arc::new(move || loops::relay_loop(cr.clone()).boxed_local()),
    );
    let cs = core.clone();
    supervise(
        ActorKind::PostgresWriter,
        "sweep_loop",
        Arc::new(move || loops::sweep_loop(cs.clone()).boxed_local()),
    );
    PipelineHandle {
        stop_reading,
        stop,
        scheduler,
        drained,
        health,
        arbiter: io,
    }
}
