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
    eventually(300, "all 50 jobs", async || {
        let (done, _) = status_counts(&client, &jobs).await;
        (done == jobs.len()).then_some(())
    })
    .await;
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
    let serve = env.spawn("serve", "serve", &[]);
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
    // Versions are strictly increasing in commit order, one per job.
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM cluster_versions WHERE pet_id = 'busy-pet' ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(versions, (1..=20).collect::<Vec<i64>>());
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
    assert_eq!(c["version"], 20);
    db.close().await;
    env.cleanup().await;
}
