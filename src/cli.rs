//! The `media-clustering` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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

pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load()?;
    match cli.command {
        Command::Config => {
            print!("{}", settings.to_masked_toml());
            Ok(())
        }
        Command::Token { sub, scope, ttl } => {
            println!(
                "{}",
                Jwt::new(settings.auth.jwt_secret.expose()).mint(&sub, &scope, ttl)
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
                Jwt::new(settings.auth.jwt_secret.expose()).mint(
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
        Command::Migrate => actix_rt::System::new().block_on(async {
            let _telemetry = telemetry::init(&settings)?;
            let db = crate::adapters::postgres::pool(&settings.postgres)?;
            migrate(&db).await?;
            tracing::info!("Migrations applied.");
            Ok(())
        }),
        Command::Serve => serve(settings, Mode::Serve),
        Command::Worker => serve(settings, Mode::Worker),
        Command::Api => serve(settings, Mode::Api),
    }
}

fn serve(settings: Settings, mode: Mode) -> anyhow::Result<()> {
    actix_rt::System::new().block_on(async move {
        let mut telemetry = telemetry::init(&settings).context("setting up telemetry")?;
        let result = async {
            Application::build(settings, mode)
                .await?
                .run_until_stopped()
                .await
        }
        .await;
        if let Err(e) = &result {
            tracing::error!(error = format!("{e:#}"), "Stopped with an error.");
        }
        telemetry.shutdown();
        result
    })
}
