//! Logs and traces: a `tracing` subscriber writing JSON lines (or a pretty
//! format for local runs) joined to OpenTelemetry traces, and the OTLP
//! exporter (gRPC or HTTP/protobuf, TLS and gzip, batch processor, sampler and propagators
//! from the standard OpenTelemetry variables).
//!
//! A telemetry setting never stops the service: [`ExportPlan::resolve`] turns the settings
//! and the `OTEL_*` variables into what will be done, and every value it cannot use becomes
//! a problem (logged once at start-up, counted in `media_cluster_telemetry_setup_errors_total`,
//! listed by `telemetry check`) with a stated fallback; an exporter that cannot be built
//! leaves export off.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::InstrumentationScope;
use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    TracerProvider as _,
};
use opentelemetry::{Context as OtelContext, KeyValue, global};
use opentelemetry_otlp::{
    Compression, Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, Span, SpanData,
    SpanExporter, SpanProcessor,
};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber, span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::Settings;
use actors::metrics::Metrics;

/// Keeps the tracer provider; flushes and shuts it down when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    pub fn shutdown(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }

    /// Flushes and shuts down on a blocking thread while this task's runtime keeps running:
    /// the gRPC exporter's connection is driven by the runtime it was built on (a
    /// current-thread one under actix), so flushing on that runtime's own thread would stall
    /// the export it waits for, and the last spans would be lost.
    pub async fn flush_off_runtime(mut self) {
        if let Some(p) = self.provider.take() {
            let _ = tokio::task::spawn_blocking(move || {
                let _ = p.force_flush();
                let _ = p.shutdown();
            })
            .await;
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Wraps the exporter: spans it could not deliver are counted in
/// `media_cluster_telemetry_dropped_spans_total`, and a warning is logged at most
/// once a minute, never per span. Export runs on the batch processor's own thread,
/// so a slow or absent collector never blocks a request or an actor.
#[derive(Debug)]
pub struct CountingExporter<E> {
    inner: E,
    endpoint: String,
    dropped: prometheus::IntCounter,
    /// Spans in the batch queue ([`CountedQueue`]); these leave it.
    queued: Arc<AtomicUsize>,
}

/// Unix seconds of the last export warning.
static LAST_EXPORT_WARNING: AtomicU64 = AtomicU64::new(0);
const EXPORT_WARNING_EVERY_SECS: u64 = 60;

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(batch.len()))
            });
        let result = self.inner.export(batch).await;
        if let Err(e) = &result {
            self.dropped.inc_by(n);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let last = LAST_EXPORT_WARNING.load(Ordering::Relaxed);
            if now >= last + EXPORT_WARNING_EVERY_SECS
                && LAST_EXPORT_WARNING
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    endpoint = %self.endpoint,
                    error = %e,
                    dropped = n,
                    "Exporting spans failed; they are dropped and counted \
                     (this warning repeats at most once a minute)."
                );
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

pub(crate) fn resource(settings: &Settings) -> Resource {
    let env = match settings.env {
        crate::config::AppEnv::Development => "development",
        crate::config::AppEnv::Production => "production",
    };
    Resource::builder()
        .with_service_name(settings.telemetry.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("deployment.environment.name", env),
        ])
        .build()
}

/// How spans are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportProtocol {
    Grpc,
    HttpProtobuf,
}

impl ExportProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportProtocol::Grpc => "grpc",
            ExportProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// What goes in and out of carriers (`OTEL_PROPAGATORS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagator {
    TraceContext,
    Baggage,
}

/// What an export plan sends: its variables are `OTEL_EXPORTER_OTLP_<SIGNAL>_*`, falling back
/// to the general `OTEL_EXPORTER_OTLP_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    fn upper(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
        }
    }

    /// The path a general HTTP endpoint gets for this signal.
    fn http_path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
        }
    }
}

