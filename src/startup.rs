//! Builds the application for `serve`, `api` or `worker`: connections, the
//! HTTP server bound to its port (port 0 in tests), and the actor pipeline.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use actix_web_prom::PrometheusMetricsBuilder;
use actors::algo::embed::{EmbedError, ImageEncoder, OnnxEmbedder};
use actors::ort_encoder::{OrtEncoder, OrtOptions};
use actors::pipeline::{self, ActorCounts, PipelineHandle, PipelineSettings, Ports};
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
    /// Per-caller limit on `/v1/*`; `None` when `rate_limit.requests_per_second` is 0.
    pub limiter: Option<RateLimiter>,
}

pub struct Application {
    port: u16,
    server: Server,
    pipeline: Option<PipelineHandle>,
    shutdown_timeout: Duration,
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
/// embedder thread (`actors.embedders`).
pub async fn load_model(settings: &Settings) -> anyhow::Result<Arc<dyn ImageEncoder>> {
    let (name, output, pre) = settings.embedder.resolve()?;
    let backend = settings.embedder.backend()?;
    let path = settings.embedder.model_path.clone();
    let sessions = settings.actors.embedders.max(1);
    let threads = settings.embedder.intra_op_threads(sessions)?;
    let load = move || -> Result<Arc<dyn ImageEncoder>, EmbedError> {
        Ok(match backend {
            EmbedderBackend::Tract => {
                Arc::new(OnnxEmbedder::load(&path, &name, &output, pre)?.with_threads(threads))
            }
            EmbedderBackend::OnnxRuntime { library } => {
                let options = OrtOptions {
                    library,
                    intra_threads: threads,
                    sessions,
                };
                Arc::new(OrtEncoder::load(&path, &name, &output, pre, &options)?)
            }
        })
    };
    let model = tokio::task::spawn_blocking(load).await?.with_context(|| {
        format!(
            "loading the embedder model with backend `{}` (embedder.model_path; \
             `make model` fetches the default one)",
            settings.embedder.backend
        )
    })?;
    tracing::info!(
        backend = %settings.embedder.backend,
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
    /// Connects, migrates (if configured), starts the pipeline (unless `Api`) and binds.
    /// Must run inside an actix `System`.
    pub async fn build(settings: Settings, mode: Mode) -> anyhow::Result<Self> {
        Self::build_with_model(settings, mode, None).await
    }

    /// As [`Application::build`], reusing an already loaded model (tests share one).
    pub async fn build_with_model(
        settings: Settings,
        mode: Mode,
        model: Option<Arc<dyn ImageEncoder>>,
    ) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
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
        actors::metrics::register_all(&registry)?;
        let prom = PrometheusMetricsBuilder::new(actors::metrics::HTTP_NAMESPACE)
            .registry(registry.clone())
            .mask_unmatched_patterns("UNKNOWN")
            .build()
            .map_err(|e| anyhow::anyhow!("registering HTTP metrics: {e}"))?;

        let pipeline = if mode == Mode::Api {
            None
        } else {
            let model = match model {
                Some(m) => m,
                None => load_model(&settings).await?,
            };
            Some(start_pipeline(
                &settings,
                db.clone(),
                queue.clone(),
                storage.clone(),
                model,
            ))
        };

        let bind = if mode == Mode::Worker {
            &settings.server.internal_bind
        } else {
            &settings.server.bind
        };
        let listener = TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?;
        let port = listener.local_addr()?.port();
        let state = web::Data::new(AppState {
            jwt: Jwt::new(settings.auth.jwt_secret.expose()),
            settings: settings.clone(),
            db,
            queue,
            storage,
            registry,
            limiter: RateLimiter::new(
                settings.rate_limit.requests_per_second,
                settings.rate_limit.burst,
            ),
        });
        let with_api = mode != Mode::Worker;
        let max_body = settings.server.max_upload_bytes;
        let server = HttpServer::new(move || {
            App::new()
                .wrap(prom.clone())
                .wrap(TracingLogger::default())
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
        Ok(Application {
            port,
            server,
            pipeline,
            shutdown_timeout: Duration::from_millis(settings.actors.shutdown_timeout_ms),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGINT/SIGTERM, then stops reading jobs and lets in-flight ones finish.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let http = self.server.handle();
        let mut server = actix_rt::spawn(self.server);
        tokio::select! {
            result = &mut server => return Ok(result??),
            signal = next_signal() => tracing::info!(signal, "Stopping: no new jobs; finishing in-flight ones."),
        }
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
        futures::join!(http.stop(true), drain);
        server.await??;
        tracing::info!("Stopped.");
        Ok(())
    }

    /// For tests: the server future and the pipeline, to run and stop separately.
    pub fn into_parts(self) -> (Server, Option<PipelineHandle>) {
        (self.server, self.pipeline)
    }
}

pub fn start_pipeline(
    settings: &Settings,
    db: PgPool,
    queue: RedisQueue,
    storage: Storage,
    model: Arc<dyn ImageEncoder>,
) -> PipelineHandle {
    let a = &settings.actors;
    let r = &settings.redis;
    let ps = PipelineSettings {
        stream: r.stream.clone(),
        group: r.group.clone(),
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
        params: settings.clustering.params(),
        max_pixels: settings.server.max_image_pixels,
    };
    tracing::info!(consumer = %ps.consumer, stream = %ps.stream, group = %ps.group, "Starting the pipeline.");
    let ports = Ports {
        queue: Arc::new(queue),
        store: Arc::new(PgStore { pool: db }),
        blobs: Arc::new(storage),
    };
    pipeline::start(ps, ports, model)
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
