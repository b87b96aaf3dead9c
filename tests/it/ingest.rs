//! MQTT telemetry and presence into SQLite, against Mosquitto and the embedded broker.

use std::time::Duration;

use rumqttc::QoS;

use crate::support::{Daemon, Mosquitto, Publisher, free_port, reading, wait_for};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn readings_published_to_mosquitto_arrive_in_sqlite_with_device_ts_and_payload() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "dev-pub").await;

    // Act
    for n in 0..50 {
        publisher
            .publish(
                &format!("devices/dev-{}/telemetry", n % 5),
                QoS::AtLeastOnce,
                false,
                reading(n),
            )
            .await;
    }
    publisher
        .publish(
            "devices/dev-x/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"ts":"2024-05-01T12:00:00.250Z","v":1}"#,
        )
        .await;
    publisher
        .publish(
            "devices/dev-y/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"v":2}"#,
        )
        .await;

    // Assert
    let db = daemon.db().await;
    db.wait_count(52, T).await;
    let rows = db.rows().await;
    assert_eq!(rows.len(), 52);
    for (n, row) in rows.iter().take(50).enumerate() {
        assert_eq!(row.device, format!("dev-{}", n % 5));
        assert_eq!(row.topic, format!("devices/dev-{}/telemetry", n % 5));
        assert_eq!(
            row.ts,
            1_700_000_000_000 + n as i64,
            "ts comes from the payload's Unix ms"
        );
        assert_eq!(
            row.payload,
            reading(n as i64).into_bytes(),
            "payload stored as sent"
        );
        assert_eq!(row.flags, 0);
    }
    let x = &rows[50];
    assert_eq!(x.ts, 1_714_564_800_250, "RFC 3339 ts is read");
    let y = &rows[51];
    assert!(
        (y.ts - y.received_at).abs() <= 1,
        "without ts, the receive time is used"
    );
    assert!(y.received_at > 1_700_000_000_000);
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "seq increases");
    let (online, _) = db.device("dev-1").await.expect("device row");
    assert!(online, "a device that sends telemetry is online");
    assert_eq!(
        daemon.metric("telebridge_readings_stored_total").await,
        52.0
    );
}

