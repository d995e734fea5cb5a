//! Chaos: one api and three workers on a private Redis with an append-only file; ten pets
//! upload while workers are killed, terminated and frozen (for longer than
//! `redis.claim_min_idle_ms`, so their entries are reclaimed and their pets' locks expire),
//! Redis restarts, and clients reset uploads mid-body. Afterwards every accepted upload's job
//! succeeded, every accepted photo is in exactly one cluster of its pet's latest clustering,
//! no job wrote two versions, no object lacks a row once the sweeper ran, and no job is left
//! queued or running.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::helpers::*;
use crate::process::*;

/// Accepted uploads: job id → (pet, image ids).
type Accepted = HashMap<String, (String, Vec<Uuid>)>;

const PETS: usize = 10;
const UPLOADS_PER_PET: usize = 8;
const PHOTOS_PER_UPLOAD: usize = 3;

/// Sends the head and half the body of an upload, then drops the connection.
async fn reset_mid_body(base: &str, token: &str, pet: &str, file: &(String, Vec<u8>)) {
    let addr = base.trim_start_matches("http://");
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let half = &file.1[..file.1.len() / 2];
    let head = format!(
        "POST /v1/pets/{pet}/images HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
        file.1.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(half).await;
    drop(s);
}

#[actix_rt::test]
async fn chaos_loses_nothing_and_duplicates_nothing() {
    let redis_dir = tempfile::tempdir().unwrap();
    let mut redis = OwnRedis::start(redis_dir.path(), free_port());
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    let env = ProcEnv::new(&[
        ("REDIS_URL", url.as_str()),
        ("MEDIA_CLUSTERING__REDIS__CLAIM_MIN_IDLE_MS", "1500"),
        ("MEDIA_CLUSTERING__REDIS__MAX_DELIVERIES", "30"),
        ("MEDIA_CLUSTERING__REDIS__RELAY_INTERVAL_MS", "500"),
        ("MEDIA_CLUSTERING__REDIS__RELAY_GRACE_MS", "1000"),
        ("MEDIA_CLUSTERING__STORAGE__SWEEP_INTERVAL_MS", "500"),
        ("MEDIA_CLUSTERING__STORAGE__ORPHAN_GRACE_MS", "3000"),
        ("MEDIA_CLUSTERING__ACTORS__EMBEDDERS", "1"),
        ("MEDIA_CLUSTERING__ACTORS__SHUTDOWN_TIMEOUT_MS", "3000"),
    ])
    .await;
    let api = env.spawn("api", "api", &[]);
    let client = Arc::new(Client::new(&env, &api.base));
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| env.spawn("worker", &format!("w{i}"), &[]))
        .collect();

    // Ten pets upload three photos at a time, faster than the workers keep up, so workers
    // hold entries and locks when the drill hits them; every third upload is first tried and
    // reset mid-body.
    let rows = labels();
    let accepted: Arc<Mutex<Accepted>> = Arc::default();
    let mut uploaders = Vec::new();
    for p in 0..PETS {
        let (client, accepted) = (client.clone(), accepted.clone());
        let files: Vec<(String, Vec<u8>)> = (0..UPLOADS_PER_PET * PHOTOS_PER_UPLOAD)
            .map(|k| fixture_files(&[rows[(p * 7 + k) % rows.len()].0.clone()]).remove(0))
            .collect();
        uploaders.push(actix_rt::spawn(async move {
            let pet = format!("chaos-{p}");
            for u in 0..UPLOADS_PER_PET {
                let batch = &files[PHOTOS_PER_UPLOAD * u..PHOTOS_PER_UPLOAD * (u + 1)];
                if u % 3 == 0 {
                    reset_mid_body(&client.base, &client.token, &pet, &batch[0]).await;
                }
                // While Redis restarts an upload may be refused (and must store nothing).
                for _ in 0..50 {
                    let (status, body) = client.try_upload(&pet, batch, None).await;
                    if status == 202 {
                        let ids = body["images"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|i| Uuid::parse_str(i["image_id"].as_str().unwrap()).unwrap())
                            .collect();
                        let job = body["job_id"].as_str().unwrap().to_owned();
                        accepted.lock().unwrap().insert(job, (pet.clone(), ids));
                        break;
                    }
                    assert_eq!(status, 503, "{body}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // Spread over the whole drill, faster than the workers keep up with.
                tokio::time::sleep(Duration::from_millis(800)).await;
            }
        }));
    }

    // Meanwhile: a worker killed, one terminated, one frozen past the claim time, Redis
    // restarted; each worker that goes is replaced.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    workers[0].signal("KILL");
    workers[0] = env.spawn("worker", "w0-again", &[]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    workers[1].signal("TERM");
    let _ = eventually(20, "the terminated worker to exit", async || {
        workers[1].child.try_wait().unwrap()
    })
    .await;
    workers[1] = env.spawn("worker", "w1-again", &[]);
    workers[2].signal("STOP");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    workers[2].signal("CONT");
    redis.restart();
    for u in uploaders {
        u.await.unwrap();
    }

    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() >= PETS * UPLOADS_PER_PET,
        "{} uploads accepted",
        accepted.len()
    );
    let jobs: Vec<String> = accepted.keys().cloned().collect();
    eventually(240, "every accepted upload's job to succeed", async || {
        let mut done = 0;
        for j in &jobs {
            let s = client.job_status(j).await;
            assert!(
                !["failed", "dead_lettered"].contains(&s.as_str()),
                "job {j} ended {s}"
            );
            done += usize::from(s == "succeeded");
        }
        (done == jobs.len()).then_some(())
    })
    .await;

    let db = PgPool::connect(&env.vars["DATABASE_URL"]).await.unwrap();
    let q = async |sql: &str| -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&db)
            .await
            .unwrap()
    };
    assert_eq!(
        q("SELECT count(*) FROM (SELECT job_id FROM cluster_versions GROUP BY job_id HAVING count(*) > 1) d").await,
        0
    );
    assert_eq!(
        q("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')").await,
        0
    );
    assert_eq!(
        q("SELECT count(*) FROM jobs WHERE cluster_version IS NULL").await,
        0
    );
    // Every accepted photo is in exactly one cluster of its pet's latest clustering.
    let mut want: HashMap<String, HashSet<Uuid>> = HashMap::new();
    for (pet, ids) in accepted.values() {
        want.entry(pet.clone()).or_default().extend(ids);
    }
    for (pet, photos) in &want {
        let r = client
            .http
            .get(format!("{}/v1/pets/{pet}/clusters", client.base))
            .bearer_auth(&client.token)
            .send()
            .await
            .unwrap();
        let c: serde_json::Value = r.json().await.unwrap();
        let members: Vec<Uuid> = c["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["image_ids"].as_array().unwrap().clone())
            .map(|i| Uuid::parse_str(i.as_str().unwrap()).unwrap())
            .collect();
        let set: HashSet<Uuid> = members.iter().copied().collect();
        assert_eq!(set.len(), members.len(), "{pet}: a photo in two clusters");
        assert_eq!(
            &set, photos,
            "{pet}: the latest clustering is not every accepted photo"
        );
    }
    // Once the sweeper has run, every object has its row and every row its object.
    let media = env.dir.path().join("media/images");
    let rows_now = q("SELECT count(*) FROM images").await as usize;
    eventually(30, "objects and rows to agree", async || {
        let objects = std::fs::read_dir(&media).map(|d| d.count()).unwrap_or(0);
        (objects == rows_now).then_some(())
    })
    .await;
    // What the drill hit (printed with --nocapture, for the record).
    let logs: String = workers
        .iter()
        .map(|w| w.log_text())
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!(
        "chaos: {} uploads accepted; reclaims {}, lost locks {}, relayed {}, retries {}",
        accepted.len(),
        logs.matches("Reclaimed entries left idle").count(),
        logs.matches("lost its pet's lock").count(),
        logs.matches("Enqueued committed jobs").count(),
        logs.matches("retrying after a backoff").count(),
    );
    db.close().await;
    drop(workers);
    drop(api);
    env.cleanup().await;
}
