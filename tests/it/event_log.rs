//! One ordered event log: readings, presence and command changes all carry ids from one
//! sequence, resume exactly with any filter, and survive an upgrade from the previous schema.

use std::time::Duration;

use rumqttc::QoS;
use serde_json::{Value, json};

use crate::support::{
    Daemon, FakeDevice, Mosquitto, Publisher, SseClient, SseEvent, reading, wait_for,
};

const T: Duration = Duration::from_secs(30);

/// The id of an event as a number.
fn id(e: &SseEvent) -> i64 {
    e.id.as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("event without a numeric id: {e:?}"))
}

/// Reads events until `last_id` reaches `min` (from an event or an `id:`-only frame).
async fn until_id(client: &mut SseClient, min: i64) -> Vec<SseEvent> {
    let deadline = std::time::Instant::now() + T;
    let mut got = Vec::new();
    while client
        .last_id
        .as_deref()
        .and_then(|v| v.parse::<i64>().ok())
        .is_none_or(|v| v < min)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "last id {:?} never reached {min}",
            client.last_id
        );
        if let Some(e) = client.next(Duration::from_millis(200)).await {
            got.push(e);
        }
    }
    got
}

#[tokio::test]
async fn a_status_watcher_that_reconnects_with_its_last_id_gets_exactly_the_changes_it_missed() {
    // Arrange: a presence-only watcher sees a1 come online.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "ev-pub").await;
    let mut watcher = SseClient::connect(daemon.http, "/events?type=status", None).await;
    publisher
        .publish("devices/a1/status", QoS::AtLeastOnce, false, "online")
        .await;
    let first = watcher.take("status", 1, T).await;
    let last_id = watcher.last_id.clone().expect("the status event has an id");
    assert_eq!(id(&first[0]).to_string(), last_id);
    drop(watcher);

    // Act: while it is away, devices go offline and online, with readings in between.
    let changes = [
        ("a1", "offline"),
        ("a2", "online"),
        ("a1", "online"),
        ("a2", "offline"),
    ];
    for (n, (device, state)) in changes.iter().enumerate() {
        publisher
            .publish(
                &format!("devices/{device}/status"),
                QoS::AtLeastOnce,
                false,
                *state,
            )
            .await;
        publisher
            .publish(
                "devices/a3/telemetry",
                QoS::AtLeastOnce,
                false,
                reading(n as i64),
            )
            .await;
    }
    publisher.wait_acked(9, T).await;
    let db = daemon.db().await;
    db.wait_count(4, T).await;
    // a3's first reading brings it online: one more status change, in its place.
    let mut again = SseClient::connect(daemon.http, "/events?type=status", Some(&last_id)).await;
    let got = again.take("status", 5, T).await;

    // Assert: exactly those, in order, with rising ids; nothing more.
    let seen: Vec<(String, bool)> = got
        .iter()
        .map(|e| {
            let d = e.json();
            (
                d["device"].as_str().unwrap_or("").to_owned(),
                d["online"] == true,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("a1".to_owned(), false),
            ("a3".to_owned(), true),
            ("a2".to_owned(), true),
            ("a1".to_owned(), true),
            ("a2".to_owned(), false),
        ]
    );
    let ids: Vec<i64> = got.iter().map(id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(ids[0] > last_id.parse::<i64>().expect("id"));
    assert!(again.next(Duration::from_millis(500)).await.is_none());
}

#[tokio::test]
async fn a_mixed_stream_resumed_at_many_points_yields_exactly_the_events_it_missed() {
    // Arrange: readings, presence and a command's life (sent, acked) in one stream.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "mix-pub").await;
    let mut device = FakeDevice::connect(&broker.url(), "m1", "devices/m1/commands").await;
    let mut full = SseClient::connect(daemon.http, "/events", None).await;
    for n in 0..10 {
        publisher
            .publish("devices/m1/telemetry", QoS::AtLeastOnce, false, reading(n))
            .await;
        if n == 3 {
            publisher
                .publish("devices/m2/status", QoS::AtLeastOnce, false, "online")
                .await;
        }
        if n == 5 {
            let r = daemon
                .client
                .post(daemon.url("/api/devices/m1/commands"))
                .json(&json!({"name": "ping"}))
                .send()
                .await
                .expect("POST");
            assert_eq!(r.status(), 202);
            let cmd = device
                .next_command(T)
                .await
                .expect("command reaches the device");
            device
                .answer(json!({"id": cmd["id"], "ok": true, "result": {"pong": n}}))
                .await;
        }
    }
    publisher
        .publish("devices/m2/status", QoS::AtLeastOnce, false, "offline")
        .await;
    // 10 readings, m1 online, m2 online and offline, command sent and acked.
    let mut events = Vec::new();
    while events.len() < 15 {
        let e = full.next(T).await.expect("live event");
        events.push(e);
    }
    let kinds: std::collections::BTreeSet<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        ["command", "reading", "status"].into_iter().collect(),
        "{events:?}"
    );
    let ids: Vec<i64> = events.iter().map(id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids rise: {ids:?}");

    // Act and assert: resuming after each event gives exactly the rest, byte for byte,
    // whether the client asks for every kind or one kind.
    for k in 0..events.len() {
        let mut resumed =
            SseClient::connect(daemon.http, "/events", Some(&ids[k].to_string())).await;
        let mut rest = Vec::new();
        while rest.len() < events.len() - k - 1 {
            rest.push(resumed.next(T).await.expect("replayed event"));
        }
        assert_eq!(
            rest,
            events[k + 1..].to_vec(),
            "resumed after id {}",
            ids[k]
        );
        assert!(resumed.next(Duration::from_millis(100)).await.is_none());
    }
    for kind in ["status", "command", "reading"] {
        let wanted: Vec<&SseEvent> = events[2..].iter().filter(|e| e.event == kind).collect();
        let mut resumed = SseClient::connect(
            daemon.http,
            &format!("/events?type={kind}"),
            Some(&ids[1].to_string()),
        )
        .await;
        let got = resumed.take(kind, wanted.len(), T).await;
        assert_eq!(got.iter().collect::<Vec<_>>(), wanted, "type={kind}");
    }
}

#[tokio::test]
async fn a_filtered_clients_resume_point_moves_past_events_it_does_not_receive() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "skip-pub").await;
    let mut status_only = SseClient::connect(daemon.http, "/events?type=status", None).await;
    let mut all = SseClient::connect(daemon.http, "/events", None).await;

    // Act: readings pass (the first one brings f1 online: one status event).
    for n in 0..20 {
        publisher
            .publish("devices/f1/telemetry", QoS::AtLeastOnce, false, reading(n))
            .await;
    }
    let readings = all.take("reading", 20, T).await;
    let newest = id(readings.last().expect("readings"));

    // Assert: the status client's last id reaches the newest reading's without getting it.
    let got = until_id(&mut status_only, newest).await;
    assert!(got.iter().all(|e| e.event == "status"), "{got:?}");
    // And resuming from it gives nothing old again.
    let last = status_only.last_id.clone().expect("id");
    let mut again = SseClient::connect(daemon.http, "/events?type=status", Some(&last)).await;
    assert!(again.next(Duration::from_millis(500)).await.is_none());
}

