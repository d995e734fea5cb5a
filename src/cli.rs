//! The `media-clustering` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::Instrument;

use crate::api::auth::{Jwt, SCOPE_READ, SCOPE_WRITE};
use crate::config::Settings;
use crate::startup::{Application, Mode, migrate};
use crate::{client, telemetry};

#[derive(Parser)]
#[command(
    name = "media-clustering",
    version,
    about = "Groups pet photos into clusters of similar shots and picks a hero photo for each."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// API and worker in one process (local use).
    Serve,
    /// The worker: reads jobs, runs the actors; health and metrics on server.internal_bind.
    Worker,
    /// The HTTP API only.
    Api,
    /// Apply database migrations and exit.
    Migrate,
    /// Upload photos (files or folders) for a pet, wait for the job, print the clusters.
    Upload {
        /// The pet the photos belong to.
        #[arg(long)]
        pet: String,
        /// Files or folders (folders: their .jpg, .jpeg, .png and .webp files).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Base URL of the API (default: http:// + server.bind).
        #[arg(long)]
        server: Option<String>,
        /// Bearer token (default: a development token minted from auth.jwt_secret).
        #[arg(long, env = "MEDIA_CLUSTERING_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Photos per request; each request is one job.
        #[arg(long, default_value_t = 10)]
        batch: usize,
        /// Do not wait for the job or print the clusters.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for the job.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Print the effective configuration, secrets masked.
    Config,
    /// Embed every photo lacking an embedding for the configured model, ahead of jobs.
    Reembed {
        /// Only this pet's photos.
        #[arg(long)]
        pet: Option<String>,
    },
    /// Inspect and re-enqueue dead-lettered jobs.
    Deadletter {
        #[command(subcommand)]
        command: DeadletterCommand,
    },
    /// Benchmark helpers (`scripts/bench_e2e.py` drives the service itself).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Telemetry tools.
    Telemetry {
        #[command(subcommand)]
        command: TelemetryCommand,
    },
    /// Exit 0 when this container's service answers `GET /healthz` with 200 on
    /// `server.bind` or `server.internal_bind` (the image's HEALTHCHECK), else 1.
    Healthcheck,
    /// Mint a development JWT signed with auth.jwt_secret.
    Token {
        #[arg(long, default_value = "dev")]
        sub: String,
        #[arg(long, default_value_t = format!("{SCOPE_READ} {SCOPE_WRITE}"))]
        scope: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(Subcommand)]
enum DeadletterCommand {
    /// List dead-letter entries, oldest first.
    List {
        #[arg(long, default_value_t = 100)]
        count: usize,
    },
    /// Put an entry back on the jobs stream (its job becomes `queued` again).
    Replay {
        /// The dead-letter entry id, as `list` prints it.
        id: String,
    },
    /// Delete every dead-letter entry.
    Purge {
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Decode + preprocess + embed a folder of photos on `actors.embedders` threads with the
    /// configured model, backend and intra-op threads, and no service around it; prints
    /// photos/s as JSON (the CPU bound the end-to-end benchmark compares against).
    CpuBound {
        /// A folder of JPEG, PNG or WebP photos.
        #[arg(long, default_value = "tests/fixtures/photos")]
        photos: PathBuf,
        /// Keep going (after one pass over every photo) until this many seconds have passed.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Also take the quality measures the hero score needs.
        #[arg(long)]
        with_quality: bool,
    },
    /// Where one photo's CPU time goes, stage by stage on one thread (the upload check,
    /// hashing, the embedder's decode, quality measures, preprocessing, inference); prints
    /// milliseconds per photo as JSON.
    Stages {
        /// A folder of JPEG, PNG or WebP photos.
        #[arg(long, default_value = "tests/fixtures/photos")]
        photos: PathBuf,
        /// Passes over the folder (after one untimed pass).
        #[arg(long, default_value_t = 3)]
        passes: usize,
    },
    /// A bare actix-web server that reads any request's body and answers 202, with the
    /// service's worker count and body limit: the ceiling the API's ingest rate is compared
    /// with (scripts/bench_ingest.sh).
    BareApi {
        #[arg(long, default_value = "127.0.0.1:8099")]
        bind: String,
    },
}

#[derive(Subcommand)]
enum TelemetryCommand {
    /// Send a test span to the configured OTLP endpoint and say whether it was accepted
    /// (exit 1 if not); also try a metrics scrape of a local instance.
    Check,
}

pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load()?;
    telemetry::take_compression_vars();
    // The OTLP HTTP exporter's TLS uses the process's rustls provider; another crate may
    // have installed one already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Config => {
            print!("{}", settings.to_masked_toml());
            Ok(())
        }
        Command::Healthcheck => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(healthcheck(&settings)),
        Command::Token { sub, scope, ttl } => {
            anyhow::ensure!(
                ttl <= settings.auth.max_token_lifetime_s,
                "--ttl {ttl} is longer than auth.max_token_lifetime_s ({}); the service would refuse the token",
                settings.auth.max_token_lifetime_s
            );
            anyhow::ensure!(!sub.trim().is_empty(), "--sub must not be empty");
            println!(
                "{}",
                Jwt::from_settings(&settings.auth).mint(&sub, &scope, ttl)
            );
            Ok(())
        }
        Command::Upload {
            pet,
            paths,
            server,
            token,
            batch,
            no_wait,
            timeout,
        } => {
            let server = server.unwrap_or_else(|| format!("http://{}", settings.server.bind));
            let token = token.unwrap_or_else(|| {
                Jwt::from_settings(&settings.auth).mint(
                    "cli",
                    &format!("{SCOPE_READ} {SCOPE_WRITE}"),
                    3600,
                )
            });
            let opts = client::UploadOptions {
                server,
                token,
                pet,
                paths,
                batch,
                wait: !no_wait,
                timeout_secs: timeout,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(client::upload(opts))
        }
        Command::Telemetry {
            command: TelemetryCommand::Check,
        } => telemetry_check(&settings),
        Command::Bench {
            command:
                BenchCommand::CpuBound {
                    photos,
                    seconds,
                    with_quality,
                },
        } => {
            let r = crate::bench::cpu_bound(&settings, &photos, seconds, with_quality)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::Stages { photos, passes },
        } => {
            let r = crate::bench::stages(&settings, &photos, passes)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::BareApi { bind },
        } => actix_web::rt::System::new().block_on(crate::bench::bare_api(&settings, &bind)),
        Command::Reembed { pet } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(crate::reembed::reembed(&settings, pet.as_deref())),
        Command::Deadletter { command } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                // A replay is a new `send`: its span is the root of the replay's trace.
                let telemetry = match command {
                    DeadletterCommand::Replay { .. } => Some(telemetry::init(
                        &settings,
                        &actors::metrics::Metrics::new(),
                    )?),
                    _ => None,
                };
                let result = deadletter(&settings, command).await;
                if let Some(t) = telemetry {
                    t.flush_off_runtime().await;
                }
                result
            }),
        Command::Migrate => actix_rt::System::new().block_on(async {
            let telemetry = telemetry::init(&settings, &actors::metrics::Metrics::new())?;
            let db = crate::adapters::postgres::pool(&settings.postgres)?;
            let result = migrate(&db).await;
            if result.is_ok() {
                tracing::info!("Migrations applied.");
            }
            telemetry.flush_off_runtime().await;
            result
        }),
        Command::Serve => serve(settings, Mode::Serve),
        Command::Worker => serve(settings, Mode::Worker),
        Command::Api => serve(settings, Mode::Api),
    }
}

