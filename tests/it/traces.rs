//! Traces and logs against a real OTLP/HTTP receiver, with the service as a process.

use std::collections::HashSet;

use serde_json::Value;

use crate::helpers::*;
use crate::process::*;

/// The span of the commit transaction (named by its `db.query.summary`).
const COMMIT_SPAN: &str = "INSERT cluster_versions clusters cluster_members";

/// A child process stopped when the test ends, whether it passes or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `process <stream>` and `ack <stream>`: messaging span names carry the destination.
fn on_stream(env: &ProcEnv, operation: &str) -> String {
    format!(
        "{operation} {}",
        env.vars["MEDIA_CLUSTERING__REDIS__STREAM"]
    )
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

fn otlp_vars(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("TELEMETRY_ENABLED", "true".into()),
        ("TRACE_SAMPLE_RATE", "1.0".into()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        ),
    ]
}

/// Asserts the span's string attributes `want` (key, value).
fn assert_strings(span: &Value, want: &[(&str, &str)]) {
    for (k, v) in want {
        assert_eq!(
            attr(span, k).map(|v| &v["stringValue"]),
            Some(&Value::from(*v)),
            "{k} of {}",
            span["name"]
        );
    }
}

fn as_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn photos(n: usize) -> Vec<(String, Vec<u8>)> {
    fixture_files(
        &labels()
            .iter()
            .take(n)
            .map(|r| r.0.clone())
            .collect::<Vec<_>>(),
    )
}