#[tokio::test]
async fn a_status_resume_point_inside_deleted_history_gets_a_gap_first() {
    // Arrange: presence changes, then retention removes the older ones.
    let broker = Mosquitto::start().await;
    let mut daemon = Daemon::start(
        &broker.url(),
        "[storage]\nretention = \"1d\"\nevents_retention = \"1d\"\nretention_interval = \"200ms\"",
    )
    .await;
    let publisher = Publisher::connect(&broker.url(), "gap-pub").await;
    for n in 0..6 {
        let state = if n % 2 == 0 { "online" } else { "offline" };
        publisher
            .publish("devices/g1/status", QoS::AtLeastOnce, false, state)
            .await;
    }
    let mut client = SseClient::connect(daemon.http, "/events?type=status", Some("0")).await;
    let all = client.take("status", 6, T).await;
    assert!(daemon.sigterm().success());
    assert_eq!(daemon.age_events_through(id(&all[2])).await, 3);
    daemon.spawn().await;
    let db = daemon.db().await;
    wait_for(T, "retention of old events", || async {
        (db.events().await == 3).then_some(())
    })
    .await;

    // Act
    let mut resumed = SseClient::connect(
        daemon.http,
        "/events?type=status",
        Some(&id(&all[0]).to_string()),
    )
    .await;

    // Assert: the gap first, naming the first id still there, then the rest.
    let gap = resumed.next(T).await.expect("gap");
    assert_eq!(gap.event, "gap");
    assert_eq!(gap.json()["first_available"], id(&all[2]) + 1);
    let rest = resumed.take("status", 3, T).await;
    assert_eq!(rest, all[3..].to_vec());
}