/// Development only: `MEDIA_CLUSTERING_FAULTS=embedder=2,read_loop=1` makes those points of
/// the pipeline panic that many times (for restart and escalation drills).
const FAULTS_VAR: &str = "MEDIA_CLUSTERING_FAULTS";
/// Development only: `MEDIA_CLUSTERING_UPLOAD_PAUSE=after_commit:1500` pauses every upload
/// there (to reset the connection or kill the process at that point in drills and tests).
const UPLOAD_PAUSE_VAR: &str = "MEDIA_CLUSTERING_UPLOAD_PAUSE";

fn serve(settings: Settings, mode: Mode) -> anyhow::Result<()> {
    let faults = match std::env::var(FAULTS_VAR) {
        Ok(spec) if !spec.is_empty() => {
            anyhow::ensure!(
                settings.env == crate::config::AppEnv::Development,
                "{FAULTS_VAR} is refused outside development"
            );
            Some(std::sync::Arc::new(
                actors::runtime::Faults::parse(&spec)
                    .map_err(|e| anyhow::anyhow!("{FAULTS_VAR}: {e}"))?,
            ))
        }
        _ => None,
    };
    let upload_pause = match std::env::var(UPLOAD_PAUSE_VAR) {
        Ok(spec) if !spec.is_empty() => {
            anyhow::ensure!(
                settings.env == crate::config::AppEnv::Development,
                "{UPLOAD_PAUSE_VAR} is refused outside development"
            );
            Some(crate::api::UploadPoint::parse(&spec).ok_or_else(|| {
                anyhow::anyhow!(
                    "{UPLOAD_PAUSE_VAR}: expected `after_check|after_store|after_commit|after_enqueue:MS`"
                )
            })?)
        }
        _ => None,
    };
    actix_rt::System::new().block_on(async move {
        let metrics = actors::metrics::Metrics::new();
        let telemetry = telemetry::init(&settings, &metrics).context("setting up telemetry")?;
        let options = crate::startup::BuildOptions {
            metrics: Some(metrics),
            model: None,
            faults,
            upload_pause,
        };
        let result = async {
            Application::build_with(settings, mode, options)
                .await?
                .run_until_stopped()
                .await
        }
        .await;
        if let Err(e) = &result {
            tracing::error!(error = format!("{e:#}"), "Stopped with an error.");
        }
        telemetry.flush_off_runtime().await;
        result
    })
}

