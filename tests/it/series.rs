//! `GET /api/devices/{id}/series`: aggregates per time bucket, checked against what the
//! test computes from the readings it published; repeats, late readings, retention, bad
//! parameters and scopes.

use std::collections::BTreeMap;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::{Value, json};

use crate::support::{Daemon, Mosquitto, Publisher, wait_for};

const T: Duration = Duration::from_secs(30);
const DAY: i64 = 86_400_000;

/// One published reading: its device time and values (`None`: the field is absent).
#[derive(Clone, Copy)]
struct Sent {
    ts: i64,
    temperature: Option<f64>,
    rpm: Option<f64>,
}

impl Sent {
    fn payload(&self) -> String {
        let mut v = json!({ "ts": self.ts, "label": "x", "on": true });
        if let Some(t) = self.temperature {
            v["temperature"] = json!(t);
        }
        if let Some(r) = self.rpm {
            v["engine"] = json!({ "rpm": r });
        }
        v.to_string()
    }

    fn value(&self, field: &str) -> Option<f64> {
        match field {
            "temperature" => self.temperature,
            "engine.rpm" => self.rpm,
            _ => None,
        }
    }
}

/// The aggregates of one bucket, computed here: first/last by device time, the earlier
/// published winning a tie for first and the later one for last.
#[derive(Debug)]
struct Expect {
    count: i64,
    sum: f64,
    min: f64,
    max: f64,
    first: (i64, f64),
    last: (i64, f64),
}

fn expected(sent: &[Sent], field: &str, step: i64) -> BTreeMap<i64, Expect> {
    let mut out: BTreeMap<i64, Expect> = BTreeMap::new();
    for s in sent {
        let Some(v) = s.value(field) else { continue };
        let bucket = s.ts.div_euclid(step) * step;
        let e = out.entry(bucket).or_insert(Expect {
            count: 0,
            sum: 0.0,
            min: v,
            max: v,
            first: (s.ts, v),
            last: (s.ts, v),
        });
        e.count += 1;
        e.sum += v;
        e.min = e.min.min(v);
        e.max = e.max.max(v);
        if s.ts < e.first.0 {
            e.first = (s.ts, v);
        }
        if s.ts >= e.last.0 {
            e.last = (s.ts, v);
        }
    }
    out
}

/// Readings every 97 s over about 8 hours across a UTC midnight, values that floats hold
/// exactly, some fields missing, two readings sharing a device time.
fn fleet(now: i64) -> Vec<Sent> {
    let base = now.div_euclid(DAY) * DAY - 2 * DAY - 4 * 3_600_000;
    let mut sent: Vec<Sent> = (0..300)
        .map(|i: i64| Sent {
            ts: base + i * 97_000 + (i % 7) * 13,
            temperature: (i % 11 != 3).then(|| ((i * 37) % 101) as f64 / 4.0 - 5.0),
            rpm: (i % 5 != 1).then(|| ((i * 10) % 777) as f64),
        })
        .collect();
    // Same device time as reading 100, other values: first and last break the tie by order.
    let tie = sent[100].ts;
    sent.push(Sent {
        ts: tie,
        temperature: Some(99.5),
        rpm: Some(1.0),
    });
    sent
}

async fn series(daemon: &Daemon, device: &str, query: &str) -> Value {
    let r = daemon
        .get(&format!("/api/devices/{device}/series?{query}"))
        .await;
    assert_eq!(r.status(), 200, "{query}");
    r.json().await.expect("json")
}

async fn publish_all(publisher: &Publisher, device: &str, sent: &[Sent]) {
    for s in sent {
        publisher
            .publish(
                &format!("devices/{device}/telemetry"),
                QoS::AtLeastOnce,
                false,
                s.payload(),
            )
            .await;
    }
}

