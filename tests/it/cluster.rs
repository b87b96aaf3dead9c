//! Several instances on one broker and one PostgreSQL database: each with its own client id,
//! all in one MQTT shared-subscription group. Ingest is split and stored exactly once, every
//! instance streams the whole log in one order, a kill -9 loses nothing the broker
//! acknowledged, SSE clients move between instances with Last-Event-ID, commands and their
//! answers cross instances, timers fire once, sessions are valid everywhere, and an append
//! held open by another writer is never overtaken.
//!
//! These always use PostgreSQL, so they run only in the PostgreSQL pass of `scripts/test`
//! (`TELEBRIDGE_TEST_BACKEND=postgres`); in the SQLite pass they return at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::{Value, json};
use sqlx::Connection as _;

use crate::pg::{self, PgDb};
use crate::support::{
    Backend, Daemon, Db, FakeDevice, Mosquitto, Publisher, SseClient, SseEvent, Ws, backend,
    reading, wait_for,
};

const T: Duration = Duration::from_secs(20);

/// The append lock of the log (migrations/postgres, the append protocol).
const APPEND_LOCK: i64 = 0x7465_6c65_6272_6467;

/// True (with a visible line) in the SQLite pass: these tests run in the PostgreSQL one.
fn skip() -> bool {
    if backend() == Backend::Postgres {
        return false;
    }
    eprintln!(
        "skipped: the cluster tests run in the PostgreSQL pass (TELEBRIDGE_TEST_BACKEND=postgres)"
    );
    true
}

/// Instances `tb-a`, `tb-b`, ... on one Mosquitto and one fresh database.
struct Cluster {
    // Dropped in this order: the daemons first, then the database and the broker.
    daemons: Vec<Daemon>,
    /// Each daemon's MQTT client id, its name on /metrics.
    ids: Vec<String>,
    pg: PgDb,
    broker: Mosquitto,
}

fn instance_config(pg: &PgDb, client_id: &str, extra: &str) -> String {
    format!(
        "[mqtt]\nclient_id = \"{client_id}\"\nshared_group = \"tb\"\n[storage]\nurl = \"{}\"\n{extra}",
        pg.url
    )
}

impl Cluster {
    /// Starts `n` instances one after the other, each ready before the next starts.
    async fn start(n: usize, extra: &str) -> Cluster {
        let broker = Mosquitto::start().await;
        let pg = pg::database().await;
        let ids: Vec<String> = (0..n)
            .map(|i| format!("tb-{}", (b'a' + i as u8) as char))
            .collect();
        let mut daemons = Vec::new();
        for id in &ids {
            daemons.push(Daemon::start(&broker.url(), &instance_config(&pg, id, extra)).await);
        }
        Cluster {
            daemons,
            ids,
            pg,
            broker,
        }
    }

    /// Starts `n` instances at the same moment on the empty database.
    async fn start_together(n: usize, extra: &str) -> Cluster {
        let broker = Mosquitto::start().await;
        let pg = pg::database().await;
        let ids: Vec<String> = (0..n)
            .map(|i| format!("tb-{}", (b'a' + i as u8) as char))
            .collect();
        let url = broker.url();
        let configs: Vec<String> = ids
            .iter()
            .map(|id| instance_config(&pg, id, extra))
            .collect();
        let daemons =
            futures_util::future::join_all(configs.iter().map(|c| Daemon::start(&url, c))).await;
        Cluster {
            daemons,
            ids,
            pg,
            broker,
        }
    }

    fn url(&self) -> String {
        self.broker.url()
    }

    async fn db(&self) -> Db {
        Db::postgres(&self.pg.url).await
    }
}

/// The event's id as a number.
fn id(e: &SseEvent) -> i64 {
    e.id.as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("event without a numeric id: {e:?}"))
}

/// Every seq of the log (readings and events) above `after`, in order.
async fn log_seqs(db: &Db, after: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT seq FROM readings WHERE seq > $1 UNION ALL SELECT seq FROM events WHERE seq > $1 ORDER BY 1",
    )
    .bind(after)
    .fetch_all(db.pg())
    .await
    .expect("log seqs")
}

async fn log_head(db: &Db) -> i64 {
    sqlx::query_scalar("SELECT last FROM log_head")
        .fetch_one(db.pg())
        .await
        .expect("log_head")
}

/// Publishes readings `from..to` over `devices` devices `{prefix}{n % devices}`, QoS 1.
async fn publish_range(p: &Publisher, prefix: &str, devices: i64, from: i64, to: i64) {
    for n in from..to {
        p.publish(
            &format!("devices/{prefix}{}/telemetry", n % devices),
            QoS::AtLeastOnce,
            false,
            reading(n),
        )
        .await;
    }
}

/// Waits until every number in `0..n` is stored (duplicates allowed) and the count has not
/// moved for half a second (redeliveries done); returns the numbers in seq order.
async fn wait_all_stored(db: &Db, n: i64, timeout: Duration) -> Vec<i64> {
    let numbers = wait_for(timeout, &format!("readings 0..{n} stored"), || async {
        let numbers = db.numbers().await;
        let distinct: BTreeSet<i64> = numbers.iter().copied().collect();
        ((0..n).all(|i| distinct.contains(&i))).then_some(numbers)
    })
    .await;
    let mut last = numbers.len();
    let deadline = Instant::now() + timeout;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = db.count().await as usize;
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    db.numbers().await
}