fn telemetry_check(settings: &Settings) -> anyhow::Result<()> {
    let t = &settings.telemetry;
    let plan = telemetry::ExportPlan::resolve(settings);
    let endpoint = plan.endpoint.clone();
    println!("endpoint: {endpoint}");
    println!("protocol: {}", plan.protocol.as_str());
    println!(
        "tls:      {}",
        match (
            endpoint.starts_with("https://"),
            &plan.ca,
            &plan.client_identity
        ) {
            (false, ..) => "no (http://)".to_owned(),
            (true, ca, id) => format!(
                "system roots{}{}",
                ca.as_ref()
                    .map(|c| format!(" + CA {}", c.display()))
                    .unwrap_or_default(),
                id.as_ref()
                    .map(|(c, _)| format!(", client certificate {}", c.display()))
                    .unwrap_or_default()
            ),
        }
    );
    println!("gzip:     {}", plan.gzip);
    println!("sampler:  {}", plan.sampler_name);
    println!(
        "propagators: {}",
        if plan.propagators.is_empty() {
            "none".to_owned()
        } else {
            plan.propagators
                .iter()
                .map(|p| format!("{p:?}").to_lowercase())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!("service:  {}", t.service_name);
    for p in &plan.problems {
        println!("problem:  {p}");
    }
    if let Some(why) = &plan.off {
        println!("note:     export is off ({why}), so the service exports nothing");
    }
    let metrics_plan = telemetry::ExportPlan::resolve_signal(settings, telemetry::Signal::Metrics);
    match &metrics_plan.off {
        Some(why) => println!("metrics:  not exported by OTLP ({why})"),
        None => println!(
            "metrics:  OTLP to {} ({}, gzip {}) every {} ms",
            metrics_plan.endpoint,
            metrics_plan.protocol.as_str(),
            metrics_plan.gzip,
            metrics_plan.interval.as_millis()
        ),
    }
    for p in metrics_plan
        .problems
        .iter()
        .filter(|p| !plan.problems.contains(p))
    {
        println!("problem:  {p}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The HTTP exporter's client blocks, so it runs outside the async runtime; gRPC needs it.
    let export = if plan.protocol == telemetry::ExportProtocol::HttpProtobuf {
        futures::executor::block_on(telemetry::check_export(settings, &plan))
    } else {
        rt.block_on(telemetry::check_export(settings, &plan))
    };
    match &export {
        Ok(()) => println!("export:   ok, the collector accepted a test span"),
        Err(e) => println!("export:   FAILED: {e}"),
    }
    // Where a service runs here, its metrics endpoint should answer too.
    let token = settings.auth.internal_token.expose().to_owned();
    for addr in [&settings.server.bind, &settings.server.internal_bind] {
        let url = format!("http://{addr}/internal/metrics");
        let scrape = rt.block_on(async {
            reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(3))
                .build()?
                .get(&url)
                .bearer_auth(&token)
                .send()
                .await
        });
        match scrape {
            Ok(r) => println!("metrics:  {url} answered {}", r.status()),
            Err(_) => println!("metrics:  {url} not reachable (no service running there)"),
        }
    }
    match export {
        Ok(()) => Ok(()),
        Err(e) => anyhow::bail!(
            "telemetry export to {endpoint} ({}) failed: {e}",
            plan.protocol.as_str()
        ),
    }
}

async fn deadletter(settings: &Settings, command: DeadletterCommand) -> anyhow::Result<()> {
    let queue = crate::adapters::redis_queue::RedisQueue::connect(&settings.redis, 0)
        .await
        .context("connecting to Redis (redis.url)")?;
    match command {
        DeadletterCommand::List { count } => {
            let entries = queue.dead_letters(count).await?;
            if entries.is_empty() {
                println!("no dead letters in {}", queue.deadletter);
            }
            for (id, fields) in entries {
                let get = |k: &str| {
                    fields
                        .iter()
                        .find(|(f, _)| f == k)
                        .map(|(_, v)| v.as_str())
                        .unwrap_or("-")
                };
                let failed_at = get("failed_at")
                    .parse::<i64>()
                    .ok()
                    .and_then(chrono::DateTime::from_timestamp_millis)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{id}  job {}  pet {}  deliveries {}  failed {failed_at}  source {}  trace {}\n    error: {}",
                    get("job_id"),
                    get("pet_id"),
                    get("deliveries"),
                    get("source_id"),
                    get("trace_id"),
                    get("error"),
                );
            }
        }
        DeadletterCommand::Replay { id } => {
            let Some(mut fields) = queue.dead_letter_original(&id).await? else {
                anyhow::bail!("no dead-letter entry {id} in {}", queue.deadletter);
            };
            let job = fields
                .iter()
                .find(|(k, _)| k == "job_id")
                .and_then(|(_, v)| uuid::Uuid::parse_str(v).ok());
            let span = replay_span(&queue, &id, job, &mut fields);
            let trace_id = telemetry::trace_id(&span);
            // The job row first: a worker may read the new entry at once.
            if let Some(job) = job {
                let db = crate::adapters::postgres::pool(&settings.postgres)?;
                let reset =
                    crate::adapters::postgres::requeue_for_replay(&db, job, trace_id.as_deref())
                        .instrument(span.clone())
                        .await?;
                if reset == 0 {
                    println!("note: job {job} has no failed or dead-lettered row to reset");
                }
            }
            let new_id = queue
                .replay_dead_letter(&id, &fields)
                .instrument(span.clone())
                .await?;
            span.record("messaging.message.id", new_id.as_str());
            println!(
                "replayed {id} as {new_id} on {} (trace {})",
                queue.stream,
                trace_id.as_deref().unwrap_or("-")
            );
        }
        DeadletterCommand::Purge { yes } => {
            if !yes {
                anyhow::bail!("purging deletes every dead letter for good; add --yes to do it");
            }
            let n = queue.purge_dead_letters().await?;
            println!("purged {n} dead letters from {}", queue.deadletter);
        }
    }
    Ok(())
}

/// `healthcheck`: whichever of the two listeners this process mode has must answer.
async fn healthcheck(settings: &Settings) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(2))
        .build()?;
    let mut tried = Vec::new();
    for bind in [&settings.server.bind, &settings.server.internal_bind] {
        let port = bind.rsplit(':').next().unwrap_or_default();
        let url = format!("http://127.0.0.1:{port}/healthz");
        match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => tried.push(format!("{url}: {}", r.status())),
            Err(e) => tried.push(format!("{url}: {e}")),
        }
    }
    anyhow::bail!("unhealthy: {}", tried.join("; "))
}