#[tokio::test]
async fn readings_published_to_the_embedded_broker_arrive_in_sqlite() {
    // Arrange: the daemon starts its own broker on a free port.
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let daemon = Daemon::start(
        &url,
        &format!("[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{port}\""),
    )
    .await;
    assert!(
        daemon.log_text().contains("EMBEDDED MQTT broker"),
        "the embedded broker warns what it does not guarantee"
    );
    let publisher = Publisher::connect(&url, "emb-pub").await;

    // Act
    for n in 0..20 {
        publisher
            .publish("devices/e1/telemetry", QoS::AtLeastOnce, false, reading(n))
            .await;
    }

    // Assert
    let db = daemon.db().await;
    db.wait_count(20, T).await;
    let rows = db.rows().await;
    assert!(rows.iter().all(|r| r.device == "e1"));
    assert_eq!(db.numbers().await, (0..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn auto_mode_uses_a_broker_that_already_listens() {
    // Arrange: Mosquitto listens where the embedded broker would.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        &format!(
            "[broker]\nmode = \"auto\"\nlisten = \"127.0.0.1:{}\"",
            broker.port
        ),
    )
    .await;

    // Act
    let publisher = Publisher::connect(&broker.url(), "auto-pub").await;
    publisher
        .publish("devices/a1/telemetry", QoS::AtLeastOnce, false, reading(1))
        .await;

    // Assert
    daemon.db().await.wait_count(1, T).await;
    assert!(
        daemon.log_text().contains("already listens"),
        "auto logs which broker it chose"
    );
}

#[tokio::test]
async fn bad_input_is_kept_raw_or_rejected_and_the_good_messages_around_it_are_all_stored() {
    // Arrange
    let broker = Mosquitto::start().await;
    let mut daemon = Daemon::start(&broker.url(), "[mqtt]\nmax_payload = 1024").await;
    let publisher = Publisher::connect(&broker.url(), "bad-pub").await;
    let good = |n| reading(n);

    // Act: good, bad, good, ...
    let t = "devices/d1/telemetry";
    publisher.publish(t, QoS::AtLeastOnce, false, good(0)).await;
    publisher
        .publish(t, QoS::AtLeastOnce, false, "not json at all")
        .await;
    publisher.publish(t, QoS::AtLeastOnce, false, good(1)).await;
    publisher
        .publish(t, QoS::AtLeastOnce, false, vec![0xff, 0xfe, 0x00, 0x80])
        .await;
    publisher.publish(t, QoS::AtLeastOnce, false, good(2)).await;
    publisher
        .publish(t, QoS::AtLeastOnce, false, vec![b'x'; 4096])
        .await; // over max_payload
    publisher.publish(t, QoS::AtLeastOnce, false, good(3)).await;
    publisher
        .publish(
            "devices/bad$id/telemetry",
            QoS::AtLeastOnce,
            false,
            good(99),
        )
        .await;
    publisher
        .publish(
            &format!("devices/{}/telemetry", "x".repeat(65)),
            QoS::AtLeastOnce,
            false,
            good(98),
        )
        .await;
    publisher.publish(t, QoS::AtLeastOnce, false, good(4)).await;
    publisher.publish(t, QoS::AtLeastOnce, false, "").await;
    publisher
        .publish(t, QoS::AtLeastOnce, false, "[1,2,3]")
        .await;
    publisher
        .publish(t, QoS::AtLeastOnce, false, r#"{"ts":"not a time","v":1}"#)
        .await;
    publisher.publish(t, QoS::AtLeastOnce, false, good(5)).await;
    publisher.wait_acked(14, T).await;

    // Assert: 6 good + 4 raw (text, invalid UTF-8, empty, array) + 1 bad ts = 11 rows.
    let db = daemon.db().await;
    db.wait_count(11, T).await;
    wait_for(T, "all 14 messages handled", || async {
        (daemon.metric("telebridge_messages_received_total").await >= 14.0).then_some(())
    })
    .await;
    let rows = db.rows().await;
    assert_eq!(rows.len(), 11, "{rows:?}");
    assert_eq!(db.numbers().await, vec![0, 1, 2, 3, 4, 5]);
    let raw: Vec<&[u8]> = rows
        .iter()
        .filter(|r| r.flags & 1 == 1)
        .map(|r| r.payload.as_slice())
        .collect();
    assert_eq!(
        raw,
        vec![
            &b"not json at all"[..],
            &[0xff, 0xfe, 0x00, 0x80][..],
            &b""[..],
            &b"[1,2,3]"[..]
        ],
        "non-objects are stored raw, byte for byte, and flagged"
    );
    let bad_ts = rows
        .iter()
        .find(|r| r.flags == 2)
        .expect("bad ts row is flagged 2");
    assert!((bad_ts.ts - bad_ts.received_at).abs() <= 1);
    assert_eq!(
        daemon
            .metric("telebridge_messages_rejected_total{reason=\"too_large\"}")
            .await,
        1.0
    );
    assert_eq!(
        daemon
            .metric("telebridge_messages_rejected_total{reason=\"invalid_device\"}")
            .await,
        2.0
    );

    // Nothing rejected may come back as a poison message: after a restart on the same
    // persistent session, the broker has nothing left to redeliver.
    assert!(daemon.sigterm().success());
    daemon.spawn().await;
    publisher.publish(t, QoS::AtLeastOnce, false, good(6)).await;
    db.wait_count(12, T).await;
    assert_eq!(
        daemon.metric("telebridge_messages_received_total").await,
        1.0,
        "only the new message arrives after the restart: every earlier one was acknowledged"
    );
}

#[tokio::test]
async fn presence_follows_the_status_topic_and_silence() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[presence]\ntimeout = \"1s\"").await;
    let publisher = Publisher::connect(&broker.url(), "presence-pub").await;
    let db = daemon.db().await;

    // Act + Assert: online, offline, then silence after telemetry.
    publisher
        .publish("devices/p1/status", QoS::AtLeastOnce, true, "online")
        .await;
    wait_for(T, "p1 online", || async {
        db.device("p1").await.filter(|d| d.0).map(|_| ())
    })
    .await;
    publisher
        .publish("devices/p1/status", QoS::AtLeastOnce, true, "offline")
        .await;
    wait_for(T, "p1 offline", || async {
        db.device("p1").await.filter(|d| !d.0).map(|_| ())
    })
    .await;

    publisher
        .publish("devices/p2/telemetry", QoS::AtLeastOnce, false, reading(1))
        .await;
    wait_for(T, "p2 online", || async {
        db.device("p2").await.filter(|d| d.0).map(|_| ())
    })
    .await;
    wait_for(T, "p2 offline after 1 s of silence", || async {
        db.device("p2").await.filter(|d| !d.0).map(|_| ())
    })
    .await;
    // The counter moves just after the commit that the database already shows.
    wait_for(T, "the presence timeout counted", || async {
        (daemon.metric("telebridge_presence_timeouts_total").await >= 1.0).then_some(())
    })
    .await;

    publisher
        .publish("devices/p3/status", QoS::AtLeastOnce, false, "sleeping")
        .await;
    wait_for(T, "bad status counted", || async {
        (daemon
            .metric("telebridge_messages_rejected_total{reason=\"bad_status\"}")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_daemon_reconnects_after_the_broker_restarts_and_stores_what_comes_after() {
    // Arrange
    let mut broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[mqtt]\nreconnect_max = \"500ms\"").await;
    {
        let publisher = Publisher::connect(&broker.url(), "rc-pub-1").await;
        publisher
            .publish("devices/r1/telemetry", QoS::AtLeastOnce, false, reading(1))
            .await;
        daemon.db().await.wait_count(1, T).await;
    }

    // Act: the broker goes away and comes back.
    broker.stop();
    wait_for(T, "readyz to report the broker down", || async {
        (daemon.get("/readyz").await.status() == 503).then_some(())
    })
    .await;
    broker.restart().await;
    wait_for(T, "readyz ready again", || async {
        daemon
            .get("/readyz")
            .await
            .status()
            .is_success()
            .then_some(())
    })
    .await;
    let publisher = Publisher::connect(&broker.url(), "rc-pub-2").await;
    for n in 2..12 {
        publisher
            .publish("devices/r1/telemetry", QoS::AtLeastOnce, false, reading(n))
            .await;
    }

    // Assert
    let db = daemon.db().await;
    db.wait_count(11, T).await;
    assert_eq!(db.numbers().await, (1..12).collect::<Vec<_>>());
    assert!(daemon.metric("telebridge_mqtt_reconnects_total").await >= 1.0);
}

#[tokio::test]
async fn retention_deletes_old_readings_and_keeps_new_ones() {
    // Arrange: ten readings, then moved two days into the past.
    let broker = Mosquitto::start().await;
    let mut daemon = Daemon::start(
        &broker.url(),
        "[storage]\nretention = \"1d\"\nretention_interval = \"200ms\"",
    )
    .await;
    let old = Publisher::connect(&broker.url(), "old-pub").await;
    for n in 0..10 {
        old.publish("devices/old/telemetry", QoS::AtLeastOnce, false, reading(n))
            .await;
    }
    daemon.db().await.wait_count(10, T).await;
    assert!(daemon.sigterm().success());
    assert_eq!(daemon.age_readings_below(10).await, 10);

    // Act
    daemon.spawn().await;
    let publisher = Publisher::connect(&broker.url(), "ret-pub").await;
    publisher
        .publish(
            "devices/new/telemetry",
            QoS::AtLeastOnce,
            false,
            reading(11),
        )
        .await;

    // Assert
    let db = daemon.db().await;
    wait_for(T, "old readings deleted", || async {
        let rows = db.rows().await;
        (rows.len() == 1 && rows[0].device == "new").then_some(())
    })
    .await;
    let deleted = wait_for(T, "the deletions counted", || async {
        let n = daemon.metric("telebridge_retention_deleted_total").await;
        (n >= 10.0).then_some(n)
    })
    .await;
    assert_eq!(deleted, 10.0);
    assert!(
        db.rows().await[0].seq > 10,
        "seq never goes back, even after deletions"
    );
}

#[tokio::test]
async fn a_device_that_keeps_sending_stays_online_and_its_last_seen_follows_within_250_ms() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[presence]\ntimeout = \"1s\"").await;
    let publisher = Publisher::connect(&broker.url(), "keep-pub").await;
    let db = daemon.db().await;

    // Act: a reading every 100 ms for 2.5 s, longer than the presence timeout.
    for n in 0..25 {
        publisher
            .publish("devices/k1/telemetry", QoS::AtLeastOnce, false, reading(n))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.wait_count(25, T).await;

    // Assert
    let last_row = db.rows().await.last().map(|r| r.received_at).expect("rows");
    let (online, last_seen) = db.device("k1").await.expect("k1 is a device");
    assert!(online, "still online");
    assert_eq!(
        daemon.metric("telebridge_presence_timeouts_total").await,
        0.0,
        "never timed out while sending"
    );
    assert!(
        last_row - last_seen <= 250 && last_seen <= last_row,
        "last_seen {last_seen} within 250 ms of the last reading {last_row}"
    );
}

#[tokio::test]
async fn a_device_that_misses_its_usual_readings_turns_stale_and_fresh_again_on_the_next() {
    // Arrange: a device that sends every 200 ms, and one stream watching presence.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[presence]\ntimeout = \"60s\"\n").await;
    let mut sse =
        crate::support::SseClient::connect(daemon.http, "/events?type=status", None).await;
    let p = Publisher::connect(&broker.url(), "stale-pub").await;
    for n in 0..10 {
        p.publish(
            "devices/beat-1/telemetry",
            QoS::AtLeastOnce,
            false,
            reading(n),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let presence = |want: &'static str| {
        let daemon = &daemon;
        async move {
            let d: serde_json::Value = daemon.get("/api/devices/beat-1").await.json().await.ok()?;
            (d["presence"] == want).then_some(d)
        }
    };
    assert!(presence("online").await.is_some());

    // Act 1: silence. Assert 1: stale (3 intervals, at least 2 s), still online.
    let went_quiet = std::time::Instant::now();
    let d = wait_for(T, "beat-1 to be stale", || presence("stale")).await;
    assert!(
        went_quiet.elapsed() >= Duration::from_millis(1_800),
        "stale too early"
    );
    assert_eq!(d["online"], true);
    assert_eq!(d["stale"], true);
    let e = sse
        .take("status", 2, T)
        .await
        .into_iter()
        .map(|e| e.json())
        .find(|e| e["presence"] == "stale")
        .expect("a stale event");
    assert_eq!(e["device"], "beat-1");
    assert_eq!(
        daemon
            .metric("telebridge_devices{presence=\"stale\"}")
            .await,
        1.0
    );
    let list: serde_json::Value = daemon.get("/api/devices").await.json().await.expect("json");
    assert_eq!(list["devices"][0]["presence"], "stale");

    // Act 2: it speaks. Assert 2: fresh again, with its event.
    p.publish(
        "devices/beat-1/telemetry",
        QoS::AtLeastOnce,
        false,
        reading(99),
    )
    .await;
    wait_for(T, "beat-1 to be fresh", || presence("online")).await;
    let back = sse.take("status", 1, T).await.remove(0).json();
    assert_eq!(back["presence"], "online");
    assert_eq!(back["stale"], false);
    assert_eq!(
        daemon
            .metric("telebridge_devices{presence=\"stale\"}")
            .await,
        0.0
    );
}
