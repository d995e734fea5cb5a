//! Exemplars: the trace of a recent observation in each histogram bucket, and the OpenMetrics
//! text encoder that serves them.
//!
//! Written by hand because the `prometheus` crate records no exemplars and encodes only the
//! plain text format, while `prometheus-client` encodes only OpenMetrics and would mean
//! rewriting every collector and actix-web-prom's. So the collectors stay as they are, a
//! [`TracedHistogram`] also keeps, per bucket, the trace id of its latest sampled observation,
//! and [`encode_openmetrics`] writes the gathered families in the OpenMetrics 1.0 text format
//! with those exemplars attached to the bucket lines.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::TraceContextExt;
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{Histogram, HistogramVec};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The OpenMetrics content type (what a scraper asks for and what [`encode_openmetrics`] writes).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One observation's trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Exemplar {
    pub trace_id: String,
    pub span_id: String,
    pub value: f64,
    /// Unix time in seconds.
    pub at: f64,
}

/// The latest exemplar of each bucket of one series (the last slot is `+Inf`).
#[derive(Debug)]
pub struct Slots {
    bounds: Vec<f64>,
    latest: Mutex<Vec<Option<Exemplar>>>,
}

impl Slots {
    fn new(bounds: Vec<f64>) -> Self {
        let n = bounds.len() + 1;
        Slots {
            bounds,
            latest: Mutex::new(vec![None; n]),
        }
    }

    /// The bucket a value is counted in: the first bound it does not exceed.
    fn bucket(&self, v: f64) -> usize {
        self.bounds.partition_point(|b| *b < v)
    }

    fn record(&self, v: f64, trace_id: String, span_id: String) {
        let i = self.bucket(v);
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest[i] = Some(Exemplar {
            trace_id,
            span_id,
            value: v,
            at,
        });
    }

    /// The exemplar of the bucket whose upper bound is `le`.
    fn for_bound(&self, le: f64) -> Option<Exemplar> {
        let i = if le.is_infinite() {
            self.bounds.len()
        } else {
            self.bounds.iter().position(|b| *b == le)?
        };
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest[i].clone()
    }

    /// Every bucket's exemplar, lowest bucket first.
    fn all(&self) -> Vec<Exemplar> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest.iter().flatten().cloned().collect()
    }
}

/// Series key: family name and label values in the family's label order.
type SeriesKey = (String, Vec<String>);

/// Every traced series of one metrics handle, found by family and label values at scrape time.
#[derive(Debug, Default)]
pub struct ExemplarStore {
    series: Mutex<HashMap<SeriesKey, Arc<Slots>>>,
}

impl ExemplarStore {
    fn slots(&self, family: &str, labels: &[&str], bounds: &[f64]) -> Arc<Slots> {
        let key = (
            family.to_owned(),
            labels.iter().map(|s| (*s).to_owned()).collect(),
        );
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series
            .entry(key)
            .or_insert_with(|| Arc::new(Slots::new(bounds.to_vec())))
            .clone()
    }

    /// The exemplars of one series (family name, label values in the family's order).
    pub fn exemplars(&self, family: &str, labels: &[&str]) -> Vec<Exemplar> {
        self.find(family, labels)
            .map(|s| s.all())
            .unwrap_or_default()
    }

    fn find(&self, family: &str, labels: &[&str]) -> Option<Arc<Slots>> {
        let key = (
            family.to_owned(),
            labels.iter().map(|s| (*s).to_owned()).collect(),
        );
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.get(&key).cloned()
    }
}

/// A histogram child that also keeps an exemplar per bucket.
#[derive(Clone, Debug)]
pub struct TracedHistogram {
    hist: Histogram,
    slots: Arc<Slots>,
}

