//! OTLP metrics export (`OTEL_METRICS_EXPORTER=otlp`), for backends that take metrics by OTLP.
//!
//! The collectors stay the Prometheus ones that `/internal/metrics` serves: every
//! `OTEL_METRIC_EXPORT_INTERVAL` a thread of its own gathers that registry and sends it as
//! cumulative OTLP data with the same names (counters as monotonic sums, gauges, histograms
//! with their buckets and exemplars), over gRPC or HTTP/protobuf with the trace exporter's
//! TLS, compression and header rules (the `_METRICS_` variants win). Written by hand because
//! the OpenTelemetry SDK exports only its own instruments (it has no asynchronous histogram,
//! so the registry cannot be bridged into it); the messages are the proto crate's.
//! A failed export is logged (at most once a minute) and counted in
//! `media_cluster_telemetry_metric_export_failures_total`; it never stops the service.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actors::exemplars::ExemplarStore;
use actors::metrics::Metrics;
use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Exemplar, Gauge, Histogram, HistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, exemplar, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus::Registry;
use prometheus::proto::{MetricFamily, MetricType};
use prost::Message as _;

use crate::config::Settings;
use crate::telemetry::{ExportPlan, ExportProtocol, Signal};

/// The running export; dropping it sends one last export and stops the thread.
pub struct MetricsExporter {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MetricsExporter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the export when the settings ask for it; `None` when they do not or when it cannot
/// be built (logged and counted as a telemetry setup error).
pub fn start(
    settings: &Settings,
    registry: Registry,
    metrics: Arc<Metrics>,
) -> Option<MetricsExporter> {
    let plan = ExportPlan::resolve_signal(settings, Signal::Metrics);
    // The trace plan has logged the problems both share.
    let traces = ExportPlan::resolve(settings);
    for problem in plan
        .problems
        .iter()
        .filter(|p| !traces.problems.contains(p))
    {
        metrics.telemetry_setup_errors.inc();
        tracing::warn!(problem = %problem, "A telemetry setting could not be used.");
    }
    if plan.off.is_some() {
        return None;
    }
    let resource = resource(settings);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let endpoint = plan.endpoint.clone();
    let protocol = plan.protocol;
    let thread = std::thread::Builder::new()
        .name("otlp-metrics".into())
        .spawn(move || {
            let sender = match Sender::build(&plan) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            run(&plan, &sender, &registry, &metrics, &resource, &stop_rx);
        })
        .ok()?;
    match ready_rx.recv() {
        Ok(Ok(())) => {
            tracing::info!(
                endpoint = %endpoint,
                protocol = protocol.as_str(),
                "Exporting metrics by OTLP."
            );
            Some(MetricsExporter {
                stop: Some(stop_tx),
                thread: Some(thread),
            })
        }
        Ok(Err(e)) => {
            let _ = thread.join();
            tracing::error!(
                endpoint = %endpoint,
                error = %e,
                "The OTLP metrics exporter could not be built: metrics are only scraped."
            );
            None
        }
        Err(_) => None,
    }
}

fn run(
    plan: &ExportPlan,
    sender: &Sender,
    registry: &Registry,
    metrics: &Metrics,
    resource: &Resource,
    stop: &mpsc::Receiver<()>,
) {
    let started = unix_nanos();
    loop {
        let stopping = !matches!(
            stop.recv_timeout(plan.interval),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        let request = encode(
            &registry.gather(),
            &metrics.exemplars,
            resource,
            started,
            unix_nanos(),
        );
        if let Err(e) = sender.send(request) {
            metrics.metric_export_failures.inc();
            warn_rate_limited(&plan.endpoint, &format!("{e:#}"));
        }
        if stopping {
            return;
        }
    }
}

/// Unix seconds of the last export warning.
static LAST_WARNING: AtomicU64 = AtomicU64::new(0);

fn warn_rate_limited(endpoint: &str, error: &str) {
    let now = unix_nanos() / 1_000_000_000;
    let last = LAST_WARNING.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST_WARNING
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            endpoint,
            error,
            "The OTLP metric export failed (counted in \
             media_cluster_telemetry_metric_export_failures_total)."
        );
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One transport, built once on the export thread.
enum Sender {
    Http {
        client: reqwest13::blocking::Client,
        url: String,
        headers: Vec<(String, String)>,
        gzip: bool,
    },
    Grpc(Box<GrpcSender>),
}

struct GrpcSender {
    runtime: tokio::runtime::Runtime,
    client: MetricsServiceClient<tonic::transport::Channel>,
    headers: tonic::metadata::MetadataMap,
    timeout: Duration,
}

impl Sender {
    fn build(plan: &ExportPlan) -> anyhow::Result<Self> {
        match plan.protocol {
            ExportProtocol::HttpProtobuf => Ok(Sender::Http {
                client: plan.http_client()?,
                url: plan.endpoint.clone(),
                headers: plan.headers.clone(),
                gzip: plan.gzip,
            }),
            ExportProtocol::Grpc => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building the export thread's runtime")?;
                let mut endpoint = tonic::transport::Endpoint::from_shared(plan.endpoint.clone())
                    .context("the OTLP metrics endpoint")?
                    .timeout(plan.timeout)
                    .connect_timeout(plan.timeout);
                if let Some(tls) = plan.grpc_tls()? {
                    endpoint = endpoint.tls_config(tls).context("the TLS settings")?;
                }
                // The channel's worker task needs the runtime it will run on.
                let channel = {
                    let _entered = runtime.enter();
                    endpoint.connect_lazy()
                };
                let mut client = MetricsServiceClient::new(channel);
                if plan.gzip {
                    client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                let mut headers = tonic::metadata::MetadataMap::new();
                for (k, v) in &plan.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                        .with_context(|| format!("the header name `{k}`"))?;
                    let value = v
                        .parse()
                        .with_context(|| format!("the value of header `{k}`"))?;
                    headers.insert(key, value);
                }
                Ok(Sender::Grpc(Box::new(GrpcSender {
                    runtime,
                    client,
                    headers,
                    timeout: plan.timeout,
                })))
            }
        }
    }

    fn send(&self, request: ExportMetricsServiceRequest) -> anyhow::Result<()> {
        match self {
            Sender::Http {
                client,
                url,
                headers,
                gzip,
            } => {
                let mut body = request.encode_to_vec();
                let mut r = client
                    .post(url)
                    .header("content-type", "application/x-protobuf");
                if *gzip {
                    let mut z =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                    z.write_all(&body)?;
                    body = z.finish()?;
                    r = r.header("content-encoding", "gzip");
                }
                for (k, v) in headers {
                    r = r.header(k.as_str(), v.as_str());
                }
                let response = r.body(body).send().context("sending")?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "the collector answered {}",
                    response.status()
                );
                Ok(())
            }
            Sender::Grpc(grpc) => grpc.runtime.block_on(async {
                let GrpcSender {
                    client,
                    headers,
                    timeout,
                    ..
                } = grpc.as_ref();
                let mut req = tonic::Request::new(request);
                *req.metadata_mut() = headers.clone();
                let mut client = client.clone();
                match tokio::time::timeout(*timeout, client.export(req)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status)) => Err(anyhow::anyhow!(
                        "the collector answered {:?}: {}",
                        status.code(),
                        status.message()
                    )),
                    Err(_) => Err(anyhow::anyhow!("no answer within {timeout:?}")),
                }
            }),
        }
    }
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

