//! Builds the application for `serve`, `api` or `worker`: connections, the
//! HTTP server bound to its port (port 0 in tests), and the actor pipeline.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use actix_web_prom::PrometheusMetricsBuilder;
use actors::algo::budget::MemoryBudget;
use actors::algo::decode::DecodeLimits;
use actors::algo::embed::{EmbedError, ImageEncoder, OnnxEmbedder, Preprocess};
use actors::algo::prepared::PreparedCache;
use actors::metrics::Metrics;
use actors::ort_encoder::{OrtEncoder, OrtOptions};
use actors::pipeline::{self, ActorCounts, PipelineHandle, PipelineSettings, Ports};
use actors::runtime::{Faults, Health};
use actors::stages::DbTarget;
use anyhow::Context;
use prometheus::Registry;
use sqlx::PgPool;
use tracing_actix_web::TracingLogger;

use crate::adapters::postgres::{self, MIGRATOR, PgStore};
use crate::adapters::redis_queue::RedisQueue;
use crate::adapters::storage::Storage;
use crate::api::rate_limit::RateLimiter;
use crate::api::{self, auth::Jwt};
use crate::config::{EmbedderBackend, Settings};

/// What the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// API and worker in one process, internal endpoints on the API port.
    Serve,
    /// The API only.
    Api,
    /// The worker, with health and metrics on `server.internal_bind`.
    Worker,
}

/// Shared by every request handler.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub db: PgPool,
    pub queue: RedisQueue,
    pub storage: Storage,
    pub jwt: Jwt,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    /// The pipeline's readiness (never failing in `api` mode).
    pub health: Arc<Health>,
    /// Per-caller limit on `/v1/*`; `None` when `rate_limit.requests_per_second` is 0.
    pub limiter: Option<RateLimiter>,
    /// Per-peer limit on `/healthz` and `/readyz`.
    pub probe_limiter: Option<RateLimiter>,
    /// `/readyz`'s last dependency check.
    pub ready_cache: api::ReadyCache,
    /// Development drills: pause uploads at a point of their work.
    pub upload_pause: Option<(api::UploadPoint, Duration)>,
    pub decoding: Decoding,
    /// Where uploads commit their rows and jobs, together with concurrent ones.
    pub uploads: postgres::UploadCommitter,
    /// Where uploads record their jobs' stream ids.
    pub stream_ids: postgres::StreamIdRecorder,
}

/// How photos are decoded, the same in the API's checks and in the embedders.
/// How long a prepared photo waits for its embedder before it is dropped: well past the
/// time a queued job waits, short enough that entries nobody takes do not hold the budget.
const PREPARED_TTL: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub struct Decoding {
    pub limits: DecodeLimits,
    /// The configured model's preprocessing (so a check decodes at the embedder's scale,
    /// and prepares the model input for it).
    pub preprocess: Preprocess,
    /// Where the API keeps what it decoded of an upload for this process's embedders
    /// ([`actors::algo::prepared`]): `serve` only, and not with `embedder.prepared_cache_mib
    /// = 0`.
    pub prepared: Option<Arc<PreparedCache>>,
    /// The process's decoding memory budget.
    pub budget: Arc<MemoryBudget>,
}

impl Decoding {
    /// `with_cache`: the API and the embedders run in this process.
    pub fn from_settings(settings: &Settings, with_cache: bool) -> anyhow::Result<Self> {
        let (_, _, pre) = settings.embedder.resolve()?;
        let cache_bytes = settings.embedder.prepared_cache_mib << 20;
        Ok(Decoding {
            limits: settings.server.decode_limits(),
            preprocess: pre,
            prepared: (with_cache && cache_bytes > 0)
                .then(|| Arc::new(PreparedCache::new(cache_bytes, PREPARED_TTL))),
            budget: Arc::new(MemoryBudget::new(
                settings.server.decode_memory_budget_mib << 20,
            )),
        })
    }
}

pub struct Application {
    port: u16,
    server: Server,
    pipeline: Option<PipelineHandle>,
    health: Arc<Health>,
    shutdown_timeout: Duration,
    unready_grace: Duration,
    /// OTLP metrics export, when asked for; dropped last, so its final export sees the drain.
    metrics_export: Option<crate::otlp_metrics::MetricsExporter>,
}

