//! Fan-out to clients that watch some devices: thousands of filtered clients, token scopes,
//! and a slow filtered client among fast neighbours.

use std::io::Write as _;
use std::time::{Duration, Instant};

use rumqttc::QoS;

use crate::support::{Daemon, Mosquitto, Publisher, SseClient, collect_resuming, reading};

const T: Duration = Duration::from_secs(60);

/// The device and `n` of each reading event.
fn device_and_n(events: &[crate::support::SseEvent]) -> Vec<(String, i64)> {
    events
        .iter()
        .map(|e| {
            let d = e.json()["device"].as_str().unwrap_or("?").to_owned();
            (d, e.n())
        })
        .collect()
}

#[tokio::test]
async fn thousands_of_filtered_clients_each_get_exactly_their_own_devices_events_in_order() {
    // Arrange: 2,000 clients over 200 devices, one device each, and one client on 150 of
    // them at once.
    const DEVICES: i64 = 200;
    const CLIENTS: i64 = 2_000;
    const ROUNDS: i64 = 6;
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[http]\nmax_streams_per_ip = 5000").await;
    let publisher = Publisher::connect(&broker.url(), "fan-pub").await;
    let http = crate::support::http();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let path = format!("/events?type=reading&device=f{}", c % DEVICES);
        clients.push(SseClient::connect_via(&http, daemon.http, &path, None).await);
    }
    let wide: Vec<String> = (0..150).map(|d| format!("f{d}")).collect();
    let mut wide_client = SseClient::connect(
        daemon.http,
        &format!("/events?type=reading&device={}", wide.join(",")),
        None,
    )
    .await;

    // Act: readings round the devices, interleaved, so every client's are spread out.
    for n in 0..DEVICES * ROUNDS {
        publisher
            .publish(
                &format!("devices/f{}/telemetry", n % DEVICES),
                QoS::AtLeastOnce,
                false,
                reading(n),
            )
            .await;
    }

    // Assert: each client gets its device's readings, nothing else, in publish order. Its
    // last device's reading comes after every other device's, so a stray one would show.
    for (c, client) in clients.iter_mut().enumerate() {
        let d = c as i64 % DEVICES;
        let got = device_and_n(&client.take("reading", ROUNDS as usize, T).await);
        let want: Vec<(String, i64)> = (0..ROUNDS)
            .map(|r| (format!("f{d}"), r * DEVICES + d))
            .collect();
        assert_eq!(got, want, "client {c}");
    }
    let want: Vec<(String, i64)> = (0..DEVICES * ROUNDS)
        .filter(|n| n % DEVICES < 150)
        .map(|n| (format!("f{}", n % DEVICES), n))
        .collect();
    let got = device_and_n(&wide_client.take("reading", want.len(), T).await);
    assert_eq!(got, want, "the client on 150 devices");
}