#[tokio::test]
async fn status_history_answers_from_the_log_paged_by_event_id() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "hist-pub").await;
    let mut client = SseClient::connect(daemon.http, "/events?type=status", None).await;
    for n in 0..5 {
        let state = if n % 2 == 0 { "online" } else { "offline" };
        publisher
            .publish("devices/h1/status", QoS::AtLeastOnce, false, state)
            .await;
        publisher
            .publish("devices/h2/status", QoS::AtLeastOnce, false, "online")
            .await;
    }
    let live: Vec<SseEvent> = client
        .take("status", 10, T)
        .await
        .into_iter()
        .filter(|e| e.json()["device"] == "h1")
        .collect();

    // Act
    let page = |q: &str| {
        let url = daemon.url(&format!("/api/devices/h1/status-history{q}"));
        let client = daemon.client.clone();
        async move {
            let r = client.get(url).send().await.expect("GET");
            (r.status().as_u16(), r.json::<Value>().await.expect("JSON"))
        }
    };
    let (status, first) = page("?limit=3").await;
    let after = first["next_after"]
        .as_i64()
        .expect("next_after on a full page");
    let (_, second) = page(&format!("?limit=3&after={after}")).await;

    // Assert: the same changes as streamed, with their event ids as seq, in two pages.
    assert_eq!(status, 200, "{first}");
    let mut changes: Vec<Value> = first["changes"].as_array().expect("changes").clone();
    changes.extend(
        second["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .cloned(),
    );
    assert_eq!(changes.len(), 5, "{changes:?}");
    for (c, e) in changes.iter().zip(&live) {
        assert_eq!(c["seq"].as_i64(), Some(id(e)));
        assert_eq!(c["online"], e.json()["online"]);
        assert_eq!(c["at"], e.json()["at"]);
    }
    assert_eq!(second["next_after"], Value::Null);
    let (status, body) = page("?after=x").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_parameter");
    let missing = daemon.get("/api/devices/nobody/status-history").await;
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn a_database_of_the_previous_release_upgrades_in_place_and_its_reading_ids_still_resume() {
    if crate::support::sqlite_only() {
        return;
    }
    // Arrange: a database with only the previous release's migrations and its readings.
    let dir = tempfile::tempdir().expect("tempdir");
    let old_migrations = dir.path().join("migrations");
    std::fs::create_dir(&old_migrations).expect("mkdir");
    for f in ["0001_init.sql", "0002_meta.sql"] {
        std::fs::copy(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations/sqlite")
                .join(f),
            old_migrations.join(f),
        )
        .expect("copy migration");
    }
    let db_path = dir.path().join("old.db");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    {
        use sqlx::Connection as _;
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db_path)
            .create_if_missing(true);
        let mut c = sqlx::SqliteConnection::connect_with(&opts)
            .await
            .expect("create");
        sqlx::migrate::Migrator::new(old_migrations.as_path())
            .await
            .expect("old migrations")
            .run(&mut c)
            .await
            .expect("migrate to the previous schema");
        // Recent (`now`): retention must not take them.
        for n in 1..=30i64 {
            sqlx::query(
                "INSERT INTO readings (seq, device, topic, ts, received_at, payload, flags) \
                 VALUES (?, 'u1', 'devices/u1/telemetry', ?, ?, ?, 0)",
            )
            .bind(n * 2) // the old ids need not be contiguous
            .bind(now + n)
            .bind(now + n)
            .bind(reading(n))
            .execute(&mut c)
            .await
            .expect("insert");
        }
        sqlx::query(
            "INSERT INTO devices (id, first_seen, last_seen, online) VALUES ('u1', 0, 0, 1)",
        )
        .execute(&mut c)
        .await
        .expect("device");
        c.close().await.expect("close");
    }
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        &format!("[storage]\npath = \"{}\"", db_path.display()),
    )
    .await;

    // Act: resume from an old reading id, then a new reading arrives.
    let mut client = SseClient::connect(daemon.http, "/events", Some("40")).await;
    let old = client.take("reading", 10, T).await;
    let publisher = Publisher::connect(&broker.url(), "up-pub").await;
    publisher
        .publish("devices/u1/telemetry", QoS::AtLeastOnce, false, reading(31))
        .await;
    let new = client.take("reading", 1, T).await;

    // Assert: the old readings kept their ids and come after 40; the new one is above them.
    assert_eq!(
        old.iter().map(id).collect::<Vec<_>>(),
        (21..=30).map(|n| n * 2).collect::<Vec<_>>()
    );
    assert_eq!(
        old.iter().map(|e| e.n()).collect::<Vec<_>>(),
        (21..=30).collect::<Vec<_>>()
    );
    assert!(id(&new[0]) > 60, "{:?}", new[0]);
    assert_eq!(daemon.db().await.count().await, 31);
    // The readings from before rollups existed were rolled up when the file was opened.
    let series: serde_json::Value = daemon
        .get(&format!(
            "/api/devices/u1/series?fields=n&from={}&to={}&step=1h&agg=count,min,max",
            now - 1,
            now + 31
        ))
        .await
        .json()
        .await
        .expect("json");
    let counted: i64 = series["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["n"]["count"].as_i64().expect("count"))
        .sum();
    assert_eq!(counted, 30, "{series}");
}
