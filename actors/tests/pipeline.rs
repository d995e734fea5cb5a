//! The actor runtime through its ports, with in-memory fakes: instances that bound
//! concurrency, mailbox depth under slow stages, per-pet scheduling and coalescing,
//! restarts and escalation, kept work, bounded memory, retries, quarantine and dead letters.
//! Each test has its own metrics handle, so they pass under plain `cargo test` too.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use actors::runtime::ActorKind;
use actors::runtime::faults::FaultPoint;
use support::*;

fn colours(n: usize, seed: u8) -> Vec<[u8; 3]> {
    (0..n)
        .map(|i| [seed.wrapping_mul(37), (i as u8).wrapping_mul(11), 90])
        .collect()
}

#[actix_rt::test]
async fn a_panicking_actor_is_restarted_and_its_job_still_succeeds() {
    let store = FakeStore {
        panics: AtomicU32::new(1),
        ..Default::default()
    };
    let mut h = Harness::start(settings(2, 16, 5), store, Duration::ZERO);
    let (job, sid) = h.enqueue("rex", &[RED, RED, BLUE]);
    h.wait_acked(&sid).await;

    assert_eq!(h.status(job), "succeeded");
    assert_eq!(h.restarts("postgres_writer"), 1);
    assert_eq!(
        h.metrics
            .messages
            .with_label_values(&["postgres_writer", "panic"])
            .get(),
        1
    );
    assert_eq!(h.metrics.retries.get(), 1, "the failed attempt was retried");
    let commits = h.store.commits.lock().unwrap().clone();
    assert_eq!(commits.len(), 1);
    assert_eq!(commits[0].clusters.len(), 2, "red pair and blue singleton");
    // The embeddings were kept when they were made: the retry embedded nothing.
    assert_eq!(h.encoder.embedded.load(Ordering::SeqCst), 3);
    h.until("the writer's instances back to 2", || {
        h.instances("postgres_writer") == 2
    })
    .await;
    h.until("the pet unlocked", || h.locked_pets().is_empty())
        .await;
    // And the pipeline keeps working.
    let (job2, sid2) = h.enqueue("rex", &[BLUE]);
    h.wait_acked(&sid2).await;
    assert_eq!(h.status(job2), "succeeded");
    h.stop().await;
}

#[actix_rt::test]
async fn a_panic_in_each_stage_the_read_loop_or_a_job_restarts_it_and_the_job_ends() {
    let cases = [
        (
            FaultPoint::Actor(ActorKind::StreamReader),
            Some("stream_reader"),
        ),
        (FaultPoint::Actor(ActorKind::Embedder), Some("embedder")),
        (FaultPoint::Actor(ActorKind::Clusterer), Some("clusterer")),
        (
            FaultPoint::Actor(ActorKind::HeroSelector),
            Some("hero_selector"),
        ),
        (
            FaultPoint::Actor(ActorKind::PostgresWriter),
            Some("postgres_writer"),
        ),
        (FaultPoint::ReadLoop, Some("stream_reader")),
        (FaultPoint::Job, None),
    ];
    for (point, kind) in cases {
        let mut h = Harness::start(settings(2, 16, 5), FakeStore::default(), Duration::ZERO);
        h.faults.arm(point, 1);
        let (job, sid) = h.enqueue("milo", &[RED, RED, BLUE]);
        h.wait_acked(&sid).await;
        assert_eq!(h.status(job), "succeeded", "{point:?}");
        assert!(h.faults.is_empty(), "{point:?}: the fault was not hit");
        match kind {
            Some(kind) => {
                assert_eq!(h.restarts(kind), 1, "{point:?}: restarts of {kind}");
                let c = h.settings.counts;
                let want = match kind {
                    "stream_reader" => c.stream_readers,
                    "embedder" => c.embedders,
                    "clusterer" => c.clusterers,
                    "hero_selector" => c.hero_selectors,
                    _ => c.postgres_writers,
                } as i64;
                h.until("instances restored", || h.instances(kind) == want)
                    .await;
            }
            None => {
                // A job that panicked is retried; its lock, slot and entry were released.
                assert_eq!(
                    h.metrics
                        .messages
                        .with_label_values(&["pet_scheduler", "panic"])
                        .get(),
                    1
                );
                assert_eq!(h.metrics.retries.get(), 1);
            }
        }
        h.until("the pet unlocked", || h.locked_pets().is_empty())
            .await;
        assert_eq!(h.metrics.worker_inflight.get(), 0, "{point:?}");
        h.stop().await;
    }
}