/// What a process shares with its application beyond the settings.
#[derive(Default)]
pub struct BuildOptions {
    /// The metrics handle (the exporter counts dropped spans in it too); a new one if unset.
    pub metrics: Option<Arc<Metrics>>,
    /// An already loaded model (tests share one); loaded from the settings if unset.
    pub model: Option<Arc<dyn ImageEncoder>>,
    /// Injected faults (tests and drills); none if unset.
    pub faults: Option<Arc<Faults>>,
    /// Pause every upload at a point of its work (tests and drills).
    pub upload_pause: Option<(api::UploadPoint, Duration)>,
}

/// `host-pid-random`: unique per process, so a restarted worker never inherits
/// a dead one's pending entries by name.
pub fn consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xFF_FFFF
    )
}

/// Loads the configured ONNX model with the configured backend (slow: optimisation takes
/// seconds, so off the async threads). The ONNX Runtime backend gets one session per
/// embedder thread (`actors.embedders`); when its library is missing or does not load, the
/// built-in tract backend takes over (same embeddings, so the model version and cached
/// embeddings stay), and one log line says why.
pub async fn load_model(settings: &Settings) -> anyhow::Result<Arc<dyn ImageEncoder>> {
    let (name, output, pre) = settings.embedder.resolve()?;
    let backend = settings.embedder.backend()?;
    let path = settings.embedder.model_path.clone();
    let sessions = settings.actors.embedders.max(1);
    let threads = settings.embedder.intra_op_threads(sessions)?;
    let load = move || -> Result<Arc<dyn ImageEncoder>, EmbedError> {
        let tract = |p: Preprocess| -> Result<Arc<dyn ImageEncoder>, EmbedError> {
            let m = OnnxEmbedder::load(&path, &name, &output, p)?.with_threads(threads);
            Ok(Arc::new(m))
        };
        match backend {
            EmbedderBackend::Tract => tract(pre),
            EmbedderBackend::OnnxRuntime { library } => {
                let ort = match library.filter(|l| l.is_file()) {
                    None => Err(
                        "no libonnxruntime.so at embedder.onnxruntime_library or ORT_DYLIB_PATH \
                         (`make model` fetches it)"
                            .to_owned(),
                    ),
                    Some(library) => {
                        let options = OrtOptions {
                            library,
                            intra_threads: threads,
                            sessions,
                        };
                        OrtEncoder::load(&path, &name, &output, pre.clone(), &options)
                            .map_err(|e| e.to_string())
                    }
                };
                match ort {
                    Ok(m) => Ok(Arc::new(m)),
                    Err(why) => {
                        tracing::warn!(
                            reason = %why,
                            "ONNX Runtime is not available; embedding with the built-in tract \
                             backend instead (the same embeddings, about twice as slow)."
                        );
                        tract(pre)
                    }
                }
            }
        }
    };
    let model = tokio::task::spawn_blocking(load).await?.with_context(|| {
        format!(
            "loading the embedder model with backend `{}` (embedder.model_path; \
             `make model` fetches the default one)",
            settings.embedder.backend
        )
    })?;
    tracing::info!(
        backend = model.backend(),
        model_version = model.model_version(),
        intra_op_threads = threads,
        "Loaded the embedder model."
    );
    Ok(model)
}

pub async fn migrate(db: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(db)
        .await
        .context("applying database migrations")
}

impl Application {
    /// Connects, migrates (if configured), binds, then starts the pipeline (unless `Api`).
    /// Must run inside an actix `System`.
    pub async fn build(settings: Settings, mode: Mode) -> anyhow::Result<Self> {
        Self::build_with(settings, mode, BuildOptions::default()).await
    }

    /// As [`Application::build`], reusing an already loaded model (tests share one).
    pub async fn build_with_model(
        settings: Settings,
        mode: Mode,
        model: Option<Arc<dyn ImageEncoder>>,
    ) -> anyhow::Result<Self> {
        let options = BuildOptions {
            model,
            ..BuildOptions::default()
        };
        Self::build_with(settings, mode, options).await
    }

