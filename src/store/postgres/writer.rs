//! This instance's writer on PostgreSQL: it commits the readings its own MQTT session
//! receives, in batches, under the append lock (see the module above), and only then
//! acknowledges them. What it commits reaches the live feed through the tail, like what
//! every other instance commits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions as _, Connection as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{PgStore, insert_events, lock_append, move_head};
use crate::domain::DeviceId;
use crate::ingest::{AckSink, Item};
use crate::observability::Metrics;
use crate::store::dedupe;
use crate::store::health::{FaultKind, Health};
use crate::store::rollup::{self, RollupRow};
use crate::store::writer::{self, Backend, Commit, Committed, Entry, WriterConfig};
use crate::store::{Control, StoreError};

/// How long closing a failed connection may take before it is left to close on its own.
const CLOSE_DEADLINE: Duration = Duration::from_secs(1);
/// How long a batch's transaction (waiting for the append lock included) or a connection
/// may take before the connection is given up as dead and the batch retried.
const COMMIT_DEADLINE: Duration = Duration::from_secs(30);

/// The error for a server that did not answer within `COMMIT_DEADLINE`.
fn no_answer() -> StoreError {
    StoreError::Query(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("PostgreSQL did not answer within {COMMIT_DEADLINE:?}"),
    )))
}

/// The batch writer and the tail of one instance.
pub struct Writer {
    batches: Batches,
    tail: super::tail::Tail,
    /// Where the tail runs: the runtime that opened storage (the HTTP side's), not the
    /// ingest thread, whose batches hold the cluster-wide append lock.
    tail_runtime: tokio::runtime::Handle,
}

impl Writer {
    pub(super) fn new(
        opts: PgConnectOptions,
        store: PgStore,
        health: Arc<Health>,
        head: i64,
    ) -> Writer {
        Writer {
            batches: Batches {
                opts,
                conn: None,
                store: store.clone(),
                health,
                seen_written: HashMap::new(),
                committing: None,
            },
            tail: super::tail::Tail::new(store, head),
            tail_runtime: tokio::runtime::Handle::current(),
        }
    }

    /// The head when this instance opened the database.
    pub fn head(&self) -> i64 {
        self.tail.seen()
    }