#[actix_rt::test]
async fn past_the_restart_intensity_the_pipeline_escalates() {
    let mut s = settings(2, 16, 50);
    s.restart.max_restarts = 2;
    let mut h = Harness::start(s, FakeStore::default(), Duration::ZERO);
    h.faults.arm(FaultPoint::Actor(ActorKind::Embedder), 3);
    let (_, sid) = h.enqueue("luna", &[RED, BLUE, RED, BLUE]);
    h.until("an escalation", || h.health.escalation().is_some())
        .await;
    let why = h.health.escalation().unwrap();
    assert!(why.contains("embedder"), "{why}");
    assert!(
        h.health.problems().iter().any(|p| p.contains("embedder")),
        "{:?}",
        h.health.problems()
    );
    assert_eq!(h.restarts("embedder"), 3);
    // The job still finishes (the faults are spent) and the process can drain.
    h.wait_acked(&sid).await;
    h.stop().await;
}

#[actix_rt::test]
async fn mailbox_depth_rises_behind_a_slow_stage_and_drains_to_zero() {
    let capacity = 4;
    let mut h = Harness::start(
        settings(1, capacity, 5),
        FakeStore::default(),
        Duration::from_millis(15),
    );
    let mut sids = Vec::new();
    for pet in 0..6 {
        sids.push(h.enqueue(&format!("burst-{pet}"), &colours(4, pet)).1);
    }
    let mut max_depth = 0;
    while !sids.iter().all(|s| h.is_acked(s)) {
        let d = h.gauge_depth("embedder");
        max_depth = max_depth.max(d);
        assert!(
            d <= capacity as i64,
            "depth {d} above the mailbox capacity {capacity}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(max_depth > 0, "the embedder's mailbox never filled");
    for actor in ActorKind::ALL {
        assert_eq!(
            h.gauge_depth(actor.as_str()),
            0,
            "{actor} depth after draining"
        );
    }
    let handled = h
        .metrics
        .handling
        .with_label_values(&["embedder"])
        .get_sample_count();
    assert_eq!(handled, 24);
    h.stop().await;
}

/// Runs one-photo jobs for `pets` pets against a store whose every operation takes 15 ms;
/// returns the writer's highest mailbox depth seen.
async fn writer_burst(h: &mut Harness, pets: usize) -> i64 {
    let sids: Vec<String> = (0..pets)
        .map(|p| h.enqueue(&format!("pet-{p}"), &[[p as u8, 40, 40]]).1)
        .collect();
    let mut max_depth = 0;
    while !sids.iter().all(|s| h.is_acked(s)) {
        max_depth = max_depth.max(h.gauge_depth("postgres_writer"));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    max_depth
}

#[actix_rt::test]
async fn one_writer_handles_one_operation_at_a_time_and_the_rest_wait_in_its_mailbox() {
    let mut s = settings(2, 16, 5);
    s.counts.postgres_writers = 1;
    s.max_inflight_jobs = 8;
    let store = FakeStore {
        delay: Duration::from_millis(15),
        ..Default::default()
    };
    let mut h = Harness::start(s, store, Duration::ZERO);
    let max_depth = writer_burst(&mut h, 12).await;
    assert!(max_depth >= 1, "the writer's depth stayed at {max_depth}");
    assert_eq!(h.store.max_active.load(Ordering::SeqCst), 1);
    h.until("the writer's depth back to 0", || {
        h.gauge_depth("postgres_writer") == 0
    })
    .await;
    let wait = h
        .metrics
        .mailbox_wait
        .with_label_values(&["postgres_writer"]);
    assert!(wait.get_sample_sum() > 0.0, "no writer message waited");
    h.stop().await;
}

#[actix_rt::test]
async fn four_writers_run_four_operations_at_once_and_never_five() {
    let mut s = settings(2, 16, 5);
    s.counts.postgres_writers = 4;
    s.max_inflight_jobs = 8;
    let store = FakeStore {
        delay: Duration::from_millis(15),
        ..Default::default()
    };
    let mut h = Harness::start(s, store, Duration::ZERO);
    writer_burst(&mut h, 12).await;
    assert_eq!(h.store.max_active.load(Ordering::SeqCst), 4);
    h.stop().await;
}

#[actix_rt::test]
async fn a_busy_pet_does_not_hold_up_another_and_its_burst_is_coalesced() {
    let mut s = settings(2, 64, 5);
    s.max_inflight_jobs = 4;
    let store = FakeStore {
        delay: Duration::from_millis(1),
        ..Default::default()
    };
    let mut h = Harness::start(s, store, Duration::from_millis(25));
    // Pet B's one-photo job on an idle pipeline.
    let t = Instant::now();
    let (_, sid) = h.enqueue("pet-b", &[BLUE]);
    h.wait_acked(&sid).await;
    let idle = t.elapsed();

    // The same behind a burst of 24 one-photo jobs for pet A.
    let mut burst = Vec::new();
    for i in 0..24u8 {
        burst.push(h.enqueue("pet-a", &[[i * 9, 200, 30]]).1);
    }
    let t = Instant::now();
    let (_, sid) = h.enqueue("pet-b", &[[12, 12, 180]]);
    h.wait_acked(&sid).await;
    let behind = t.elapsed();
    for s in &burst {
        h.wait_acked(s).await;
    }
    assert!(
        behind <= idle * 3,
        "pet B took {behind:?} behind the burst, {idle:?} on an idle pipeline"
    );
    let versions = h.store.commits_for("pet-a");
    assert!(
        versions < 24,
        "24 jobs of pet A wrote {versions} versions: nothing was coalesced"
    );
    // Every photo of pet A is in its last clustering.
    let commits = h.store.commits.lock().unwrap().clone();
    let last = commits.iter().rev().find(|c| c.pet_id == "pet-a").unwrap();
    let members: usize = last.clusters.iter().map(|c| c.members.len()).sum();
    assert_eq!(members, 24);
    h.stop().await;
}

#[actix_rt::test]
async fn another_process_holding_a_pets_lock_holds_no_slot() {
    let mut s = settings(2, 16, 5);
    s.max_inflight_jobs = 1;
    let mut h = Harness::start(s, FakeStore::default(), Duration::ZERO);
    h.queue
        .locks
        .lock()
        .unwrap()
        .insert("pet-x".into(), "another-worker".into());
    let (x, sid_x) = h.enqueue("pet-x", &[RED]);
    let (_, sid_y) = h.enqueue("pet-y", &[BLUE]);
    // With one slot, pet Y can only run if pet X waits without it.
    h.wait_acked(&sid_y).await;
    assert!(!h.is_acked(&sid_x));
    assert_ne!(h.status(x), "succeeded");
    h.queue.locks.lock().unwrap().remove("pet-x");
    h.wait_acked(&sid_x).await;
    assert_eq!(h.status(x), "succeeded");
    h.stop().await;
}

#[actix_rt::test]
async fn a_commit_that_fails_once_is_retried_without_embedding_again() {
    let store = FakeStore {
        failures: AtomicU32::new(1),
        ..Default::default()
    };
    let mut h = Harness::start(settings(2, 16, 5), store, Duration::ZERO);
    let (job, sid) = h.enqueue("kept", &[RED, BLUE, RED]);
    h.wait_acked(&sid).await;
    assert_eq!(h.status(job), "succeeded");
    assert_eq!(h.metrics.retries.get(), 1);
    assert_eq!(h.encoder.embedded.load(Ordering::SeqCst), 3);
    h.stop().await;
}

#[actix_rt::test]
async fn at_most_embedders_plus_capacity_photos_are_in_memory() {
    let (embedders, capacity) = (2, 3);
    let mut s = settings(embedders, capacity, 5);
    s.max_inflight_jobs = 8;
    let mut h = Harness::start(s, FakeStore::default(), Duration::from_millis(3));
    let sids: Vec<String> = (0..8)
        .map(|p| h.enqueue(&format!("big-{p}"), &colours(8, p)).1)
        .collect();
    for s in &sids {
        h.wait_acked(s).await;
    }
    let max = h.blobs.count.max_live.load(Ordering::SeqCst);
    assert!(
        max <= embedders + capacity,
        "{max} photos were held at once (bound {})",
        embedders + capacity
    );
    assert!(max >= embedders, "the run was not concurrent ({max})");
    h.stop().await;
}

#[actix_rt::test]
async fn retryable_failures_are_retried_and_the_job_succeeds() {
    let store = FakeStore {
        failures: AtomicU32::new(2),
        ..Default::default()
    };
    let mut h = Harness::start(settings(2, 16, 5), store, Duration::ZERO);
    let (job, sid) = h.enqueue("milo", &[RED, BLUE]);
    h.wait_acked(&sid).await;
    assert_eq!(h.status(job), "succeeded");
    assert_eq!(h.metrics.retries.get(), 2);
    assert_eq!(h.metrics.jobs.with_label_values(&["succeeded"]).get(), 1);
    h.stop().await;
}

#[actix_rt::test]
async fn a_photo_that_cannot_be_decoded_is_quarantined_and_its_pet_goes_on() {
    let mut h = Harness::start(settings(2, 16, 5), FakeStore::default(), Duration::ZERO);
    let good = h.add_photos("bella", &[RED, RED]);
    let bad = h.add_photo_bytes("bella", vec![b"\x89PNG\r\n\x1a\nnot really".to_vec()]);
    let (job, sid) = h.enqueue_job("bella", [good.clone(), bad.clone()].concat());
    h.wait_acked(&sid).await;
    assert_eq!(h.status(job), "succeeded");
    let q = h.store.quarantined();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].0, bad[0]);
    let commits = h.store.commits.lock().unwrap().clone();
    let members: Vec<_> = commits[0]
        .clusters
        .iter()
        .flat_map(|c| c.members.iter().map(|m| m.image_id))
        .collect();
    assert_eq!(members.len(), 2);
    assert!(!members.contains(&bad[0]));
    // The next job of the pet does not try the photo again.
    let (job2, sid2) = h.enqueue("bella", &[BLUE]);
    h.wait_acked(&sid2).await;
    assert_eq!(h.status(job2), "succeeded");
    assert_eq!(h.store.quarantined().len(), 1);
    h.stop().await;
}

#[actix_rt::test]
async fn poison_and_exhausted_entries_are_dead_lettered_while_others_proceed() {
    let store = FakeStore {
        failures: AtomicU32::new(3),
        ..Default::default()
    };
    let mut h = Harness::start(settings(2, 16, 3), store, Duration::ZERO);
    let poison: HashMap<String, String> = [
        ("schema", "1"),
        ("job_id", "not-a-uuid"),
        ("pet_id", "../../etc"),
        ("kind", "bogus"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let poison_id = h.push(poison);
    let (doomed, doomed_sid) = h.enqueue("luna", &[RED]);
    h.wait_acked(&poison_id).await;
    h.wait_acked(&doomed_sid).await;
    // The store recovers; the next job goes through.
    let (fine, fine_sid) = h.enqueue("luna", &[BLUE]);
    h.wait_acked(&fine_sid).await;

    assert_eq!(h.status(doomed), "dead_lettered");
    assert_eq!(h.status(fine), "succeeded");
    let dead = h.queue.dead.lock().unwrap().clone();
    assert_eq!(dead.len(), 2);
    assert!(dead[0].1.contains("malformed entry"), "{}", dead[0].1);
    assert!(
        dead[1].1.contains("gave up after 3 attempts"),
        "{}",
        dead[1].1
    );
    assert_eq!(h.metrics.deadletters.get(), 2);
    assert_eq!(
        h.metrics.jobs.with_label_values(&["dead_lettered"]).get(),
        1
    );
    h.stop().await;
}

#[actix_rt::test]
async fn capacity_and_instances_are_published_per_kind() {
    let h = Harness::start(settings(3, 7, 5), FakeStore::default(), Duration::ZERO);
    let cap = |a: &str| h.metrics.mailbox_capacity.with_label_values(&[a]).get();
    for a in [
        "stream_reader",
        "embedder",
        "clusterer",
        "hero_selector",
        "postgres_writer",
    ] {
        assert_eq!(cap(a), 7, "{a}");
    }
    h.until("every instance running", || {
        h.instances("embedder") == 3
            && h.instances("stream_reader") == 2
            && h.instances("postgres_writer") == 2
            && h.instances("clusterer") == 1
            && h.instances("supervisor") == 1
            && h.instances("pet_scheduler") == 1
    })
    .await;
    h.stop().await;
}

#[actix_rt::test]
async fn the_relay_enqueues_committed_jobs_without_an_entry_once_and_lost_ones_again() {
    let h = Harness::start(settings(2, 16, 5), FakeStore::default(), Duration::ZERO);
    let entry = |pet: &str| actors::job::JobEntry {
        job_id: uuid::Uuid::now_v7(),
        pet_id: pet.into(),
        kind: actors::job::JobKind::Recluster,
        image_ids: vec![],
        enqueued_at_ms: 0,
        attempt: 1,
        traceparent: None,
        tracestate: None,
    };
    let (never, present, lost) = (entry("never"), entry("present"), entry("lost"));
    h.queue.acked.lock().unwrap().push("9-0".into()); // the lost entry's id is gone
    *h.store.outbox.lock().unwrap() = vec![
        (never.clone(), None),
        (present.clone(), Some("8-0".into())),
        (lost.clone(), Some("9-0".into())),
    ];
    h.until("both relayed", || {
        h.queue.enqueued.lock().unwrap().len() >= 2
    })
    .await;
    // More rounds pass; nothing is enqueued twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let enqueued: Vec<uuid::Uuid> = h
        .queue
        .enqueued
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.job_id)
        .collect();
    assert_eq!(enqueued.len(), 2, "{enqueued:?}");
    assert!(enqueued.contains(&never.job_id) && enqueued.contains(&lost.job_id));
    assert!(!enqueued.contains(&present.job_id));
    // The relay's entries carry a trace context of their own.
    let ids: HashMap<uuid::Uuid, Option<String>> = h
        .store
        .outbox
        .lock()
        .unwrap()
        .iter()
        .map(|(e, s)| (e.job_id, s.clone()))
        .collect();
    assert!(
        ids[&never.job_id]
            .as_deref()
            .unwrap()
            .starts_with("relayed-")
    );
    h.stop().await;
}

#[actix_rt::test]
async fn a_job_that_lost_its_pets_lock_gives_up_and_the_holder_goes_on() {
    let mut s = settings(2, 16, 5);
    // Keep-alive every 100 ms.
    s.claim_min_idle_ms = 300;
    let store = FakeStore::default();
    let mut h = Harness::start(s, store, Duration::ZERO);
    // Just before the first commit another worker takes the pet: the lock is removed and a
    // later lease taken (its fencing token bumped).
    let (queue, taken) = (h.queue.clone(), std::sync::Arc::new(AtomicU32::new(0)));
    let (fences_store, t) = (h.store.clone(), taken.clone());
    *h.store.before_commit.lock().unwrap() = Some(Box::new(move |r| {
        if t.fetch_add(1, Ordering::SeqCst) == 0 {
            queue
                .locks
                .lock()
                .unwrap()
                .insert(r.pet_id.clone(), "another-worker".into());
            *fences_store
                .fences
                .lock()
                .unwrap()
                .get_mut(&r.pet_id)
                .unwrap() += 1;
        }
    }));
    let (job, sid) = h.enqueue("contested", &[RED, BLUE]);
    h.until("the first commit refused", || {
        taken.load(Ordering::SeqCst) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        h.store.commits.lock().unwrap().is_empty(),
        "a fenced-out commit was written"
    );
    assert!(!h.is_acked(&sid));
    // The other worker finishes and releases the pet; the job goes on and commits once.
    h.queue.locks.lock().unwrap().remove("contested");
    h.wait_acked(&sid).await;
    assert_eq!(h.status(job), "succeeded");
    assert_eq!(h.store.commits.lock().unwrap().len(), 1);
    assert_eq!(
        h.metrics.retries.get(),
        0,
        "losing the lock spends no attempt"
    );
    h.stop().await;
}

#[actix_rt::test]
async fn the_sweeper_removes_old_objects_no_row_names() {
    let h = Harness::start(settings(2, 16, 5), FakeStore::default(), Duration::ZERO);
    let kept = h.add_photos("swept", &[RED]);
    let orphan = actors::ports::image_key(uuid::Uuid::now_v7());
    h.blobs
        .bytes
        .lock()
        .unwrap()
        .insert(orphan.clone(), png(BLUE));
    h.blobs
        .written
        .lock()
        .unwrap()
        .insert(orphan.clone(), std::time::SystemTime::now());
    h.until("the orphan removed", || {
        !h.blobs.bytes.lock().unwrap().contains_key(&orphan)
    })
    .await;
    assert!(
        h.blobs
            .bytes
            .lock()
            .unwrap()
            .contains_key(&actors::ports::image_key(kept[0]))
    );
    h.stop().await;
}

#[actix_rt::test]
async fn a_job_past_its_deadline_gives_up_its_slot_and_is_retried() {
    let mut s = settings(1, 16, 2);
    s.job_timeout = Duration::from_millis(80);
    s.max_inflight_jobs = 1;
    let mut h = Harness::start(s, FakeStore::default(), Duration::from_millis(400));
    let (slow, slow_sid) = h.enqueue("slow", &[RED]);
    h.wait_acked(&slow_sid).await;
    assert_eq!(h.status(slow), "dead_lettered");
    let dead = h.queue.dead.lock().unwrap().clone();
    assert!(dead[0].1.contains("deadline"), "{}", dead[0].1);
    assert!(h.metrics.retries.get() >= 1);
    h.until("the pet unlocked", || h.locked_pets().is_empty())
        .await;
    h.stop().await;
}

/// Capture times reach the clusterer: a red and a blue photo are two clusters, until their
/// capture times a second apart make them a burst (a rule wide enough for any two photos).
#[actix_rt::test]
async fn capture_times_from_the_store_reach_the_clusterer() {
    let mut s = settings(1, 16, 5);
    s.time_rule = Some(actors::algo::cluster::TimeRule {
        burst_ms: 10_000,
        burst_eps: 2.0,
        apart_ms: 3_600_000,
        apart_eps: s.params.eps,
    });
    let mut h = Harness::start(s, FakeStore::default(), Duration::ZERO);
    let undated = h.add_photos("undated", &[RED, BLUE]);
    let (_, sid) = h.enqueue_job("undated", undated);
    h.wait_acked(&sid).await;
    let burst = h.add_photos("burst", &[RED, BLUE]);
    h.set_captured_at(burst[0], 1_717_245_005_000);
    h.set_captured_at(burst[1], 1_717_245_006_000);
    let (_, sid) = h.enqueue_job("burst", burst);
    h.wait_acked(&sid).await;
    let commits = h.store.commits.lock().unwrap().clone();
    let of = |pet: &str| {
        commits
            .iter()
            .find(|c| c.pet_id == pet)
            .unwrap()
            .clusters
            .len()
    };
    assert_eq!(of("undated"), 2);
    assert_eq!(of("burst"), 1);
    h.stop().await;
}