/// The trace exporter's resource, as OTLP attributes.
fn resource(settings: &Settings) -> Resource {
    let attributes = crate::telemetry::resource(settings)
        .iter()
        .map(|(k, v)| string_kv(k.as_str(), &v.as_str()))
        .collect();
    Resource {
        attributes,
        ..Default::default()
    }
}

/// The gathered families as one cumulative OTLP request.
pub fn encode(
    families: &[MetricFamily],
    exemplars: &ExemplarStore,
    resource: &Resource,
    start_nanos: u64,
    now_nanos: u64,
) -> ExportMetricsServiceRequest {
    let cumulative = AggregationTemporality::Cumulative as i32;
    let mut out = Vec::with_capacity(families.len());
    for mf in families {
        let name = mf.name();
        let attributes = |m: &prometheus::proto::Metric| -> Vec<KeyValue> {
            m.get_label()
                .iter()
                .map(|l| string_kv(l.name(), l.value()))
                .collect()
        };
        let number = |m: &prometheus::proto::Metric, v: f64| NumberDataPoint {
            attributes: attributes(m),
            start_time_unix_nano: start_nanos,
            time_unix_nano: now_nanos,
            value: Some(number_data_point::Value::AsDouble(v)),
            ..Default::default()
        };
        let data = match mf.get_field_type() {
            MetricType::COUNTER => metric::Data::Sum(Sum {
                data_points: mf
                    .get_metric()
                    .iter()
                    .map(|m| number(m, m.get_counter().get_value()))
                    .collect(),
                aggregation_temporality: cumulative,
                is_monotonic: true,
            }),
            MetricType::GAUGE => metric::Data::Gauge(Gauge {
                data_points: mf
                    .get_metric()
                    .iter()
                    .map(|m| number(m, m.get_gauge().get_value()))
                    .collect(),
            }),
            MetricType::HISTOGRAM => metric::Data::Histogram(Histogram {
                data_points: mf
                    .get_metric()
                    .iter()
                    .map(|m| {
                        let h = m.get_histogram();
                        let mut bounds = Vec::new();
                        let mut counts = Vec::new();
                        let mut below = 0;
                        for b in h.get_bucket() {
                            if b.upper_bound().is_finite() {
                                bounds.push(b.upper_bound());
                                counts.push(b.cumulative_count().saturating_sub(below));
                                below = b.cumulative_count();
                            }
                        }
                        counts.push(h.get_sample_count().saturating_sub(below));
                        let values: Vec<&str> = m.get_label().iter().map(|l| l.value()).collect();
                        HistogramDataPoint {
                            attributes: attributes(m),
                            start_time_unix_nano: start_nanos,
                            time_unix_nano: now_nanos,
                            count: h.get_sample_count(),
                            sum: Some(h.get_sample_sum()),
                            bucket_counts: counts,
                            explicit_bounds: bounds,
                            exemplars: exemplars
                                .exemplars(name, &values)
                                .into_iter()
                                .map(|e| Exemplar {
                                    time_unix_nano: (e.at * 1e9) as u64,
                                    trace_id: hex::decode(&e.trace_id).unwrap_or_default(),
                                    span_id: hex::decode(&e.span_id).unwrap_or_default(),
                                    value: Some(exemplar::Value::AsDouble(e.value)),
                                    ..Default::default()
                                })
                                .collect(),
                            ..Default::default()
                        }
                    })
                    .collect(),
                aggregation_temporality: cumulative,
            }),
            // The registry holds neither (every collector is a counter, gauge or histogram).
            MetricType::SUMMARY | MetricType::UNTYPED => continue,
        };
        out.push(Metric {
            name: name.to_owned(),
            description: mf.help().to_owned(),
            unit: if name.ends_with("_seconds") || name.contains("_seconds_") {
                "s".to_owned()
            } else {
                String::new()
            },
            data: Some(data),
            ..Default::default()
        });
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "media-clustering".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                metrics: out,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_keep_their_names_and_values() {
        let m = Metrics::new();
        let registry = Registry::new();
        m.register(&registry).unwrap();
        m.retries.inc_by(2);
        m.worker_inflight.set(3);
        let h = m.postgres_write_for("commit_clusters");
        h.observe(0.003);
        h.observe(0.2);
        h.observe(100.0);
        let req = encode(&registry.gather(), &m.exemplars, &Resource::default(), 1, 2);
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        let find = |n: &str| {
            metrics
                .iter()
                .find(|x| x.name == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        match &find("media_cluster_retries_total").data {
            Some(metric::Data::Sum(s)) => {
                assert!(s.is_monotonic);
                assert_eq!(
                    s.data_points[0].value,
                    Some(number_data_point::Value::AsDouble(2.0))
                );
            }
            other => panic!("not a sum: {other:?}"),
        }
        match &find("media_cluster_worker_inflight").data {
            Some(metric::Data::Gauge(g)) => assert_eq!(
                g.data_points[0].value,
                Some(number_data_point::Value::AsDouble(3.0))
            ),
            other => panic!("not a gauge: {other:?}"),
        }
        let write = find("media_cluster_postgres_write_seconds");
        assert_eq!(write.unit, "s");
        let Some(metric::Data::Histogram(hist)) = &write.data else {
            panic!("not a histogram");
        };
        let point = hist
            .data_points
            .iter()
            .find(|p| {
                p.attributes.iter().any(|a| {
                    a.value
                        == Some(AnyValue {
                            value: Some(any_value::Value::StringValue("commit_clusters".into())),
                        })
                })
            })
            .unwrap();
        assert_eq!(point.count, 3);
        assert_eq!(point.bucket_counts.len(), point.explicit_bounds.len() + 1);
        assert_eq!(point.bucket_counts.iter().sum::<u64>(), 3);
        // 100 s is past the last bound: counted in the overflow bucket.
        assert_eq!(*point.bucket_counts.last().unwrap(), 1);
        let le_0005 = point
            .explicit_bounds
            .iter()
            .position(|b| *b == 0.005)
            .unwrap();
        assert_eq!(point.bucket_counts[le_0005], 1);
        assert_eq!(point.start_time_unix_nano, 1);
        assert_eq!(point.time_unix_nano, 2);
    }
}