    /// Runs the batch writer and the tail until shutdown (see [`crate::store::Writer::run`]).
    pub async fn run(
        self,
        cfg: WriterConfig,
        items: mpsc::Receiver<Item>,
        acks: Box<dyn AckSink>,
        metrics: Arc<Metrics>,
        committed: Committed,
        shutdown: CancellationToken,
    ) -> Result<(), StoreError> {
        let committed = Arc::new(committed);
        let tail = self.tail_runtime.spawn(self.tail.run(
            committed.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let result = writer::run(
            self.batches,
            cfg,
            items,
            acks,
            metrics,
            &committed,
            shutdown,
        )
        .await;
        if let Err(e) = tail.await {
            tracing::error!(error = %e, "the log tail task failed");
        }
        result
    }
}

/// The batch side: its own connection (not the pool's, so a batch never waits for one).
struct Batches {
    opts: PgConnectOptions,
    /// `None` after a failure: the connection is dropped (rolling back what a failed
    /// statement left open) and a fresh one opened for the retry.
    conn: Option<PgConnection>,
    store: PgStore,
    health: Arc<Health>,
    /// `last_seen` as this instance last wrote it, per device.
    seen_written: HashMap<Arc<str>, i64>,
    /// A batch whose COMMIT was sent without an answer yet, and how to recognise it.
    committing: Option<(Probe, Commit)>,
}

impl Batches {
    async fn take_conn(&mut self) -> Result<PgConnection, StoreError> {
        match self.conn.take() {
            Some(c) => Ok(c),
            None => tokio::time::timeout(COMMIT_DEADLINE, self.opts.connect())
                .await
                .map_err(|_| no_answer())?
                .map_err(StoreError::from),
        }
    }

    async fn put_back(&mut self, conn: PgConnection, ok: bool) {
        if ok {
            self.conn = Some(conn);
        } else if tokio::time::timeout(CLOSE_DEADLINE, conn.close())
            .await
            .is_err()
        {
            tracing::warn!("closing the failed writer connection timed out; opening another");
        }
    }

    /// One transaction: the append lock, presence as stored, then every row of the batch
    /// with seqs from the head, the head moved past them and a notification.
    async fn commit_on(
        &mut self,
        conn: &mut PgConnection,
        batch: &[Item],
    ) -> Result<Commit, StoreError> {
        let mut tx = conn.begin().await?;
        let next = lock_append(&mut tx).await?;
        let ids: Vec<String> = batch_devices(batch);
        let stored = PgStore::presence(&mut tx, ids).await?;
        // Under the append lock: a copy that another instance is storing now is seen.
        let copies = stored_copies(&mut tx, batch).await?;
        let repeats = dedupe::repeats(batch, |r, _| {
            copies
                .get(r.device.as_str())
                .and_then(|by_ts| by_ts.get(&r.ts))
                .is_some_and(|ps| ps.iter().any(|p| p[..] == r.payload[..]))
        });
        let mut p = writer::plan(
            batch,
            &repeats,
            next,
            |d| stored.get(d).copied(),
            &self.seen_written,
        );
        if p.is_empty() {
            tx.rollback().await?;
            return Ok(Commit {
                last_seq: next - 1,
                repeated: p.repeated,
                ..Commit::default()
            });
        }
        if !p.readings.is_empty() {
            let n = p.readings.len();
            let (mut seq, mut device, mut topic, mut ts, mut received, mut payload, mut flags) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for (r, s) in &p.readings {
                seq.push(*s);
                device.push(r.device.as_str());
                topic.push(&*r.topic);
                ts.push(r.ts);
                received.push(r.received_at);
                payload.push(&r.payload[..]);
                flags.push(r.flags);
            }
            sqlx::query(
                "INSERT INTO readings (seq, device, topic, ts, received_at, payload, flags) \
                 SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], \
                 $5::bigint[], $6::bytea[], $7::bigint[])",
            )
            .bind(seq)
            .bind(device)
            .bind(topic)
            .bind(ts)
            .bind(received)
            .bind(payload)
            .bind(flags)
            .execute(&mut *tx)
            .await?;
            upsert_rollups(&mut tx, &rollup::of_batch(&p.readings)).await?;
        }
        if !p.devices.is_empty() {
            let mut ids = Vec::new();
            let mut first = Vec::new();
            let mut last = Vec::new();
            let mut online = Vec::new();
            let mut at = Vec::new();
            for (d, c) in &p.devices {
                ids.push(d.as_str());
                first.push(c.first);
                last.push(c.last);
                online.push(c.online.unwrap_or(true));
                at.push(c.presence_at);
            }
            // Sorted by id, so that two instances' upserts never lock rows in opposite
            // orders (they are serialized by the append lock anyway).
            sqlx::query(
                "INSERT INTO devices (id, first_seen, last_seen, online, status_at) \
                 SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::boolean[], $5::bigint[]) \
                 ORDER BY 1 \
                 ON CONFLICT (id) DO UPDATE SET \
                 last_seen = GREATEST(devices.last_seen, excluded.last_seen), \
                 status_at = CASE WHEN excluded.online <> devices.online THEN excluded.status_at \
                 ELSE devices.status_at END, \
                 online = excluded.online",
            )
            .bind(ids)
            .bind(first)
            .bind(last)
            .bind(online)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        let mut unknown_acks = Vec::new();
        for (ack, ack_seq, slot) in std::mem::take(&mut p.acks) {
            // Only a sent command can be answered; anything else is an unknown or late ack.
            let sent_at: Option<Option<i64>> = sqlx::query_scalar(
                "UPDATE commands SET status = $1, finished_at = $2, result = $3, error = $4 \
                 WHERE id = $5 AND device = $6 AND status = 'sent' RETURNING sent_at",
            )
            .bind(writer::ack_status(ack))
            .bind(ack.at)
            .bind(ack.result.as_deref())
            .bind(ack.error.as_deref())
            .bind(&ack.id)
            .bind(ack.device.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            p.answered(ack, ack_seq, slot, sent_at, &mut unknown_acks);
        }
        insert_events(&mut tx, &p.plan.events).await?;
        // Unused seqs (unknown acks) may be skipped: ids need order, not density.
        move_head(&mut tx, p.next_seq - 1).await?;
        let probe = Probe::of(batch, &p.plan);
        let seen: Vec<(Arc<str>, i64)> = p
            .devices
            .iter()
            .map(|(d, c)| (d.shared(), c.last))
            .collect();
        p.finish();
        let commit = Commit {
            readings: p.readings.len() as u64,
            presence: p.presence,
            repeated: p.repeated,
            last_seq: p.next_seq - 1,
            plan: p.plan,
            unknown_acks,
        };
        // Kept until COMMIT answers: if the answer is lost, the batch may be stored, and
        // storing it again would duplicate it (see `Backend::commit`).
        let unprobed = match probe {
            Some(probe) => {
                self.committing = Some((probe, commit));
                None
            }
            None => Some(commit),
        };
        tx.commit().await?;
        self.seen_written.extend(seen);
        unprobed
            .or_else(|| self.committing.take().map(|(_, c)| c))
            .ok_or_else(|| StoreError::Failing("a committed batch went missing".into()))
    }

    /// Whether the batch whose COMMIT got no answer was stored after all: its first row is
    /// in the log, exactly as planned (another instance would have taken that seq for
    /// rows of its own if it was not).
    async fn landed(&mut self, probe: &Probe) -> Result<bool, StoreError> {
        let mut conn = self.take_conn().await?;
        let r = match probe {
            Probe::Reading {
                seq,
                device,
                topic,
                received_at,
            } => {
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM readings WHERE seq = $1 AND device = $2 \
                     AND topic = $3 AND received_at = $4)",
                )
                .bind(seq)
                .bind(device)
                .bind(topic)
                .bind(received_at)
                .fetch_one(&mut conn)
                .await
            }
            Probe::Event { seq, data } => {
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM events WHERE seq = $1 AND data = $2)",
                )
                .bind(seq)
                .bind(data)
                .fetch_one(&mut conn)
                .await
            }
        };
        self.put_back(conn, r.is_ok()).await;
        Ok(r?)
    }
}