#[tokio::test]
async fn every_aggregate_at_every_step_matches_the_raw_readings_late_ones_included() {
    // Arrange: readings published out of order: every tenth one comes last, late.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "series-pub").await;
    let sent = fleet(telebridge::domain::now_ms());
    let is_late = |i: usize| i % 10 == 5;
    let on_time = sent.iter().enumerate().filter(|(i, _)| !is_late(*i));
    let late: Vec<Sent> = (0..sent.len())
        .filter(|i| is_late(*i))
        .map(|i| sent[i])
        .collect();
    let order: Vec<Sent> = on_time
        .map(|(_, s)| *s)
        .chain(late.iter().copied())
        .collect();
    publish_all(&publisher, "s1", &order).await;
    daemon.db().await.wait_count(order.len() as i64, T).await;
    let from = sent.iter().map(|s| s.ts).min().expect("sent");
    let to = sent.iter().map(|s| s.ts).max().expect("sent");

    for (step, ms, resolution) in [
        ("10s", 10_000, "raw"),
        ("1m", 60_000, "1m"),
        ("5m", 300_000, "1m"),
        ("1h", 3_600_000, "1h"),
        ("1d", DAY, "1h"),
    ] {
        // Act
        let body = series(
            &daemon,
            "s1",
            &format!(
                "fields=temperature,engine.rpm&from={from}&to={to}&step={step}&agg=avg,min,max,first,last,count"
            ),
        )
        .await;

        // Assert
        assert_eq!(body["step_ms"], ms, "{step}");
        assert_eq!(body["resolution"], resolution, "{step}");
        assert_eq!(body["units"]["temperature"], "°C");
        let points = body["points"].as_array().expect("points");
        for field in ["temperature", "engine.rpm"] {
            let want = expected(&order, field, ms);
            let got: BTreeMap<i64, &Value> = points
                .iter()
                .filter(|p| !p[field].is_null())
                .map(|p| {
                    let t = telebridge::domain::parse_rfc3339_ms(p["t"].as_str().expect("t"))
                        .expect("time");
                    (t, &p[field])
                })
                .collect();
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{field} buckets at {step}"
            );
            for (bucket, e) in &want {
                let g = got[bucket];
                let at = format!("{field} at {step}, bucket {bucket}");
                assert_eq!(g["count"], e.count, "{at}");
                assert_eq!(g["min"].as_f64(), Some(e.min), "{at}");
                assert_eq!(g["max"].as_f64(), Some(e.max), "{at}");
                assert_eq!(g["first"].as_f64(), Some(e.first.1), "{at}");
                assert_eq!(g["last"].as_f64(), Some(e.last.1), "{at}");
                let avg = g["avg"].as_f64().expect("avg");
                let want_avg = e.sum / e.count as f64;
                assert!(
                    (avg - want_avg).abs() <= 1e-9 * want_avg.abs().max(1.0),
                    "{at}: {avg} vs {want_avg}"
                );
            }
        }
    }

    // A late reading's time range finds it in raw history too.
    let late_one = late[3];
    let body: Value = daemon
        .get(&format!(
            "/api/devices/s1/readings?from={}&to={}",
            late_one.ts, late_one.ts
        ))
        .await
        .json()
        .await
        .expect("json");
    let readings = body["readings"].as_array().expect("readings");
    assert_eq!(readings.len(), 1, "{body}");
    assert_eq!(
        readings[0]["payload"]["temperature"].as_f64(),
        late_one.temperature
    );

    // A long or open-ended range (seq bounds from the hour tier) holds every reading too.
    for query in [
        format!("from={from}"),
        format!("to={to}"),
        format!("from={from}&to={to}"),
    ] {
        let body: Value = daemon
            .get(&format!("/api/devices/s1/readings?{query}&limit=10000"))
            .await
            .json()
            .await
            .expect("json");
        let got = body["readings"].as_array().map(Vec::len);
        assert_eq!(got, Some(order.len()), "{query}");
    }

    // CSV: one column per field and aggregate, one row per bucket.
    let csv = daemon
        .get(&format!(
            "/api/devices/s1/series?fields=temperature&from={from}&to={to}&step=1h&agg=min,count&format=csv"
        ))
        .await
        .text()
        .await
        .expect("csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "t,temperature_min,temperature_count");
    assert_eq!(
        lines.len() - 1,
        expected(&order, "temperature", 3_600_000).len()
    );
}

