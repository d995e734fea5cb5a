//! Nothing lost: worker processes killed, stopped, doubled, and a burst for one pet.

use sqlx::PgPool;

use crate::helpers::*;
use crate::process::*;

async fn pool(env: &ProcEnv) -> PgPool {
    PgPool::connect(&env.vars["DATABASE_URL"]).await.unwrap()
}

async fn count(db: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(db)
        .await
        .unwrap()
}

fn photo(i: usize) -> Vec<(String, Vec<u8>)> {
    let rows = labels();
    fixture_files(&[rows[i % rows.len()].0.clone()])
}

async fn status_counts(client: &Client, jobs: &[String]) -> (usize, usize) {
    let mut done = 0;
    let mut succeeded = 0;
    for j in jobs {
        let s = client.job_status(j).await;
        done += usize::from(["succeeded", "failed", "dead_lettered"].contains(&s.as_str()));
        succeeded += usize::from(s == "succeeded");
    }
    (done, succeeded)
}

#[actix_rt::test]
async fn a_killed_worker_loses_nothing_and_duplicates_nothing() {
    let env = ProcEnv::new(&[
        ("MEDIA_CLUSTERING__REDIS__CLAIM_MIN_IDLE_MS", "2000"),
        ("MEDIA_CLUSTERING__ACTORS__EMBEDDERS", "1"),
    ])
    .await;
    let api = env.spawn("api", "api", &[]);
    let client = Client::new(&env, &api.base);
    let w1 = env.spawn("worker", "worker1", &[]);
    let mut jobs = Vec::new();
    for i in 0..12 {
        let files = [photo(2 * i), photo(2 * i + 1)].concat();
        let up = client.upload(&format!("k9-{i}"), &files, None).await;
        jobs.push(up["job_id"].as_str().unwrap().to_owned());
    }
    // Kill it as soon as it has finished one job, while it holds others.
    let before = eventually(120, "a first finished job", async || {
        let (done, _) = status_counts(&client, &jobs).await;
        (done > 0).then_some(done)
    })
    .await;
    w1.signal("KILL");
    drop(w1);
    assert!(
        before < jobs.len(),
        "the worker finished everything before it was killed"
    );

    let _w2 = env.spawn("worker", "worker2", &[]);
    eventually(240, "every job to finish", async || {
        let (done, _) = status_counts(&client, &jobs).await;
        (done == jobs.len()).then_some(())
    })
    .await;
    let (_, succeeded) = status_counts(&client, &jobs).await;
    assert_eq!(succeeded, jobs.len());
    let db = pool(&env).await;
    assert_eq!(count(&db, "SELECT count(*) FROM (SELECT job_id FROM cluster_versions GROUP BY job_id HAVING count(*) > 1) d").await, 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM cluster_versions").await,
        jobs.len() as i64
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM jobs WHERE status = 'running'").await,
        0
    );
    db.close().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn two_workers_share_fifty_jobs_and_run_none_twice() {
    let env = ProcEnv::new(&[]).await;
    let api = env.spawn("api", "api", &[]);
    let client = Client::new(&env, &api.base);
    let _w1 = env.spawn("worker", "worker1", &[]);
    let _w2 = env.spawn("worker", "worker2", &[]);
    let mut jobs = Vec::new();
    for i in 0..50 {
        let up = client.upload(&format!("pair-{i}"), &photo(i), None).await;
        jobs.push(up["job_id"].as_str().unwrap().to_owned());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let (done, _) = status_counts(&client, &jobs).await;
        if done == jobs.len() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let tail = |p: &Proc| {
                p.log_text()
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "{done}/50 jobs finished\nworker1:\n{}\nworker2:\n{}",
                tail(&_w1),
                tail(&_w2)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(status_counts(&client, &jobs).await.1, 50);
    let db = pool(&env).await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM cluster_versions").await,
        50
    );
    assert_eq!(
        count(&db, "SELECT max(attempts)::bigint FROM jobs").await,
        1,
        "a job was started twice"
    );
    // Both workers took part.
    let w1 = _w1.log_text().matches("Job succeeded.").count();
    let w2 = _w2.log_text().matches("Job succeeded.").count();
    assert_eq!(w1 + w2, 50);
    assert!(w1 > 0 && w2 > 0, "one worker did all the work ({w1}/{w2})");
    db.close().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn sigterm_drains_in_flight_jobs_and_exits_zero() {
    let env = ProcEnv::new(&[
        ("MEDIA_CLUSTERING__REDIS__CLAIM_MIN_IDLE_MS", "2000"),
        ("MEDIA_CLUSTERING__ACTORS__EMBEDDERS", "1"),
    ])
    .await;
    let api = env.spawn("api", "api", &[]);
    let client = Client::new(&env, &api.base);
    let mut w1 = env.spawn(
        "worker",
        "worker1",
        &[("MEDIA_CLUSTERING__ACTORS__SHUTDOWN_TIMEOUT_MS", "20000")],
    );
    let mut jobs = Vec::new();
    for i in 0..6 {
        let files = [photo(3 * i), photo(3 * i + 1), photo(3 * i + 2)].concat();
        let up = client.upload(&format!("drain-{i}"), &files, None).await;
        jobs.push(up["job_id"].as_str().unwrap().to_owned());
    }
    eventually(120, "a job in progress", async || {
        let db = pool(&env).await;
        let n = count(
            &db,
            "SELECT count(*) FROM jobs WHERE status IN ('running', 'succeeded')",
        )
        .await;
        db.close().await;
        (n > 0).then_some(())
    })
    .await;
    w1.signal("TERM");
    let status = eventually(60, "the worker to exit", async || {
        w1.child.try_wait().unwrap()
    })
    .await;
    assert!(status.success(), "exit status {status}: {}", w1.log_text());
    let db = pool(&env).await;
    // What it took, it finished: nothing is left running.
    assert_eq!(
        count(&db, "SELECT count(*) FROM jobs WHERE status = 'running'").await,
        0
    );
    // The rest is picked up by the next worker.
    let _w2 = env.spawn("worker", "worker2", &[]);
    eventually(240, "every job to finish", async || {
        let (done, _) = status_counts(&client, &jobs).await;
        (done == jobs.len()).then_some(())
    })
    .await;
    assert_eq!(status_counts(&client, &jobs).await.1, jobs.len());
    assert_eq!(
        count(&db, "SELECT count(*) FROM cluster_versions").await,
        jobs.len() as i64
    );
    db.close().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn twenty_quick_uploads_for_one_pet_end_in_one_complete_clustering() {
    let env = ProcEnv::new(&[]).await;
    // Every version is kept, so that their sequence can be checked.
    let serve = env.spawn(
        "serve",
        "serve",
        &[("MEDIA_CLUSTERING__CLUSTERING__KEEP_VERSIONS", "100")],
    );
    let client = Client::new(&env, &serve.base);
    let mut jobs = Vec::new();
    for i in 0..20 {
        let up = client.upload("busy-pet", &photo(i), None).await;
        jobs.push(up["job_id"].as_str().unwrap().to_owned());
    }
    for j in &jobs {
        assert_eq!(client.wait_job(j).await, "succeeded");
    }
    let db = pool(&env).await;
    // Versions are strictly increasing in commit order; jobs that waited for the pet were
    // coalesced into fewer clusterings, each job completed by one of them.
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM cluster_versions WHERE pet_id = 'busy-pet' ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let last = *versions.last().unwrap();
    assert_eq!(versions, (1..=last).collect::<Vec<i64>>());
    assert!(
        last < 20,
        "20 jobs wrote {last} versions: nothing was coalesced"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE pet_id = 'busy-pet' AND cluster_version BETWEEN 1 AND (SELECT max(version) FROM cluster_versions)"
        )
        .await,
        20,
        "every job names the version that completed it"
    );
    // The latest clustering holds every photo.
    let r = client
        .http
        .get(format!("{}/v1/pets/busy-pet/clusters", client.base))
        .bearer_auth(&client.token)
        .send()
        .await
        .unwrap();
    let c: serde_json::Value = r.json().await.unwrap();
    let members: usize = c["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["image_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(members, 20);
    assert_eq!(c["version"], last);
    db.close().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn jobs_survive_postgres_refusing_connections_for_a_while() {
    let env = ProcEnv::new(&[
        ("MEDIA_CLUSTERING__REDIS__MAX_DELIVERIES", "10"),
        ("MEDIA_CLUSTERING__ACTORS__EMBEDDERS", "1"),
    ])
    .await;
    let serve = env.spawn("serve", "serve", &[]);
    let client = Client::new(&env, &serve.base);
    let mut jobs = Vec::new();
    for i in 0..4 {
        let files = [photo(2 * i), photo(2 * i + 1)].concat();
        let up = client.upload(&format!("pg-{i}"), &files, None).await;
        jobs.push(up["job_id"].as_str().unwrap().to_owned());
    }
    // The database refuses connections and loses the ones it had, for two seconds.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_db_url())
        .await
        .unwrap();
    let db = &env.db_name;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"ALTER DATABASE "{db}" ALLOW_CONNECTIONS false"#
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(db)
        .execute(&mut admin)
        .await
        .unwrap();
    let ready = test_http_client()
        .get(format!("{}/readyz", serve.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503, "readyz during the outage");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await; // the outage itself
    sqlx::query(sqlx::AssertSqlSafe(format!(
        r#"ALTER DATABASE "{db}" ALLOW_CONNECTIONS true"#
    )))
    .execute(&mut admin)
    .await
    .unwrap();

    for j in &jobs {
        assert_eq!(client.wait_job(j).await, "succeeded");
    }
    let metrics = client.scrape("dev-internal-token").await;
    assert!(
        sample(&metrics, "media_cluster_retries_total") >= 1.0,
        "no retry was counted"
    );
    assert_eq!(
        sample(&metrics, r#"media_cluster_jobs_total{status="succeeded"}"#),
        4.0
    );
    let ready = test_http_client()
        .get(format!("{}/readyz", serve.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn jobs_survive_a_redis_restart() {
    let redis_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut redis = OwnRedis::start(redis_dir.path(), port);
    let url = format!("redis://127.0.0.1:{port}/0");
    let env = ProcEnv::new(&[
        ("REDIS_URL", url.as_str()),
        ("MEDIA_CLUSTERING__REDIS__CLAIM_MIN_IDLE_MS", "2000"),
        ("MEDIA_CLUSTERING__REDIS__MAX_DELIVERIES", "10"),
        ("MEDIA_CLUSTERING__ACTORS__EMBEDDERS", "1"),
    ])
    .await;
    let serve = env.spawn("serve", "serve", &[]);
    let client = Client::new(&env, &serve.base);
    let mut jobs = Vec::new();
    for i in 0..4 {
        let files = [photo(2 * i + 10), photo(2 * i + 11)].concat();
        let up = client.upload(&format!("redis-{i}"), &files, None).await;
        jobs.push(up["job_id"].as_str().unwrap().to_owned());
    }
    redis.restart();
    // While the connection comes back an upload may get 503 (and store nothing);
    // once it is back, uploads are accepted again.
    let up = eventually(30, "an upload accepted after the restart", async || {
        let (status, body) = client.try_upload("redis-after", &photo(30), None).await;
        assert!(status == 202 || status == 503, "{status}: {body}");
        (status == 202).then_some(body)
    })
    .await;
    jobs.push(up["job_id"].as_str().unwrap().to_owned());
    for j in &jobs {
        assert_eq!(client.wait_job(j).await, "succeeded");
    }
    let db = pool(&env).await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM cluster_versions").await,
        jobs.len() as i64
    );
    db.close().await;
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn two_workers_never_run_one_pets_jobs_at_once() {
    let env = ProcEnv::new(&[]).await;
    let api = env.spawn("api", "api", &[]);
    let client = Client::new(&env, &api.base);
    let _w1 = env.spawn("worker", "worker1", &[]);
    let _w2 = env.spawn("worker", "worker2", &[]);
    let mut jobs = Vec::new();
    for i in 0..10 {
        let up = client.upload("shared-pet", &photo(i), None).await;
        jobs.push(up["job_id"].as_str().unwrap().to_owned());
    }
    for j in &jobs {
        assert_eq!(client.wait_job(j).await, "succeeded");
    }
    let db = pool(&env).await;
    let mut runs: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT started_at, finished_at FROM jobs WHERE pet_id = 'shared-pet' ORDER BY started_at")
            .fetch_all(&db)
            .await
            .unwrap();
    runs.sort();
    // Jobs coalesced into one batch share its run: one start, one commit.
    runs.dedup();
    for w in runs.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "two jobs of one pet overlapped: {:?} and {:?}",
            w[0],
            w[1]
        );
    }
    // Both workers took part, and the latest clustering covers every photo.
    let w1 = _w1.log_text().matches("\"job_id\"").count();
    let w2 = _w2.log_text().matches("\"job_id\"").count();
    assert!(w1 > 0 && w2 > 0, "one worker did all the work ({w1}/{w2})");
    let r = client
        .http
        .get(format!("{}/v1/pets/shared-pet/clusters", client.base))
        .bearer_auth(&client.token)
        .send()
        .await
        .unwrap();
    let c: serde_json::Value = r.json().await.unwrap();
    let members: usize = c["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["image_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(members, 10);
    db.close().await;
    env.cleanup().await;
}
