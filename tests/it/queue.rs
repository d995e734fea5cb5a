//! The Redis adapter's trimming keeps every entry not yet acknowledged.

use actors::job::{JobEntry, JobKind};
use actors::ports::JobQueue;
use media_clustering::adapters::redis_queue::RedisQueue;
use media_clustering::config::Settings;
use uuid::Uuid;

use crate::helpers::*;

fn entry() -> JobEntry {
    JobEntry {
        job_id: Uuid::now_v7(),
        pet_id: "trim-pet".into(),
        kind: JobKind::Recluster,
        image_ids: vec![],
        enqueued_at_ms: 0,
        attempt: 1,
        traceparent: None,
        tracestate: None,
    }
}

#[actix_rt::test]
async fn trimming_never_drops_pending_or_undelivered_entries() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings::load_from(&test_vars("unused", dir.path(), &[])).unwrap();
    let q = RedisQueue::connect(&settings.redis, 1).await.unwrap();
    for _ in 0..5 {
        q.enqueue(&entry()).await.unwrap();
    }
    // Deliver three; acknowledge the second and third; the first stays pending.
    let got = q.read("trim-consumer", 3, 100).await.unwrap();
    assert_eq!(got.len(), 3);
    q.ack(std::slice::from_ref(&got[1].stream_id))
        .await
        .unwrap();
    q.ack(std::slice::from_ref(&got[2].stream_id))
        .await
        .unwrap();
    assert_eq!(
        q.trim().await.unwrap(),
        0,
        "nothing before the oldest pending entry"
    );
    assert_eq!(app_xlen(&settings).await, 5);

    // Once the first is acknowledged, the three delivered ones go; the two undelivered stay.
    q.ack(std::slice::from_ref(&got[0].stream_id))
        .await
        .unwrap();
    assert_eq!(q.trim().await.unwrap(), 3);
    assert_eq!(app_xlen(&settings).await, 2);
    let rest = q.read("trim-consumer", 10, 100).await.unwrap();
    assert_eq!(rest.len(), 2, "undelivered entries survived trimming");
    for d in &rest {
        q.ack(std::slice::from_ref(&d.stream_id)).await.unwrap();
    }
    assert_eq!(q.trim().await.unwrap(), 2);
    let mut r = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(&settings.redis.stream)
        .query_async(&mut r)
        .await
        .unwrap();
}

async fn app_xlen(settings: &Settings) -> i64 {
    let mut r = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("XLEN")
        .arg(&settings.redis.stream)
        .query_async(&mut r)
        .await
        .unwrap()
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[actix_rt::test]
async fn a_job_is_enqueued_once_unless_its_entry_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings::load_from(&test_vars("unused", dir.path(), &[])).unwrap();
    let q = RedisQueue::connect(&settings.redis, 1).await.unwrap();
    let e = entry();
    let first = q.enqueue(&e).await.unwrap();
    assert_eq!(q.enqueue(&e).await.unwrap(), first, "the same job twice");
    assert_eq!(app_xlen(&settings).await, 1);
    assert_eq!(
        q.entries_exist(&[first.clone(), "1-1".into()])
            .await
            .unwrap(),
        [true, false]
    );
    // The entry is lost (deleted with its stream, say): enqueueing again adds a new one.
    let _: i64 = redis::cmd("XDEL")
        .arg(&settings.redis.stream)
        .arg(&first)
        .query_async(&mut raw().await)
        .await
        .unwrap();
    let second = q.enqueue(&e).await.unwrap();
    assert_ne!(second, first);
    assert_eq!(app_xlen(&settings).await, 1);
    let _: i64 = redis::cmd("DEL")
        .arg(&settings.redis.stream)
        .arg(format!("{}:enqueued:{}", settings.redis.stream, e.job_id))
        .query_async(&mut raw().await)
        .await
        .unwrap();
}

#[actix_rt::test]
async fn a_lost_group_is_recreated_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings::load_from(&test_vars("unused", dir.path(), &[])).unwrap();
    let q = RedisQueue::connect(&settings.redis, 1).await.unwrap();
    assert!(q.depth().await.unwrap().group_exists);
    q.enqueue(&entry()).await.unwrap();
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&settings.redis.stream)
        .arg(&settings.redis.group)
        .query_async(&mut raw().await)
        .await
        .unwrap();
    assert!(!q.group_exists().await.unwrap());
    // A read finds it gone, recreates it from the stream's start and delivers what was added.
    assert!(q.read("c", 10, 50).await.unwrap().is_empty());
    assert!(q.group_exists().await.unwrap());
    assert!(
        !q.depth().await.unwrap().group_exists,
        "the loss is reported once"
    );
    assert!(q.depth().await.unwrap().group_exists);
    assert_eq!(q.read("c", 10, 50).await.unwrap().len(), 1);
    let _: i64 = redis::cmd("DEL")
        .arg(&settings.redis.stream)
        .query_async(&mut raw().await)
        .await
        .unwrap();
}

#[actix_rt::test]
async fn the_dead_letter_stream_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings::load_from(&test_vars(
        "unused",
        dir.path(),
        &[("MEDIA_CLUSTERING__REDIS__DEADLETTER_MAXLEN", "5")],
    ))
    .unwrap();
    let q = RedisQueue::connect(&settings.redis, 1).await.unwrap();
    for _ in 0..12 {
        q.enqueue(&entry()).await.unwrap();
    }
    for d in q.read("c", 20, 50).await.unwrap() {
        q.dead_letter(&d, "doomed").await.unwrap();
    }
    let depth = q.depth().await.unwrap();
    assert_eq!(depth.deadletters, 5);
    assert_eq!(depth.deadletter_cap, 5);
    let _: i64 = redis::cmd("DEL")
        .arg(&settings.redis.stream)
        .arg(&settings.redis.deadletter_stream)
        .query_async(&mut raw().await)
        .await
        .unwrap();
}
