//! The tail: this instance's reader of the shared log. Every event any instance commits
//! reaches this instance's live feed (and its command service) through here, in seq order.
//!
//! It is woken by LISTEN/NOTIFY (and at once by this instance's own commits), and polls
//! every [`POLL`] besides, because a notification sent while the listener reconnects is
//! lost. Reading `seq > last seen` is exact: the append lock makes ids visible in commit
//! order (see the module above), so no id can appear later below one already read.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::{CHANNEL, PgStore};
use crate::feed::Kinds;
use crate::observability::Metrics;
use crate::store::writer::Committed;

/// The longest a committed event waits for this tail when a notification was lost.
const POLL: Duration = Duration::from_millis(200);
/// Entries read per query.
const PAGE: i64 = 5_000;
/// How long to wait before connecting the listener again after it failed.
const RELISTEN: Duration = Duration::from_secs(1);

/// Whether a notification announces a commit past `seen` (its payload is the commit's last
/// seq; one that cannot be read is taken as new).
fn newer(n: &sqlx::postgres::PgNotification, seen: i64) -> bool {
    n.payload().parse::<i64>().map_or(true, |last| last > seen)
}

/// Where this instance's tail stands.
pub(super) struct Tail {
    store: PgStore,
    /// The last seq published to the feed.
    seen: i64,
}

impl Tail {
    /// A tail that starts after `head`: older events are replayed from storage on request.
    pub(super) fn new(store: PgStore, head: i64) -> Tail {
        Tail { store, seen: head }
    }

    /// The last seq published (or the head it started after).
    pub(super) fn seen(&self) -> i64 {
        self.seen
    }

    /// Follows the log until cancelled.
    pub(super) async fn run(
        mut self,
        committed: Arc<Committed>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let _ = committed.last_seq.send(self.seen);
        metrics.tail_seen.store(self.seen, Ordering::Relaxed);
        metrics.tail_head.store(self.seen, Ordering::Relaxed);
        let mut listener: Option<PgListener> = None;
        let mut relisten_at = tokio::time::Instant::now();
        let mut failing = false;
        // Whether the log may hold something past `seen`.
        let mut due = true;
        loop {
            if listener.is_none() && tokio::time::Instant::now() >= relisten_at {
                match self.listen().await {
                    Ok(l) => {
                        listener = Some(l);
                        // What committed before the LISTEN was not notified to us.
                        due = true;
                    }
                    Err(e) => {
                        relisten_at = tokio::time::Instant::now() + RELISTEN;
                        tracing::debug!(error = %e, "cannot LISTEN on the log channel; polling meanwhile");
                    }
                }
            }
            let result = if due {
                self.catch_up(&committed, &metrics).await
            } else {
                Ok(())
            };
            due = result.is_err();
            match result {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("reading the shared log works again");
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot read the shared log; retrying");
                }
                _ => {}
            }
            let seen = self.seen;
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.try_recv().await.map(|n| n.map(|n| newer(&n, seen))),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.store.wake.notified() => due = true,
                r = notified => match r {
                    Ok(Some(newer_commit)) => {
                        // One read covers every commit notified so far; a commit already
                        // read (our own, after the wake-up) needs none.
                        due |= newer_commit;
                        if let Some(l) = listener.as_mut() {
                            while let Some(n) = l.next_buffered() {
                                due |= newer(&n, seen);
                            }
                        }
                    }
                    // The connection dropped: notifications meanwhile are lost, so read.
                    _ => {
                        listener = None;
                        due = true;
                    }
                },
                _ = tokio::time::sleep(POLL) => {
                    due = true;
                    if let Ok(head) = self.store.head().await {
                        metrics.tail_head.store(head, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    async fn listen(&self) -> Result<PgListener, sqlx::Error> {
        let mut l = PgListener::connect_with(&self.store.pool).await?;
        l.listen(CHANNEL).await?;
        Ok(l)
    }

    /// Publishes everything committed after `seen`, a page at a time.
    async fn catch_up(
        &mut self,
        committed: &Committed,
        metrics: &Metrics,
    ) -> Result<(), crate::store::StoreError> {
        loop {
            let entries = self.store.replay(self.seen, None, Kinds::ALL, PAGE).await?;
            let Some(last) = entries.last().map(|e| e.seq()) else {
                return Ok(());
            };
            committed.publish_entries(&entries);
            self.seen = last;
            metrics.tail_seen.store(last, Ordering::Relaxed);
            metrics.tail_head.fetch_max(last, Ordering::Relaxed);
            if (entries.len() as i64) < PAGE {
                return Ok(());
            }
        }
    }
}
