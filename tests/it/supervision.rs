//! The supervisor on the real binary (real Redis and Postgres), with faults injected through
//! `MEDIA_CLUSTERING_FAULTS`: a panic in the read loop, a stage or a job is restarted and the
//! job ends; past the restart intensity `/readyz` answers 503 naming the actor, the process
//! drains and exits non-zero.

use sqlx::PgPool;

use crate::helpers::*;
use crate::process::*;

async fn readyz(base: &str) -> (u16, String) {
    match test_http_client()
        .get(format!("{base}/readyz"))
        .send()
        .await
    {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

#[actix_rt::test]
async fn injected_panics_restart_the_read_loop_stages_and_jobs_and_every_job_ends() {
    let env = ProcEnv::new(&[("MEDIA_CLUSTERING__ACTORS__RESTART_BACKOFF_MS", "20")]).await;
    let serve = env.spawn(
        "serve",
        "serve",
        &[(
            "MEDIA_CLUSTERING_FAULTS",
            "read_loop=1,embedder=1,clusterer=1,postgres_writer=1,job=1",
        )],
    );
    let client = Client::new(&env, &serve.base);
    let rows = labels();
    let mut jobs = Vec::new();
    for i in 0..3 {
        let files = fixture_files(&[rows[2 * i].0.clone(), rows[2 * i + 1].0.clone()]);
        let up = client.upload(&format!("sup-{i}"), &files, None).await;
        jobs.push(up["job_id"].as_str().unwrap().to_owned());
    }
    for j in &jobs {
        assert_eq!(client.wait_job(j).await, "succeeded");
    }
    let text = client.scrape("dev-internal-token").await;
    for (actor, at_least) in [
        ("stream_reader", 1.0),
        ("embedder", 1.0),
        ("clusterer", 1.0),
        ("postgres_writer", 1.0),
    ] {
        let n = sample(
            &text,
            &format!(r#"media_cluster_actor_restarts_total{{actor="{actor}"}}"#),
        );
        assert!(n >= at_least, "{actor} restarts {n}");
    }
    assert!(
        sample(
            &text,
            r#"media_cluster_actor_messages_total{actor="pet_scheduler",outcome="panic"}"#
        ) >= 1.0,
        "the job's panic was not counted"
    );
    assert_eq!(sample(&text, "media_cluster_worker_inflight"), 0.0);
    // Nothing is left locked or held, and the process is still ready.
    let db = PgPool::connect(&env.vars["DATABASE_URL"]).await.unwrap();
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status = 'running'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(running, 0);
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pattern = format!("{}:pet-lock:*", env.vars["MEDIA_CLUSTERING__REDIS__STREAM"]);
    let locks = eventually(10, "the pets' locks to be released", async || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut redis)
            .await
            .unwrap();
        keys.is_empty().then_some(keys)
    })
    .await;
    assert!(locks.is_empty());
    assert_eq!(readyz(&serve.base).await.0, 200);
    db.close().await;
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn past_the_restart_intensity_the_process_is_not_ready_drains_and_exits_non_zero() {
    let env = ProcEnv::new(&[
        ("MEDIA_CLUSTERING__ACTORS__MAX_RESTARTS", "2"),
        ("MEDIA_CLUSTERING__ACTORS__RESTART_BACKOFF_MS", "20"),
        ("MEDIA_CLUSTERING__REDIS__MAX_DELIVERIES", "20"),
        // Long enough for the test to see the 503 while the process drains.
        ("MEDIA_CLUSTERING__ACTORS__SHUTDOWN_TIMEOUT_MS", "3000"),
    ])
    .await;
    let mut serve = env.spawn(
        "serve",
        "serve",
        &[("MEDIA_CLUSTERING_FAULTS", "embedder=50")],
    );
    assert_eq!(readyz(&serve.base).await.0, 200);
    let client = Client::new(&env, &serve.base);
    let rows = labels();
    let files = fixture_files(&[rows[0].0.clone(), rows[1].0.clone()]);
    client.upload("doomed", &files, None).await;
    let (status, body) = eventually(60, "/readyz to answer 503", async || {
        let (s, b) = readyz(&serve.base).await;
        (s == 503).then_some((s, b))
    })
    .await;
    assert_eq!(status, 503);
    assert!(
        body.contains("not_ready") && body.contains("embedder"),
        "the answer names the actor: {body}"
    );
    let exit = eventually(60, "the process to exit", async || {
        serve.child.try_wait().unwrap()
    })
    .await;
    assert!(!exit.success(), "exit status {exit}");
    let log = serve.log_text();
    assert!(
        log.contains("Restart intensity exceeded"),
        "no escalation in the log: {log}"
    );
    drop(serve);
    env.cleanup().await;
}