/// The export the settings and the standard OpenTelemetry variables ask for, of one signal.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    pub signal: Signal,
    /// Why nothing is exported, when nothing is (spans are then not even recorded).
    pub off: Option<String>,
    pub endpoint: String,
    pub protocol: ExportProtocol,
    pub gzip: bool,
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`: a private CA trusted besides the system roots.
    pub ca: Option<PathBuf>,
    /// `_CLIENT_CERTIFICATE` and `_CLIENT_KEY`: the client's identity for mutual TLS.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    pub timeout: Duration,
    pub sampler: Sampler,
    /// The sampler as the variables name it, e.g. `parentbased_traceidratio(0.2)`.
    pub sampler_name: String,
    pub propagators: Vec<Propagator>,
    /// Spans waiting for export; past it they are dropped and counted.
    pub queue_size: usize,
    /// `OTEL_EXPORTER_OTLP_<SIGNAL>_HEADERS` or `_HEADERS` (`k=v,k2=v2`, values percent-decoded).
    /// The trace exporter reads them itself; the metrics exporter sends these.
    pub headers: Vec<(String, String)>,
    /// `OTEL_METRIC_EXPORT_INTERVAL` (metrics only).
    pub interval: Duration,
    /// Values that could not be used, each with what is done instead.
    pub problems: Vec<String>,
}

const DEFAULT_QUEUE_SIZE: usize = 2048;

/// PEM bytes of the private CA and of the client certificate and key.
struct TlsMaterial {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ExportPlan {
    /// Resolves the plan. A `_TRACES_` variable wins over its general one, which wins over
    /// the service's key (`telemetry.*`, which `OTEL_EXPORTER_OTLP_ENDPOINT` and
    /// `_PROTOCOL` also set). Nothing here fails: what cannot be used is a problem.
    pub fn resolve(settings: &Settings) -> Self {
        Self::resolve_signal(settings, Signal::Traces)
    }

    /// [`ExportPlan::resolve`] for `signal`. Metrics are exported only with
    /// `OTEL_METRICS_EXPORTER=otlp` (they are always served at `/internal/metrics`).
    pub fn resolve_signal(settings: &Settings, signal_kind: Signal) -> Self {
        let t = &settings.telemetry;
        let mut problems = t.problems.clone();
        let var = |k: &str| {
            t.otel_env
                .get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let own = signal_kind.upper();
        let signal = |name: &str| {
            let traces = format!("OTEL_EXPORTER_OTLP_{own}_{name}");
            var(&traces).map(|v| (traces, v)).or_else(|| {
                let general = format!("OTEL_EXPORTER_OTLP_{name}");
                var(&general).map(|v| (general, v))
            })
        };

        let mut off = None;
        if !t.enabled {
            off = Some("telemetry.enabled is false (TELEMETRY_ENABLED)".to_owned());
        }
        match var("OTEL_SDK_DISABLED").map(|v| v.to_ascii_lowercase()) {
            Some(v) if v == "true" => {
                off.get_or_insert_with(|| "OTEL_SDK_DISABLED=true".to_owned());
            }
            Some(v) if v == "false" => {}
            Some(v) => problems.push(format!(
                "OTEL_SDK_DISABLED=`{v}` is not true or false; treated as false"
            )),
            None => {}
        }
        match (
            signal_kind,
            var(&format!("OTEL_{own}_EXPORTER")).map(|v| v.to_ascii_lowercase()),
        ) {
            (_, Some(v)) if v == "none" => {
                off.get_or_insert_with(|| format!("OTEL_{own}_EXPORTER=none"));
            }
            (_, Some(v)) if v == "otlp" => {}
            (Signal::Traces, Some(v)) => problems.push(format!(
                "OTEL_TRACES_EXPORTER=`{v}` is not supported (otlp or none); exporting by OTLP"
            )),
            (Signal::Metrics, Some(v)) if v == "prometheus" => {
                off.get_or_insert_with(|| {
                    "OTEL_METRICS_EXPORTER=prometheus (scraped at /internal/metrics)".to_owned()
                });
            }
            (Signal::Metrics, Some(v)) => {
                problems.push(format!(
                    "OTEL_METRICS_EXPORTER=`{v}` is not supported (otlp, prometheus or none); \
                     metrics are only scraped"
                ));
                off.get_or_insert_with(|| format!("OTEL_METRICS_EXPORTER=`{v}`"));
            }
            (Signal::Traces, None) => {}
            (Signal::Metrics, None) => {
                off.get_or_insert_with(|| {
                    "OTEL_METRICS_EXPORTER is not otlp (metrics are scraped at /internal/metrics)"
                        .to_owned()
                });
            }
        }

        let (protocol_from, protocol) = signal("PROTOCOL").unwrap_or_else(|| {
            (
                "telemetry.otlp_protocol (OTEL_EXPORTER_OTLP_PROTOCOL)".to_owned(),
                t.otlp_protocol.clone(),
            )
        });
        let protocol = match protocol.as_str() {
            "grpc" => ExportProtocol::Grpc,
            "http/protobuf" => ExportProtocol::HttpProtobuf,
            other => {
                problems.push(format!(
                    "{protocol_from}=`{other}` is not supported (grpc or http/protobuf); using grpc"
                ));
                ExportProtocol::Grpc
            }
        };
        // A signal's own endpoint is used as given; the general one gets the signal's path
        // for HTTP (the OTLP exporter specification).
        let endpoint = match var(&format!("OTEL_EXPORTER_OTLP_{own}_ENDPOINT")) {
            Some(e) => e,
            None => {
                let base = t.otlp_endpoint.trim_end_matches('/');
                let path = signal_kind.http_path();
                if protocol == ExportProtocol::HttpProtobuf && !base.ends_with(path) {
                    format!("{base}{path}")
                } else {
                    base.to_owned()
                }
            }
        };
        match url::Url::parse(&endpoint) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => {
                problems.push(format!(
                    "the OTLP endpoint `{endpoint}` is not an http:// or https:// URL; export is off"
                ));
                off.get_or_insert_with(|| format!("no usable endpoint (`{endpoint}`)"));
            }
        }
        let gzip = match signal("COMPRESSION") {
            Some((_, v)) if v == "gzip" => true,
            Some((_, v)) if v == "none" => false,
            Some((name, v)) => {
                problems.push(format!(
                    "{name}=`{v}` is not supported (gzip or none); sending uncompressed"
                ));
                false
            }
            None => false,
        };
        let ca = signal("CERTIFICATE").map(|(_, v)| PathBuf::from(v));
        let client_identity = match (signal("CLIENT_CERTIFICATE"), signal("CLIENT_KEY")) {
            (Some((_, c)), Some((_, k))) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            (Some((name, _)), None) | (None, Some((name, _))) => {
                problems.push(format!(
                    "{name} is set without its pair (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and \
                     _CLIENT_KEY go together); export is off"
                ));
                off.get_or_insert_with(|| "an incomplete client identity".to_owned());
                None
            }
        };
        let timeout = match signal("TIMEOUT") {
            Some((name, v)) => match v.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    problems.push(format!(
                        "{name}=`{v}` is not a positive number of milliseconds; using 10000"
                    ));
                    Duration::from_secs(10)
                }
            },
            None => Duration::from_secs(10),
        };

        let (sampler, sampler_name) = resolve_sampler(
            var("OTEL_TRACES_SAMPLER"),
            var("OTEL_TRACES_SAMPLER_ARG"),
            t.sample_rate,
            &mut problems,
        );
        let propagators = match var("OTEL_PROPAGATORS") {
            None => vec![Propagator::TraceContext, Propagator::Baggage],
            Some(list) => {
                let mut out = Vec::new();
                for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    match p {
                        "tracecontext" => out.push(Propagator::TraceContext),
                        "baggage" => out.push(Propagator::Baggage),
                        "none" => {}
                        other => problems.push(format!(
                            "OTEL_PROPAGATORS: `{other}` is not supported (tracecontext, \
                             baggage, none); left out"
                        )),
                    }
                }
                out.dedup();
                out
            }
        };
        let queue_size = match var("OTEL_BSP_MAX_QUEUE_SIZE") {
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    problems.push(format!(
                        "OTEL_BSP_MAX_QUEUE_SIZE=`{v}` is not a positive number; using {DEFAULT_QUEUE_SIZE}"
                    ));
                    DEFAULT_QUEUE_SIZE
                }
            },
            None => DEFAULT_QUEUE_SIZE,
        };
        let headers = signal("HEADERS")
            .map(|(name, v)| parse_headers(&name, &v, &mut problems))
            .unwrap_or_default();
        let interval = match var("OTEL_METRIC_EXPORT_INTERVAL") {
            Some(v) => match v.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    if signal_kind == Signal::Metrics {
                        problems.push(format!(
                            "OTEL_METRIC_EXPORT_INTERVAL=`{v}` is not a positive number of \
                             milliseconds; using 60000"
                        ));
                    }
                    Duration::from_secs(60)
                }
            },
            None => Duration::from_secs(60),
        };
        ExportPlan {
            signal: signal_kind,
            off,
            endpoint,
            protocol,
            gzip,
            ca,
            client_identity,
            timeout,
            sampler,
            sampler_name,
            propagators,
            queue_size,
            headers,
            interval,
            problems,
        }
    }

    /// The propagator the variables chose.
    pub fn propagator(&self) -> TextMapCompositePropagator {
        let parts: Vec<Box<dyn TextMapPropagator + Send + Sync>> = self
            .propagators
            .iter()
            .map(|p| -> Box<dyn TextMapPropagator + Send + Sync> {
                match p {
                    Propagator::TraceContext => Box::new(TraceContextPropagator::new()),
                    Propagator::Baggage => Box::new(BaggagePropagator::new()),
                }
            })
            .collect();
        TextMapCompositePropagator::new(parts)
    }

    /// The private CA and the client identity (certificate, key) the plan names, read.
    fn tls_material(&self) -> anyhow::Result<TlsMaterial> {
        use anyhow::Context as _;
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the {what} `{}`", p.display()))
        };
        let ca = self
            .ca
            .as_ref()
            .map(|p| read(p, "CA certificate (OTEL_EXPORTER_OTLP_CERTIFICATE)"))
            .transpose()?;
        let identity = self
            .client_identity
            .as_ref()
            .map(|(c, k)| -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
                Ok((
                    read(
                        c,
                        "client certificate (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE)",
                    )?,
                    read(k, "client key (OTEL_EXPORTER_OTLP_CLIENT_KEY)")?,
                ))
            })
            .transpose()?;
        Ok(TlsMaterial { ca, identity })
    }

    /// The HTTP/protobuf transport's client: system roots (the platform verifier), the
    /// private CA and the client identity. Built on a thread of its own, as a blocking client
    /// must not be built on an async runtime's thread.
    pub(crate) fn http_client(&self) -> anyhow::Result<reqwest13::blocking::Client> {
        use anyhow::Context as _;
        let TlsMaterial { ca, identity } = self.tls_material()?;
        let mut client = reqwest13::blocking::Client::builder().timeout(self.timeout);
        if let Some(pem) = &ca {
            for cert in reqwest13::Certificate::from_pem_bundle(pem)
                .context("parsing OTEL_EXPORTER_OTLP_CERTIFICATE")?
            {
                client = client.add_root_certificate(cert);
            }
        }
        if let Some((cert, key)) = &identity {
            let mut pem = cert.clone();
            pem.extend_from_slice(b"\n");
            pem.extend_from_slice(key);
            client = client.identity(
                reqwest13::Identity::from_pem(&pem)
                    .context("parsing the client certificate and key")?,
            );
        }
        std::thread::spawn(move || client.build())
            .join()
            .map_err(|_| anyhow::anyhow!("building the HTTP client panicked"))?
            .context("building the HTTP client")
    }

    /// The gRPC transport's TLS: system roots, the private CA and the client identity; `None`
    /// for an `http://` endpoint.
    pub(crate) fn grpc_tls(
        &self,
    ) -> anyhow::Result<Option<opentelemetry_otlp::tonic_types::transport::ClientTlsConfig>> {
        use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig, Identity};
        if !self.endpoint.starts_with("https://") {
            return Ok(None);
        }
        let TlsMaterial { ca, identity } = self.tls_material()?;
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(pem) = &ca {
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some((cert, key)) = &identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Ok(Some(tls))
    }

    /// Builds the span exporter (gRPC needs a Tokio runtime when it is built).
    pub fn exporter(&self) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
        let compression = self.gzip.then_some(Compression::Gzip);
        Ok(match self.protocol {
            ExportProtocol::HttpProtobuf => {
                // A client of our own: the exporter's default one has no private CA or
                // client identity.
                let client = self.http_client()?;
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_http_client(client)
                    .with_timeout(self.timeout)
                    .with_endpoint(self.endpoint.clone());
                if let Some(c) = compression {
                    b = b.with_compression(c);
                }
                b.build()?
            }
            ExportProtocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_timeout(self.timeout)
                    .with_endpoint(self.endpoint.clone());
                if let Some(tls) = self.grpc_tls()? {
                    b = b.with_tls_config(tls);
                }
                if let Some(c) = compression {
                    b = b.with_compression(c);
                }
                b.build()?
            }
        })
    }
}

