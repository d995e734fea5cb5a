//! Logs and traces: a `tracing` subscriber writing JSON lines (or a pretty
//! format for local runs) joined to OpenTelemetry traces, and the OTLP
//! exporter (gRPC or HTTP/protobuf, batch processor, parent-based ratio sampler).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::InstrumentationScope;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    TracerProvider as _,
};
use opentelemetry::{KeyValue, global};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
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
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The URL spans are sent to: for HTTP/protobuf the `/v1/traces` path is added to
/// the base endpoint, as the OTLP specification asks for `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub fn traces_endpoint(settings: &Settings) -> String {
    let t = &settings.telemetry;
    let base = t.otlp_endpoint.trim_end_matches('/');
    if t.otlp_protocol == "http/protobuf" && !base.ends_with("/v1/traces") {
        format!("{base}/v1/traces")
    } else {
        base.to_owned()
    }
}

/// The OTLP exporter of the settings (it also honours `OTEL_EXPORTER_OTLP_HEADERS` and
/// `OTEL_EXPORTER_OTLP_TIMEOUT`). gRPC needs a Tokio runtime when it is built.
pub fn span_exporter(settings: &Settings) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let endpoint = traces_endpoint(settings);
    Ok(if settings.telemetry.otlp_protocol == "http/protobuf" {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .build()?
    } else {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?
    })
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
}

/// Unix seconds of the last export warning.
static LAST_EXPORT_WARNING: AtomicU64 = AtomicU64::new(0);
const EXPORT_WARNING_EVERY_SECS: u64 = 60;

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
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

fn resource(settings: &Settings) -> Resource {
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

/// Builds the OTLP tracer provider: batch processor, parent-based ratio sampler, resource
/// (`OTEL_RESOURCE_ATTRIBUTES` is merged in by the SDK's resource detectors).
pub fn tracer_provider(
    settings: &Settings,
    metrics: &Metrics,
) -> anyhow::Result<SdkTracerProvider> {
    let exporter = CountingExporter {
        inner: span_exporter(settings)?,
        endpoint: traces_endpoint(settings),
        dropped: metrics.dropped_spans.clone(),
    };
    let ratio = Sampler::TraceIdRatioBased(settings.telemetry.sample_rate);
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(ratio)))
        .with_resource(resource(settings))
        .build())
}

/// Sends one test span straight through the configured exporter and reports whether
/// the collector accepted it: `Ok(())`, or the exporter's error.
pub async fn check_export(settings: &Settings) -> Result<(), String> {
    let mut exporter = span_exporter(settings).map_err(|e| e.to_string())?;
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

/// Installs the global subscriber (and the tracer when telemetry is enabled).
pub fn init(settings: &Settings, metrics: &Metrics) -> anyhow::Result<TelemetryGuard> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let log_filter = filter(&settings.log.level)?;
    let provider = if settings.telemetry.enabled {
        Some(tracer_provider(settings, metrics)?)
    } else {
        None
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