/// The PRODUCER span of a dead-letter replay: the root of a new trace, linked to the trace the
/// entry was first sent in (whose `traceparent` it carried), so the replay's processing is not
/// mixed into the original's. The new context replaces the entry's `traceparent`/`tracestate`.
fn replay_span(
    queue: &crate::adapters::redis_queue::RedisQueue,
    dead_letter_id: &str,
    job: Option<uuid::Uuid>,
    fields: &mut Vec<(String, String)>,
) -> tracing::Span {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let carrier: std::collections::HashMap<String, String> = fields
        .iter()
        .filter(|(k, _)| k == "traceparent" || k == "tracestate")
        .cloned()
        .collect();
    fields.retain(|(k, _)| k != "traceparent" && k != "tracestate");
    let original = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let original = original.span().span_context().clone();
    let span = tracing::info_span!(
        "send",
        otel.name = %format_args!("send {}", queue.stream),
        otel.kind = "producer",
        messaging.system = "redis",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = %queue.stream,
        server.address = %queue.address,
        server.port = i64::from(queue.port),
        messaging.message.id = tracing::field::Empty,
        media_clustering.replay_of = %dead_letter_id,
        job_id = job.map(|j| j.to_string()),
    );
    // A new root: no parent, whatever span is current.
    let _ = span.set_parent(opentelemetry::Context::new());
    if original.is_valid() {
        span.add_link(original);
    }
    let mut injected = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&span.context(), &mut injected)
    });
    for k in ["traceparent", "tracestate"] {
        if let Some(v) = injected.remove(k).filter(|v| !v.is_empty()) {
            fields.push((k.to_owned(), v));
        }
    }
    fields.sort();
    span
}