#[actix_rt::test]
async fn one_unbroken_trace_per_upload_and_logs_joined_to_it() {
    let env = ProcEnv::new(&[]).await;
    let tap = Receiver::start(env.dir.path());
    let mut vars = otlp_vars(tap.port);
    // Photos are read from storage (a span each) rather than taken from what the API
    // prepared, as a separate worker would.
    vars.push(("MEDIA_CLUSTERING__EMBEDDER__PREPARED_CACHE_MIB", "0".into()));
    let serve = env.spawn("serve", "serve", &as_refs(&vars));
    let client = Client::new(&env, &serve.base);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let up = client
        .upload(
            "traced",
            &photos(3),
            Some(&format!("00-{trace_id}-{parent}-01")),
        )
        .await;
    let job_id = up["job_id"].as_str().unwrap().to_owned();
    assert_eq!(client.wait_job(&job_id).await, "succeeded");

    let (process, ack) = (on_stream(&env, "process"), on_stream(&env, "ack"));
    // The batch exporter sends within seconds; wait for the last stage's span.
    let spans = eventually(60, "the job's spans", async || {
        let s: Vec<Value> = tap
            .spans()
            .into_iter()
            .filter(|s| s["traceId"] == trace_id)
            .collect();
        let done = s.iter().any(|x| {
            x["name"] == COMMIT_SPAN
                && attr(x, "db.operation.name")
                    .is_some_and(|v| v["stringValue"] == "commit_clusters")
        }) && s.iter().any(|x| x["name"] == ack.as_str());
        let consumer = s.iter().any(|x| x["name"] == process.as_str());
        (done && consumer).then_some(s)
    })
    .await;
    let names: HashSet<&str> = spans.iter().map(|s| s["name"].as_str().unwrap()).collect();
    for want in [
        "POST /v1/pets/{pet_id}/images",
        process.as_str(),
        "embedder handle",
        "embed",
        "clusterer handle",
        "cluster",
        "hero_selector handle",
        "hero.select",
        "postgres_writer handle",
        COMMIT_SPAN,
        // Every I/O of the job is a span of its own: the pet's lock, the job rows, the pet's
        // photos, each blob read, each stored embedding and the acknowledgement.
        "stream_reader handle",
        "SET pet-lock",
        "UPDATE jobs",
        "SELECT images image_embeddings",
        "GET object",
        "INSERT image_embeddings",
        ack.as_str(),
    ] {
        assert!(names.contains(want), "no `{want}` span in {names:?}");
    }
    // Kinds: SERVER 2, PRODUCER 4, CONSUMER 5.
    let kinds: HashSet<i64> = spans.iter().filter_map(|s| s["kind"].as_i64()).collect();
    for k in [2, 4, 5] {
        assert!(kinds.contains(&k), "no span of kind {k}");
    }
    // No orphans: every parent is in the trace, or is the caller's span.
    let ids: HashSet<&str> = spans
        .iter()
        .map(|s| s["spanId"].as_str().unwrap())
        .chain([parent])
        .collect();
    for s in &spans {
        let p = s["parentSpanId"].as_str().unwrap_or("");
        assert!(p.is_empty() || ids.contains(p), "orphan span {}", s["name"]);
    }
    assert_eq!(
        spans.iter().filter(|s| s["name"] == "embed").count(),
        3,
        "one embed span per photo"
    );
    let consumer = spans.iter().find(|s| s["kind"] == 5).unwrap();
    assert_strings(
        consumer,
        &[
            ("messaging.system", "redis"),
            ("messaging.consumer.group.name", "media-clustering"),
            ("messaging.operation.name", "process"),
            ("messaging.operation.type", "process"),
        ],
    );
    for k in [
        "messaging.destination.name",
        "messaging.message.id",
        "messaging.client.id",
    ] {
        assert!(attr(consumer, k).is_some(), "{k}");
    }
    // The HTTP server span, by the current HTTP conventions (not the old `http.method`).
    let server = spans
        .iter()
        .find(|s| s["kind"] == 2 && s["name"] == "POST /v1/pets/{pet_id}/images")
        .unwrap();
    assert_strings(
        server,
        &[
            ("http.request.method", "POST"),
            ("http.route", "/v1/pets/{pet_id}/images"),
            ("url.path", "/v1/pets/traced/images"),
            ("url.scheme", "http"),
            ("network.protocol.version", "1.1"),
        ],
    );
    assert_eq!(
        attr(server, "http.response.status_code").map(|v| &v["intValue"]),
        Some(&Value::from("202")),
        "{server}"
    );
    for old in ["http.method", "http.status_code", "http.target"] {
        assert!(attr(server, old).is_none(), "old attribute {old}");
    }
    // The producer span: operation, destination and the Redis server it sent to.
    let producer = spans.iter().find(|s| s["kind"] == 4).unwrap();
    assert_strings(
        producer,
        &[
            ("messaging.system", "redis"),
            ("messaging.operation.name", "send"),
            ("messaging.operation.type", "send"),
            ("server.address", "127.0.0.1"),
        ],
    );
    // An integer attribute (OTLP/JSON writes 64-bit integers as strings).
    assert_eq!(
        attr(producer, "server.port").map(|v| &v["intValue"]),
        Some(&Value::from("6379")),
        "{producer}"
    );
    let write = spans.iter().find(|s| s["name"] == COMMIT_SPAN).unwrap();
    assert_eq!(
        attr(write, "db.system.name").map(|v| &v["stringValue"]),
        Some(&Value::from("postgresql"))
    );
    assert_eq!(
        attr(write, "db.namespace").map(|v| &v["stringValue"]),
        Some(&Value::from(env.db_name.as_str()))
    );
    assert_eq!(
        spans.iter().filter(|s| s["name"] == "GET object").count(),
        3,
        "one blob read per photo"
    );

    // Log lines written while processing carry the trace id and the job id.
    let logs = serve.log_text();
    let joined: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["trace_id"] == trace_id && l["job_id"] == job_id.as_str())
        .collect();
    assert!(!joined.is_empty(), "no log line with the trace and job ids");
    for l in &joined {
        for k in [
            "timestamp",
            "level",
            "message",
            "module",
            "span_id",
            "pet_id",
        ] {
            assert!(l.get(k).is_some(), "log line lacks {k}: {l}");
        }
    }
    assert!(!logs.contains(&client.token), "a token was logged");
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_down_collector_costs_nothing_but_dropped_spans() {
    let env = ProcEnv::new(&[]).await;
    // Nothing listens there.
    let dead = free_port();
    let vars = otlp_vars(dead);
    let serve = env.spawn("serve", "serve", &as_refs(&vars));
    let client = Client::new(&env, &serve.base);
    let mut jobs = Vec::new();
    for i in 0..4 {
        let up = client.upload(&format!("pet-{i}"), &photos(2), None).await;
        jobs.push(up["job_id"].as_str().unwrap().to_owned());
    }
    for j in &jobs {
        assert_eq!(client.wait_job(j).await, "succeeded");
    }
    let dropped = eventually(30, "dropped spans to be counted", async || {
        let text = client.scrape("dev-internal-token").await;
        let n = sample(&text, "media_cluster_telemetry_dropped_spans_total");
        (n > 0.0).then_some(n)
    })
    .await;
    assert!(dropped >= 4.0, "dropped {dropped}");
    let warnings = serve
        .log_text()
        .lines()
        .filter(|l| l.contains("Exporting spans failed"))
        .count();
    assert_eq!(warnings, 1, "the export warning is rate-limited");
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn telemetry_check_says_whether_the_collector_accepts_spans() {
    let env = ProcEnv::new(&[]).await;
    let tap = Receiver::start(env.dir.path());
    let ok = env
        .command("telemetry check", &as_refs(&otlp_vars(tap.port)))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("accepted"));
    eventually(10, "the test span", async || {
        tap.spans()
            .iter()
            .any(|s| s["name"] == "telemetry check")
            .then_some(())
    })
    .await;

    let dead = free_port();
    let bad = env
        .command("telemetry check", &as_refs(&otlp_vars(dead)))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains(&format!("127.0.0.1:{dead}")),
        "error does not name the endpoint: {stderr}"
    );
    env.cleanup().await;
}

