//! Alerts: rules on readings and presence, as a user sees them: `/api/alerts`, `event: alert`
//! on `/events`, acknowledgements, and signed webhooks delivered to a real HTTP server of the
//! test's own.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use rumqttc::QoS;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, Daemon, Mosquitto, Publisher, SseClient, free_port, wait_for};

const T: Duration = Duration::from_secs(20);

/// A rule "hot" on sensor-*: above 80 for 2 s fires, below 75 clears.
const HOT: &str = r#"{ name = "hot", devices = ["sensor-*"], when = "temperature > 80", for = "2s", severity = "critical", clear = "temperature < 75" }"#;

fn temp(v: f64) -> String {
    json!({ "temperature": v }).to_string()
}

async fn alerts(daemon: &Daemon, query: &str) -> Vec<Value> {
    let body: Value = daemon
        .get(&format!("/api/alerts{query}"))
        .await
        .json()
        .await
        .expect("json");
    body["alerts"].as_array().expect("alerts").clone()
}

/// Waits for an alert of `rule` on `device` in `state`.
async fn wait_alert(daemon: &Daemon, rule: &str, device: &str, state: &str) -> Value {
    wait_for(
        T,
        &format!("alert {rule} on {device} to be {state}"),
        || async {
            alerts(daemon, "")
                .await
                .into_iter()
                .find(|a| a["rule"] == rule && a["device"] == device && a["state"] == state)
        },
    )
    .await
}