/// `OTEL_TRACES_SAMPLER` and `_ARG`; unset, a parent-based ratio of `telemetry.sample_rate`
/// (`TRACE_SAMPLE_RATE`).
fn resolve_sampler(
    name: Option<String>,
    arg: Option<String>,
    sample_rate: f64,
    problems: &mut Vec<String>,
) -> (Sampler, String) {
    let ratio = |problems: &mut Vec<String>| match arg.as_deref().map(str::parse::<f64>) {
        None => 1.0,
        Some(Ok(r)) if (0.0..=1.0).contains(&r) => r,
        Some(_) => {
            problems.push(format!(
                "OTEL_TRACES_SAMPLER_ARG=`{}` is not a ratio between 0 and 1; using 1.0",
                arg.as_deref().unwrap_or_default()
            ));
            1.0
        }
    };
    let parent = |s: Sampler| Sampler::ParentBased(Box::new(s));
    let fallback = || {
        (
            parent(Sampler::TraceIdRatioBased(sample_rate)),
            format!("parentbased_traceidratio({sample_rate})"),
        )
    };
    match name.map(|n| n.to_ascii_lowercase()).as_deref() {
        None => fallback(),
        Some("always_on") => (Sampler::AlwaysOn, "always_on".into()),
        Some("always_off") => (Sampler::AlwaysOff, "always_off".into()),
        Some("traceidratio") => {
            let r = ratio(problems);
            (Sampler::TraceIdRatioBased(r), format!("traceidratio({r})"))
        }
        Some("parentbased_always_on") => {
            (parent(Sampler::AlwaysOn), "parentbased_always_on".into())
        }
        Some("parentbased_always_off") => {
            (parent(Sampler::AlwaysOff), "parentbased_always_off".into())
        }
        Some("parentbased_traceidratio") => {
            let r = ratio(problems);
            (
                parent(Sampler::TraceIdRatioBased(r)),
                format!("parentbased_traceidratio({r})"),
            )
        }
        Some(other) => {
            let (s, n) = fallback();
            problems.push(format!(
                "OTEL_TRACES_SAMPLER=`{other}` is not supported; using {n} (TRACE_SAMPLE_RATE)"
            ));
            (s, n)
        }
    }
}