#[actix_rt::test]
async fn sample_rate_zero_exports_only_what_a_sampled_parent_asks_for() {
    let env = ProcEnv::new(&[]).await;
    let tap = Receiver::start(env.dir.path());
    let mut vars = otlp_vars(tap.port);
    vars[1].1 = "0".into();
    // Logging only warnings must not stop tracing.
    vars.push(("LOG_LEVEL", "warn".into()));
    let serve = env.spawn("serve", "serve", &as_refs(&vars));
    let client = Client::new(&env, &serve.base);

    let process = on_stream(&env, "process");
    let unsampled = client.upload("quiet", &photos(2), None).await;
    assert_eq!(
        client.wait_job(unsampled["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    // A sampled parent afterwards: once its spans arrive, the exporter has flushed both jobs.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let sampled = client
        .upload(
            "loud",
            &photos(2),
            Some(&format!("00-{trace_id}-b7ad6b7169203331-01")),
        )
        .await;
    assert_eq!(
        client.wait_job(sampled["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    eventually(60, "the sampled job's spans", async || {
        tap.spans()
            .iter()
            .any(|s| s["traceId"] == trace_id && s["name"] == process.as_str())
            .then_some(())
    })
    .await;
    let others: Vec<String> = tap
        .spans()
        .iter()
        .filter(|s| s["traceId"] != trace_id)
        .map(|s| s["name"].to_string())
        .collect();
    assert!(others.is_empty(), "unsampled spans exported: {others:?}");
    drop(serve);
    env.cleanup().await;
}

/// tests/it/grpc_receiver.py on a free port, once it listens: the process, its output file
/// (a `<trace id> <span name>` line per span) and the port.
async fn grpc_receiver(env: &ProcEnv, name: &str) -> (KillOnDrop, std::path::PathBuf, u16) {
    let python = std::env::var("OTELTAP")
        .map(|t| std::path::Path::new(&t).with_file_name("python"))
        .unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/target/pytools/bin/python").into()
        });
    let port = free_port();
    let out = env.dir.path().join(name);
    let receiver = KillOnDrop(
        std::process::Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/it/grpc_receiver.py"
            ))
            .arg(port.to_string())
            .stdout(std::fs::File::create(&out).unwrap())
            .spawn()
            .expect("python with grpcio (make test installs it)"),
    );
    eventually(30, "the gRPC receiver", async || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("listening")
            .then_some(())
    })
    .await;
    (receiver, out, port)
}

#[actix_rt::test]
async fn spans_reach_a_grpc_collector_by_default_protocol() {
    let env = ProcEnv::new(&[]).await;
    let (_receiver, out, port) = grpc_receiver(&env, "grpc.out").await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let vars = [
        ("TELEMETRY_ENABLED", "true"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ];
    let serve = env.spawn("serve", "serve", &vars);
    let client = Client::new(&env, &serve.base);
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let up = client
        .upload(
            "grpc",
            &photos(2),
            Some(&format!("00-{trace_id}-00f067aa0ba902b7-01")),
        )
        .await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    let process = on_stream(&env, "process");
    eventually(60, "the job's spans over gRPC", async || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let ok = text.lines().any(|l| l == format!("{trace_id} {process}"))
            && text
                .lines()
                .any(|l| l == format!("{trace_id} {COMMIT_SPAN}"));
        ok.then_some(())
    })
    .await;
    drop(serve);
    env.cleanup().await;
}