/// Every event of `client` until one with id `last` (inclusive); panics after `timeout`.
async fn events_through(client: &mut SseClient, last: i64, timeout: Duration) -> Vec<SseEvent> {
    let deadline = Instant::now() + timeout;
    let mut out: Vec<SseEvent> = Vec::new();
    while out.last().map(id) != Some(last) {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next(left).await {
            Some(e) if e.id.is_some() => {
                let done = id(&e) >= last;
                out.push(e);
                if done {
                    break;
                }
            }
            Some(_) => {}
            None => panic!(
                "got {} events, the last {:?}, not up to id {last} (ended: {})",
                out.len(),
                out.last().map(id),
                client.ended
            ),
        }
    }
    out
}

/// The value of the sample `name{...}` whose labels include each of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (lbl, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|want| lbl.split(',').any(|have| have == *want))
            .then(|| value.trim().parse().ok())?
    })
}

async fn metrics(d: &Daemon) -> String {
    d.get("/metrics").await.text().await.expect("metrics")
}

#[tokio::test]
async fn readings_published_to_the_group_are_stored_once_and_every_instance_streams_all_in_one_order()
 {
    if skip() {
        return;
    }
    // Arrange
    let c = Cluster::start(3, "").await;
    let mut streams = Vec::new();
    for d in &c.daemons {
        streams.push(SseClient::connect(d.http, "/events?type=reading", None).await);
    }
    let publisher = Publisher::connect(&c.url(), "cl-pub").await;
    const N: i64 = 3000;

    // Act: 3,000 readings over 30 devices, QoS 1, to the group.
    publish_range(&publisher, "c", 30, 0, N).await;
    publisher.wait_acked(N as u64, T).await;

    // Assert: stored exactly once ...
    let db = c.db().await;
    let numbers = wait_all_stored(&db, N, T).await;
    let mut sorted = numbers.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..N).collect::<Vec<_>>(),
        "every reading stored exactly once ({} rows)",
        numbers.len()
    );
    // ... by every instance a part (the group splits the ingest) ...
    let mut stored = Vec::new();
    for d in &c.daemons {
        stored.push(d.metric("telebridge_readings_stored_total").await);
    }
    assert_eq!(
        stored.iter().sum::<f64>(),
        N as f64,
        "stored per instance: {stored:?}"
    );
    assert!(
        stored.iter().all(|s| *s > 0.0),
        "each instance of the group stores some: {stored:?}"
    );
    // ... and each instance streams all of them, in seq order, the same sequence.
    let seqs: Vec<i64> = db.rows().await.iter().map(|r| r.seq).collect();
    let seen = futures_util::future::join_all(
        streams.iter_mut().map(|s| s.take("reading", N as usize, T)),
    )
    .await;
    for (events, name) in seen.iter().zip(&c.ids) {
        let ids: Vec<i64> = events.iter().map(id).collect();
        assert!(
            ids == seqs,
            "{name} streams every stored reading in seq order: {} ids, first differing at {:?}",
            ids.len(),
            ids.iter().zip(&seqs).position(|(a, b)| a != b)
        );
        let ns: Vec<i64> = events.iter().map(|e| e.n()).collect();
        assert_eq!(ns, numbers, "{name}: the payloads are the stored ones");
    }
}

#[tokio::test]
async fn kill_9_of_one_instance_mid_burst_then_a_restart_under_its_client_id_loses_nothing_acknowledged()
 {
    if skip() {
        return;
    }
    // Arrange
    let mut c = Cluster::start(3, "").await;
    let publisher = Arc::new(Publisher::connect(&c.url(), "kill-pub").await);
    const N: i64 = 6000;

    // Act: a QoS 1 burst; tb-b is killed while the instances are a quarter of the way
    // through storing it, and restarted a second later.
    let db = c.db().await;
    let burst = {
        let p = publisher.clone();
        tokio::spawn(async move { publish_range(&p, "k", 30, 0, N).await })
    };
    wait_for(T, "a quarter of the burst stored", || async {
        (db.count().await >= N / 4).then_some(())
    })
    .await;
    c.daemons[1].kill9();
    let acked_at_kill = publisher.acked();
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.daemons[1].spawn().await;
    burst.await.expect("burst");
    publisher.wait_acked(N as u64, T).await;

    // Assert: every acknowledged message is stored (a redelivery may store one twice).
    let numbers = wait_all_stored(&db, N, Duration::from_secs(30)).await;
    let distinct: BTreeSet<i64> = numbers.iter().copied().collect();
    let missing: Vec<i64> = (0..N).filter(|n| !distinct.contains(n)).take(10).collect();
    assert!(missing.is_empty(), "missing, for example {missing:?}");
    let dups = numbers.len() - distinct.len();
    eprintln!(
        "kill -9 at {acked_at_kill} acknowledged: {} rows for {N} readings ({dups} stored twice)",
        numbers.len()
    );
    assert!(dups < N as usize / 2, "{dups} stored twice");
    let seqs: Vec<i64> = db.rows().await.iter().map(|r| r.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs strictly increasing"
    );
}

