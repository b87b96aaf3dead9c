//! Housekeeping on timers: WAL checkpoints (SQLite), retention and presence timeouts (two
//! loops: a long retention pass never delays the others). On
//! SQLite they are the writer's work; on PostgreSQL every instance runs them, and the
//! append lock makes each change happen once.

use std::time::Duration;

use super::{RETENTION_PER_CALL, Store, StoreError};
use crate::config::StorageConfig;
use crate::domain;

/// Retention pauses this many times as long as each chunk took before the next one, so a
/// pass takes at most a quarter of the writer's time.
const RETENTION_PAUSE_FACTOR: u32 = 3;

/// How often committed WAL frames are checkpointed into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Sends retention and presence work to the writer on a timer until cancelled.
pub async fn run_housekeeping(
    store: Store,
    storage: StorageConfig,
    presence_timeout: Duration,
    metrics: std::sync::Arc<crate::observability::Metrics>,
    cancel: tokio_util::sync::CancellationToken,
) {
    // A retention pass may take minutes (it pauses between chunks): on a loop of its own,
    // so checkpoints and presence timeouts never wait for it.
    tokio::join!(
        run_retention(store.clone(), storage, metrics.clone(), cancel.clone()),
        checkpoints_and_presence(store, presence_timeout, metrics, cancel),
    );
}

/// Checkpoints and presence timeouts on their timers until cancelled.
async fn checkpoints_and_presence(
    store: Store,
    presence_timeout: Duration,
    metrics: std::sync::Arc<crate::observability::Metrics>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let sweep_every =
        (presence_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    let mut sweep_tick = tokio::time::interval(sweep_every);
    let mut checkpoint_tick = tokio::time::interval(CHECKPOINT_EVERY);
    checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checkpoint_failing = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                if let Err(e) = store.checkpoint().await {
                    tracing::warn!(error = %e, "final checkpoint failed");
                }
                return;
            }
            _ = checkpoint_tick.tick() => {
                // Logged when it starts failing and when it works again, not twice a second.
                match store.checkpoint().await {
                    Err(e) if !checkpoint_failing => {
                        checkpoint_failing = true;
                        tracing::warn!(error = %e, "WAL checkpoint failed; commits go on into the WAL, retrying");
                    }
                    Ok(()) if checkpoint_failing => {
                        checkpoint_failing = false;
                        tracing::info!("WAL checkpoint works again");
                    }
                    _ => {}
                }
            }
            _ = sweep_tick.tick() => {
                let cutoff = domain::now_ms() - presence_timeout.as_millis() as i64;
                match store.presence_sweep(cutoff).await {
                    Ok(ids) if !ids.is_empty() => {
                        metrics.presence_timeouts.inc_by(ids.len() as u64);
                        tracing::info!(devices = ?ids, "marked offline after silence");
                    }
                    Err(StoreError::WriterGone) => return,
                    Err(StoreError::Failing(_) | StoreError::WriterBusy(_)) => {}
                    Err(e) => tracing::warn!(error = %e, "presence sweep failed; will retry"),
                    _ => {}
                }
            }
        }
    }
}

/// Retention on its timer until cancelled.
async fn run_retention(
    store: Store,
    storage: StorageConfig,
    metrics: std::sync::Arc<crate::observability::Metrics>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(storage.retention_interval);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                if !retention_pass(&store, &storage, &metrics, &cancel).await {
                    return;
                }
            }
        }
    }
}

/// One retention pass: readings and events, then each rollup tier; false once the writer
/// is gone.
async fn retention_pass(
    store: &Store,
    storage: &StorageConfig,
    metrics: &crate::observability::Metrics,
    cancel: &tokio_util::sync::CancellationToken,
) -> bool {
    let retention = storage.retention;
    let events_retention = storage.events_retention();
    let rollup_retention = [
        (super::rollup::TIERS[0], storage.retention_1m),
        (super::rollup::TIERS[1], storage.retention_1h),
    ];
    let now = domain::now_ms();
    let cutoff = now - retention.as_millis() as i64;
    let events_cutoff = now - events_retention.as_millis() as i64;
    // In calls of at most RETENTION_PER_CALL rows, so that readings are
    // committed between them even when a long downtime left millions due, and
    // at most a quarter of the time: deletes slow the commits beside them too.
    let mut deleted = 0;
    loop {
        let started = std::time::Instant::now();
        match store.retention(cutoff, events_cutoff).await {
            Ok(n) => {
                deleted += n;
                metrics.retention_deleted.inc_by(n);
                if n < RETENTION_PER_CALL || cancel.is_cancelled() {
                    break;
                }
                let pause = started.elapsed() * RETENTION_PAUSE_FACTOR;
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = cancel.cancelled() => break,
                }
            }
            Err(StoreError::WriterGone) => return false,
            // The writer already reports the fault (log, /readyz): no line per tick.
            Err(StoreError::Failing(_) | StoreError::WriterBusy(_)) => break,
            Err(e) => {
                tracing::warn!(error = %e, "retention failed; will retry");
                break;
            }
        }
    }
    if deleted > 0 {
        tracing::info!(deleted, "retention removed old readings and events");
    }
    for (tier, keep) in rollup_retention {
        let Some(keep) = keep else { continue };
        let cutoff = now - keep.as_millis() as i64;
        let mut deleted = 0;
        let mut after = String::new();
        loop {
            match store.rollup_retention(tier, cutoff, &after).await {
                Ok(sweep) => {
                    deleted += sweep.deleted;
                    match sweep.next {
                        Some(next) if !cancel.is_cancelled() => after = next,
                        _ => break,
                    }
                }
                Err(StoreError::WriterGone) => return false,
                Err(StoreError::Failing(_) | StoreError::WriterBusy(_)) => break,
                Err(e) => {
                    tracing::warn!(error = %e, tier, "rollup retention failed; will retry");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, tier_ms = tier, "retention removed old rollups");
        }
    }
    true
}