/// The first row of a batch, to tell afterwards whether its transaction committed.
#[derive(Debug)]
enum Probe {
    Reading {
        seq: i64,
        device: String,
        topic: String,
        received_at: i64,
    },
    Event {
        seq: i64,
        data: String,
    },
}

impl Probe {
    /// The probe of a planned batch: its first reading or event (none when it only
    /// touches device rows, which a second try rewrites the same way).
    fn of(batch: &[Item], plan: &writer::Plan) -> Option<Probe> {
        plan.order.iter().find_map(|e| match *e {
            Entry::Reading(i, seq) => match batch.get(i) {
                Some(Item::Reading(r, _)) => Some(Probe::Reading {
                    seq,
                    device: r.device.to_string(),
                    topic: r.topic.to_string(),
                    received_at: r.received_at,
                }),
                _ => None,
            },
            Entry::Event(i) => plan.events.get(i).map(|ev| Probe::Event {
                seq: ev.seq,
                data: ev.data.clone(),
            }),
        })
    }
}

/// Payloads of stored readings, by device, then device time.
type Copies = HashMap<String, HashMap<i64, Vec<Vec<u8>>>>;

/// Stored readings with the device and device time of one of the batch's: their payloads,
/// to tell a redelivered reading from a new one.
async fn stored_copies(conn: &mut PgConnection, batch: &[Item]) -> Result<Copies, StoreError> {
    let (mut devices, mut ts) = (Vec::new(), Vec::new());
    for item in batch {
        if let Item::Reading(r, _) = item {
            devices.push(r.device.as_str());
            ts.push(r.ts);
        }
    }
    let mut out = Copies::new();
    if devices.is_empty() {
        return Ok(out);
    }
    let rows: Vec<(String, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT device, ts, payload FROM readings \
         WHERE (device, ts) IN (SELECT * FROM UNNEST($1::text[], $2::bigint[]))",
    )
    .bind(devices)
    .bind(ts)
    .fetch_all(&mut *conn)
    .await?;
    for (device, ts, payload) in rows {
        out.entry(device)
            .or_default()
            .entry(ts)
            .or_default()
            .push(payload);
    }
    Ok(out)
}