    pub async fn build_with(
        settings: Settings,
        mode: Mode,
        options: BuildOptions,
    ) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        let metrics = options.metrics.unwrap_or_else(Metrics::new);
        let db = postgres::pool(&settings.postgres).context("postgres.url")?;
        if settings.postgres.migrate_on_start && mode != Mode::Api {
            migrate(&db).await?;
        }
        let readers = if mode == Mode::Api {
            0
        } else {
            settings.actors.stream_readers
        };
        let queue = RedisQueue::connect(&settings.redis, readers)
            .await
            .context("connecting to Redis (redis.url)")?;
        let storage = Storage::from_url(&settings.storage.url).context("opening storage.url")?;
        let registry = Registry::new();
        metrics.register(&registry)?;
        let prom = PrometheusMetricsBuilder::new(actors::metrics::HTTP_NAMESPACE)
            .registry(registry.clone())
            .mask_unmatched_patterns("UNKNOWN")
            .build()
            .map_err(|e| anyhow::anyhow!("registering HTTP metrics: {e}"))?;
        let metrics_export =
            crate::otlp_metrics::start(&settings, registry.clone(), metrics.clone());
        let model = match (mode, options.model) {
            (Mode::Api, _) => None,
            (_, Some(m)) => Some(m),
            (_, None) => Some(load_model(&settings).await?),
        };

        // Bind first: a process that cannot take its port takes no job either.
        let bind = if mode == Mode::Worker {
            &settings.server.internal_bind
        } else {
            &settings.server.bind
        };
        let listener = TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?;
        let port = listener.local_addr()?.port();
        let health = Health::new();
        let decoding = Decoding::from_settings(&settings, mode == Mode::Serve)?;
        let state = web::Data::new(AppState {
            jwt: Jwt::from_settings(&settings.auth),
            settings: settings.clone(),
            db: db.clone(),
            queue: queue.clone(),
            storage: storage.clone(),
            registry,
            metrics: metrics.clone(),
            health: health.clone(),
            limiter: RateLimiter::new(
                settings.rate_limit.requests_per_second,
                settings.rate_limit.burst,
            ),
            probe_limiter: RateLimiter::new(
                settings.rate_limit.probe_requests_per_second,
                settings.rate_limit.probe_burst,
            ),
            ready_cache: Default::default(),
            upload_pause: options.upload_pause,
            decoding: decoding.clone(),
            uploads: postgres::UploadCommitter::spawn(db.clone()),
            stream_ids: postgres::StreamIdRecorder::spawn(db.clone()),
        });
        let with_api = mode != Mode::Worker;
        let max_body = settings.server.max_upload_bytes;
        let server = HttpServer::new(move || {
            App::new()
                .wrap(prom.clone())
                .wrap(TracingLogger::<api::http_span::SemconvRootSpan>::new())
                // Outermost: a made-up method is refused before a metric or span names it.
                .wrap(actix_web::middleware::from_fn(api::standard_methods_only))
                .app_data(state.clone())
                .app_data(web::PayloadConfig::new(max_body as usize))
                .configure(api::configure_internal)
                .configure(|cfg| {
                    if with_api {
                        api::configure_api(cfg)
                    }
                })
                .default_service(web::to(api::not_found))
        })
        .listen(listener)?
        // A client that is slow to send its request head gets 408; the upload handler
        // applies the same limit to pauses in the body.
        .client_request_timeout(Duration::from_millis(settings.server.request_timeout_ms))
        .client_disconnect_timeout(Duration::from_millis(settings.server.disconnect_timeout_ms))
        .shutdown_timeout(30)
        .disable_signals()
        .run();
        tracing::info!(port, mode = ?mode, "Listening.");