#[tokio::test]
async fn a_repeated_reading_changes_no_aggregate_even_after_a_restart() {
    // Arrange
    let broker = Mosquitto::start().await;
    let mut daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "repeat-pub").await;
    let sent = &fleet(telebridge::domain::now_ms())[..40];
    publish_all(&publisher, "r1", sent).await;
    daemon.db().await.wait_count(40, T).await;
    let from = sent[0].ts;
    let to = sent[39].ts;
    let query = format!("from={from}&to={to}&step=1m&agg=avg,min,max,first,last,count");
    let before = series(&daemon, "r1", &query).await;

    // Act: the same messages again (what a redelivery looks like), then after a restart,
    // then one new reading.
    publish_all(&publisher, "r1", &sent[..10]).await;
    wait_for(T, "the repeats counted", || async {
        (daemon.metric("telebridge_readings_repeated_total").await >= 10.0).then_some(())
    })
    .await;
    daemon.sigterm();
    daemon.spawn().await;
    publish_all(&publisher, "r1", &sent[30..]).await;
    let fresh = Sent {
        ts: sent[39].ts + 120_000,
        temperature: Some(1.25),
        rpm: None,
    };
    publish_all(&publisher, "r1", &[fresh]).await;
    daemon.db().await.wait_count(41, T).await;
    wait_for(T, "the repeats after the restart counted", || async {
        (daemon.metric("telebridge_readings_repeated_total").await >= 10.0).then_some(())
    })
    .await;

    // Assert: 41 rows, and the aggregates of the first 40 are as they were.
    assert_eq!(daemon.db().await.count().await, 41);
    let after = series(&daemon, "r1", &query).await;
    assert_eq!(after["points"], before["points"]);
    let with_fresh = series(
        &daemon,
        "r1",
        &format!(
            "from={from}&to={}&step=1h&agg=count&fields=temperature",
            fresh.ts
        ),
    )
    .await;
    let total: i64 = with_fresh["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["temperature"]["count"].as_i64().expect("count"))
        .sum();
    let want = sent.iter().filter(|s| s.temperature.is_some()).count() as i64 + 1;
    assert_eq!(total, want);
}

