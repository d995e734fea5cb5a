//! Logs and traces: a `tracing` subscriber writing JSON lines (or a pretty
//! format for local runs) joined to OpenTelemetry traces, and the OTLP
//! exporter (gRPC or HTTP/protobuf, batch processor, parent-based ratio sampler).

use std::fmt;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{KeyValue, global};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
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

/// Builds the OTLP tracer provider from the settings (the exporter also honours
/// `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` and `OTEL_RESOURCE_ATTRIBUTES`).
pub fn tracer_provider(settings: &Settings) -> anyhow::Result<SdkTracerProvider> {
    let t = &settings.telemetry;
    let exporter = if t.otlp_protocol == "http/protobuf" {
        let base = t.otlp_endpoint.trim_end_matches('/');
        let endpoint = if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        };
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .build()?
    } else {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&t.otlp_endpoint)
            .build()?
    };
    let env = match settings.env {
        crate::config::AppEnv::Development => "development",
        crate::config::AppEnv::Production => "production",
    };
    let resource = Resource::builder()
        .with_service_name(t.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("deployment.environment.name", env),
        ])
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            t.sample_rate,
        ))))
        .with_resource(resource)
        .build())
}

/// Installs the global subscriber (and the tracer when telemetry is enabled).
pub fn init(settings: &Settings) -> anyhow::Result<TelemetryGuard> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_new(&settings.log.level)?;
    let provider = if settings.telemetry.enabled {
        Some(tracer_provider(settings)?)
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        global::set_tracer_provider(p.clone());
        tracing_opentelemetry::layer().with_tracer(p.tracer("media-clustering"))
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
        .with(filter)
        .with(otel)
        .with(JobFieldsLayer)
        .with(fmt)
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