#[tokio::test]
async fn a_scoped_token_never_receives_another_devices_event_whatever_it_asks_for() {
    // Arrange: a viewer that may see sensor-* only, and an unscoped admin.
    let (viewer, vh) = telebridge::auth::new_token();
    let (admin, ah) = telebridge::auth::new_token();
    let broker = Mosquitto::start().await;
    let config = format!(
        "[auth]\ntokens = [ {{ name = \"view\", role = \"viewer\", hash = \"{vh}\", devices = [\"sensor-*\"] }}, \
         {{ name = \"admin\", role = \"operator\", hash = \"{ah}\" }} ]\n"
    );
    let daemon = Daemon::start(&broker.url(), &config).await;
    let publisher = Publisher::connect(&broker.url(), "scope-pub").await;
    let mut scoped_all =
        SseClient::connect_with_token(daemon.http, "/events?type=reading", &viewer).await;
    let mut scoped_statuses =
        SseClient::connect_with_token(daemon.http, "/events?type=status", &viewer).await;
    let mut scoped_one =
        SseClient::connect_with_token(daemon.http, "/events?type=reading&device=sensor-2", &viewer)
            .await;
    let mut everything =
        SseClient::connect_with_token(daemon.http, "/events?type=reading", &admin).await;
    let mut all_statuses =
        SseClient::connect_with_token(daemon.http, "/events?type=status", &admin).await;

    // Act: readings and presence changes of devices in and out of the scope, interleaved.
    let devices = ["sensor-1", "pump-1", "sensor-2", "sensorx", "other-9"];
    for n in 0..40i64 {
        let d = devices[n as usize % devices.len()];
        publisher
            .publish(
                &format!("devices/{d}/telemetry"),
                QoS::AtLeastOnce,
                false,
                reading(n),
            )
            .await;
    }
    for d in devices {
        publisher
            .publish(
                &format!("devices/{d}/status"),
                QoS::AtLeastOnce,
                false,
                "offline",
            )
            .await;
    }

    // Assert
    let of = |pick: &dyn Fn(&str) -> bool| -> Vec<(String, i64)> {
        (0..40i64)
            .map(|n| (devices[n as usize % devices.len()].to_owned(), n))
            .filter(|(d, _)| pick(d))
            .collect()
    };
    let want = of(&|d| d.starts_with("sensor-"));
    let got = device_and_n(&scoped_all.take("reading", want.len(), T).await);
    assert_eq!(got, want, "a scoped client without a filter");
    let want = of(&|d| d == "sensor-2");
    let got = device_and_n(&scoped_one.take("reading", want.len(), T).await);
    assert_eq!(got, want, "a scoped client on one device");
    let want = of(&|_| true);
    let got = device_and_n(&everything.take("reading", want.len(), T).await);
    assert_eq!(got, want, "an unscoped client");
    // The scoped streams got nothing else: the next in-scope event is the next they get.
    publisher
        .publish(
            "devices/pump-1/telemetry",
            QoS::AtLeastOnce,
            false,
            reading(98),
        )
        .await;
    publisher
        .publish(
            "devices/sensor-1/telemetry",
            QoS::AtLeastOnce,
            false,
            reading(99),
        )
        .await;
    publisher
        .publish("devices/pump-1/status", QoS::AtLeastOnce, false, "online")
        .await;
    publisher
        .publish("devices/sensor-2/status", QoS::AtLeastOnce, false, "online")
        .await;
    let next = device_and_n(&scoped_all.take("reading", 1, T).await);
    assert_eq!(next, [("sensor-1".to_owned(), 99)]);
    // Presence: what the unscoped watcher saw up to sensor-2 coming back, less the devices
    // outside the scope, is exactly what the scoped one gets.
    let presence = |e: &crate::support::SseEvent| {
        let v = e.json();
        (
            v["device"].as_str().unwrap_or("?").to_owned(),
            v["online"] == true,
        )
    };
    let mut seen = Vec::new();
    while seen.last() != Some(&("sensor-2".to_owned(), true)) || seen.len() < 6 {
        let e = all_statuses.take("status", 1, T).await;
        seen.push(presence(&e[0]));
    }
    assert!(seen.iter().any(|(d, _)| d == "pump-1"), "{seen:?}");
    let want: Vec<(String, bool)> = seen
        .into_iter()
        .filter(|(d, _)| d.starts_with("sensor-"))
        .collect();
    let got: Vec<(String, bool)> = scoped_statuses
        .take("status", want.len(), T)
        .await
        .iter()
        .map(presence)
        .collect();
    assert_eq!(got, want, "a scoped presence watcher");
    let refused = crate::support::http()
        .get(format!("http://{}/events?device=pump-1", daemon.http))
        .bearer_auth(&viewer)
        .send()
        .await
        .expect("get");
    assert_eq!(
        refused.status(),
        403,
        "asking for a device outside the scope"
    );
}

#[tokio::test]
async fn a_slow_filtered_client_is_cut_off_and_resumes_without_loss_while_its_neighbours_keep_up() {
    // Arrange: a small live buffer; a client on device `slow` that never reads its socket,
    // a neighbour on the same device that reads (resuming like a browser), and one on
    // another device.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[http]\nsse_buffer = 500").await;
    let publisher = Publisher::connect(&broker.url(), "slow-pub").await;
    let path = "/events?type=reading&device=slow";
    let mut slow = std::net::TcpStream::connect(daemon.http).expect("connect");
    write!(
        slow,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    const N: i64 = 6_000;
    let same = SseClient::connect(daemon.http, path, None).await;
    let same = tokio::spawn({
        let addr = daemon.http;
        async move { collect_resuming(same, addr, path, N as usize, T).await }
    });
    let mut calm = SseClient::connect(daemon.http, "/events?type=reading&device=calm", None).await;

    // Act: 1 KiB readings on `slow`, far more than the buffer and socket buffers hold, with
    // one on `calm` every 200; each `calm` one is awaited on its stream.
    let pad = "x".repeat(1000);
    let mut calm_waits = Vec::new();
    for n in 0..N {
        let body = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
        publisher
            .publish("devices/slow/telemetry", QoS::AtLeastOnce, false, body)
            .await;
        if n % 200 == 199 {
            let sent = Instant::now();
            publisher
                .publish(
                    "devices/calm/telemetry",
                    QoS::AtLeastOnce,
                    false,
                    reading(n),
                )
                .await;
            let got = calm.reading_numbers(1, T).await;
            assert_eq!(got, [n], "the neighbour on another device gets its reading");
            calm_waits.push(sent.elapsed());
        }
    }

    // Assert: the neighbours got everything; the other device's readings were not held
    // back behind the slow client (a generous bound: this is not a speed test).
    daemon.db().await.wait_count(N + N / 200, T).await;
    let slowest = calm_waits.iter().max().copied().unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(5),
        "a reading on another device took {slowest:?}"
    );
    let (got, _reconnects) = same.await.expect("neighbour");
    assert_eq!(
        got.iter().map(|e| e.n()).collect::<Vec<_>>(),
        (0..N).collect::<Vec<_>>(),
        "the neighbour on the same device misses nothing"
    );

    // The slow client's stream was closed with a notice; it resumes from its last id.
    let (text, last_id) = crate::support::read_cut_stream(slow);
    let first_missing = text.matches("event: reading").count() as i64;
    assert!(first_missing < N, "it was cut off before the end");
    assert!(daemon.metric("telebridge_sse_clients_cut_total").await >= 1.0);
    crate::support::assert_resumes(daemon.http, path, &last_id, first_missing, N, T).await;
}
