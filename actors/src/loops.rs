//! The pipeline's loops, children of the supervisor: each returns `Ok(())` when the pipeline
//! stops, and a panic is a failure the supervisor restarts. An unavailable dependency is not
//! a failure of the loop: it backs off and tries again.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::Instrument;
use uuid::Uuid;

use crate::batch::dead_letter_one;
use crate::error::PipelineError;
use crate::job::JobEntry;
use crate::pipeline::{Core, Held};
use crate::ports::FinalStatus;
use crate::runtime::faults::FaultPoint;
use crate::scheduler::{SchedulerLink, SchedulerMsg, backoff};
use crate::stages::*;

/// Most entries read at once.
const READ_BATCH: usize = 16;

/// The readiness condition of the consumer group.
const CONSUMER_GROUP: &str = "consumer_group";

/// Jobs the relay looks at per round.
const RELAY_BATCH: usize = 200;
/// Every this many rounds, the relay also checks that queued jobs' entries still exist.
const RELAY_CHECK_EVERY: u64 = 6;

/// How often the reader looks for entries idle in other consumers' hands.
fn reclaim_interval(claim_min_idle_ms: u64) -> Duration {
    Duration::from_millis((claim_min_idle_ms / 4).clamp(250, 10_000))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads entries while the scheduler has room for them (`max_queued_jobs`), and hands them
/// over; malformed and over-delivered entries go straight to the dead-letter stream.
pub(crate) async fn read_loop(
    core: Arc<Core>,
    scheduler: SchedulerLink,
) -> Result<(), PipelineError> {
    let mut stop = core.reading_stopped.clone();
    let mut failures = 0u32;
    // Reclaim first: a restarted worker finishes what a crashed one left.
    let mut last_reclaim: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let first = tokio::select! {
            p = core.held.clone().acquire_owned() => p.map_err(|_| PipelineError::ShuttingDown)?,
            _ = stop.changed() => return Ok(()),
        };
        let mut permits = vec![first];
        while permits.len() < READ_BATCH {
            match core.held.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        core.faults.hit(FaultPoint::ReadLoop);
        let s = &core.settings;
        let mode =
            if last_reclaim.is_none_or(|t| t.elapsed() >= reclaim_interval(s.claim_min_idle_ms)) {
                last_reclaim = Some(Instant::now());
                ReadMode::Reclaim {
                    min_idle_ms: s.claim_min_idle_ms,
                }
            } else {
                ReadMode::New
            };
        let read = core.readers.send(RedisOp::Read {
            count: permits.len(),
            mode,
        });
        let batch = tokio::select! {
            r = read => r,
            _ = stop.changed() => return Ok(()),
        };
        match batch {
            Ok(RedisReply::Read(batch)) => {
                failures = 0;
                let mut held = Vec::with_capacity(batch.len());
                for d in batch {
                    if core.tracked.holds_entry(&d.stream_id) {
                        continue; // already here
                    }
                    let entry = match JobEntry::parse(&d.fields) {
                        Ok(e) => e,
                        Err(e) => {
                            dead_letter_one(&core, &d, None, &format!("malformed entry: {e}"))
                                .await;
                            continue;
                        }
                    };
                    if d.deliveries > u64::from(s.max_deliveries) {
                        let why = format!(
                            "delivered {} times, more than redis.max_deliveries ({})",
                            d.deliveries, s.max_deliveries
                        );
                        let finish = DbOp::Finish {
                            job_ids: vec![entry.job_id],
                            status: FinalStatus::DeadLettered,
                            error: why.clone(),
                        };
                        if let Err(e) = core.writers.send(finish).await {
                            tracing::warn!(error = %e, "Marking the job dead-lettered failed.");
                        }
                        dead_letter_one(&core, &d, Some(entry.job_id), &why).await;
                        continue;
                    }
                    if d.deliveries == 1 {
                        core.metrics
                            .job_queue_wait
                            .observe((now_ms() - entry.enqueued_at_ms).max(0) as f64 / 1e3);
                    }
                    let Some(permit) = permits.pop() else { break };
                    held.push(Held::new(d, entry, permit, &core.tracked));
                }
                if !held.is_empty() {
                    scheduler.tell(SchedulerMsg::Submit(held));
                }
            }
            Ok(other) => tracing::warn!(reply = ?other, "Unexpected stream-reader reply."),
            Err(e) => {
                failures += 1;
                let wait = backoff(Duration::from_millis(200), failures.min(6));
                tracing::warn!(error = %e, backoff_ms = wait.as_millis() as u64, "Reading the jobs stream failed; backing off.");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {},
                    _ = stop.changed() => return Ok(()),
                }
            }
        }
    }
}

