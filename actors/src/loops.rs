//! The pipeline's loops, children of the supervisor: each returns `Ok(())` when the pipeline
//! stops, and a panic is a failure the supervisor restarts. An unavailable dependency is not
//! a failure of the loop: it backs off and tries again.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
        if (!stream_ids.is_empty() || !pets.is_empty())
            && let Err(e) = core
                .readers
                .send(RedisOp::KeepAlive { stream_ids, pets })
                .await
        {
            tracing::warn!(error = %e, "Refreshing held entries and pet locks failed.");
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
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {},
            _ = stop.changed() => return Ok(()),
        }
    }
}