/// The batch processor behind a bounded queue of its own, so that every span dropped for a
/// full queue is counted (the SDK's processor drops them silently): the inner queue holds
/// twice the bound, and spans past the bound are dropped here, before it.
#[derive(Debug)]
struct CountedQueue {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    bound: usize,
    dropped: prometheus::IntCounter,
}

impl SpanProcessor for CountedQueue {
    fn on_start(&self, span: &mut Span, cx: &OtelContext) {
        self.inner.on_start(span, cx)
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let taken = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.bound).then_some(q + 1)
            });
        if taken.is_ok() {
            self.inner.on_end(span);
        } else {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// Builds the tracer provider of a plan whose export is on: the exporter, a bounded batch
/// queue, the sampler, the resource (`OTEL_RESOURCE_ATTRIBUTES` is merged in by the SDK's
/// resource detectors).
pub fn tracer_provider(
    settings: &Settings,
    plan: &ExportPlan,
    metrics: &Metrics,
) -> anyhow::Result<SdkTracerProvider> {
    let queued = Arc::new(AtomicUsize::new(0));
    let exporter = CountingExporter {
        inner: plan.exporter()?,
        endpoint: plan.endpoint.clone(),
        dropped: metrics.dropped_spans.clone(),
        queued: queued.clone(),
    };
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(plan.queue_size * 2)
                .build(),
        )
        .build();
    let processor = CountedQueue {
        inner: batch,
        queued,
        bound: plan.queue_size,
        dropped: metrics.dropped_spans.clone(),
    };
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(plan.sampler.clone())
        .with_resource(resource(settings))
        .build())
}