        let pipeline = model.map(|model| {
            let faults = options.faults.unwrap_or_default();
            start_pipeline(
                &settings,
                db,
                queue,
                storage,
                model,
                metrics,
                health.clone(),
                faults,
                decoding.clone(),
            )
        });
        Ok(Application {
            port,
            server,
            pipeline,
            health,
            shutdown_timeout: Duration::from_millis(settings.actors.shutdown_timeout_ms),
            unready_grace: Duration::from_millis(settings.server.unready_grace_ms),
            metrics_export,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGINT/SIGTERM, then stops reading jobs and lets in-flight ones finish.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let http = self.server.handle();
        let mut server = actix_rt::spawn(self.server);
        let health = self.health.clone();
        let escalated = tokio::select! {
            result = &mut server => return Ok(result??),
            signal = next_signal() => {
                tracing::info!(signal, "Stopping: no new jobs; finishing in-flight ones.");
                None
            }
            reason = health.escalated() => Some(reason),
        };
        // A second signal exits at once; unacknowledged entries are reclaimed by other workers.
        actix_rt::spawn(async {
            let signal = next_signal().await;
            tracing::warn!(signal, "Second signal: exiting now.");
            std::process::exit(1);
        });
        let drain = async {
            if let Some(p) = self.pipeline
                && !p.shutdown(self.shutdown_timeout).await
            {
                tracing::warn!(
                    "Shutdown timeout reached; unfinished jobs stay pending for another worker."
                );
            }
        };
        if escalated.is_some() {
            // Keep answering while draining, and for a grace period at least, so that probes
            // and load balancers see `/readyz` say 503 and why.
            futures::join!(drain, tokio::time::sleep(self.unready_grace));
            http.stop(true).await;
        } else {
            futures::join!(http.stop(true), drain);
        }
        server.await??;
        // One last export with the drained pipeline's counts.
        drop(self.metrics_export);
        match escalated {
            // Non-zero, so that the orchestrator replaces the process.
            Some(reason) => anyhow::bail!("the pipeline gave up: {reason}"),
            None => {
                tracing::info!("Stopped.");
                Ok(())
            }
        }
    }

    /// For tests: the server future and the pipeline, to run and stop separately.
    pub fn into_parts(self) -> (Server, Option<PipelineHandle>) {
        (self.server, self.pipeline)
    }
}

#[allow(clippy::too_many_arguments)]
pub fn start_pipeline(
    settings: &Settings,
    db: PgPool,
    queue: RedisQueue,
    storage: Storage,
    model: Arc<dyn ImageEncoder>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    faults: Arc<Faults>,
    decoding: Decoding,
) -> PipelineHandle {
    let a = &settings.actors;
    let r = &settings.redis;
    let ps = PipelineSettings {
        stream: r.stream.clone(),
        group: r.group.clone(),
        deadletter_stream: r.deadletter_stream.clone(),
        consumer: consumer_name(),
        block_ms: r.block_ms,
        claim_min_idle_ms: r.claim_min_idle_ms,
        max_deliveries: r.max_deliveries,
        retry_base: Duration::from_millis(200),
        counts: ActorCounts {
            stream_readers: a.stream_readers,
            embedders: a.embedders,
            clusterers: a.clusterers,
            hero_selectors: a.hero_selectors,
            postgres_writers: a.postgres_writers,
        },
        mailbox_capacity: a.mailbox_capacity,
        max_inflight_jobs: a.max_inflight_jobs,
        max_queued_jobs: a.max_queued_jobs,
        restart: a.restart_policy(),
        job_timeout: Duration::from_millis(a.job_timeout_ms),
        relay_interval: Duration::from_millis(r.relay_interval_ms),
        relay_grace: Duration::from_millis(r.relay_grace_ms),
        sweep_interval: Duration::from_millis(settings.storage.sweep_interval_ms),
        orphan_grace: Duration::from_millis(settings.storage.orphan_grace_ms),
        params: settings
            .clustering
            .params(model.crop_preprocess().map_or(1, Preprocess::views)),
        time_rule: settings.clustering.time_rule(),
        cluster_cache_bytes: settings.clustering.cache_mib << 20,

        limits: settings.server.decode_limits(),
    };
    tracing::info!(consumer = %ps.consumer, stream = %ps.stream, group = %ps.group, "Starting the pipeline.");
    if !faults.is_empty() {
        tracing::warn!("Fault injection is on: chosen points of the pipeline will panic.");
    }
    let ports = Ports {
        queue: Arc::new(queue),
        store: Arc::new(PgStore {
            pool: db,
            keep_versions: settings.clustering.keep_versions,
        }),
        blobs: Arc::new(storage),
        db_target: db_target(&settings.postgres),
        budget: decoding.budget,
        prepared: decoding.prepared,
    };

    pipeline::start(ps, ports, model, metrics, health, faults)
}

/// Database name, host and port of `postgres.url`, for span attributes.
fn db_target(p: &crate::config::PostgresSettings) -> DbTarget {
    let u = url::Url::parse(p.url.expose()).ok();
    DbTarget {
        namespace: u
            .as_ref()
            .map(|u| u.path().trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        address: u
            .as_ref()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default(),
        port: u.and_then(|u| u.port()).unwrap_or(5432),
    }
}

/// Waits for SIGTERM or SIGINT and names it.
async fn next_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