/// Merges rollup rows into `rollups` inside the caller's transaction (see the SQLite
/// writer's upsert: the same arithmetic).
pub(super) async fn upsert_rollups(
    conn: &mut PgConnection,
    rows: &[RollupRow],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&RollupRow) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
    let fcol = |f: fn(&RollupRow) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    sqlx::query(
        "INSERT INTO rollups (device, tier, bucket, field, n, total, lo, hi, first_v, first_ts, \
         last_v, last_ts, seq_lo, seq_hi) \
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], \
         $6::float8[], $7::float8[], $8::float8[], $9::float8[], $10::bigint[], $11::float8[], \
         $12::bigint[], $13::bigint[], $14::bigint[]) \
         ON CONFLICT (device, tier, bucket, field) DO UPDATE SET \
         n = rollups.n + excluded.n, total = rollups.total + excluded.total, \
         lo = LEAST(rollups.lo, excluded.lo), hi = GREATEST(rollups.hi, excluded.hi), \
         first_v = CASE WHEN excluded.first_ts < rollups.first_ts THEN excluded.first_v ELSE rollups.first_v END, \
         first_ts = LEAST(rollups.first_ts, excluded.first_ts), \
         last_v = CASE WHEN excluded.last_ts >= rollups.last_ts THEN excluded.last_v ELSE rollups.last_v END, \
         last_ts = GREATEST(rollups.last_ts, excluded.last_ts), \
         seq_lo = LEAST(rollups.seq_lo, excluded.seq_lo), seq_hi = GREATEST(rollups.seq_hi, excluded.seq_hi)",
    )
    .bind(rows.iter().map(|r| &*r.device).collect::<Vec<&str>>())
    .bind(col(|r| r.tier))
    .bind(col(|r| r.bucket))
    .bind(rows.iter().map(|r| r.field.as_str()).collect::<Vec<&str>>())
    .bind(col(|r| r.stats.count))
    .bind(fcol(|r| r.stats.sum))
    .bind(fcol(|r| r.stats.min))
    .bind(fcol(|r| r.stats.max))
    .bind(fcol(|r| r.stats.first))
    .bind(col(|r| r.stats.first_ts))
    .bind(fcol(|r| r.stats.last))
    .bind(col(|r| r.stats.last_ts))
    .bind(rows.iter().map(|r| r.seqs.map(|s| s.0)).collect::<Vec<Option<i64>>>())
    .bind(rows.iter().map(|r| r.seqs.map(|s| s.1)).collect::<Vec<Option<i64>>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The distinct devices a batch concerns.
fn batch_devices(batch: &[Item]) -> Vec<String> {
    let mut ids: Vec<&DeviceId> = batch
        .iter()
        .filter_map(|i| match i {
            Item::Reading(r, _) => Some(&r.device),
            Item::Presence { device, .. } => Some(device),
            Item::CommandAck(a) => Some(&a.device),
            Item::Skip(_) => None,
        })
        .collect();
    ids.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    ids.dedup_by(|a, b| a.as_str() == b.as_str());
    ids.into_iter().map(|d| d.to_string()).collect()
}

impl Backend for Batches {
    async fn commit(&mut self, batch: &[Item]) -> Result<Commit, StoreError> {
        // The last try's COMMIT got no answer (connection lost, deadline): find out first
        // whether it was stored, rather than store it twice.
        if let Some((probe, commit)) = self.committing.take() {
            match tokio::time::timeout(COMMIT_DEADLINE, self.landed(&probe)).await {
                Ok(Ok(true)) => {
                    tracing::warn!(
                        "a batch whose COMMIT got no answer was stored: not storing it again"
                    );
                    return Ok(commit);
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    self.committing = Some((probe, commit));
                    return Err(e);
                }
                Err(_) => {
                    self.conn = None;
                    self.committing = Some((probe, commit));
                    return Err(no_answer());
                }
            }
        }
        let mut conn = self.take_conn().await?;
        match tokio::time::timeout(COMMIT_DEADLINE, self.commit_on(&mut conn, batch)).await {
            Ok(r) => {
                self.put_back(conn, r.is_ok()).await;
                r
            }
            // A half-open connection would wait forever: dropped, and the batch retried.
            Err(_) => Err(no_answer()),
        }
    }

    fn publish(&self, _committed: &Committed, _batch: &[Item], _commit: &Commit) {
        // Every instance's feed is fed by its tail, in the shared log's order.
        self.store.committed();
    }

    fn fault_kind(&self, e: &StoreError) -> FaultKind {
        match e {
            StoreError::Query(q) => crate::store::health::classify_postgres(q),
            _ => FaultKind::Error,
        }
    }

    fn health(&self) -> &Arc<Health> {
        &self.health
    }

    fn start_seq(&self) -> Option<i64> {
        None
    }

    fn controls(&mut self) -> Option<&mut mpsc::Receiver<Control>> {
        None
    }

    async fn control(&mut self, _ctl: Control, _committed: &Committed) {}

    async fn after_batch(&mut self, _metrics: &Metrics, _committed: &Committed) {}

    async fn probe(&mut self) {
        let ok = match self.take_conn().await {
            Ok(mut conn) => {
                let r = sqlx::query("SELECT 1").execute(&mut conn).await;
                let ok = r.is_ok();
                self.put_back(conn, ok).await;
                ok
            }
            Err(_) => false,
        };
        if ok {
            self.health.committed(0);
        }
    }

    async fn close(&mut self) {
        if let Some(conn) = self.conn.take()
            && let Err(e) = conn.close().await
        {
            tracing::warn!(error = %e, "closing the writer connection failed");
        }
    }
}