/// The spans still queued when the service stops are exported by its shutdown, over gRPC
/// too (whose connection runs on the runtime that is stopping): with a schedule delay longer
/// than the test, only that flush can deliver them.
#[actix_rt::test]
async fn a_graceful_stop_exports_the_queued_spans_over_grpc() {
    let env = ProcEnv::new(&[]).await;
    let (_receiver, out, port) = grpc_receiver(&env, "grpc-stop.out").await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let vars = [
        ("TELEMETRY_ENABLED", "true"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
    ];
    let mut serve = env.spawn("serve", "serve", &vars);
    let client = Client::new(&env, &serve.base);
    let trace_id = "6cf92f3577b34da6a3ce929d0e0e4738";
    let up = client
        .upload(
            "stopping",
            &photos(2),
            Some(&format!("00-{trace_id}-00f067aa0ba902b7-01")),
        )
        .await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    serve.signal("TERM");
    assert!(
        serve.child.wait().unwrap().success(),
        "{}",
        serve.log_text()
    );
    let process = on_stream(&env, "process");
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        text.lines().any(|l| l == format!("{trace_id} {process}")),
        "the job's spans were not exported at the stop:\n{text}"
    );
    env.cleanup().await;
}

/// A real worker dead-letters a traced job (its attempts fail by injected panics); the entry
/// names the upload's trace, and `deadletter replay` starts a new trace, linked to it, that
/// the job row then names and the replayed processing continues.
#[actix_rt::test]
async fn a_dead_letter_names_its_trace_and_a_replay_is_a_new_trace_linked_to_it() {
    let env = ProcEnv::new(&[("MEDIA_CLUSTERING__REDIS__MAX_DELIVERIES", "2")]).await;
    let tap = Receiver::start(env.dir.path());
    let vars = otlp_vars(tap.port);
    let mut serve_vars = as_refs(&vars);
    // The first two attempts panic; the job is dead-lettered after its second delivery.
    serve_vars.push(("MEDIA_CLUSTERING_FAULTS", "job=2"));
    let serve = env.spawn("serve", "serve", &serve_vars);
    let client = Client::new(&env, &serve.base);

    let original = "5bf92f3577b34da6a3ce929d0e0e4737";
    let up = client
        .upload(
            "replayed",
            &photos(1),
            Some(&format!("00-{original}-00f067aa0ba902b7-01")),
        )
        .await;
    let job_id = up["job_id"].as_str().unwrap().to_owned();
    assert_eq!(client.wait_job(&job_id).await, "dead_lettered");

    let mut r = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let dl = &env.vars["MEDIA_CLUSTERING__REDIS__DEADLETTER_STREAM"];
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(dl)
        .arg("-")
        .arg("+")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(entries.ids.len(), 1);
    let entry = &entries.ids[0];
    assert_eq!(
        entry.get::<String>("trace_id").as_deref(),
        Some(original),
        "{:?}",
        entry.map
    );
    let out = env.command("deadletter list", &[]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("trace {original}")),
        "{out:?}"
    );

    let out = env
        .command(&format!("deadletter replay {}", entry.id), &as_refs(&vars))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(client.wait_job(&job_id).await, "succeeded");
    let job: Value = test_http_client()
        .get(format!("{}/v1/jobs/{job_id}", serve.base))
        .bearer_auth(&client.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let replay = job["trace_id"].as_str().unwrap().to_owned();
    assert_eq!(replay.len(), 32, "{job}");
    assert_ne!(replay, original, "the replay continued the original trace");

    let (send, process) = (on_stream(&env, "send"), on_stream(&env, "process"));
    let spans = eventually(60, "the replay's spans", async || {
        let s: Vec<Value> = tap
            .spans()
            .into_iter()
            .filter(|s| s["traceId"] == replay.as_str())
            .collect();
        let done = s.iter().any(|x| x["name"] == COMMIT_SPAN)
            && s.iter().any(|x| x["name"] == send.as_str());
        done.then_some(s)
    })
    .await;
    // The replay's send is the new trace's root, linked to the original trace.
    let root = spans.iter().find(|s| s["name"] == send.as_str()).unwrap();
    assert_eq!(root["kind"], 4, "{root}");
    assert_eq!(root["parentSpanId"].as_str().unwrap_or(""), "", "{root}");
    let links = root["links"].as_array().cloned().unwrap_or_default();
    assert!(
        links.iter().any(|l| l["traceId"] == original),
        "no link to the original trace: {root}"
    );
    assert_strings(
        root,
        &[
            ("messaging.operation.type", "send"),
            ("media_clustering.replay_of", entry.id.as_str()),
            ("job_id", job_id.as_str()),
        ],
    );
    // The replayed processing is in the new trace, under the send.
    let consumer = spans
        .iter()
        .find(|s| s["name"] == process.as_str())
        .unwrap();
    assert_eq!(consumer["parentSpanId"], root["spanId"], "{consumer}");
    // And the original trace got nothing of the replay.
    let late: Vec<Value> = tap
        .spans()
        .into_iter()
        .filter(|s| s["traceId"] == original && s["name"] == COMMIT_SPAN)
        .collect();
    assert!(late.is_empty(), "the original trace has a commit: {late:?}");
    drop(serve);
    env.cleanup().await;
}