/// Sends one test span straight through the plan's exporter and reports whether the
/// collector accepted it: `Ok(())`, or why not.
pub async fn check_export(settings: &Settings, plan: &ExportPlan) -> Result<(), String> {
    let mut exporter = plan.exporter().map_err(|e| format!("{e:#}"))?;
    exporter.set_resource(&resource(settings));
    let now = SystemTime::now();
    let span = SpanData {
        span_context: SpanContext::new(
            TraceId::from(rand::random::<u128>() | 1),
            SpanId::from(rand::random::<u64>() | 1),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: "telemetry check".into(),
        start_time: now,
        end_time: now,
        attributes: vec![KeyValue::new("media_clustering.check", true)],
        dropped_attributes_count: 0,
        events: Default::default(),
        links: Default::default(),
        status: Status::Ok,
        instrumentation_scope: InstrumentationScope::builder("media-clustering").build(),
    };
    let result = exporter.export(vec![span]).await.map_err(|e| e.to_string());
    let _ = exporter.shutdown();
    result
}

/// Directives that keep the telemetry stack's own chatter out of the logs (the
/// exporter's failures are reported, rate-limited, by [`CountingExporter`]).
const QUIET: &str = "opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off,\
opentelemetry_http=off,h2=warn,hyper=warn,hyper_util=warn,tonic=warn,tower=warn,reqwest=warn";

fn filter(level: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    // The operator's own directives for these targets win.
    let extra: Vec<&str> = QUIET
        .split(',')
        .filter(|d| !level.contains(d.split('=').next().unwrap_or_default()))
        .collect();
    EnvFilter::try_new(format!("{level},{}", extra.join(",")))
}

/// Installs the global subscriber, the propagator and (when export is on and its exporter
/// builds) the tracer. Only a bad log setting is an error; telemetry problems are logged
/// and counted once the subscriber is in place.
pub fn init(settings: &Settings, metrics: &Metrics) -> anyhow::Result<TelemetryGuard> {
    let plan = ExportPlan::resolve(settings);
    global::set_text_map_propagator(plan.propagator());
    let log_filter = filter(&settings.log.level)?;
    let mut build_error = None;
    let provider = match plan.off {
        Some(_) => None,
        None => match tracer_provider(settings, &plan, metrics) {
            Ok(p) => Some(p),
            Err(e) => {
                build_error = Some(format!("{e:#}"));
                None
            }
        },
    };
    // Spans are exported at `info` whatever the log level, so LOG_LEVEL=warn still traces.
    let span_filter = filter("info")?;
    let otel = provider.as_ref().map(|p| {
        global::set_tracer_provider(p.clone());
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("media-clustering"))
            .with_filter(span_filter)
    });
    let fmt = if settings.log.format == "pretty" {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stdout)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .with_writer(std::io::stdout)
            .boxed()
    };
    tracing_subscriber::registry()
        .with(otel)
        .with(JobFieldsLayer)
        .with(fmt.with_filter(log_filter))
        .try_init()?;
    for problem in &plan.problems {
        metrics.telemetry_setup_errors.inc();
        tracing::warn!(problem = %problem, "A telemetry setting could not be used.");
    }
    match (&build_error, &plan.off) {
        (Some(e), _) => {
            metrics.telemetry_setup_errors.inc();
            tracing::error!(
                endpoint = %plan.endpoint,
                protocol = plan.protocol.as_str(),
                error = %e,
                "The trace exporter could not be built: the service runs with trace export off \
                 (`media-clustering telemetry check` explains)."
            );
        }
        (None, Some(why)) => tracing::info!(reason = %why, "Trace export is off."),
        (None, None) => tracing::info!(
            endpoint = %plan.endpoint,
            protocol = plan.protocol.as_str(),
            gzip = plan.gzip,
            sampler = %plan.sampler_name,
            "Exporting traces."
        ),
    }
    Ok(TelemetryGuard { provider })
}