/// Publishes `value` as the temperature of `device` every 200 ms for `span`.
async fn hold(p: &Publisher, device: &str, value: f64, span: Duration) {
    let end = Instant::now() + span;
    while Instant::now() < end {
        p.publish(
            &format!("devices/{device}/telemetry"),
            QoS::AtLeastOnce,
            false,
            temp(value),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One request the webhook receiver got.
#[derive(Debug, Clone)]
pub struct Hook {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Hook {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("webhook body is JSON")
    }
}

/// A real HTTP/1.1 server that records every request and answers `status`.
pub struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Hook>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(status: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    // One request per connection is all this server reads.
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let headers: Vec<(String, String)> = head
                        .lines()
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
                        .collect();
                    let len: usize = headers
                        .iter()
                        .find(|(k, _)| k == "content-length")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = buf[head_end + 4..].to_vec();
                    while body.len() < len {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        body.extend_from_slice(&chunk[..n]);
                    }
                    seen.lock().unwrap().push(Hook { headers, body });
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Receiver { port, got, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub fn hooks(&self) -> Vec<Hook> {
        self.got.lock().unwrap().clone()
    }

    pub async fn wait(&self, n: usize) -> Vec<Hook> {
        wait_for(T, &format!("{n} webhook deliveries"), || async {
            let h = self.hooks();
            (h.len() >= n).then_some(h)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The signature a receiver computes from the secret and the body it got.
fn expected_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn a_threshold_fires_once_after_for_and_hysteresis_clears_it_with_signed_webhooks() {
    // Arrange
    let broker = Mosquitto::start().await;
    let receiver = Receiver::start(200).await;
    let secret = "s3cret-for-the-test";
    let daemon = Daemon::start(
        &broker.url(),
        &format!(
            "[alerts]\nrules = [ {HOT} ]\nwebhooks = [ {{ url = \"{}\", secret = \"{secret}\" }} ]\n",
            receiver.url()
        ),
    )
    .await;
    let mut sse = SseClient::connect(daemon.http, "/events?type=alert", None).await;
    let p = Publisher::connect(&broker.url(), "alert-pub").await;

    // Act 1: above the threshold for less than `for`, then back below.
    hold(&p, "sensor-1", 90.0, Duration::from_millis(800)).await;
    hold(&p, "sensor-1", 70.0, Duration::from_millis(400)).await;
    // Assert 1: more than `for` later, nothing has fired.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        alerts(&daemon, "").await.is_empty(),
        "a threshold held for less than `for` fired"
    );

    // Act 2: above it for longer than `for` (and readings keep coming).
    hold(&p, "sensor-1", 85.0, Duration::from_millis(3500)).await;
    // Assert 2: exactly one alert, firing, with what fired it.
    let fired = wait_alert(&daemon, "hot", "sensor-1", "firing").await;
    hold(&p, "sensor-1", 88.0, Duration::from_millis(1200)).await;
    let all = alerts(&daemon, "").await;
    assert_eq!(all.len(), 1, "fired more than once: {all:?}");
    assert_eq!(fired["severity"], "critical");
    assert_eq!(fired["field"], "temperature");
    assert_eq!(fired["threshold"], 80.0);
    assert!(fired["value"].as_f64().unwrap() > 80.0, "{fired}");
    assert_eq!(
        daemon
            .metric("telebridge_alerts_open{severity=\"critical\"}")
            .await,
        1.0
    );
    assert_eq!(daemon.metric("telebridge_devices_known").await, 1.0);
    assert_eq!(
        daemon
            .metric("telebridge_devices{presence=\"online\"}")
            .await,
        1.0
    );

    // Act 3: between clear (75) and the threshold (80): hysteresis keeps it firing...
    hold(&p, "sensor-1", 77.0, Duration::from_millis(1000)).await;
    assert_eq!(alerts(&daemon, "?state=firing").await.len(), 1);
    // ...until it goes below 75.
    hold(&p, "sensor-1", 74.0, Duration::from_millis(400)).await;
    let resolved = wait_alert(&daemon, "hot", "sensor-1", "resolved").await;
    assert_eq!(resolved["id"], fired["id"]);
    assert!(alerts(&daemon, "?state=open").await.is_empty());
    assert_eq!(
        daemon
            .metric("telebridge_alerts_open{severity=\"critical\"}")
            .await,
        0.0
    );

    // Assert 4: the stream carried exactly those two changes, with log ids.
    let events = sse.take("alert", 2, T).await;
    let states: Vec<Value> = events.iter().map(|e| e.json()["state"].clone()).collect();
    assert_eq!(states, [json!("firing"), json!("resolved")]);
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e.id.as_deref().unwrap().parse().unwrap())
        .collect();
    assert!(ids[0] < ids[1], "{ids:?}");

    // Assert 5: the webhook got both, signed, and each signature verifies.
    let hooks = receiver.wait(2).await;
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    for (h, state) in hooks.iter().zip(["firing", "resolved"]) {
        let sig = h.header("x-telebridge-signature").expect("signed");
        assert_eq!(sig, expected_signature(secret, &h.body));
        assert_ne!(sig, expected_signature("another secret", &h.body));
        assert_eq!(h.json()["state"], state);
        assert_eq!(h.json()["rule"], "hot");
        assert_eq!(h.header("content-type"), Some("application/json"));
    }
    assert_eq!(
        daemon.metric("telebridge_webhook_deliveries_total").await,
        2.0
    );
}

#[tokio::test]
async fn offline_fires_on_a_last_will_and_on_the_presence_timeout() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        "[presence]\ntimeout = \"2s\"\n[alerts]\nrules = [ { name = \"down\", when = \"offline\", severity = \"critical\" } ]\n",
    )
    .await;
    // A device with a last will, whose connection then dies without a goodbye.
    let (host, port) = broker
        .url()
        .trim_start_matches("mqtt://")
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.parse::<u16>().unwrap()))
        .unwrap();
    let mut opts = rumqttc::MqttOptions::new("will-device", host, port);
    opts.set_keep_alive(Duration::from_secs(5))
        .set_last_will(rumqttc::LastWill::new(
            "devices/gw-1/status",
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    let device = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    client
        .publish("devices/gw-1/status", QoS::AtLeastOnce, true, "online")
        .await
        .unwrap();
    wait_for(T, "gw-1 to be online", || async {
        let d: Value = daemon.get("/api/devices/gw-1").await.json().await.ok()?;
        (d["online"] == true).then_some(())
    })
    .await;

    // Act 1: the connection dies (the task that owns the socket is gone).
    device.abort();
    // Assert 1: the broker sends the will, and the rule fires.
    let a = wait_alert(&daemon, "down", "gw-1", "firing").await;
    assert_eq!(a["severity"], "critical");

    // Act 2: a device that just goes silent.
    let p = Publisher::connect(&broker.url(), "silent-pub").await;
    p.publish(
        "devices/quiet-1/telemetry",
        QoS::AtLeastOnce,
        false,
        temp(20.0),
    )
    .await;
    // Assert 2: the presence timeout marks it offline, and the rule fires.
    wait_alert(&daemon, "down", "quiet-1", "firing").await;

    // Act 3: it speaks again. Assert 3: resolved.
    p.publish(
        "devices/quiet-1/telemetry",
        QoS::AtLeastOnce,
        false,
        temp(20.0),
    )
    .await;
    wait_alert(&daemon, "down", "quiet-1", "resolved").await;
    assert_eq!(alerts(&daemon, "?device=gw-1&state=open").await.len(), 1);
}

#[tokio::test]
async fn no_reading_and_a_missing_field_fire_after_their_time_and_resolve_on_the_next_reading() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        "[alerts]\nrules = [ { name = \"silent\", devices = [\"q-*\"], when = \"no reading\", for = \"2s\" }, \
         { name = \"nohum\", devices = [\"h-*\"], when = \"missing env.humidity\", for = \"2s\", severity = \"info\" } ]\n",
    )
    .await;
    let p = Publisher::connect(&broker.url(), "absence-pub").await;
    let with_humidity = json!({ "temperature": 20, "env": { "humidity": 40 } }).to_string();

    // Act: q-1 sends once and goes quiet; h-1 keeps sending without the field, h-2 with it.
    p.publish("devices/q-1/telemetry", QoS::AtLeastOnce, false, temp(20.0))
        .await;
    let end = Instant::now() + Duration::from_millis(3000);
    while Instant::now() < end {
        p.publish("devices/h-1/telemetry", QoS::AtLeastOnce, false, temp(20.0))
            .await;
        p.publish(
            "devices/h-2/telemetry",
            QoS::AtLeastOnce,
            false,
            with_humidity.clone(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Assert: each fires on its own device only.
    let silent = wait_alert(&daemon, "silent", "q-1", "firing").await;
    assert_eq!(silent["message"], "no reading for 2s");
    let nohum = wait_alert(&daemon, "nohum", "h-1", "firing").await;
    assert_eq!(nohum["severity"], "info");
    assert_eq!(nohum["field"], "env.humidity");
    let all = alerts(&daemon, "").await;
    assert_eq!(
        all.len(),
        2,
        "h-2 sends the field and q-1 alone is quiet: {all:?}"
    );

    // Act + Assert: the next reading (with the field) resolves each.
    p.publish("devices/q-1/telemetry", QoS::AtLeastOnce, false, temp(20.0))
        .await;
    p.publish(
        "devices/h-1/telemetry",
        QoS::AtLeastOnce,
        false,
        with_humidity,
    )
    .await;
    wait_alert(&daemon, "silent", "q-1", "resolved").await;
    wait_alert(&daemon, "nohum", "h-1", "resolved").await;
}

#[tokio::test]
async fn an_operator_acknowledges_and_a_viewer_gets_403() {
    // Arrange
    let broker = Mosquitto::start().await;
    let (viewer, vh) = telebridge::auth::new_token();
    let (operator, oh) = telebridge::auth::new_token();
    let (pumps, ph) = telebridge::auth::new_token();
    let daemon = Daemon::start(
        &broker.url(),
        &format!(
            "[alerts]\nrules = [ {HOT} ]\n[auth]\ntokens = [ {{ name = \"view\", role = \"viewer\", hash = \"{vh}\" }}, \
             {{ name = \"ops\", role = \"operator\", hash = \"{oh}\" }}, \
             {{ name = \"pumps\", role = \"operator\", hash = \"{ph}\", devices = [\"pump-*\"] }} ]\n"
        ),
    )
    .await;
    let p = Publisher::connect(&broker.url(), "ack-pub").await;
    hold(&p, "sensor-1", 95.0, Duration::from_millis(2600)).await;
    let client = support::http();
    let list = |token: &str| {
        let req = client
            .get(daemon.url("/api/alerts"))
            .bearer_auth(token)
            .send();
        async move {
            let body: Value = req.await.expect("list").json().await.expect("json");
            body["alerts"].as_array().expect("alerts").clone()
        }
    };
    let id = wait_for(T, "the alert to fire", || async {
        list(&operator)
            .await
            .first()
            .map(|a| a["id"].as_i64().unwrap())
    })
    .await;
    let ack = |token: &str, id: String| {
        client
            .post(daemon.url(&format!("/api/alerts/{id}/ack")))
            .bearer_auth(token)
            .send()
    };

    // Act + Assert: a viewer may look but not acknowledge.
    assert_eq!(list(&viewer).await.len(), 1);
    let r = ack(&viewer, id.to_string()).await.unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden");
    // An operator whose scope does not hold the device neither sees nor acknowledges it.
    assert!(list(&pumps).await.is_empty());
    assert_eq!(ack(&pumps, id.to_string()).await.unwrap().status(), 403);
    // Bad and unknown ids.
    assert_eq!(ack(&operator, "x".into()).await.unwrap().status(), 400);
    assert_eq!(ack(&operator, "999999".into()).await.unwrap().status(), 404);
    // The operator acknowledges: who and when are kept.
    let r = ack(&operator, id.to_string()).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["alert"]["state"], "acknowledged");
    assert_eq!(body["alert"]["acked_by"], "ops");
    assert!(body["alert"]["acked_at"].is_string());
    // Again: no change, same answer.
    let again: Value = ack(&operator, id.to_string())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["alert"]["acked_at"], body["alert"]["acked_at"]);
    // An acknowledged alert still resolves.
    hold(&p, "sensor-1", 60.0, Duration::from_millis(400)).await;
    let resolved = wait_for(T, "the acknowledged alert to resolve", || async {
        list(&operator)
            .await
            .into_iter()
            .find(|a| a["state"] == "resolved")
    })
    .await;
    assert_eq!(resolved["acked_by"], "ops");
    assert_eq!(ack(&operator, id.to_string()).await.unwrap().status(), 409);
}

#[tokio::test]
async fn alerts_survive_a_restart_without_firing_again() {
    // Arrange: an alert firing.
    let broker = Mosquitto::start().await;
    let mut daemon = Daemon::start(&broker.url(), &format!("[alerts]\nrules = [ {HOT} ]\n")).await;
    let p = Publisher::connect(&broker.url(), "restart-pub").await;
    hold(&p, "sensor-1", 90.0, Duration::from_millis(2600)).await;
    let fired = wait_alert(&daemon, "hot", "sensor-1", "firing").await;

    // Act: restart, and the condition goes on holding.
    assert!(daemon.sigterm().success());
    daemon.spawn().await;
    let mut sse = SseClient::connect(daemon.http, "/events?type=alert", None).await;
    hold(&p, "sensor-1", 91.0, Duration::from_millis(3000)).await;

    // Assert: the same alert, still firing, and no new one.
    let all = alerts(&daemon, "").await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["id"], fired["id"]);
    assert_eq!(all[0]["state"], "firing");
    assert_eq!(
        daemon
            .metric("telebridge_alert_changes_total{state=\"firing\"}")
            .await,
        0.0
    );
    assert!(
        sse.next(Duration::from_millis(500))
            .await
            .is_none_or(|e| e.event != "alert")
    );
    // And it still resolves after the restart.
    hold(&p, "sensor-1", 70.0, Duration::from_millis(400)).await;
    wait_alert(&daemon, "hot", "sensor-1", "resolved").await;
}

#[tokio::test]
async fn a_receiver_that_is_down_gets_retries_then_a_counted_failure_while_ingest_goes_on() {
    // Arrange: a webhook at a port where nothing listens.
    let broker = Mosquitto::start().await;
    let dead = format!("http://127.0.0.1:{}/hook", free_port());
    let daemon = Daemon::start(
        &broker.url(),
        &format!(
            "[alerts]\nrules = [ {{ name = \"any\", devices = [\"d-1\"], when = \"temperature > 0\" }} ]\n\
             webhooks = [ {{ url = \"{dead}\" }} ]\nwebhook_attempts = 3\nwebhook_backoff_max = \"1s\"\n"
        ),
    )
    .await;
    let p = Publisher::connect(&broker.url(), "dead-pub").await;

    // Act: fire an alert, then keep publishing.
    p.publish("devices/d-1/telemetry", QoS::AtLeastOnce, false, temp(5.0))
        .await;
    wait_alert(&daemon, "any", "d-1", "firing").await;
    for n in 0..200 {
        p.publish(
            "devices/d-2/telemetry",
            QoS::AtLeastOnce,
            false,
            support::reading(n),
        )
        .await;
    }

    // Assert: ingest went on while the webhook retried...
    let db = daemon.db().await;
    assert!(db.wait_count(201, T).await >= 201);
    // ...and after three attempts (two retries) the delivery is a counted failure.
    wait_for(T, "the webhook failure to be counted", || async {
        (daemon.metric("telebridge_webhook_failures_total").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(daemon.metric("telebridge_webhook_retries_total").await, 2.0);
    assert_eq!(
        daemon.metric("telebridge_webhook_deliveries_total").await,
        0.0
    );
    assert_eq!(daemon.metric("telebridge_webhook_queue_depth").await, 0.0);
    assert!(
        daemon
            .log_text()
            .contains("webhook delivery failed; giving up"),
        "the failure is logged"
    );
}

#[tokio::test]
async fn alert_events_resume_by_last_event_id() {
    // Arrange: one alert fired, seen on a stream that then goes away.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), &format!("[alerts]\nrules = [ {HOT} ]\n")).await;
    let p = Publisher::connect(&broker.url(), "resume-pub").await;
    let mut sse = SseClient::connect(daemon.http, "/events?type=alert", None).await;
    hold(&p, "sensor-1", 90.0, Duration::from_millis(2600)).await;
    let first = sse.take("alert", 1, T).await.remove(0);
    drop(sse);

    // Act: it resolves while nobody listens; a client comes back with the last id it had.
    hold(&p, "sensor-1", 60.0, Duration::from_millis(400)).await;
    wait_alert(&daemon, "hot", "sensor-1", "resolved").await;
    let mut back = SseClient::connect(daemon.http, "/events?type=alert", first.id.as_deref()).await;

    // Assert: exactly what came after, and nothing else.
    let next = back.take("alert", 1, T).await.remove(0);
    assert_eq!(next.json()["state"], "resolved");
    assert!(
        next.id.as_deref().unwrap().parse::<i64>().unwrap()
            > first.id.as_deref().unwrap().parse::<i64>().unwrap()
    );
    assert!(
        back.next(Duration::from_millis(500))
            .await
            .is_none_or(|e| e.event != "alert")
    );
}

#[tokio::test]
async fn sighup_reloads_the_rules_without_dropping_a_stream() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), &format!("[alerts]\nrules = [ {HOT} ]\n")).await;
    let mut sse = SseClient::connect(daemon.http, "/events?type=alert", None).await;
    let p = Publisher::connect(&broker.url(), "hup-pub").await;

    // Act: a broken file first (kept out), then a lower threshold.
    let text = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        text.replace("temperature > 80", "temperature >> 80"),
    )
    .unwrap();
    hup(&daemon);
    wait_for(T, "the reload to be refused", || async {
        daemon
            .log_text()
            .contains("keeping the current alert rules")
            .then_some(())
    })
    .await;
    std::fs::write(
        &daemon.config,
        text.replace("temperature > 80", "temperature > 50"),
    )
    .unwrap();
    hup(&daemon);
    wait_for(T, "the rules to reload", || async {
        daemon
            .log_text()
            .contains("alert rules reloaded")
            .then_some(())
    })
    .await;
    hold(&p, "sensor-1", 60.0, Duration::from_millis(2600)).await;

    // Assert: the new rule fired, on the stream that was open all along.
    let e = sse.take("alert", 1, T).await.remove(0);
    assert_eq!(e.json()["threshold"], 50.0);
    assert!(!sse.ended);
}

fn hup(daemon: &Daemon) {
    let pid = daemon.pid().expect("running");
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
}

#[test]
fn check_reports_a_broken_rule_with_its_key_and_line() {
    let (code, out) = support::check(
        "[[alerts.rules]]\nname = \"hot\"\nwhen = \"temperature above 80\"\n\n[[alerts.rules]]\nname = \"hot\"\nwhen = \"offline\"\n",
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("line 3: alerts.rules[0].when"), "{out}");
    assert!(out.contains("line 6: alerts.rules[1].name"), "{out}");
    let (code, out) = support::check(
        "[[alerts.rules]]\nname = \"x\"\nwhen = \"offline\"\nseverity = \"urgent\"\n",
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("line 4: alerts.rules[0].severity"), "{out}");
}
