//! Nothing lost between the request and the stream, on the real binary with real Redis and
//! Postgres: a client that resets, or a process that dies, at each point of an upload; a lost
//! consumer group and a deleted stream.

use std::path::Path;
use std::time::Duration;

use sqlx::PgPool;

use crate::helpers::*;
use crate::process::*;

const POINTS: [&str; 4] = [
    "after_check",
    "after_store",
    "after_commit",
    "after_enqueue",
];

fn objects(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("media/images"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn scalar(db: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(db)
        .await
        .unwrap()
}

fn two_photos(offset: usize) -> Vec<(String, Vec<u8>)> {
    let rows = labels();
    fixture_files(&[rows[offset].0.clone(), rows[offset + 1].0.clone()])
}

/// Sends an upload and gives up waiting after `after` (the connection is dropped).
async fn upload_and_reset(
    client: &Client,
    pet: &str,
    files: &[(String, Vec<u8>)],
    after: Duration,
) {
    let r = client
        .http
        .post(format!("{}/v1/pets/{pet}/images", client.base))
        .bearer_auth(&client.token)
        .multipart(form(files))
        .timeout(after)
        .send()
        .await;
    assert!(r.is_err(), "the upload answered before the reset: {r:?}");
}

#[actix_rt::test]
async fn a_client_that_resets_at_any_point_of_an_upload_loses_nothing() {
    let env = ProcEnv::new(&[]).await;
    let db = PgPool::connect(&env.vars["DATABASE_URL"]).await.unwrap();
    for (i, point) in POINTS.iter().enumerate() {
        let serve = env.spawn(
            "serve",
            &format!("serve-{point}"),
            &[("MEDIA_CLUSTERING_UPLOAD_PAUSE", &format!("{point}:1500"))],
        );
        let client = Client::new(&env, &serve.base);
        let pet = format!("reset-{i}");
        upload_and_reset(
            &client,
            &pet,
            &two_photos(2 * i),
            Duration::from_millis(600),
        )
        .await;
        // The work after the body runs to completion: the job commits, reaches the stream
        // and succeeds, with both photos stored once.
        eventually(
            60,
            &format!("the job of an upload reset {point}"),
            async || {
                let done = scalar(
                    &db,
                    &format!(
                        "SELECT count(*) FROM jobs WHERE pet_id = '{pet}' AND status = 'succeeded'"
                    ),
                )
                .await;
                (done == 1).then_some(())
            },
        )
        .await;
        assert_eq!(
            scalar(
                &db,
                &format!("SELECT count(*) FROM images WHERE pet_id = '{pet}'")
            )
            .await,
            2,
            "{point}"
        );
        drop(serve);
    }
    assert_eq!(
        objects(env.dir.path()),
        2 * POINTS.len(),
        "one object per photo row"
    );
    db.close().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_process_killed_mid_upload_leaves_nothing_once_the_sweeper_and_the_relay_ran() {
    let env = ProcEnv::new(&[
        ("MEDIA_CLUSTERING__STORAGE__ORPHAN_GRACE_MS", "0"),
        ("MEDIA_CLUSTERING__STORAGE__SWEEP_INTERVAL_MS", "200"),
        ("MEDIA_CLUSTERING__REDIS__RELAY_INTERVAL_MS", "200"),
        ("MEDIA_CLUSTERING__REDIS__RELAY_GRACE_MS", "0"),
    ])
    .await;
    let db = PgPool::connect(&env.vars["DATABASE_URL"]).await.unwrap();
    for (i, point) in ["after_store", "after_commit"].iter().enumerate() {
        let serve = env.spawn(
            "serve",
            &format!("doomed-{point}"),
            &[("MEDIA_CLUSTERING_UPLOAD_PAUSE", &format!("{point}:5000"))],
        );
        let client = Client::new(&env, &serve.base);
        let pet = format!("killed-{i}");
        let (p, files) = (pet.clone(), two_photos(10 + 2 * i));
        let request = actix_rt::spawn(async move {
            let _ = client.try_upload(&p, &files, None).await;
        });
        // Wait for the paused upload to have done its part, then kill the process there.
        eventually(30, "the upload to reach its pause", async || {
            let reached = match *point {
                "after_store" => objects(env.dir.path()) == 2,
                _ => {
                    scalar(
                        &db,
                        &format!("SELECT count(*) FROM jobs WHERE pet_id = '{pet}'"),
                    )
                    .await
                        == 1
                }
            };
            reached.then_some(())
        })
        .await;
        serve.signal("KILL");
        drop(serve);
        request.abort();
        let next = env.spawn("serve", &format!("next-{point}"), &[]);
        match *point {
            // Stored, not committed: the sweeper removes the objects no row names.
            "after_store" => {
                eventually(30, "the orphaned objects to be swept", async || {
                    (objects(env.dir.path()) == 0).then_some(())
                })
                .await;
                assert_eq!(
                    scalar(
                        &db,
                        &format!("SELECT count(*) FROM images WHERE pet_id = '{pet}'")
                    )
                    .await,
                    0
                );
            }
            // Committed, not enqueued: the relay puts the job on the stream, once.
            _ => {
                eventually(60, "the relayed job to succeed", async || {
                    let done = scalar(
                        &db,
                        &format!("SELECT count(*) FROM jobs WHERE pet_id = '{pet}' AND status = 'succeeded'"),
                    )
                    .await;
                    (done == 1).then_some(())
                })
                .await;
                assert_eq!(objects(env.dir.path()), 2);
                assert!(
                    next.log_text()
                        .contains("Enqueued committed jobs that had no stream entry")
                );
            }
        }
        drop(next);
    }
    db.close().await;
    env.cleanup().await;
}

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
async fn a_lost_group_comes_back_with_readyz_503_then_200_and_jobs_go_on() {
    let env = ProcEnv::new(&[]).await;
    let serve = env.spawn("serve", "serve", &[]);
    let client = Client::new(&env, &serve.base);
    let up = client.upload("group-a", &two_photos(0), None).await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    assert_eq!(readyz(&serve.base).await.0, 200);

    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&env.vars["MEDIA_CLUSTERING__REDIS__STREAM"])
        .arg("media-clustering")
        .query_async(&mut redis)
        .await
        .unwrap();
    let body = eventually(30, "/readyz to answer 503", async || {
        let (s, b) = readyz(&serve.base).await;
        (s == 503).then_some(b)
    })
    .await;
    assert!(body.contains("consumer group"), "{body}");
    eventually(30, "/readyz back to 200", async || {
        (readyz(&serve.base).await.0 == 200).then_some(())
    })
    .await;
    let up = client.upload("group-b", &two_photos(2), None).await;
    assert_eq!(
        client.wait_job(up["job_id"].as_str().unwrap()).await,
        "succeeded"
    );
    drop(serve);
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_job_whose_stream_was_deleted_is_enqueued_again_by_the_relay() {
    let env = ProcEnv::new(&[("MEDIA_CLUSTERING__REDIS__RELAY_INTERVAL_MS", "200")]).await;
    let api = env.spawn("api", "api", &[]);
    let client = Client::new(&env, &api.base);
    let up = client.upload("lost-stream", &two_photos(4), None).await;
    let job = up["job_id"].as_str().unwrap().to_owned();
    // No worker has read it; then Redis loses the stream (a restart without persistence).
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(&env.vars["MEDIA_CLUSTERING__REDIS__STREAM"])
        .query_async(&mut redis)
        .await
        .unwrap();
    let worker = env.spawn(
        "worker",
        "worker",
        &[("MEDIA_CLUSTERING__REDIS__RELAY_GRACE_MS", "0")],
    );
    assert_eq!(client.wait_job(&job).await, "succeeded");
    assert!(
        worker
            .log_text()
            .contains("Enqueued committed jobs that had no stream entry")
    );
    drop(worker);
    env.cleanup().await;
}
