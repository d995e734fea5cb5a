//! Telemetry as production backends take it: OTLP over TLS (a private CA, mutual TLS), gzip,
//! headers, the standard variables, and settings that never stop the service. Real receivers
//! (tests/it/tls_receiver.py, grpcio and Python's ssl), the service as a process.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::helpers::*;
use crate::process::*;

/// A CA made for the test, a server certificate for 127.0.0.1 and a client certificate.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_pki(dir: &Path) -> Pki {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN=test-{name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
    Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

/// A child process stopped when the test ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tls_receiver.py KIND` on a free port; its output file and the port.
async fn tls_receiver(dir: &Path, kind: &str, pki: &Pki, client_ca: bool) -> (Child, PathBuf, u16) {
    let python = std::env::var("OTELTAP")
        .map(|t| Path::new(&t).with_file_name("python"))
        .unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/target/pytools/bin/python").into()
        });
    let port = free_port();
    let out = dir.join(format!("{kind}-{port}.out"));
    let mut cmd = Command::new(&python);
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/tls_receiver.py"
    ))
    .arg(kind)
    .arg(port.to_string())
    .arg(&pki.server_cert)
    .arg(&pki.server_key);
    if client_ca {
        cmd.arg(&pki.ca);
    }
    let child = Child(
        cmd.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{kind}-{port}.err"))).unwrap())
            .spawn()
            .expect("python with grpcio (make test installs it)"),
    );
    eventually(30, "the TLS receiver", async || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("listening")
            .then_some(())
    })
    .await;
    (child, out, port)
}

fn photos(n: usize) -> Vec<(String, Vec<u8>)> {
    let names: Vec<String> = labels().iter().take(n).map(|r| r.0.clone()).collect();
    fixture_files(&names)
}

/// Uploads with a sampled parent and waits for its job, returning the trace id.
async fn traced_job(client: &Client, pet: &str, trace_id: &str) {
    let up = client
        .upload(
            pet,
            &photos(2),
            Some(&format!("00-{trace_id}-00f067aa0ba902b7-01")),
        )
        .await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
}

async fn received(out: &Path, what: &str, want: impl Fn(&str) -> bool) {
    eventually(60, what, async || {
        let text = std::fs::read_to_string(out).unwrap_or_default();
        want(&text).then_some(())
    })
    .await;
}