#[tokio::test]
async fn a_range_whose_raw_readings_are_gone_is_answered_from_the_rollups() {
    // Arrange: readings of two days ago (device time), received long ago as well.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        "[storage]\nretention = \"1d\"\nretention_interval = \"1s\"\n",
    )
    .await;
    let publisher = Publisher::connect(&broker.url(), "gone-pub").await;
    let sent = &fleet(telebridge::domain::now_ms())[..60];
    publish_all(&publisher, "g1", sent).await;
    daemon.db().await.wait_count(60, T).await;
    let from = sent[0].ts;
    let to = sent[59].ts;
    let query = format!("fields=temperature&from={from}&to={to}&agg=count,min,max");
    let before = series(&daemon, "g1", &format!("{query}&step=1m")).await;

    // Act: the readings age past retention, which deletes them.
    daemon.age_all_readings().await;
    wait_for(T, "retention to delete the raw readings", || async {
        (daemon.db().await.count().await == 0).then_some(())
    })
    .await;

    // Assert: raw history is empty, the series is the same, and says where it came from.
    let raw: Value = daemon
        .get(&format!("/api/devices/g1/readings?from={from}&to={to}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(raw["readings"].as_array().map(Vec::len), Some(0));
    let after = series(&daemon, "g1", &format!("{query}&step=1m")).await;
    assert_eq!(after["points"], before["points"]);
    assert!(!after["points"].as_array().expect("points").is_empty());
    assert_eq!(after["past_raw"], true);
    let auto = series(&daemon, "g1", &format!("{query}&step=auto")).await;
    assert_eq!(auto["resolution"], "1m", "{auto}");
    assert_eq!(auto["points"], before["points"]);
}

#[tokio::test]
async fn bad_parameters_get_a_400_that_names_them() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "bad-pub").await;
    publish_all(&publisher, "b1", &fleet(telebridge::domain::now_ms())[..1]).await;
    daemon.db().await.wait_count(1, T).await;

    for (query, status, names) in [
        ("step=7x", 400, "step"),
        ("step=0s", 400, "step"),
        ("step=1s&from=0", 400, "step"),
        ("agg=median", 400, "agg"),
        ("fields=a..b", 400, "fields"),
        ("fields=ts", 400, "fields"),
        ("from=yesterday", 400, "from"),
        ("from=2000&to=1000", 400, "from"),
        ("format=xml", 400, "format"),
        ("limit=5", 400, "limit"),
        ("bogus=1", 400, "bogus"),
    ] {
        // Act
        let r = daemon.get(&format!("/api/devices/b1/series?{query}")).await;

        // Assert
        assert_eq!(r.status(), status, "{query}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "bad_parameter", "{query}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.starts_with(names), "{query}: {message}");
    }
    let r = daemon.get("/api/devices/b+1/series").await;
    assert_eq!(r.status(), 400);
    let r = daemon.get("/api/devices/nobody/series").await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn series_follow_the_token_scopes_of_history() {
    // Arrange
    let (viewer, vh) = telebridge::auth::new_token();
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        &format!(
            "[auth]\ntokens = [ {{ name = \"view\", role = \"viewer\", hash = \"{vh}\", devices = [\"sensor-*\"] }} ]\n"
        ),
    )
    .await;
    let publisher = Publisher::connect(&broker.url(), "scope-pub").await;
    let one = &fleet(telebridge::domain::now_ms())[..1];
    publish_all(&publisher, "sensor-1", one).await;
    publish_all(&publisher, "pump-1", one).await;
    daemon.db().await.wait_count(2, T).await;
    let get = |device: &str| {
        crate::support::http()
            .get(format!(
                "http://{}/api/devices/{device}/series",
                daemon.http
            ))
            .bearer_auth(viewer.clone())
            .send()
    };

    // Act + Assert
    assert_eq!(get("sensor-1").await.expect("get").status(), 200);
    let r = get("pump-1").await.expect("get");
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "forbidden");
    let anonymous = crate::support::http()
        .get(format!(
            "http://{}/api/devices/sensor-1/series",
            daemon.http
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn units_come_from_the_payload_then_the_device_glob_then_the_config_then_the_name() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        "[units]\nspeed = \"m/s\"\n[units.\"truck-*\"]\nspeed = \"mph\"\n[units.\"truck-eu-*\"]\nspeed = \"km/h\"\n",
    )
    .await;
    let publisher = Publisher::connect(&broker.url(), "units-pub").await;
    let sent = [
        ("truck-1", r#"{"speed": 10, "temp_c": 4}"#),
        ("truck-eu-1", r#"{"speed": 11}"#),
        (
            "car-1",
            r#"{"speed": 12, "units": {"speed": "kn", "env.t": "K"}, "env": {"t": 280}}"#,
        ),
        ("bike-1", r#"{"speed": 13}"#),
    ];
    for (device, payload) in sent {
        publisher
            .publish(
                &format!("devices/{device}/telemetry"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await;
    }
    daemon.db().await.wait_count(sent.len() as i64, T).await;
    let want = [
        ("truck-1", json!({"speed": "mph", "temp_c": "°C"})),
        ("truck-eu-1", json!({"speed": "km/h"})),
        ("car-1", json!({"speed": "kn", "env.t": "K"})),
        ("bike-1", json!({"speed": "m/s"})),
    ];

    // Act
    let list: Value = daemon.get("/api/devices").await.json().await.expect("json");

    // Assert: each device's own units in the list, in its own entry and in its series.
    assert_eq!(list["units"]["speed"], "m/s", "{list}");
    for (device, units) in &want {
        let entry = list["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .find(|d| d["id"] == *device)
            .unwrap_or_else(|| panic!("{device} in {list}"));
        assert_eq!(&entry["units"], units, "{device} in the list");
        let one: Value = daemon
            .get(&format!("/api/devices/{device}"))
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(&one["units"], units, "{device}");
        let body = series(&daemon, device, "fields=speed&from=-1h").await;
        assert_eq!(body["units"]["speed"], units["speed"], "{device} series");
    }
}
