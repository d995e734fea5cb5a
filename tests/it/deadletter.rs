//! Dead letters end to end: a poison entry is dead-lettered by a worker; the
//! `deadletter` CLI lists, replays and purges.

use crate::helpers::*;
use crate::process::*;

async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn run(env: &ProcEnv, args: &str) -> (bool, String) {
    let out = env.command(args, &[]).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[actix_rt::test]
async fn poison_is_dead_lettered_and_the_cli_lists_replays_and_purges() {
    let env = ProcEnv::new(&[]).await;
    let stream = env.vars["MEDIA_CLUSTERING__REDIS__STREAM"].clone();
    let dl = env.vars["MEDIA_CLUSTERING__REDIS__DEADLETTER_STREAM"].clone();
    let mut r = redis_conn().await;
    let api = env.spawn("api", "api", &[]);
    let client = Client::new(&env, &api.base);

    // A job whose entry we take back out of the stream before any worker sees it,
    // and put in the dead letters as if it had failed for good.
    let up = client
        .upload("dl-pet", &fixture_files(&[labels()[0].0.clone()]), None)
        .await;
    let job_id = up["job_id"].as_str().unwrap().to_owned();
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut r)
        .await
        .unwrap();
    let original = &entries.ids[0];
    let mut add = redis::cmd("XADD");
    add.arg(&dl)
        .arg("*")
        .arg("error")
        .arg("gave up")
        .arg("deliveries")
        .arg("5")
        .arg("failed_at")
        .arg("0")
        .arg("source_id")
        .arg(&original.id);
    for (k, v) in &original.map {
        add.arg(k)
            .arg(redis::from_redis_value::<String>(v.clone()).unwrap());
    }
    let job_dl_id: String = add.query_async(&mut r).await.unwrap();
    let _: i64 = redis::cmd("XDEL")
        .arg(&stream)
        .arg(&original.id)
        .query_async(&mut r)
        .await
        .unwrap();
    let db = sqlx::PgPool::connect(&env.vars["DATABASE_URL"])
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET status = 'dead_lettered', error = 'gave up' WHERE id = $1::uuid")
        .bind(&job_id)
        .execute(&db)
        .await
        .unwrap();

    // A poison entry: garbage fields.
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("schema")
        .arg("1")
        .arg("job_id")
        .arg("not-a-uuid")
        .arg("pet_id")
        .arg("../../etc")
        .query_async(&mut r)
        .await
        .unwrap();
    let worker = env.spawn("worker", "worker", &[]);
    let len = eventually(60, "the poison entry in the dead letters", async || {
        let n: i64 = redis::cmd("XLEN")
            .arg(&dl)
            .query_async(&mut r)
            .await
            .unwrap();
        (n == 2).then_some(n)
    })
    .await;
    assert_eq!(len, 2);
    let metrics = client_scrape(&worker).await;
    assert_eq!(sample(&metrics, "media_cluster_deadletter_total"), 1.0);

    let (ok, list) = run(&env, "deadletter list");
    assert!(ok, "{list}");
    assert!(
        list.contains(&job_dl_id) && list.contains("gave up"),
        "{list}"
    );
    assert!(list.contains("malformed entry"), "{list}");

    // Replaying the job's entry runs it.
    let (ok, out) = run(&env, &format!("deadletter replay {job_dl_id}"));
    assert!(ok, "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while client.job_status(&job_id).await != "succeeded" {
        assert!(
            std::time::Instant::now() < deadline,
            "replayed job not done; replay said {out}; worker log: {}",
            worker.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (ok, out) = run(&env, "deadletter replay 1-1");
    assert!(!ok && out.contains("no dead-letter entry"), "{out}");

    let (ok, out) = run(&env, "deadletter purge");
    assert!(!ok && out.contains("--yes"), "{out}");
    let (ok, out) = run(&env, "deadletter purge --yes");
    assert!(ok && out.contains("purged 1"), "{out}");
    let n: i64 = redis::cmd("XLEN")
        .arg(&dl)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(n, 0);
    drop(worker);
    db.close().await;
    env.cleanup().await;
}

async fn client_scrape(p: &Proc) -> String {
    test_http_client()
        .get(format!("{}/internal/metrics", p.base))
        .bearer_auth("dev-internal-token")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