/// Refreshes the idle time of the entries held here and the TTL of the pet locks held here,
/// so that a slow or waiting job is never reclaimed and run twice; now and then removes
/// consumers that left nothing pending.
pub(crate) async fn keep_alive_loop(core: Arc<Core>) -> Result<(), PipelineError> {
    let mut stop = core.stopped.clone();
    let s = &core.settings;
    let every = Duration::from_millis((s.claim_min_idle_ms / 3).max(100));
    let prune_idle_ms = (s.claim_min_idle_ms * 10).max(60_000);
    let mut last_prune = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {},
            _ = stop.changed() => return Ok(()),
        }
        let (stream_ids, pets) = (core.tracked.entries(), core.tracked.pets());
        if !stream_ids.is_empty() || !pets.is_empty() {
            match core
                .readers
                .send(RedisOp::KeepAlive { stream_ids, pets })
                .await
            {
                Ok(RedisReply::LostPets(lost)) if !lost.is_empty() => core.tracked.mark_lost(lost),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "Refreshing held entries and pet locks failed.")
                }
            }
        }
        if last_prune.elapsed() >= Duration::from_millis(prune_idle_ms) {
            last_prune = Instant::now();
            match core
                .readers
                .send(RedisOp::PruneConsumers {
                    idle_ms: prune_idle_ms,
                })
                .await
            {
                Ok(RedisReply::Count(n)) if n > 0 => {
                    tracing::info!(removed = n, "Removed idle consumers with nothing pending.")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "Pruning idle consumers failed."),
            }
        }
    }
}