/// The ids a log line inherits from its spans.
#[derive(Default, Clone)]
struct JobFields(Map<String, Value>);

const JOINED_FIELDS: &[&str] = &["job_id", "pet_id", "image_id"];

impl Visit for JobFields {
    fn record_str(&mut self, f: &Field, v: &str) {
        if JOINED_FIELDS.contains(&f.name()) {
            self.0.insert(f.name().into(), Value::from(v));
        }
    }
    fn record_debug(&mut self, f: &Field, v: &dyn fmt::Debug) {
        if JOINED_FIELDS.contains(&f.name()) {
            self.0
                .insert(f.name().into(), Value::from(format!("{v:?}")));
        }
    }
}

/// Remembers `job_id`, `pet_id` and `image_id` of each span, so that every line logged inside carries them.
struct JobFieldsLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for JobFieldsLayer {
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut f = JobFields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(f);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            if let Some(f) = ext.get_mut::<JobFields>() {
                values.record(f);
            }
        }
    }
}

struct EventFields(Map<String, Value>);

impl Visit for EventFields {
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.0.insert(f.name().into(), Value::from(v));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().into(), Value::from(v));
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().into(), Value::from(v));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().into(), Value::from(v));
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().into(), Value::from(v));
    }
    fn record_debug(&mut self, f: &Field, v: &dyn fmt::Debug) {
        self.0
            .insert(f.name().into(), Value::from(format!("{v:?}")));
    }
}

