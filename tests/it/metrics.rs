//! `/internal/metrics` after a real job: every DESIGN.md metric, actor samples, no id labels.

use media_clustering::startup::Mode;

use crate::helpers::*;

const NAMES: &[&str] = &[
    "media_cluster_jobs_total",
    "media_cluster_retries_total",
    "media_cluster_deadletter_total",
    "media_cluster_processing_duration_seconds",
    "media_cluster_embedding_duration_seconds",
    "media_cluster_postgres_write_seconds",
    "media_cluster_pending_jobs",
    "media_cluster_worker_inflight",
    "media_cluster_job_queue_wait_seconds",
    "media_cluster_actor_mailbox_depth",
    "media_cluster_actor_mailbox_wait_seconds",
    "media_cluster_actor_handling_seconds",
    "media_cluster_actor_restarts_total",
    "media_cluster_actor_instances",
    "media_cluster_http_requests_total",
    "media_cluster_http_requests_duration_seconds",
];

#[actix_rt::test]
async fn metrics_carry_every_name_and_rise_with_a_job() {
    let app = spawn_app_with(Mode::Serve, &[]).await;
    let before = app.scrape().await;
    let names: Vec<String> = labels().iter().take(4).map(|r| r.0.clone()).collect();
    let body: serde_json::Value = app
        .upload("metrics-pet", &fixture_files(&names))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        app.wait_job(body["job_id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    let text = app.scrape().await;

    for n in NAMES {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("# TYPE {n} "))),
            "missing {n}"
        );
    }
    // The text parses with Prometheus's own checker (`make test` installs promtool).
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; make test installs it)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("no help text"))
        .collect();
    assert!(
        out.status.success() || out.status.code() == Some(3),
        "promtool: {report}"
    );
    assert!(
        problems.iter().all(|l| !l.to_lowercase().contains("error")),
        "promtool: {report}"
    );
    let succeeded = r#"media_cluster_jobs_total{status="succeeded"}"#;
    assert_eq!(sample(&text, succeeded) - sample(&before, succeeded), 1.0);
    for actor in [
        "stream_reader",
        "embedder",
        "clusterer",
        "hero_selector",
        "postgres_writer",
    ] {
        let series = format!("media_cluster_actor_handling_seconds_count{{actor=\"{actor}\"}}");
        assert!(
            sample(&text, &series) > sample(&before, &series),
            "{actor} handled nothing"
        );
        // Nothing is left waiting once the job is done.
        assert_eq!(
            sample(
                &text,
                &format!("media_cluster_actor_mailbox_depth{{actor=\"{actor}\"}}")
            ),
            0.0,
            "{actor}"
        );
    }
    let embedded = sample(
        &text,
        "media_cluster_embedding_duration_seconds_count{model_version=\"open-nsfw-eef41e25-dn6s1-gem2-lp5x128\"}",
    );
    assert!(embedded >= 4.0, "embeddings counted: {embedded}");
    // HTTP series are labelled by route pattern, never by raw path or id.
    assert!(
        text.contains(r#"endpoint="/v1/pets/{pet_id}/images""#),
        "route pattern label missing"
    );
    assert!(!text.contains("metrics-pet"));
    for id_label in ["pet_id=", "job_id=", "image_id="] {
        assert!(!text.contains(id_label), "{id_label} used as a label");
    }
    app.cleanup().await;
}
