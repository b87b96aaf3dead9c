//! `GET /api/devices` and `GET /api/devices/{id}/readings`.

use std::time::Duration;

use rumqttc::QoS;

use crate::support::{Daemon, Mosquitto, Publisher, reading};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn history_pages_by_seq_filters_by_time_and_exports_csv() {
    // Arrange: 25 readings of h1 (device ts = 1_700_000_000_000 + n), 5 of h2.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "hist-pub").await;
    for n in 0..30 {
        let device = if n < 25 { "h1" } else { "h2" };
        publisher
            .publish(
                &format!("devices/{device}/telemetry"),
                QoS::AtLeastOnce,
                false,
                reading(n),
            )
            .await;
    }
    daemon.db().await.wait_count(30, T).await;

    // Act + Assert: paging
    let mut after = 0;
    let mut numbers = Vec::new();
    loop {
        let body: serde_json::Value = daemon
            .get(&format!("/api/devices/h1/readings?limit=10&after={after}"))
            .await
            .json()
            .await
            .expect("json");
        for r in body["readings"].as_array().expect("readings") {
            numbers.push(r["payload"]["n"].as_i64().expect("n"));
            assert_eq!(r["device"], "h1");
        }
        match body["next_after"].as_i64() {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(numbers, (0..25).collect::<Vec<_>>());

    // Newest first, paged by `before`, within a time range too.
    let mut before = None::<i64>;
    let mut newest = Vec::new();
    loop {
        let cursor = before.map(|b| format!("&before={b}")).unwrap_or_default();
        let body: serde_json::Value = daemon
            .get(&format!(
                "/api/devices/h1/readings?order=desc&limit=4&from=1700000000010{cursor}"
            ))
            .await
            .json()
            .await
            .expect("json");
        assert!(body["next_after"].is_null(), "{body}");
        newest.extend(
            body["readings"]
                .as_array()
                .expect("readings")
                .iter()
                .map(|r| r["payload"]["n"].as_i64().expect("n")),
        );
        match body["next_before"].as_i64() {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    assert_eq!(newest, (10..25).rev().collect::<Vec<_>>());

    // Time range on device time (RFC 3339 and Unix ms).
    let from = telebridge::domain::format_ms(1_700_000_000_005);
    let body: serde_json::Value = daemon
        .get(&format!(
            "/api/devices/h1/readings?from={from}&to=1700000000009"
        ))
        .await
        .json()
        .await
        .expect("json");
    let ns: Vec<i64> = body["readings"]
        .as_array()
        .expect("arr")
        .iter()
        .map(|r| r["payload"]["n"].as_i64().expect("n"))
        .collect();
    assert_eq!(ns, vec![5, 6, 7, 8, 9]);

    // CSV
    let r = daemon.get("/api/devices/h2/readings?format=csv").await;
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/csv; charset=utf-8")
    );
    let csv = r.text().await.expect("csv");
    let lines: Vec<&str> = csv.lines().collect();
    // A column per numeric field (the device time `ts` is the reading's own column).
    assert_eq!(
        lines[0],
        "seq,device,topic,ts,received_at,n,temperature,payload,flags"
    );
    assert_eq!(lines.len(), 6);
    let cells: Vec<&str> = lines[1].splitn(8, ',').collect();
    assert_eq!(&cells[5..7], ["25", "21.5"], "{}", lines[1]);
    assert!(lines[1].contains(r#""{""n"":25,"#), "{}", lines[1]);

    // Devices
    let body: serde_json::Value = daemon.get("/api/devices").await.json().await.expect("json");
    let devices = body["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0]["id"], "h1");
    assert_eq!(devices[0]["online"], true);
    assert_eq!(devices[0]["latest"]["payload"]["n"], 24);
    assert_eq!(devices[1]["latest"]["payload"]["n"], 29);
}

#[tokio::test]
async fn bad_history_parameters_get_a_400_naming_the_parameter_and_unknown_devices_a_404() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "hist-bad").await;
    publisher
        .publish("devices/b1/telemetry", QoS::AtLeastOnce, false, reading(1))
        .await;
    daemon.db().await.wait_count(1, T).await;

    for (query, word) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=ten", "limit"),
        ("after=-5", "after"),
        ("from=yesterday", "from"),
        ("to=soon", "to"),
        ("from=1700000000009&to=1700000000001", "from"),
        ("format=xml", "format"),
        ("before=0", "before"),
        ("before=x", "before"),
        ("order=newest", "order"),
        ("around=5", "around"),
    ] {
        let r = daemon
            .get(&format!("/api/devices/b1/readings?{query}"))
            .await;
        assert_eq!(r.status(), 400, "{query}");
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "bad_parameter", "{query}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .starts_with(word),
            "{query}: {body}"
        );
    }
    // Unknown parameters are refused on every endpoint, named in the message.
    for path in [
        "/api/devices?sort=id",
        "/api/devices/b1/status-history?page=2",
        "/api/commands?state=sent",
        "/api/alerts?status=open",
        "/api/devices/b1?fields=n",
        "/events?devices=b1",
    ] {
        let r = daemon.get(path).await;
        assert_eq!(r.status(), 400, "{path}");
        let body: serde_json::Value = r.json().await.expect("json");
        let name = path.split(['?', '=']).nth(1).expect("name");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .starts_with(&format!("{name}: unknown parameter")),
            "{path}: {body}"
        );
    }
    let r = daemon.get("/api/devices/nobody/readings").await;
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_found");
    let r = daemon.get("/api/devices/bad%2Bid/readings").await;
    assert_eq!(r.status(), 400);
    let r = daemon.get("/no/such/path").await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["error"]["code"],
        "not_found"
    );
}

#[tokio::test]
async fn the_device_list_says_how_a_first_device_publishes() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let body: serde_json::Value = daemon.get("/api/devices").await.json().await.expect("json");
    assert_eq!(body["devices"].as_array().map(Vec::len), Some(0));
    let hint = &body["publish"];
    assert_eq!(hint["topic"], "devices/{device}/telemetry");
    let port = broker.url().rsplit(':').next().expect("port").to_owned();
    assert_eq!(hint["port"].to_string(), port);
    let example = hint["example"].as_str().expect("example");
    assert!(
        example.starts_with("mosquitto_pub -h 127.0.0.1 -p ")
            && example.contains(" -t devices/my-sensor/telemetry -m '{\"temperature\": 21.5}'"),
        "{example}"
    );
}