#[tokio::test]
async fn an_sse_client_of_a_killed_instance_resumes_on_another_with_no_gap_and_no_duplicate() {
    if skip() {
        return;
    }
    // Arrange: readings flowing while a client reads them from tb-a.
    let mut c = Cluster::start(3, "").await;
    let publisher = Arc::new(Publisher::connect(&c.url(), "resume-pub").await);
    const N: i64 = 1500;
    let path = "/events?type=reading";
    let mut client = SseClient::connect(c.daemons[0].http, path, None).await;
    let flow = {
        let p = publisher.clone();
        tokio::spawn(async move {
            for chunk in 0..N / 50 {
                publish_range(&p, "r", 10, chunk * 50, (chunk + 1) * 50).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut seen = client.take("reading", 300, T).await;

    // Act: tb-a dies; the client reconnects to tb-b with the last id it had.
    c.daemons[0].kill9();
    while let Some(e) = client.next(Duration::from_secs(5)).await {
        if e.event == "reading" {
            seen.push(e);
        }
    }
    assert!(client.ended, "the stream of a killed instance ends");
    let last = client.last_id.clone().expect("an id was seen");
    let mut resumed = SseClient::connect(c.daemons[1].http, path, Some(&last)).await;
    // tb-a comes back for its unacknowledged messages (its persistent session has them).
    c.daemons[0].spawn().await;
    flow.await.expect("flow");
    publisher.wait_acked(N as u64, T).await;
    let db = c.db().await;
    wait_all_stored(&db, N, T).await;
    let seqs: Vec<i64> = db.rows().await.iter().map(|r| r.seq).collect();
    let after: Vec<SseEvent> = events_through(&mut resumed, *seqs.last().expect("rows"), T)
        .await
        .into_iter()
        .filter(|e| e.event == "reading")
        .collect();

    // Assert: before and after the move, every stored reading once, in order.
    let before = seen.len();
    let ids: Vec<i64> = seen.iter().chain(&after).map(id).collect();
    assert_eq!(
        after.first().map(id),
        seqs.iter()
            .copied()
            .find(|s| *s > last.parse::<i64>().expect("id")),
        "the resumed stream starts right after Last-Event-ID {last}"
    );
    assert!(
        ids == seqs,
        "{before} readings on tb-a, {} on tb-b: {} ids for {} stored, first differing at {:?}",
        after.len(),
        ids.len(),
        seqs.len(),
        ids.iter().zip(&seqs).position(|(a, b)| a != b)
    );
}

#[tokio::test]
async fn a_command_sent_on_one_instance_gets_its_ack_there_whichever_instance_takes_the_answer() {
    if skip() {
        return;
    }
    // Arrange
    let c = Cluster::start(3, "").await;
    let mut device = FakeDevice::connect(&c.url(), "cx-1", "devices/cx-1/commands").await;
    let mut ws = Ws::connect(c.daemons[0].http).await;

    // Act: six commands, one after the other; the group spreads the answers over instances.
    let mut ids = Vec::new();
    for i in 0..6 {
        ws.send_json(
            json!({"type": "command", "device": "cx-1", "name": "ping", "ref": format!("r{i}")}),
        )
        .await;
        let accepted = ws.expect("accepted", T).await;
        assert_eq!(accepted["status"], "sent", "{accepted}");
        let id = accepted["id"].as_str().expect("id").to_owned();
        let cmd = device.next_command(T).await.expect("the device gets it");
        assert_eq!(cmd["id"], id.as_str());
        device
            .answer(json!({"id": id, "ok": true, "result": {"i": i}}))
            .await;

        // Assert: the ack reaches the WebSocket on tb-a.
        let ack = ws.expect("ack", T).await;
        assert_eq!(ack["id"], id.as_str(), "{ack}");
        assert_eq!(ack["ok"], true, "{ack}");
        assert_eq!(ack["result"], json!({"i": i}), "{ack}");
        ids.push(id);
    }
    assert!(
        device
            .next_command(Duration::from_millis(500))
            .await
            .is_none(),
        "each command was published once"
    );
    // Every instance's command log shows each acked.
    for (d, name) in c.daemons.iter().zip(&c.ids) {
        wait_for(T, &format!("{name} lists the commands acked"), || async {
            let body: Value = d.get("/api/commands?limit=100").await.json().await.ok()?;
            let list = body["commands"].as_array()?;
            ids.iter()
                .all(|id| {
                    list.iter()
                        .any(|c| c["id"] == id.as_str() && c["status"] == "acked")
                })
                .then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn timeouts_expiry_and_queued_publishing_happen_once_with_three_instances_racing() {
    if skip() {
        return;
    }
    // Arrange: a 1 s command timeout on every instance; a stream of command events on tb-b,
    // presence on tb-a (the instance that takes the commands).
    let c = Cluster::start(3, "[commands]\ntimeout = \"1s\"").await;
    let mut events = SseClient::connect(c.daemons[1].http, "/events?type=command", None).await;
    let mut presence = SseClient::connect(c.daemons[0].http, "/events?type=status", None).await;
    let mut silent = FakeDevice::connect(&c.url(), "quiet-1", "devices/quiet-1/commands").await;
    let mut late = FakeDevice::connect(&c.url(), "late-1", "devices/late-1/commands").await;
    let gone = FakeDevice::connect(&c.url(), "gone-1", "devices/gone-1/commands").await;
    late.presence("offline").await;
    gone.presence("offline").await;
    // tb-a has seen both go offline (whichever instance stored it).
    let mut offline = BTreeSet::new();
    let deadline = Instant::now() + T;
    while offline.len() < 2 {
        let e = presence
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
            .expect("offline status events on tb-a");
        let v = e.json();
        if v["online"] == false {
            offline.insert(v["device"].as_str().unwrap_or_default().to_owned());
        }
    }
    let mut ws = Ws::connect(c.daemons[0].http).await;
    let accepted = |m: Value, status: &str| -> String {
        assert_eq!(m["type"], "accepted", "{m}");
        assert_eq!(m["status"], status, "{m}");
        m["id"].as_str().expect("id").to_owned()
    };

    // Act: a command nobody answers ...
    ws.send_json(json!({"type": "command", "device": "quiet-1", "name": "ping"}))
        .await;
    let quiet = accepted(ws.recv(T).await.expect("accepted"), "sent");
    assert!(silent.next_command(T).await.is_some());
    // ... one for a device that is offline and comes back ...
    ws.send_json(json!({"type": "command", "device": "late-1", "name": "ping"}))
        .await;
    let queued = accepted(ws.recv(T).await.expect("accepted"), "queued");
    // ... and one that waits too long.
    ws.send_json(json!({"type": "command", "device": "gone-1", "name": "ping", "ttl": "1s"}))
        .await;
    let expires = accepted(ws.recv(T).await.expect("accepted"), "queued");
    assert!(
        late.next_command(Duration::from_millis(500))
            .await
            .is_none(),
        "nothing is sent while offline"
    );
    late.presence("online").await;
    let cmd = late
        .next_command(T)
        .await
        .expect("the queued command is sent once late-1 is online");
    assert_eq!(cmd["id"], queued.as_str());
    late.answer(json!({"id": queued, "ok": true})).await;

    // Assert: each change exactly once, in the event log and on the WebSocket.
    let want: BTreeSet<(String, String)> = [
        (&quiet, "sent"),
        (&quiet, "timeout"),
        (&queued, "queued"),
        (&queued, "sent"),
        (&queued, "acked"),
        (&expires, "queued"),
        (&expires, "expired"),
    ]
    .into_iter()
    .map(|(i, s)| (i.clone(), s.to_owned()))
    .collect();
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut ws_counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    let deadline = Instant::now() + T;
    let mut settle: Option<Instant> = None;
    // Until everything came, then 2.5 s more (two timeout periods) for any second firing.
    while settle.is_none_or(|s| Instant::now() < s) {
        assert!(
            Instant::now() < deadline,
            "events so far: {counts:?}; ws: {ws_counts:?}"
        );
        tokio::select! {
            e = events.next(Duration::from_millis(200)) => {
                if let Some(e) = e.filter(|e| e.event == "command") {
                    let v = e.json();
                    let key = (v["id"].as_str().unwrap_or_default().to_owned(),
                               v["status"].as_str().unwrap_or_default().to_owned());
                    *counts.entry(key).or_default() += 1;
                }
            }
            m = ws.recv(Duration::from_millis(200)) => {
                if let Some(m) = m {
                    let key = (m["id"].as_str().unwrap_or_default().to_owned(),
                               m["type"].as_str().unwrap_or_default().to_owned());
                    *ws_counts.entry(key).or_default() += 1;
                }
            }
        }
        if settle.is_none() && want.iter().all(|k| counts.contains_key(k)) {
            settle = Some(Instant::now() + Duration::from_millis(2_500));
        }
    }
    for (key, n) in &counts {
        assert_eq!(*n, 1, "{key:?} came {n} times; all: {counts:?}");
    }
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "command events"
    );
    for key in [
        (quiet.clone(), "timeout"),
        (queued.clone(), "ack"),
        (expires.clone(), "expired"),
    ] {
        let key = (key.0, key.1.to_owned());
        assert_eq!(
            ws_counts.get(&key),
            Some(&1),
            "{key:?} once on the WebSocket: {ws_counts:?}"
        );
    }
    assert!(
        late.next_command(Duration::from_millis(300))
            .await
            .is_none(),
        "late-1 got its command once"
    );
    assert!(
        silent
            .next_command(Duration::from_millis(100))
            .await
            .is_none(),
        "quiet-1 got its command once"
    );
    let status = |d: &Daemon| {
        let url = d.url("/api/commands?limit=100");
        let client = d.client.clone();
        async move {
            let body: Value = client.get(url).send().await.ok()?.json().await.ok()?;
            Some(body["commands"].as_array()?.clone())
        }
    };
    for (d, name) in c.daemons.iter().zip(&c.ids) {
        let list = status(d).await.expect("command log");
        for (id, want) in [
            (&quiet, "timeout"),
            (&queued, "acked"),
            (&expires, "expired"),
        ] {
            let got = list.iter().find(|c| c["id"] == id.as_str());
            assert_eq!(
                got.map(|c| c["status"].clone()),
                Some(Value::from(want)),
                "{name}: {got:?}"
            );
        }
    }
}

/// The Set-Cookie of a login with `token` on `d`, as `name=value`.
async fn login(d: &Daemon, token: &str) -> String {
    let r = d
        .client
        .post(d.url("/api/session"))
        .body(json!({ "token": token }).to_string())
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 204, "login on {}", d.http);
    r.headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned()
}

async fn whoami(d: &Daemon, cookie: &str) -> (u16, Value) {
    let r = d
        .client
        .get(d.url("/api/session"))
        .header("cookie", cookie)
        .send()
        .await
        .expect("GET /api/session");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn auth_config() -> (String, String) {
    let (token, hash) = telebridge::auth::new_token();
    (
        token,
        format!(
            "[auth]\ntokens = [ {{ name = \"ops\", role = \"operator\", hash = \"{hash}\" }} ]\n"
        ),
    )
}

#[tokio::test]
async fn a_session_cookie_issued_by_one_instance_is_valid_on_the_others() {
    if skip() {
        return;
    }
    // Arrange
    let (token, config) = auth_config();
    let c = Cluster::start(3, &config).await;

    // Act
    let cookie = login(&c.daemons[0], &token).await;

    // Assert
    for (d, name) in c.daemons.iter().zip(&c.ids) {
        let (status, who) = whoami(d, &cookie).await;
        assert_eq!(status, 200, "{name}: {who}");
        assert_eq!(who["name"], "ops", "{name}: {who}");
        let devices = d
            .client
            .get(d.url("/api/devices"))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("devices");
        assert_eq!(devices.status(), 200, "{name}");
    }
    let mut forged = cookie.clone();
    let last = forged.pop();
    forged.push(if last == Some('0') { '1' } else { '0' });
    let refused = c.daemons[1]
        .client
        .get(c.daemons[1].url("/api/devices"))
        .header("cookie", &forged)
        .send()
        .await
        .expect("devices");
    assert_eq!(refused.status(), 401, "a forged cookie is refused");
}

#[tokio::test]
async fn instances_started_together_on_an_empty_database_share_one_schema_and_one_session_key() {
    if skip() {
        return;
    }
    // Arrange and act: three instances start at once on a database nobody migrated yet.
    let (token, config) = auth_config();
    let c = Cluster::start_together(3, &config).await;
    let publisher = Publisher::connect(&c.url(), "together-pub").await;
    publish_range(&publisher, "s", 3, 0, 30).await;

    // Assert: one schema (every reading stored), and a cookie of any works on every one.
    wait_all_stored(&c.db().await, 30, T).await;
    for issuer in &c.daemons {
        let cookie = login(issuer, &token).await;
        for (d, name) in c.daemons.iter().zip(&c.ids) {
            let (status, who) = whoami(d, &cookie).await;
            assert_eq!(
                (status, &who["name"]),
                (200, &Value::from("ops")),
                "a cookie of {} on {name}: {who}",
                issuer.http
            );
        }
    }
}

#[tokio::test]
async fn every_instance_names_itself_on_metrics_reports_the_database_and_catches_up_the_log() {
    if skip() {
        return;
    }
    // Arrange
    let c = Cluster::start(3, "").await;
    let publisher = Publisher::connect(&c.url(), "m-pub").await;

    // Act
    publish_range(&publisher, "m", 10, 0, 300).await;
    let db = c.db().await;
    wait_all_stored(&db, 300, T).await;
    let head = log_head(&db).await;

    // Assert
    for (d, name) in c.daemons.iter().zip(&c.ids) {
        let text = metrics(d).await;
        let instance = format!("instance=\"{name}\"");
        assert_eq!(
            sample(
                &text,
                "telebridge_instance_info",
                &[&instance, "backend=\"postgres\""]
            ),
            Some(1.0),
            "{name}: telebridge_instance_info{{{instance},backend=\"postgres\"}} 1 in:\n{text}"
        );
        let ready = d.get("/readyz").await;
        assert_eq!(ready.status(), 200, "{name}");
        let body: Value = ready.json().await.expect("readyz JSON");
        assert_eq!(body["database"], true, "{name}: {body}");
        wait_for(T, &format!("{name} tailing up to {head}"), || async {
            let text = metrics(d).await;
            let seen = sample(&text, "telebridge_tail_seen_seq", &[])?;
            let top = sample(&text, "telebridge_tail_head_seq", &[])?;
            let lag = sample(&text, "telebridge_tail_lag_events", &[])?;
            (seen == head as f64 && top == head as f64 && lag == 0.0).then_some(())
        })
        .await;
    }
}

/// A status event appended by hand, following the append protocol, in a transaction the
/// test holds open: (its seq, its data).
async fn hold_an_append(conn: &mut sqlx::PgConnection) -> (i64, String) {
    sqlx::query("BEGIN")
        .execute(&mut *conn)
        .await
        .expect("BEGIN");
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *conn)
        .await
        .expect("take the append lock");
    let last: i64 = sqlx::query_scalar("SELECT last FROM log_head")
        .fetch_one(&mut *conn)
        .await
        .expect("log_head");
    let seq = last + 1;
    let at = telebridge::domain::now_ms();
    let data = json!({"device": "trap", "online": true, "at": telebridge::domain::format_ms(at)})
        .to_string();
    sqlx::query(
        "INSERT INTO devices (id, first_seen, last_seen, online, status_at) VALUES ('trap', $1, $1, true, $1) \
         ON CONFLICT (id) DO UPDATE SET online = true, last_seen = $1, status_at = $1",
    )
    .bind(at)
    .execute(&mut *conn)
    .await
    .expect("device row");
    sqlx::query(
        "INSERT INTO events (seq, kind, device, at, data) VALUES ($1, 'status', 'trap', $2, $3)",
    )
    .bind(seq)
    .bind(at)
    .bind(&data)
    .execute(&mut *conn)
    .await
    .expect("insert the held event");
    sqlx::query("UPDATE log_head SET last = $1")
        .bind(seq)
        .execute(&mut *conn)
        .await
        .expect("move log_head");
    sqlx::query("SELECT pg_notify('telebridge_log', $1)")
        .bind(seq.to_string())
        .execute(&mut *conn)
        .await
        .expect("notify");
    (seq, data)
}

/// Asserts that no seq is used twice across readings and events (`seqs` from `log_seqs`).
fn assert_unique(seqs: &[i64]) {
    let twice: Vec<i64> = seqs
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    assert!(
        twice.is_empty(),
        "seqs used twice in the log (a reading and an event with one id): {twice:?}"
    );
}

/// Asserts that the ids of `events` rise strictly, and notes holes (ids drawn but never
/// stored, which the log allows; late arrivals it does not).
fn assert_rising(events: &[SseEvent], who: &str) {
    let ids: Vec<i64> = events.iter().map(id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{who}: ids not strictly increasing: {ids:?}"
    );
    let holes: Vec<i64> = ids
        .windows(2)
        .flat_map(|w| w[0] + 1..w[1])
        .take(20)
        .collect();
    if !holes.is_empty() {
        eprintln!("{who}: ids with no event (holes in the log): {holes:?}");
    }
}

#[tokio::test]
async fn an_append_held_open_by_another_writer_is_streamed_before_the_readings_that_waited_for_it()
{
    if skip() {
        return;
    }
    // Arrange: a daemon with one reading stored, a client of every kind.
    let c = Cluster::start(1, "").await;
    let d = &c.daemons[0];
    let db = c.db().await;
    let publisher = Publisher::connect(&c.url(), "trap-pub").await;
    publish_range(&publisher, "w", 1, 0, 1).await;
    wait_all_stored(&db, 1, T).await;
    let mut client = SseClient::connect(d.http, "/events", None).await;
    let mut other = c.pg.connect().await;

    // Act: another writer takes the append lock and draws the next seq, then holds on ...
    let (held, data) = hold_an_append(&mut other).await;
    publish_range(&publisher, "w", 1, 1, 21).await;
    publisher.wait_acked(21, T).await;
    // ... the daemon's writer waits for it: nothing new is stored or streamed meanwhile.
    let early = client.next(Duration::from_millis(1_200)).await;
    assert!(
        early.is_none(),
        "streamed while the append lock was held: {early:?}"
    );
    assert_eq!(db.count().await, 1, "stored while the append lock was held");
    sqlx::query("COMMIT")
        .execute(&mut other)
        .await
        .expect("COMMIT");
    let _ = other.close().await;

    // Assert: the held event first, then the readings, each once, ids rising, and nothing
    // of the log missing between them.
    let numbers = wait_all_stored(&db, 21, T).await;
    assert_eq!(numbers, (0..21).collect::<Vec<_>>());
    let head = log_head(&db).await;
    let events = events_through(&mut client, head, T).await;
    let log = log_seqs(&db, held - 1).await;
    assert_unique(&log);
    assert_eq!(events[0].id, Some(held.to_string()), "{:?}", events[0]);
    assert_eq!(events[0].event, "status");
    assert_eq!(events[0].data, data, "streamed as stored");
    assert_rising(&events, "the client");
    assert_eq!(
        events.iter().map(id).collect::<Vec<_>>(),
        log,
        "the stream is the log"
    );
    let ns: Vec<i64> = events
        .iter()
        .filter(|e| e.event == "reading")
        .map(|e| e.n())
        .collect();
    assert_eq!(ns, (1..21).collect::<Vec<_>>());
}

#[tokio::test]
async fn two_instances_writing_at_once_around_a_held_append_stream_one_gapless_sequence() {
    if skip() {
        return;
    }
    // Arrange: two instances, a client of every kind on each.
    let c = Cluster::start(2, "").await;
    let db = c.db().await;
    let publisher = Arc::new(Publisher::connect(&c.url(), "race-pub").await);
    const N: i64 = 2000;
    // The devices are known first, so that what waits for the lock is readings only.
    publish_range(&publisher, "z", 20, N, N + 20).await;
    wait_for(T, "the first readings", || async {
        (db.count().await == 20).then_some(())
    })
    .await;
    let mut clients = Vec::new();
    for d in &c.daemons {
        clients.push(SseClient::connect(d.http, "/events", None).await);
    }
    let base = log_head(&db).await;
    let mut other = c.pg.connect().await;

    // Act: readings flow to both instances while another writer holds an append open, and
    // go on after it commits.
    let (held, _) = hold_an_append(&mut other).await;
    let flow = {
        let p = publisher.clone();
        tokio::spawn(async move {
            publish_range(&p, "z", 20, 0, N / 4).await;
            tokio::time::sleep(Duration::from_millis(1_200)).await;
            for chunk in 1..N / 100 + 1 {
                let from = N / 4 + (chunk - 1) * 100;
                publish_range(&p, "z", 20, from, (from + 100).min(N)).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    for (cl, name) in clients.iter_mut().zip(&c.ids) {
        let early = cl.next(Duration::from_millis(500)).await;
        assert!(
            early.is_none(),
            "{name} streamed while the append lock was held: {early:?}"
        );
    }
    assert_eq!(
        db.count().await,
        20,
        "stored while the append lock was held"
    );
    sqlx::query("COMMIT")
        .execute(&mut other)
        .await
        .expect("COMMIT");
    let _ = other.close().await;
    flow.await.expect("flow");
    publisher.wait_acked(N as u64 + 20, T).await;
    wait_all_stored(&db, N, T).await;

    // Assert: both clients got the whole log from the held event on, in one order.
    let seqs = log_seqs(&db, base).await;
    assert_unique(&seqs);
    assert_eq!(seqs.first(), Some(&held));
    let last = *seqs.last().expect("log");
    let streams =
        futures_util::future::join_all(clients.iter_mut().map(|cl| events_through(cl, last, T)))
            .await;
    for (events, name) in streams.iter().zip(&c.ids) {
        assert_rising(events, name);
        assert!(
            events.iter().map(id).collect::<Vec<_>>() == seqs,
            "{name}: the stream is the log ({} events, {} in the log)",
            events.len(),
            seqs.len()
        );
    }
    assert_eq!(streams[0], streams[1], "the same sequence on both");
}

/// The sum of one counter over every instance.
async fn total(c: &Cluster, sample: &str) -> f64 {
    let mut sum = 0.0;
    for d in &c.daemons {
        sum += d.metric(sample).await;
    }
    sum
}

#[tokio::test]
async fn retention_on_three_instances_deletes_each_old_reading_once_and_an_old_resume_point_gets_a_gap()
 {
    if skip() {
        return;
    }
    // Arrange: twenty readings, the ten with the lowest seqs then aged by two days.
    let c = Cluster::start(
        3,
        "[storage]\nretention = \"1d\"\nretention_interval = \"200ms\"",
    )
    .await;
    let publisher = Publisher::connect(&c.url(), "ret-pub").await;
    publish_range(&publisher, "old", 1, 0, 20).await;
    let db = c.db().await;
    // In seq order (the instances' batches interleave the numbers).
    let numbers = wait_all_stored(&db, 20, T).await;

    // Act: a plain UPDATE (retention itself takes the append lock when it deletes).
    let mut conn = c.pg.connect().await;
    sqlx::query(
        "UPDATE readings SET received_at = received_at - 2 * 86400000 \
         WHERE seq IN (SELECT seq FROM readings ORDER BY seq LIMIT 10)",
    )
    .execute(&mut conn)
    .await
    .expect("age the first ten");
    let _ = conn.close().await;

    // Assert: exactly those ten are gone, deleted once over the three instances ...
    wait_for(T, "retention of the old readings", || async {
        (db.count().await == 10).then_some(())
    })
    .await;
    assert_eq!(db.numbers().await, numbers[10..]);
    wait_for(T, "the deletions counted", || async {
        (total(&c, "telebridge_retention_deleted_total").await >= 10.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        total(&c, "telebridge_retention_deleted_total").await,
        10.0,
        "each reading deleted once, by one instance"
    );
    // ... and every instance answers a resume point inside them with the exact gap.
    let first_kept = db.rows().await[0].seq;
    for (d, name) in c.daemons.iter().zip(&c.ids) {
        let mut client = SseClient::connect(d.http, "/events?type=reading", Some("1")).await;
        let gap = client.next(T).await.expect("gap event");
        assert_eq!(gap.event, "gap", "{name}: {gap:?}");
        assert_eq!(gap.json()["first_available"], first_kept, "{name}: {gap:?}");
        let rest: Vec<i64> = client.reading_numbers(10, T).await;
        assert_eq!(rest, numbers[10..], "{name}");
    }
}

#[tokio::test]
async fn a_silent_device_is_marked_offline_once_by_three_instances() {
    if skip() {
        return;
    }
    // Arrange
    let c = Cluster::start(3, "[presence]\ntimeout = \"1s\"").await;
    let mut status = SseClient::connect(c.daemons[2].http, "/events?type=status", None).await;
    let publisher = Publisher::connect(&c.url(), "nap-pub").await;

    // Act: one reading, then silence.
    publish_range(&publisher, "nap", 1, 0, 1).await;

    // Assert: online, then offline once (watched for 2.5 s more: two timeout periods).
    let mut changes = Vec::new();
    let deadline = Instant::now() + T;
    let mut settle: Option<Instant> = None;
    while settle.is_none_or(|s| Instant::now() < s) {
        assert!(
            Instant::now() < deadline,
            "status events so far: {changes:?}"
        );
        if let Some(e) = status.next(Duration::from_millis(200)).await {
            let v = e.json();
            if v["device"] == "nap0" {
                changes.push(v["online"].clone());
            }
        }
        if settle.is_none() && changes.contains(&Value::Bool(false)) {
            settle = Some(Instant::now() + Duration::from_millis(2_500));
        }
    }
    assert_eq!(changes, vec![Value::Bool(true), Value::Bool(false)]);
    assert_eq!(
        total(&c, "telebridge_presence_timeouts_total").await,
        1.0,
        "one instance timed it out"
    );
    let db = c.db().await;
    assert_eq!(db.device("nap0").await.map(|d| d.0), Some(false));
}

#[tokio::test]
async fn postgres_that_cannot_be_used_stops_start_up_with_a_clear_error_and_never_the_password() {
    if skip() {
        return;
    }
    // Arrange: a server nobody listens for, a database that does not exist, bad URLs.
    let closed = format!(
        "url = \"postgres://tb:s3cret-pw@127.0.0.1:{}/tb\"",
        crate::support::free_port()
    );
    let cluster = crate::pg::cluster_url();
    let (base, _) = cluster.rsplit_once('/').expect("cluster URL");
    let (scheme, host) = base.split_once("://").expect("scheme");
    let missing = format!("url = \"{scheme}://postgres:s3cret-pw@{host}/no_such_db_here\"");

    // Act
    let unreachable = crate::support::run_until_exit(&closed);
    let no_db = crate::support::run_until_exit(&missing);
    let (bad_port, bad_port_text) =
        crate::support::check("[storage]\nurl = \"postgres://tb:s3cret-pw@db:99999/tb\"\n");
    let (both, both_text) = crate::support::check(
        "[storage]\npath = \"x.db\"\nurl = \"postgres://tb:s3cret-pw@db/tb\"\n",
    );
    let (alone, alone_text) =
        crate::support::check("[mqtt]\nshared_group = \"tb\"\n[storage]\npath = \"x.db\"\n");

    // Assert: exit 3 for storage at start-up, 2 for the config, with what to fix; the
    // password shown as *** everywhere.
    for (code, err) in [&unreachable, &no_db] {
        assert_eq!(*code, 3, "{err}");
        assert!(err.contains("cannot connect to PostgreSQL at"), "{err}");
        assert!(err.contains(":***@"), "{err}");
        assert!(
            !err.contains("s3cret-pw") && !err.contains("panicked"),
            "{err}"
        );
    }
    assert!(
        unreachable.1.contains("Connection refused"),
        "{}",
        unreachable.1
    );
    assert!(no_db.1.contains("does not exist"), "{}", no_db.1);
    assert_eq!(bad_port, 2, "{bad_port_text}");
    assert!(
        bad_port_text.contains("storage.url") && bad_port_text.contains("99999"),
        "{bad_port_text}"
    );
    assert_eq!(both, 2, "{both_text}");
    assert!(both_text.contains("not both"), "{both_text}");
    assert_eq!(alone, 2, "{alone_text}");
    assert!(alone_text.contains("mqtt.shared_group"), "{alone_text}");
    for text in [&bad_port_text, &both_text] {
        assert!(!text.contains("s3cret-pw"), "{text}");
    }
}

#[tokio::test]
async fn a_postgresql_server_that_stops_mid_burst_leaves_nothing_acknowledged_unstored_and_recovery_is_automatic()
 {
    if skip() {
        return;
    }
    // Arrange: a server of this test's own, so that it can be stopped; a daemon on it.
    let server = pg::Cluster::start();
    let mut admin = sqlx::PgConnection::connect(&server.url)
        .await
        .expect("connect");
    sqlx::query("CREATE DATABASE fault")
        .execute(&mut admin)
        .await
        .expect("create database");
    admin.close().await.expect("close");
    let (base, _) = server.url.rsplit_once('/').expect("cluster URL");
    let url = format!("{base}/fault");
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        &format!("[storage]\nurl = \"{url}\"\nretry_max = \"200ms\""),
    )
    .await;
    let publisher = Publisher::connect(&broker.url(), "fault-pub").await;
    for n in 0..200 {
        publisher
            .publish("devices/f1/telemetry", QoS::AtLeastOnce, false, reading(n))
            .await;
    }
    let db = Db::postgres(&url).await;
    db.wait_count(200, T).await;
    db.close().await;

    // Act: the server stops; readings keep coming; then it starts again.
    server.stop();
    for n in 200..400 {
        publisher
            .publish("devices/f1/telemetry", QoS::AtLeastOnce, false, reading(n))
            .await;
    }
    let down = wait_for(T, "/readyz 503 naming the database", || async {
        let r = daemon.get("/readyz").await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.ok()?;
        (status == 503 && body["database"] == false).then_some(body)
    })
    .await;
    let stored_while_down = daemon.metric("telebridge_readings_stored_total").await;
    server.start_again();

    // Assert: unready with the reason while down, nothing committed meanwhile; then ready
    // again by itself, and every reading stored exactly once.
    let reason = down["storage"].as_str().unwrap_or_default();
    assert!(
        reason.contains("database server unreachable since"),
        "{down}"
    );
    assert!(stored_while_down <= 200.0 + 1.0, "{stored_while_down}");
    wait_for(T, "/readyz 200 again", || async {
        (daemon.get("/readyz").await.status().as_u16() == 200).then_some(())
    })
    .await;
    let db = Db::postgres(&url).await;
    db.wait_count(400, T).await;
    let mut numbers = db.numbers().await;
    numbers.sort_unstable();
    assert_eq!(numbers, (0..400).collect::<Vec<_>>(), "each reading once");
    assert!(
        daemon
            .metric("telebridge_store_commit_failures_total")
            .await
            >= 1.0,
        "the failed commits are counted"
    );
}

#[tokio::test]
async fn three_instances_evaluating_one_rule_fire_and_resolve_it_once_and_call_the_webhook_once() {
    if skip() {
        return;
    }
    // Arrange: a rule and a webhook on every instance; readings split over the group.
    let receiver = crate::alerts::Receiver::start(200).await;
    let c = Cluster::start(
        3,
        &format!(
            "[alerts]\nrules = [ {{ name = \"hot\", when = \"temperature > 80\", for = \"1s\", clear = \"temperature < 75\" }} ]\nwebhooks = [ {{ url = \"{}\" }} ]\n",
            receiver.url()
        ),
    )
    .await;
    let mut streams = Vec::new();
    for d in &c.daemons {
        streams.push(SseClient::connect(d.http, "/events?type=alert", None).await);
    }
    let p = Publisher::connect(&c.url(), "cl-alert-pub").await;
    let burst = |v: f64| {
        let p = &p;
        async move {
            for _ in 0..15 {
                let body = json!({ "temperature": v }).to_string();
                p.publish("devices/boiler-1/telemetry", QoS::AtLeastOnce, false, body)
                    .await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
    };

    // Act: above the threshold for 2 s, then below the clear.
    burst(90.0).await;
    burst(60.0).await;

    // Assert: each instance streams one firing and one resolved change, the same two ids...
    let mut seen = Vec::new();
    for (s, name) in streams.iter_mut().zip(&c.ids) {
        let events = s.take("alert", 2, T).await;
        let states: Vec<Value> = events.iter().map(|e| e.json()["state"].clone()).collect();
        assert_eq!(states, [json!("firing"), json!("resolved")], "{name}");
        seen.push(events.iter().map(id).collect::<Vec<_>>());
        assert!(
            s.next(Duration::from_millis(300))
                .await
                .is_none_or(|e| e.event != "alert"),
            "{name} streamed a third alert change"
        );
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    // ...one stored alert...
    let body: Value = c.daemons[1].get("/api/alerts").await.json().await.unwrap();
    assert_eq!(body["alerts"].as_array().unwrap().len(), 1, "{body}");
    // ...made by one instance each time, which alone called the webhook.
    assert_eq!(
        total(&c, "telebridge_alert_changes_total{state=\"firing\"}").await,
        1.0
    );
    assert_eq!(
        total(&c, "telebridge_alert_changes_total{state=\"resolved\"}").await,
        1.0
    );
    let hooks = receiver.wait(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.hooks().len(), 2, "{hooks:?}");
}