#[actix_rt::test]
async fn spans_reach_a_tls_grpc_collector_with_a_private_ca_and_the_configured_header() {
    let env = ProcEnv::new(&[]).await;
    let pki = make_pki(env.dir.path());
    let (_rx, out, port) = tls_receiver(env.dir.path(), "grpc", &pki, false).await;
    let endpoint = format!("https://127.0.0.1:{port}");
    let ca = pki.ca.display().to_string();
    let vars = [
        ("TELEMETRY_ENABLED", "true"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str()),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=grpc-secret-1"),
        // Metrics too, by the same rules.
        ("OTEL_METRICS_EXPORTER", "otlp"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
    ];
    let serve = env.spawn("serve", "serve", &vars);
    let client = Client::new(&env, &serve.base);
    let trace_id = "6bf92f3577b34da6a3ce929d0e0e4731";
    traced_job(&client, "tls-grpc", trace_id).await;
    received(&out, "the job's spans and metrics over TLS", |t| {
        t.lines().any(|l| l.starts_with(trace_id))
            && t.lines().any(|l| l == "metric media_cluster_jobs_total")
    })
    .await;
    let text = std::fs::read_to_string(&out).unwrap();
    let requests: Vec<&str> = text.lines().filter(|l| l.starts_with("request ")).collect();
    assert!(!requests.is_empty());
    for r in &requests {
        assert!(r.ends_with(" api-key=grpc-secret-1 client=-"), "{text}");
    }
    // Every message arrived compressed (the flag of gRPC's length prefix, read off the wire
    // by the receiver's TLS end).
    let messages: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("grpc-message "))
        .collect();
    assert!(!messages.is_empty(), "{text}");
    for m in &messages {
        assert_eq!(*m, "grpc-message compressed=1", "{text}");
    }
    let check = env.command("telemetry check", &vars).output().unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{stdout}");
    assert!(
        stdout.contains("gzip:     true") && stdout.contains(&ca),
        "{stdout}"
    );
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn spans_reach_an_https_collector_with_mutual_tls_and_the_traces_variables_win() {
    let env = ProcEnv::new(&[]).await;
    let pki = make_pki(env.dir.path());
    let (_rx, out, port) = tls_receiver(env.dir.path(), "http", &pki, true).await;
    // The general variables point nowhere useful; the _TRACES_ ones win, the endpoint as is.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let endpoint = format!("https://127.0.0.1:{port}/v1/traces");
    let (ca, cert, key) = (
        pki.ca.display().to_string(),
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let vars = [
        ("TELEMETRY_ENABLED", "true"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", dead.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", ca.as_str()),
        (
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            cert.as_str(),
        ),
        ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", key.as_str()),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "api-key=http-secret-2"),
    ];
    let serve = env.spawn("serve", "serve", &vars);
    let client = Client::new(&env, &serve.base);
    let trace_id = "7bf92f3577b34da6a3ce929d0e0e4732";
    traced_job(&client, "tls-http", trace_id).await;
    received(&out, "the job's spans over HTTPS", |t| {
        t.lines().any(|l| l.starts_with(trace_id))
    })
    .await;
    let text = std::fs::read_to_string(&out).unwrap();
    for r in text.lines().filter(|l| l.starts_with("request ")) {
        assert_eq!(
            r, "request encoding=gzip api-key=http-secret-2 client=test-client",
            "{text}"
        );
    }
    let metrics = client.scrape("dev-internal-token").await;
    assert_eq!(
        sample(&metrics, "media_cluster_telemetry_setup_errors_total"),
        0.0
    );
    drop(serve);
    env.cleanup().await;
}

/// An https endpoint whose certificate the service cannot trust: the service runs, the failed
/// exports are counted, and `telemetry check` names the reason.
#[actix_rt::test]
async fn an_untrusted_collector_costs_dropped_spans_and_telemetry_check_names_it() {
    let env = ProcEnv::new(&[]).await;
    let pki = make_pki(env.dir.path());
    let (_rx, out, port) = tls_receiver(env.dir.path(), "grpc", &pki, false).await;
    let endpoint = format!("https://127.0.0.1:{port}");
    let vars = [
        ("TELEMETRY_ENABLED", "true"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ];
    let serve = env.spawn("serve", "serve", &vars);
    let client = Client::new(&env, &serve.base);
    traced_job(&client, "untrusted", "8bf92f3577b34da6a3ce929d0e0e4733").await;
    eventually(60, "the failed export to be counted", async || {
        let text = client.scrape("dev-internal-token").await;
        (sample(&text, "media_cluster_telemetry_dropped_spans_total") > 0.0).then_some(())
    })
    .await;
    assert!(
        !std::fs::read_to_string(&out).unwrap().contains("request "),
        "an untrusted server got spans"
    );
    let check = env.command("telemetry check", &vars).output().unwrap();
    assert!(!check.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(said.contains(&endpoint), "{said}");
    assert!(
        said.to_lowercase().contains("certificate") || said.contains("UnknownIssuer"),
        "the check does not name the certificate problem: {said}"
    );
    drop(serve);
    env.cleanup().await;
}

/// Bad telemetry values, all at once: `migrate` and `serve` still start, each problem is
/// logged and counted, and the service works.
#[actix_rt::test]
async fn no_telemetry_value_stops_start_up() {
    let env = ProcEnv::new(&[]).await;
    let bad = [
        ("TELEMETRY_ENABLED", "true"),
        ("TRACE_SAMPLE_RATE", "lots"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_PROPAGATORS", "tracecontext,b3"),
        ("OTEL_SDK_DISABLED", "perhaps"),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/nonexistent/client.key"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
    ];
    let migrate = env.command("migrate", &bad).output().unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let serve = env.spawn("serve", "serve", &bad);
    let client = Client::new(&env, &serve.base);
    let up = client.upload("unbothered", &photos(2), None).await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    let metrics = client.scrape("dev-internal-token").await;
    assert_eq!(
        sample(&metrics, "media_cluster_telemetry_setup_errors_total"),
        (bad.len() - 1) as f64,
        "one per bad value"
    );
    let log = serve.log_text();
    for (var, _) in &bad[1..] {
        assert!(log.contains(var), "{var} not named in the log:\n{log}");
    }
    let check = env.command("telemetry check", &bad).output().unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(
        stdout.matches("problem:").count(),
        bad.len() - 1,
        "{stdout}"
    );
    drop(serve);
    env.cleanup().await;
}

/// `OTEL_TRACES_SAMPLER` wins over `TRACE_SAMPLE_RATE`; `OTEL_PROPAGATORS` without
/// tracecontext ignores an incoming `traceparent`; `OTEL_SDK_DISABLED=true` exports nothing.
#[actix_rt::test]
async fn the_sampler_propagator_and_sdk_variables_do_what_they_say() {
    let env = ProcEnv::new(&[]).await;
    let tap = Receiver::start(env.dir.path());
    let endpoint = format!("http://127.0.0.1:{}", tap.port);
    let base = [
        ("TELEMETRY_ENABLED", "true"),
        ("TRACE_SAMPLE_RATE", "0"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let process = format!("process {}", env.vars["MEDIA_CLUSTERING__REDIS__STREAM"]);

    // always_on over a rate of 0, and only baggage propagated: the upload's trace is new.
    let vars = with(&[
        ("OTEL_TRACES_SAMPLER", "always_on"),
        ("OTEL_PROPAGATORS", "baggage"),
    ]);
    let serve = env.spawn("serve", "serve", &vars);
    let client = Client::new(&env, &serve.base);
    let given = "9bf92f3577b34da6a3ce929d0e0e4734";
    let up = client
        .upload(
            "sampled",
            &photos(2),
            Some(&format!("00-{given}-00f067aa0ba902b7-00")),
        )
        .await;
    let job_id = up["job_id"].as_str().unwrap().to_owned();
    assert_eq!(client.wait_job(&job_id).await, "succeeded");
    let traced = eventually(60, "the job's spans", async || {
        tap.spans()
            .into_iter()
            .find(|s| s["name"] == process.as_str())
    })
    .await;
    assert_ne!(traced["traceId"], given, "traceparent was propagated");
    drop(serve);

    // OTEL_SDK_DISABLED: nothing is exported, not even at a graceful stop's flush.
    let before = tap.spans().len();
    let vars = with(&[
        ("OTEL_TRACES_SAMPLER", "always_on"),
        ("OTEL_SDK_DISABLED", "true"),
    ]);
    let mut serve = env.spawn("serve", "serve", &vars);
    let client = Client::new(&env, &serve.base);
    let up = client.upload("silent", &photos(2), None).await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    serve.signal("TERM");
    let status = serve.child.wait().unwrap();
    assert!(status.success(), "{}", serve.log_text());
    assert!(serve.log_text().contains("OTEL_SDK_DISABLED=true"));
    assert_eq!(
        tap.spans().len(),
        before,
        "spans exported with the SDK disabled"
    );
    env.cleanup().await;
}

/// Bad metric-export values: the service runs and scrapes as ever, each value is counted once
/// and named, `telemetry check` lists them, and no header value is ever printed.
#[actix_rt::test]
async fn no_metrics_export_value_stops_start_up() {
    let env = ProcEnv::new(&[]).await;
    let bad = [
        ("OTEL_METRICS_EXPORTER", "statsd"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "often"),
        (
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
            "secret-token-without-a-key",
        ),
    ];
    let serve = env.spawn("serve", "serve", &bad);
    let client = Client::new(&env, &serve.base);
    let up = client.upload("metrics-unbothered", &photos(1), None).await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    let metrics = client.scrape("dev-internal-token").await;
    assert_eq!(
        sample(&metrics, "media_cluster_telemetry_setup_errors_total"),
        bad.len() as f64,
        "one per bad value"
    );
    let log = serve.log_text();
    for (var, _) in &bad {
        assert!(log.contains(var), "{var} not named in the log:\n{log}");
    }
    let check = env.command("telemetry check", &bad).output().unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(stdout.matches("problem:").count(), bad.len(), "{stdout}");
    assert!(
        stdout.contains("metrics:  not exported by OTLP ("),
        "{stdout}"
    );
    for text in [log.as_str(), stdout.as_ref()] {
        assert!(!text.contains("secret-token-without-a-key"), "{text}");
    }
    drop(serve);
    env.cleanup().await;
}
