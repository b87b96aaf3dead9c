//! `GET /events`: the contract's fields, filters, exact resume, gaps, snapshots, slow
//! clients, heartbeats and shutdown.

use std::io::Write as _;
use std::time::Duration;

use rumqttc::QoS;

use crate::support::{
    Daemon, Mosquitto, Publisher, SseClient, collect_resuming, reading, wait_for,
};

const T: Duration = Duration::from_secs(30);

/// Readings numbered `ns`, spread over devices r0, r1 and r2.
async fn publish_over_three_devices(publisher: &Publisher, ns: std::ops::Range<i64>) {
    for n in ns {
        let topic = format!("devices/r{}/telemetry", n % 3);
        publisher
            .publish(&topic, QoS::AtLeastOnce, false, reading(n))
            .await;
    }
}

async fn setup(extra: &str) -> (Mosquitto, Daemon, Publisher) {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), extra).await;
    let publisher = Publisher::connect(&broker.url(), "sse-pub").await;
    (broker, daemon, publisher)
}

#[tokio::test]
async fn readings_arrive_on_events_with_the_contract_fields_filtered_by_device_and_type() {
    // Arrange
    let (_broker, daemon, publisher) = setup("").await;
    let mut all = SseClient::connect(daemon.http, "/events", None).await;
    let mut only_s2 = SseClient::connect(daemon.http, "/events?device=s2&type=reading", None).await;
    let mut only_status = SseClient::connect(daemon.http, "/events?type=status", None).await;

    // Act
    publisher
        .publish("devices/s1/telemetry", QoS::AtLeastOnce, false, reading(1))
        .await;
    publisher
        .publish("devices/s2/telemetry", QoS::AtLeastOnce, false, reading(2))
        .await;
    publisher
        .publish("devices/s1/status", QoS::AtLeastOnce, false, "offline")
        .await;
    publisher
        .publish("devices/s2/telemetry", QoS::AtLeastOnce, false, reading(3))
        .await;

    // Assert
    let readings = all.take("reading", 3, T).await;
    let rows = daemon.db().await.rows().await;
    for (ev, row) in readings.iter().zip(&rows) {
        let data = ev.json();
        assert_eq!(
            ev.id.as_deref(),
            Some(row.seq.to_string().as_str()),
            "id is the row's seq"
        );
        assert_eq!(data["seq"], row.seq);
        assert_eq!(data["device"], row.device.as_str());
        assert_eq!(data["topic"], row.topic.as_str());
        assert_eq!(data["ts"], telebridge::domain::format_ms(row.ts).as_str());
        assert_eq!(
            data["received_at"],
            telebridge::domain::format_ms(row.received_at).as_str()
        );
        let sent: serde_json::Value = serde_json::from_slice(&row.payload).expect("json");
        assert_eq!(
            data["payload"], sent,
            "payload is the device's JSON as sent"
        );
    }
    assert_eq!(
        readings.iter().map(|e| e.n()).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let s2: Vec<i64> = only_s2.reading_numbers(2, T).await;
    assert_eq!(s2, vec![2, 3]);
    // New devices appear online with their first reading; then s1 reports offline.
    let status: Vec<(String, bool)> = only_status
        .take("status", 3, T)
        .await
        .iter()
        .map(|e| {
            (
                e.json()["device"].as_str().unwrap_or("").to_owned(),
                e.json()["online"] == true,
            )
        })
        .collect();
    assert_eq!(
        status,
        vec![
            ("s1".into(), true),
            ("s2".into(), true),
            ("s1".into(), false)
        ]
    );
    // The filtered streams got nothing else.
    assert!(only_s2.next(Duration::from_millis(300)).await.is_none());
    assert!(only_status.next(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_readings_in_order_then_goes_live_without_gap_or_duplicate()
 {
    // Arrange: a client reads the first 10 readings and disconnects.
    let (_broker, daemon, publisher) = setup("").await;
    let mut first = SseClient::connect(daemon.http, "/events?type=reading", None).await;
    for n in 0..10 {
        publisher
            .publish("devices/r1/telemetry", QoS::AtLeastOnce, false, reading(n))
            .await;
    }
    let seen = first.take("reading", 10, T).await;
    let last_id = seen.last().and_then(|e| e.id.clone()).expect("id");
    drop(first);

    // Act: many readings while it is away, then a reconnect with more published during
    // the replay.
    const AWAY: i64 = 3_000;
    const DURING: i64 = 500;
    publish_over_three_devices(&publisher, 10..10 + AWAY).await;
    daemon.db().await.wait_count(10 + AWAY, T).await;
    let mut resumed = SseClient::connect(daemon.http, "/events?type=reading", Some(&last_id)).await;
    publish_over_three_devices(&publisher, 10 + AWAY..10 + AWAY + DURING).await;

    // Assert: exactly 10.., in order, once each.
    let got = resumed.take("reading", (AWAY + DURING) as usize, T).await;
    let numbers: Vec<i64> = got.iter().map(|e| e.n()).collect();
    assert_eq!(numbers, (10..10 + AWAY + DURING).collect::<Vec<_>>());
    let ids: Vec<i64> = got
        .iter()
        .map(|e| e.id.as_deref().and_then(|i| i.parse().ok()).expect("id"))
        .collect();
    assert!(ids.windows(2).all(|w| w[1] > w[0]), "ids increase");
    assert!(
        resumed.next(Duration::from_millis(300)).await.is_none(),
        "no duplicate after the end"
    );

    // The query parameter works like the header, filtered by device too.
    let mut by_query = SseClient::connect(
        daemon.http,
        &format!("/events?device=r1&last_event_id={last_id}"),
        None,
    )
    .await;
    let r1: Vec<i64> = by_query.reading_numbers((AWAY / 3) as usize, T).await;
    assert!(r1.iter().all(|n| n % 3 == 1));
    assert_eq!(r1.first(), Some(&10));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_without_slowing_ingest_and_resumes_without_loss() {
    // Arrange: a small live buffer, and a client that never reads its socket.
    let (_broker, daemon, publisher) = setup("[http]\nsse_buffer = 500").await;
    let mut slow = std::net::TcpStream::connect(daemon.http).expect("connect");
    write!(
        slow,
        "GET /events?type=reading HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let reader = SseClient::connect(daemon.http, "/events?type=reading", None).await;
    let reader = tokio::spawn({
        let addr = daemon.http;
        async move {
            collect_resuming(
                reader,
                addr,
                "/events?type=reading",
                6_000,
                Duration::from_secs(60),
            )
            .await
        }
    });

    // Act: far more than the buffer and the socket buffers hold (1 KiB readings).
    const N: i64 = 6_000;
    let pad = "x".repeat(1000);
    for n in 0..N {
        let body = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
        publisher
            .publish("devices/slow/telemetry", QoS::AtLeastOnce, false, body)
            .await;
    }

    // Assert: ingest kept up, a reading client got everything, memory stayed bounded.
    daemon.db().await.wait_count(N, T).await;
    let (got, _reconnects) = reader.await.expect("reader");
    assert_eq!(
        got.iter().map(|e| e.n()).collect::<Vec<_>>(),
        (0..N).collect::<Vec<_>>(),
        "a reader that resumes like a browser misses nothing"
    );
    let rss_kib = daemon.rss_kib();
    assert!(rss_kib < 200 * 1024, "resident memory {rss_kib} KiB");

    // The slow client's stream was closed: reading its socket now ends, after a notice.
    let (text, last_id) = crate::support::read_cut_stream(slow);
    assert!(daemon.metric("telebridge_sse_clients_cut_total").await >= 1.0);

    // It resumes from storage and gets the rest, in order.
    let first_missing: i64 = text.split("\n\n").filter(|b| b.contains("id: ")).count() as i64;
    let path = "/events?type=reading";
    crate::support::assert_resumes(daemon.http, path, &last_id, first_missing, N, T).await;
}

#[tokio::test]
async fn snapshot_latest_starts_with_the_latest_reading_of_each_device() {
    let (_broker, daemon, publisher) = setup("").await;
    for n in 0..9 {
        publisher
            .publish(
                &format!("devices/k{}/telemetry", n % 3),
                QoS::AtLeastOnce,
                false,
                reading(n),
            )
            .await;
    }
    daemon.db().await.wait_count(9, T).await;

    let mut all = SseClient::connect(daemon.http, "/events?snapshot=latest", None).await;
    let snap: Vec<i64> = all.reading_numbers(3, T).await;
    assert_eq!(snap, vec![6, 7, 8]);
    let mut one =
        SseClient::connect(daemon.http, "/events?snapshot=latest&device=k1,k2", None).await;
    let snap: Vec<i64> = one.reading_numbers(2, T).await;
    assert_eq!(snap, vec![7, 8]);

    // Live continues after the snapshot, without repeating it.
    publisher
        .publish("devices/k1/telemetry", QoS::AtLeastOnce, false, reading(9))
        .await;
    assert_eq!(one.take("reading", 1, T).await[0].n(), 9);
}

#[tokio::test]
async fn a_resume_point_older_than_storage_gets_a_gap_event_first() {
    // Arrange: readings 1..=20, then retention removes the first ten.
    let (_broker, mut daemon, publisher) =
        setup("[storage]\nretention = \"1d\"\nretention_interval = \"200ms\"").await;
    for n in 0..20 {
        publisher
            .publish("devices/g1/telemetry", QoS::AtLeastOnce, false, reading(n))
            .await;
    }
    daemon.db().await.wait_count(20, T).await;
    assert!(daemon.sigterm().success());
    assert_eq!(daemon.age_readings_below(10).await, 10);
    daemon.spawn().await;
    wait_for(T, "retention", || async {
        (daemon.db().await.count().await == 10).then_some(())
    })
    .await;

    // Act
    let mut client = SseClient::connect(daemon.http, "/events?type=reading", Some("3")).await;

    // Assert
    let gap = client.next(T).await.expect("gap event");
    assert_eq!(gap.event, "gap");
    let first_kept = daemon.db().await.rows().await[0].seq;
    assert_eq!(gap.json()["first_available"], first_kept);
    let rest: Vec<i64> = client.reading_numbers(10, T).await;
    assert_eq!(rest, (10..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn bad_event_parameters_get_a_json_400_naming_the_parameter() {
    let (_broker, daemon, _publisher) = setup("").await;
    for (query, code, word) in [
        ("device=a%2Bb", "invalid_device", "device"),
        ("device=a%2Fb", "invalid_device", "device"),
        ("type=readings", "bad_parameter", "type"),
        ("last_event_id=abc", "bad_parameter", "last_event_id"),
        ("last_event_id=-1", "bad_parameter", "last_event_id"),
        ("snapshot=all", "bad_parameter", "snapshot"),
    ] {
        let r = daemon.get(&format!("/events?{query}")).await;
        assert_eq!(r.status(), 400, "{query}");
        let body: serde_json::Value = r.json().await.expect("json error");
        assert_eq!(body["error"]["code"], code, "{query}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains(word),
            "{query}: {body}"
        );
    }
}

#[tokio::test]
async fn heartbeats_keep_an_idle_stream_alive_and_shutdown_ends_it_with_a_final_event() {
    let (_broker, mut daemon, _publisher) = setup("[http]\nheartbeat = \"1s\"").await;
    let mut client = SseClient::connect(daemon.http, "/events", None).await;
    assert!(client.next(Duration::from_millis(2_500)).await.is_none());
    assert!(
        client.comments.iter().any(|c| c == "heartbeat"),
        "{:?}",
        client.comments
    );

    let status = tokio::task::spawn_blocking(move || {
        let s = daemon.sigterm();
        (s, daemon)
    });
    let last = client.next(T).await.expect("a final event");
    assert_eq!(last.event, "shutdown");
    assert!(
        client.next(T).await.is_none() && client.ended,
        "the stream ends"
    );
    let (status, _daemon) = status.await.expect("join");
    assert!(status.success());
}

#[tokio::test]
async fn a_device_that_comes_back_by_sending_telemetry_gets_an_online_status_event() {
    let (_broker, daemon, publisher) = setup("").await;
    let mut status = SseClient::connect(daemon.http, "/events?type=status", None).await;
    publisher
        .publish("devices/back/status", QoS::AtLeastOnce, false, "offline")
        .await;
    assert_eq!(status.take("status", 1, T).await[0].json()["online"], false);

    publisher
        .publish(
            "devices/back/telemetry",
            QoS::AtLeastOnce,
            false,
            reading(1),
        )
        .await;
    publisher
        .publish(
            "devices/back/telemetry",
            QoS::AtLeastOnce,
            false,
            reading(2),
        )
        .await;

    let back = status.take("status", 1, T).await;
    assert_eq!(back[0].json()["device"], "back");
    assert_eq!(back[0].json()["online"], true);
    assert!(
        status.next(Duration::from_millis(400)).await.is_none(),
        "one event per change, not per reading"
    );
}

#[tokio::test]
async fn a_client_that_goes_away_is_noticed_and_its_stream_freed() {
    let (_broker, daemon, _publisher) = setup("").await;
    let client = SseClient::connect(daemon.http, "/events", None).await;
    assert_eq!(daemon.metric("telebridge_sse_clients").await, 1.0);

    drop(client);

    wait_for(T, "the stream to be freed", || async {
        (daemon.metric("telebridge_sse_clients").await == 0.0).then_some(())
    })
    .await;
}