impl TracedHistogram {
    /// The child of `vec` with `labels`, traced in `store` under `family`.
    pub fn of(
        store: &ExemplarStore,
        vec: &HistogramVec,
        family: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> Self {
        TracedHistogram {
            hist: vec.with_label_values(labels),
            slots: store.slots(family, labels, buckets),
        }
    }

    /// Observes `v`; the current span's trace becomes the bucket's exemplar if it is sampled.
    pub fn observe(&self, v: f64) {
        self.observe_in(v, &tracing::Span::current());
    }

    /// Observes `v` with `span`'s trace as the exemplar (if sampled).
    pub fn observe_in(&self, v: f64, span: &tracing::Span) {
        self.hist.observe(v);
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() && sc.is_sampled() {
            self.slots
                .record(v, sc.trace_id().to_string(), sc.span_id().to_string());
        }
    }

    /// The plain child (for reading counts in tests and benchmarks).
    pub fn histogram(&self) -> &Histogram {
        &self.hist
    }
}

/// A number as OpenMetrics writes it: integers keep a `.0`, infinities are `+Inf`/`-Inf`.
fn number(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{v:.1}");
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Escapes a label value or help text: backslash, double quote and newline.
fn escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn labels(out: &mut String, pairs: &[(&str, &str)]) {
    if pairs.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escaped(out, v);
        out.push('"');
    }
    out.push('}');
}

/// Writes `families` in the OpenMetrics 1.0 text format, ending with `# EOF`. Counter families
/// are named without their `_total` suffix, which their samples carry; histogram buckets get
/// the exemplars `store` holds for them.
pub fn encode_openmetrics(families: &[MetricFamily], store: &ExemplarStore) -> String {
    let mut out = String::with_capacity(16 * 1024);
    for mf in families {
        let name = mf.name();
        let kind = mf.get_field_type();
        let family = match kind {
            MetricType::COUNTER => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        let type_name = match kind {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::HISTOGRAM => "histogram",
            // The registry holds neither (every collector is a counter, gauge or histogram).
            MetricType::SUMMARY | MetricType::UNTYPED => continue,
        };
        let _ = writeln!(out, "# TYPE {family} {type_name}");
        if !mf.help().is_empty() {
            let _ = write!(out, "# HELP {family} ");
            escaped(&mut out, mf.help());
            out.push('\n');
        }
        for m in mf.get_metric() {
            let pairs: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            let sample = |out: &mut String, suffix: &str, extra: Option<(&str, &str)>, v: f64| {
                out.push_str(family);
                out.push_str(suffix);
                let mut all = pairs.clone();
                all.extend(extra);
                labels(out, &all);
                out.push(' ');
                number(out, v);
            };
            match kind {
                MetricType::COUNTER => {
                    sample(&mut out, "_total", None, m.get_counter().get_value());
                    out.push('\n');
                }
                MetricType::GAUGE => {
                    sample(&mut out, "", None, m.get_gauge().get_value());
                    out.push('\n');
                }
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    let values: Vec<&str> = pairs.iter().map(|(_, v)| *v).collect();
                    let slots = store.find(name, &values);
                    let mut bounds: Vec<(f64, u64)> = h
                        .get_bucket()
                        .iter()
                        .map(|b| (b.upper_bound(), b.cumulative_count()))
                        .collect();
                    if bounds.last().is_none_or(|(b, _)| b.is_finite()) {
                        bounds.push((f64::INFINITY, h.get_sample_count()));
                    }
                    for (le, count) in bounds {
                        let mut le_text = String::new();
                        number(&mut le_text, le);
                        sample(&mut out, "_bucket", Some(("le", &le_text)), count as f64);
                        if let Some(e) = slots.as_ref().and_then(|s| s.for_bound(le)) {
                            out.push_str(" # ");
                            labels(&mut out, &[("trace_id", &e.trace_id)]);
                            out.push(' ');
                            number(&mut out, e.value);
                            let _ = write!(out, " {:.3}", e.at);
                        }
                        out.push('\n');
                    }
                    sample(&mut out, "_sum", None, h.get_sample_sum());
                    out.push('\n');
                    sample(&mut out, "_count", None, h.get_sample_count() as f64);
                    out.push('\n');
                }
                MetricType::SUMMARY | MetricType::UNTYPED => {}
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

/// Whether an `Accept` header prefers OpenMetrics to the plain text format (by q-value, the
/// plain format winning a tie only when it is listed first, as Prometheus lists them).
pub fn wants_openmetrics(accept: &str) -> bool {
    let mut best: Option<(f32, bool)> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let mut q = 1.0f32;
        for p in parts {
            if let Some(v) = p.strip_prefix("q=") {
                q = v.parse().unwrap_or(0.0);
            }
        }
        let om = match media.as_str() {
            "application/openmetrics-text" => true,
            "text/plain" | "*/*" | "text/*" => false,
            _ => continue,
        };
        if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, om));
        }
    }
    best.is_some_and(|(_, om)| om)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, TraceFlags, TraceId, TraceState};
    use prometheus::{HistogramOpts, IntCounter, Registry};