/// Publishes the stream's lag and pending counts, and trims acknowledged entries.
pub(crate) async fn depth_loop(core: Arc<Core>) -> Result<(), PipelineError> {
    let mut stop = core.stopped.clone();
    let mut rounds = 0u64;
    let mut last_dlq_warning: Option<Instant> = None;
    loop {
        rounds += 1;
        if rounds % 10 == 1 {
            match core.readers.send(RedisOp::Trim).await {
                Ok(RedisReply::Count(n)) if n > 0 => {
                    tracing::debug!(removed = n, "Trimmed acknowledged entries.")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "Trimming the jobs stream failed."),
            }
        }
        if let Ok(RedisReply::Depth(d)) = core.readers.send(RedisOp::Depth).await {
            let m = &core.metrics;
            m.pending_jobs.with_label_values(&["lag"]).set(d.lag);
            m.pending_jobs
                .with_label_values(&["pending"])
                .set(d.pending);
            // Not ready while the group is missing; the queue has recreated it by the next round.
            core.health.set(
                CONSUMER_GROUP,
                (!d.group_exists).then(|| {
                    format!(
                        "the consumer group `{}` was missing on `{}`; recreated",
                        core.settings.group, core.settings.stream
                    )
                }),
            );
            if d.deadletter_cap > 0
                && d.deadletters * 10 >= d.deadletter_cap * 9
                && last_dlq_warning.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(60))
            {
                last_dlq_warning = Some(Instant::now());
                tracing::warn!(
                    entries = d.deadletters,
                    cap = d.deadletter_cap,
                    "The dead-letter stream is nearly full; past redis.deadletter_maxlen its oldest entries are dropped."
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {},
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// The outbox relay: the job row is the outbox. A job committed by the API but never put on
/// the stream (the request was cancelled or the process crashed between the commit and the
/// enqueue), or whose entry was lost with the stream or the group, is enqueued here. The
/// enqueue is idempotent (a job whose entry is in the stream keeps it), so the relay and the
/// API never put one job on the stream twice.
pub(crate) async fn relay_loop(core: Arc<Core>) -> Result<(), PipelineError> {
    let mut stop = core.stopped.clone();
    let s = &core.settings;
    let mut rounds = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(s.relay_interval) => {},
            _ = stop.changed() => return Ok(()),
        }
        rounds += 1;
        let check_entries = rounds % RELAY_CHECK_EVERY == 1;
        if let Err(e) = relay_once(&core, check_entries).await {
            tracing::warn!(error = %e, "Relaying jobs without a stream entry failed; trying again later.");
        }
    }
}

async fn relay_once(core: &Core, check_entries: bool) -> Result<(), PipelineError> {
    let s = &core.settings;
    let ask = DbOp::Outbox {
        grace_ms: s.relay_grace.as_millis() as u64,
        // A running job whose entry is gone had its worker and its entry lost together.
        stale_ms: s
            .claim_min_idle_ms
            .saturating_mul(3)
            .max(s.relay_grace.as_millis() as u64),
        check_entries,
        limit: RELAY_BATCH,
    };
    let jobs = match core.writers.send(ask).await? {
        DbReply::Outbox(j) => j,
        other => {
            return Err(PipelineError::permanent(format!(
                "unexpected reply {other:?}"
            )));
        }
    };
    if jobs.is_empty() {
        return Ok(());
    }
    let recorded: Vec<String> = jobs.iter().filter_map(|j| j.stream_id.clone()).collect();
    let exists = if recorded.is_empty() {
        Vec::new()
    } else {
        match core
            .readers
            .send(RedisOp::EntriesExist {
                stream_ids: recorded.clone(),
            })
            .await?
        {
            RedisReply::Exist(e) => e,
            other => {
                return Err(PipelineError::permanent(format!(
                    "unexpected reply {other:?}"
                )));
            }
        }
    };
    let present: HashSet<&str> = recorded
        .iter()
        .zip(&exists)
        .filter(|(_, e)| **e)
        .map(|(id, _)| id.as_str())
        .collect();
    let mut relayed = 0usize;
    for job in jobs {
        if job
            .stream_id
            .as_deref()
            .is_some_and(|id| present.contains(id))
        {
            continue;
        }
        let span = tracing::info_span!(
            "relay",
            job_id = %job.entry.job_id,
            pet_id = %job.entry.pet_id,
            media_clustering.upload_trace_id = job.trace_id.as_deref().unwrap_or(""),
            lost_entry = job.stream_id.as_deref().unwrap_or(""),
        );
        let job_id = job.entry.job_id;
        let enqueued = async {
            let id = match core
                .readers
                .send(RedisOp::Enqueue { entry: job.entry })
                .await?
            {
                RedisReply::Enqueued(id) => id,
                other => {
                    return Err(PipelineError::permanent(format!(
                        "unexpected reply {other:?}"
                    )));
                }
            };
            core.writers
                .send(DbOp::SetStreamId {
                    job_id,
                    stream_id: id,
                })
                .await?;
            Ok(())
        }
        .instrument(span)
        .await;
        match enqueued {
            Ok(()) => relayed += 1,
            Err(e) => tracing::warn!(job_id = %job_id, error = %e, "Relaying a job failed."),
        }
    }
    if relayed > 0 {
        tracing::warn!(
            jobs = relayed,
            "Enqueued committed jobs that had no stream entry."
        );
    }
    Ok(())
}

/// Objects the sweeper looks at per page.
const SWEEP_PAGE: usize = 500;

/// Removes photo objects that no row names and that are older than the grace period: what a
/// crashed upload wrote before its transaction committed (uploads that fail otherwise remove
/// their objects at once).
///
/// Each sweep looks only at objects that passed the grace period since the previous one (the
/// first sweep of a process at all older ones), so its memory follows the upload rate.
pub(crate) async fn sweep_loop(core: Arc<Core>) -> Result<(), PipelineError> {
    let mut stop = core.stopped.clone();
    let mut watermark = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(core.settings.sweep_interval) => {},
            _ = stop.changed() => return Ok(()),
        }
        let until = SystemTime::now() - core.settings.orphan_grace;
        match sweep_once(&core, watermark, until).await {
            Ok(n) => {
                watermark = Some(until);
                if n > 0 {
                    tracing::warn!(objects = n, "Removed objects that no photo row names.");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Sweeping orphaned objects failed; trying again later.")
            }
        }
    }
}

async fn sweep_once(
    core: &Core,
    from: Option<SystemTime>,
    until: SystemTime,
) -> Result<usize, PipelineError> {
    let keys = core.blobs.list_written(from, until).await?;
    let mut removed = 0;
    for page in keys.chunks(SWEEP_PAGE) {
        let ids: Vec<(Uuid, &String)> = page
            .iter()
            .filter_map(|k| {
                let id = k.rsplit('/').next().and_then(|s| Uuid::parse_str(s).ok())?;
                Some((id, k))
            })
            .collect();
        let known: HashSet<Uuid> = match core
            .writers
            .send(DbOp::KnownImages {
                ids: ids.iter().map(|(id, _)| *id).collect(),
            })
            .await?
        {
            DbReply::Known(k) => k.into_iter().collect(),
            other => {
                return Err(PipelineError::permanent(format!(
                    "unexpected reply {other:?}"
                )));
            }
        };
        for (id, key) in ids {
            if !known.contains(&id) {
                core.blobs
                    .delete(key)
                    .instrument(tracing::debug_span!("blob.delete", image_id = %id))
                    .await?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}