/// One JSON object per line: `timestamp, level, message, module, trace_id, span_id`,
/// the `job_id`/`pet_id`/`image_id` of the enclosing spans, then the event's fields.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut out = Map::new();
        out.insert(
            "timestamp".into(),
            Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        out.insert("level".into(), Value::from(meta.level().as_str()));
        let mut fields = EventFields(Map::new());
        event.record(&mut fields);
        let message = fields.0.remove("message").unwrap_or(Value::from(""));
        out.insert("message".into(), message);
        out.insert(
            "module".into(),
            Value::from(meta.module_path().unwrap_or(meta.target())),
        );
        let cx = tracing::Span::current().context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            out.insert("trace_id".into(), Value::from(sc.trace_id().to_string()));
            out.insert("span_id".into(), Value::from(sc.span_id().to_string()));
        }
        if let Some(scope) = ctx.event_scope() {
            for span in scope {
                if let Some(f) = span.extensions().get::<JobFields>() {
                    for (k, v) in &f.0 {
                        out.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
            }
        }
        for (k, v) in fields.0 {
            out.entry(k).or_insert(v);
        }
        writeln!(w, "{}", Value::Object(out))
    }
}

/// Removes the OTLP compression variables from the process environment, once the settings
/// have captured them ([`ExportPlan`] decides compression and passes it to the exporter).
/// The exporter crate would otherwise read them itself, and refuse values the specification
/// allows (`none`) or that it cannot honour, failing the exporter's build.
///
/// Must be called before the process starts a thread (`cli::run` calls it right after the
/// settings are loaded, before any runtime exists).
pub fn take_compression_vars() {
    for var in [
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    ] {
        if std::env::var_os(var).is_some() {
            // SAFETY: the environment is only unsafe to change while another thread may
            // read it; no other thread exists yet (see above).
            #[allow(unsafe_code)]
            unsafe {
                std::env::remove_var(var)
            };
        }
    }
}

/// `k=v,k2=v2` with percent-encoded values (the OTLP exporter specification); a pair without
/// `=` or with an empty key is a problem and left out.
fn parse_headers(name: &str, list: &str, problems: &mut Vec<String>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                let v = percent_encoding::percent_decode_str(v.trim()).decode_utf8_lossy();
                out.push((k.trim().to_ascii_lowercase(), v.into_owned()));
            }
            // Never the text itself: a header is usually a credential.
            _ => problems.push(format!(
                "{name}: an entry of {} characters is not a key=value pair; left out",
                pair.chars().count()
            )),
        }
    }
    out
}

/// The trace id of `span`'s OpenTelemetry context, if it has a valid one (hex, 32 digits).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