    const BUCKETS: &[f64] = &[0.1, 1.0, 10.0];

    fn fixture() -> (Registry, ExemplarStore, TracedHistogram) {
        let registry = Registry::new();
        let vec = HistogramVec::new(
            HistogramOpts::new("work_seconds", "Work \"time\".").buckets(BUCKETS.to_vec()),
            &["actor"],
        )
        .unwrap();
        registry.register(Box::new(vec.clone())).unwrap();
        let jobs = IntCounter::new("jobs_total", "Jobs.").unwrap();
        jobs.inc_by(3);
        registry.register(Box::new(jobs)).unwrap();
        let store = ExemplarStore::default();
        let h = TracedHistogram::of(&store, &vec, "work_seconds", BUCKETS, &["embedder"]);
        (registry, store, h)
    }

    /// Runs `f` inside a span whose parent is a sampled remote context with `trace`.
    fn in_trace(trace: u128, sampled: bool, f: impl FnOnce()) {
        use tracing_subscriber::layer::SubscriberExt;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "test");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        tracing::subscriber::with_default(subscriber, || {
            let flags = if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            let remote = SpanContext::new(
                TraceId::from(trace),
                opentelemetry::trace::SpanId::from(7u64),
                flags,
                true,
                TraceState::default(),
            );
            let span = tracing::info_span!("work");
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
            span.in_scope(f);
        });
    }

    #[test]
    fn a_sampled_observation_becomes_its_buckets_exemplar_and_the_latest_wins() {
        let (registry, store, h) = fixture();
        in_trace(0xaa, true, || h.observe(0.5));
        in_trace(0xbb, true, || h.observe(0.7));
        in_trace(0xcc, true, || h.observe(20.0));
        let text = encode_openmetrics(&registry.gather(), &store);
        let bucket = |le: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "work_seconds_bucket{{actor=\"embedder\",le=\"{le}\"}}"
                    ))
                })
                .unwrap_or_else(|| panic!("no bucket {le} in\n{text}"))
                .to_owned()
        };
        assert!(!bucket("0.1").contains('#'), "{text}");
        let one = bucket("1.0");
        assert!(
            one.starts_with(&format!(
                "work_seconds_bucket{{actor=\"embedder\",le=\"1.0\"}} 2.0 # {{trace_id=\"{:032x}\"}} 0.7 ",
                0xbb
            )),
            "{one}"
        );
        assert!(bucket("+Inf").contains(&format!("{:032x}", 0xcc)), "{text}");
        assert!(text.contains("work_seconds_count{actor=\"embedder\"} 3.0\n"));
    }

    #[test]
    fn an_unsampled_or_untraced_observation_is_counted_without_an_exemplar() {
        let (registry, store, h) = fixture();
        in_trace(0xaa, false, || h.observe(0.5));
        h.observe(0.5);
        let text = encode_openmetrics(&registry.gather(), &store);
        assert!(!text.contains("trace_id"), "{text}");
        assert!(text.contains("work_seconds_count{actor=\"embedder\"} 2.0\n"));
    }

    #[test]
    fn counters_are_named_without_total_help_is_escaped_and_the_text_ends_with_eof() {
        let (registry, store, _) = fixture();
        let text = encode_openmetrics(&registry.gather(), &store);
        assert!(text.contains("# TYPE jobs counter\n# HELP jobs Jobs.\njobs_total 3.0\n"));
        assert!(text.contains("# HELP work_seconds Work \\\"time\\\".\n"));
        assert!(text.ends_with("\n# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
    }

    #[test]
    fn openmetrics_is_chosen_by_the_scrapers_preference() {
        // Prometheus's default scrape header.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(wants_openmetrics("application/openmetrics-text"));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics(
            "text/plain;q=0.9,application/openmetrics-text;q=0.5"
        ));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
    }
}