/// `OTEL_METRICS_EXPORTER=otlp`: the registry reaches an OTLP receiver with the scrape's
/// names, counters as cumulative monotonic sums, and histogram exemplars naming the job's
/// trace; the scrape itself serves the same exemplar in OpenMetrics when asked.
#[actix_rt::test]
async fn metrics_go_by_otlp_and_openmetrics_with_exemplars_of_the_jobs_trace() {
    let env = ProcEnv::new(&[]).await;
    let tap = Receiver::start(env.dir.path());
    let mut vars = otlp_vars(tap.port);
    vars.push(("OTEL_METRICS_EXPORTER", "otlp".into()));
    vars.push(("OTEL_METRIC_EXPORT_INTERVAL", "300".into()));
    let serve = env.spawn("serve", "serve", &as_refs(&vars));
    let client = Client::new(&env, &serve.base);
    let trace_id = "6bf92f3577b34da6a3ce929d0e0e4738";
    let up = client
        .upload(
            "exemplars",
            &photos(2),
            Some(&format!("00-{trace_id}-00f067aa0ba902b7-01")),
        )
        .await;
    let job_id = up["job_id"].as_str().unwrap().to_owned();
    assert_eq!(client.wait_job(&job_id).await, "succeeded");

    // OpenMetrics, as Prometheus asks for it.
    let om = test_http_client()
        .get(format!("{}/internal/metrics", serve.base))
        .bearer_auth("dev-internal-token")
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(
        om.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        om.headers()
    );
    let text = om.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"));
    for family in [
        "media_cluster_processing_duration_seconds_bucket",
        "media_cluster_embedding_duration_seconds_bucket",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(family)
                    && l.contains(&format!("# {{trace_id=\"{trace_id}\"}}"))),
            "no exemplar of {family} with the job's trace:\n{text}"
        );
    }
    // The plain format stays the default.
    let plain = client.scrape("dev-internal-token").await;
    assert!(!plain.contains("# EOF") && !plain.contains("trace_id"));

    let metrics = eventually(60, "the job's metrics by OTLP", async || {
        let all = tap.metrics();
        let jobs = all
            .iter()
            .rev()
            .find(|m| m["name"] == "media_cluster_jobs_total")?;
        let succeeded = jobs["sum"]["dataPoints"].as_array()?.iter().any(|p| {
            p["attributes"]
                .as_array()
                .is_some_and(|a| a.iter().any(|kv| kv["value"]["stringValue"] == "succeeded"))
                && p["asDouble"].as_f64().is_some_and(|v| v >= 1.0)
        });
        let processing = all
            .iter()
            .rev()
            .find(|m| m["name"] == "media_cluster_processing_duration_seconds")?;
        let linked = processing["histogram"]["dataPoints"]
            .as_array()?
            .iter()
            .flat_map(|p| p["exemplars"].as_array().cloned().unwrap_or_default())
            .any(|e| e["traceId"] == trace_id);
        (succeeded && linked).then_some(all)
    })
    .await;
    let jobs = metrics
        .iter()
        .find(|m| m["name"] == "media_cluster_jobs_total")
        .unwrap();
    assert_eq!(jobs["sum"]["isMonotonic"], true);
    // AGGREGATION_TEMPORALITY_CUMULATIVE
    assert_eq!(jobs["sum"]["aggregationTemporality"], 2);
    for name in [
        "media_cluster_actor_mailbox_depth",
        "media_cluster_actor_handling_seconds",
        "media_cluster_http_requests_total",
    ] {
        assert!(
            metrics.iter().any(|m| m["name"] == name),
            "{name} was not exported"
        );
    }
    let scrape = client.scrape("dev-internal-token").await;
    assert_eq!(
        sample(
            &scrape,
            "media_cluster_telemetry_metric_export_failures_total"
        ),
        0.0
    );
    drop(serve);
    env.cleanup().await;
}
