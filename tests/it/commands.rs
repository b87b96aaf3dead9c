//! Operator commands: WebSocket → MQTT device → ack → WebSocket, and everything that can go
//! wrong on the way.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Daemon, FakeDevice, Mosquitto, SseClient, Ws, wait_for};

const T: Duration = Duration::from_secs(20);

async fn command_status(daemon: &Daemon, id: &str) -> serde_json::Value {
    let body: serde_json::Value = daemon
        .get("/api/commands?limit=1000")
        .await
        .json()
        .await
        .expect("json");
    body["commands"]
        .as_array()
        .expect("commands")
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("command {id} not in the log: {body}"))
}

async fn wait_status(daemon: &Daemon, id: &str, status: &str) -> serde_json::Value {
    wait_for(T, &format!("command {id} to be {status}"), || async {
        let c = command_status(daemon, id).await;
        (c["status"] == status).then_some(c)
    })
    .await
}

#[tokio::test]
async fn a_command_reaches_the_device_and_its_ack_comes_back_with_the_round_trip() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-1", "devices/dev-1/commands").await;
    let mut events = SseClient::connect(daemon.http, "/events?type=command", None).await;
    let mut ws = Ws::connect(daemon.http).await;

    // Act
    ws.send_json(json!({"type": "command", "device": "dev-1", "name": "set_interval", "params": {"seconds": 5}, "ref": "r-1"}))
        .await;
    let accepted = ws.expect("accepted", T).await;
    let id = accepted["id"].as_str().expect("id").to_owned();
    let cmd = device
        .next_command(T)
        .await
        .expect("the device receives the command");
    device
        .answer(json!({"id": cmd["id"], "ok": true, "result": {"interval": 5}}))
        .await;

    // Assert
    assert_eq!(accepted["ref"], "r-1");
    assert_eq!(accepted["status"], "sent");
    assert_eq!(
        uuid::Uuid::parse_str(&id).map(|_| ()),
        Ok(()),
        "the id is a uuid"
    );
    assert_eq!(cmd["_topic"], "devices/dev-1/commands");
    assert_eq!(cmd["id"], id.as_str());
    assert_eq!(cmd["name"], "set_interval");
    assert_eq!(cmd["params"], json!({"seconds": 5}));
    let ack = ws.expect("ack", T).await;
    assert_eq!(ack["id"], id.as_str());
    assert_eq!(ack["ok"], true);
    assert_eq!(ack["result"], json!({"interval": 5}));
    let rtt = ack["rtt_ms"].as_f64().expect("rtt_ms");
    assert!(rtt > 0.0 && rtt < 5_000.0, "rtt_ms {rtt}");
    let stored = wait_status(&daemon, &id, "acked").await;
    assert!(
        stored["sent_at"].is_string() && stored["finished_at"].is_string(),
        "{stored}"
    );
    assert_eq!(stored["result"], json!({"interval": 5}));
    let lifecycle: Vec<String> = events
        .take("command", 2, T)
        .await
        .iter()
        .map(|e| e.json()["status"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(lifecycle, vec!["sent", "acked"]);
}

#[tokio::test]
async fn a_device_that_answers_not_ok_fails_the_command() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-2", "devices/dev-2/commands").await;
    let mut ws = Ws::connect(daemon.http).await;

    ws.send_json(json!({"type": "command", "device": "dev-2", "name": "explode"}))
        .await;
    let id = ws.expect("accepted", T).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let cmd = device.next_command(T).await.expect("command");
    assert_eq!(cmd["params"], json!({}), "absent params are sent as {{}}");
    device
        .answer(json!({"id": id, "ok": false, "error": "unknown command"}))
        .await;

    let ack = ws.expect("ack", T).await;
    assert_eq!(ack["ok"], false);
    assert_eq!(ack["error"], "unknown command");
    let stored = wait_status(&daemon, &id, "failed").await;
    assert_eq!(stored["error"], "unknown command");
}

#[tokio::test]
async fn a_command_without_an_answer_times_out() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[commands]\ntimeout = \"1s\"").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-3", "devices/dev-3/commands").await;
    let mut ws = Ws::connect(daemon.http).await;

    ws.send_json(json!({"type": "command", "device": "dev-3", "name": "ping"}))
        .await;
    let id = ws.expect("accepted", T).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert!(device.next_command(T).await.is_some());

    let timeout = ws.expect("timeout", T).await;
    assert_eq!(timeout["id"], id.as_str());
    wait_status(&daemon, &id, "timeout").await;

    // A late answer is an unknown ack: counted, nothing breaks.
    device.answer(json!({"id": id, "ok": true})).await;
    device
        .answer(json!({"id": "no-such-command", "ok": true}))
        .await;
    wait_for(T, "unknown acks counted", || async {
        (daemon.metric("telebridge_command_acks_unknown_total").await == 2.0).then_some(())
    })
    .await;
    assert_eq!(command_status(&daemon, &id).await["status"], "timeout");
    assert!(daemon.get("/healthz").await.status().is_success());
}

#[tokio::test]
async fn a_command_completes_in_storage_when_its_client_is_gone() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-4", "devices/dev-4/commands").await;
    let mut ws = Ws::connect(daemon.http).await;
    ws.send_json(json!({"type": "command", "device": "dev-4", "name": "reboot"}))
        .await;
    let id = ws.expect("accepted", T).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    drop(ws);

    let cmd = device.next_command(T).await.expect("command");
    device.answer(json!({"id": cmd["id"], "ok": true})).await;

    wait_status(&daemon, &id, "acked").await;
}

#[tokio::test]
async fn a_command_for_an_offline_device_waits_queued_until_it_comes_online() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-5", "devices/dev-5/commands").await;
    device.presence("offline").await;
    let db = daemon.db().await;
    wait_for(T, "dev-5 offline", || async {
        db.device("dev-5").await.filter(|d| !d.0).map(|_| ())
    })
    .await;
    let mut ws = Ws::connect(daemon.http).await;

    ws.send_json(json!({"type": "command", "device": "dev-5", "name": "ping"}))
        .await;
    let accepted = ws.expect("accepted", T).await;
    let id = accepted["id"].as_str().expect("id").to_owned();
    assert_eq!(accepted["status"], "queued");
    assert!(
        device
            .next_command(Duration::from_millis(500))
            .await
            .is_none(),
        "nothing is sent while offline"
    );
    assert_eq!(command_status(&daemon, &id).await["status"], "queued");

    device.presence("online").await;
    let cmd = device
        .next_command(T)
        .await
        .expect("sent once the device is online");
    assert_eq!(cmd["id"], id.as_str());
    wait_status(&daemon, &id, "sent").await;
    device.answer(json!({"id": id, "ok": true})).await;
    assert_eq!(ws.expect("ack", T).await["ok"], true);
}

#[tokio::test]
async fn an_operator_cancels_a_queued_command_and_it_is_never_sent() {
    // Arrange: a command waiting for an offline device, and one already sent.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-9", "devices/dev-9/commands").await;
    device.presence("offline").await;
    let db = daemon.db().await;
    wait_for(T, "dev-9 offline", || async {
        db.device("dev-9").await.filter(|d| !d.0).map(|_| ())
    })
    .await;
    let mut ws = Ws::connect(daemon.http).await;
    ws.send_json(json!({"type": "command", "device": "dev-9", "name": "reboot"}))
        .await;
    let id = ws.expect("accepted", T).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let client = crate::support::http();
    let delete = |id: &str| {
        client
            .delete(daemon.url(&format!("/api/commands/{id}")))
            .send()
    };

    // Act
    let r = delete(&id).await.expect("DELETE");

    // Assert: cancelled, told to the sender, shown by the API, never published.
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["status"], "cancelled");
    assert!(body["finished_at"].is_string(), "{body}");
    assert_eq!(ws.expect("cancelled", T).await["id"], id.as_str());
    let one: serde_json::Value = daemon
        .get(&format!("/api/commands/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(one["status"], "cancelled");
    assert_eq!(one["name"], "reboot");
    let listed: serde_json::Value = daemon
        .get("/api/commands?status=cancelled,expired")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(listed["commands"].as_array().expect("list").len(), 1);
    let none: serde_json::Value = daemon
        .get("/api/commands?status=queued")
        .await
        .json()
        .await
        .expect("json");
    assert!(none["commands"].as_array().expect("list").is_empty());
    device.presence("online").await;
    assert!(
        device.next_command(Duration::from_secs(2)).await.is_none(),
        "a cancelled command was sent"
    );
    assert_eq!(
        daemon
            .metric("telebridge_commands_finished_total{status=\"cancelled\"}")
            .await,
        1.0
    );
    // Only a queued command can be cancelled; unknown ids and bad filters say so.
    let again = delete(&id).await.expect("DELETE");
    assert_eq!(again.status(), 409);
    let body: serde_json::Value = again.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_queued");
    assert_eq!(delete("no-such-id").await.expect("DELETE").status(), 404);
    assert_eq!(daemon.get("/api/commands/no-such-id").await.status(), 404);
    let bad = daemon.get("/api/commands?status=done").await;
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("status:"),
        "{body}"
    );
}

#[tokio::test]
async fn a_queued_command_expires_when_its_ttl_runs_out() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-6", "devices/dev-6/commands").await;
    device.presence("offline").await;
    let db = daemon.db().await;
    wait_for(T, "dev-6 offline", || async {
        db.device("dev-6").await.filter(|d| !d.0).map(|_| ())
    })
    .await;
    let mut ws = Ws::connect(daemon.http).await;

    ws.send_json(json!({"type": "command", "device": "dev-6", "name": "ping", "ttl": "1s"}))
        .await;
    let id = ws.expect("accepted", T).await["id"]
        .as_str()
        .expect("id")
        .to_owned();

    assert_eq!(ws.expect("expired", T).await["id"], id.as_str());
    wait_status(&daemon, &id, "expired").await;
    device.presence("online").await;
    assert!(
        device
            .next_command(Duration::from_millis(800))
            .await
            .is_none(),
        "an expired command is never sent"
    );
}

#[tokio::test]
async fn the_same_idempotency_key_twice_publishes_once() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-7", "devices/dev-7/commands").await;
    let mut ws = Ws::connect(daemon.http).await;

    let cmd =
        json!({"type": "command", "device": "dev-7", "name": "open_valve", "key": "valve-42"});
    ws.send_json(cmd.clone()).await;
    let first = ws.expect("accepted", T).await;
    ws.send_json(cmd).await;
    let second = ws.expect("accepted", T).await;

    assert_eq!(first["id"], second["id"]);
    assert_eq!(second["duplicate"], true);
    assert!(device.next_command(T).await.is_some());
    assert!(
        device
            .next_command(Duration::from_millis(800))
            .await
            .is_none(),
        "published once"
    );
}

#[tokio::test]
async fn every_bad_message_gets_its_error_code_and_the_connection_stays_usable() {
    // Arrange: a wildcard listener sees anything published under devices/.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[commands]\nrate_limit = 1000").await;
    let mut spy = FakeDevice::connect(&broker.url(), "spy", "#").await;
    let mut ws = Ws::connect(daemon.http).await;
    let big = "x".repeat(20_000);

    for (msg, code) in [
        ("{not json".to_owned(), "bad_json"),
        ("[1,2]".to_owned(), "bad_json"),
        (
            r#"{"type":"subscribe","ref":"a"}"#.to_owned(),
            "unknown_type",
        ),
        (r#"{"device":"d"}"#.to_owned(), "unknown_type"),
        (
            r#"{"type":"command","device":"+","name":"x","ref":1}"#.to_owned(),
            "invalid_device",
        ),
        (
            r##"{"type":"command","device":"#","name":"x"}"##.to_owned(),
            "invalid_device",
        ),
        (
            r#"{"type":"command","device":"a/b","name":"x"}"#.to_owned(),
            "invalid_device",
        ),
        (
            r#"{"type":"command","device":"","name":"x"}"#.to_owned(),
            "invalid_device",
        ),
        (
            format!(
                r#"{{"type":"command","device":"{}","name":"x"}}"#,
                "d".repeat(65)
            ),
            "invalid_device",
        ),
        (
            r#"{"type":"command","device":"d","name":"a/b"}"#.to_owned(),
            "invalid_command",
        ),
        (
            r#"{"type":"command","device":"d","name":"x","params":"5"}"#.to_owned(),
            "invalid_params",
        ),
        (
            format!(r#"{{"type":"command","device":"d","name":"x","params":{{"p":"{big}"}}}}"#),
            "too_large",
        ),
    ] {
        ws.send(msg.clone()).await;
        let err = ws.expect("error", T).await;
        assert_eq!(err["code"], code, "{msg:.80}: {err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    ws.send(r#"{"type":"subscribe","ref":"tag-9"}"#).await;
    assert_eq!(
        ws.expect("error", T).await["ref"],
        "tag-9",
        "errors carry the client's ref"
    );

    // Nothing reached MQTT, and the same connection still works.
    ws.send_json(json!({"type": "command", "device": "ok-1", "name": "ping"}))
        .await;
    ws.expect("accepted", T).await;
    let published = spy.next_command(T).await.expect("the good command");
    assert_eq!(published["_topic"], "devices/ok-1/commands");
    assert!(
        spy.next_command(Duration::from_millis(300)).await.is_none(),
        "only the good command was published"
    );
}

#[tokio::test]
async fn commands_beyond_the_rate_limit_are_refused_with_rate_limited() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[commands]\nrate_limit = 2").await;
    let mut ws = Ws::connect(daemon.http).await;
    for i in 0..10 {
        ws.send_json(json!({"type": "command", "device": "rl", "name": "ping", "ref": i}))
            .await;
    }
    let mut codes = Vec::new();
    for _ in 0..10 {
        let m = ws.recv(T).await.expect("reply");
        codes.push(if m["type"] == "error" {
            m["code"].as_str().unwrap_or("").to_owned()
        } else {
            m["type"].as_str().unwrap_or("").to_owned()
        });
    }
    assert!(
        codes.iter().filter(|c| *c == "accepted").count() >= 4,
        "{codes:?}"
    );
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
}

#[tokio::test]
async fn two_websocket_clients_get_only_their_own_acks() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-8", "devices/dev-8/commands").await;
    let mut a = Ws::connect(daemon.http).await;
    let mut b = Ws::connect(daemon.http).await;

    a.send_json(json!({"type": "command", "device": "dev-8", "name": "a"}))
        .await;
    let id_a = a.expect("accepted", T).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    b.send_json(json!({"type": "command", "device": "dev-8", "name": "b"}))
        .await;
    let id_b = b.expect("accepted", T).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    for _ in 0..2 {
        let c = device.next_command(T).await.expect("command");
        device
            .answer(json!({"id": c["id"], "ok": true, "result": c["name"]}))
            .await;
    }

    let ack_a = a.expect("ack", T).await;
    let ack_b = b.expect("ack", T).await;
    assert_eq!(
        (ack_a["id"].as_str(), ack_a["result"].as_str()),
        (Some(id_a.as_str()), Some("a"))
    );
    assert_eq!(
        (ack_b["id"].as_str(), ack_b["result"].as_str()),
        (Some(id_b.as_str()), Some("b"))
    );
    assert!(a.recv(Duration::from_millis(300)).await.is_none());
    assert!(b.recv(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn commands_over_http_are_accepted_with_202_and_logged() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-9", "devices/dev-9/commands").await;
    let client = crate::support::http();
    let url = format!("http://{}/api/devices/dev-9/commands", daemon.http);

    let r = client
        .post(&url)
        .body(r#"{"name":"ping","params":{"n":1}}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.expect("json");
    let id = body["id"].as_str().expect("id").to_owned();
    let cmd = device.next_command(T).await.expect("command");
    assert_eq!(cmd["id"], id.as_str());
    device.answer(json!({"id": id, "ok": true})).await;
    wait_status(&daemon, &id, "acked").await;

    for (body, code) in [
        ("nope", "bad_json"),
        (r#"{"params":{}}"#, "invalid_command"),
        (r#"{"name":"x","params":[]}"#, "invalid_params"),
    ] {
        let r = client.post(&url).body(body).send().await.expect("post");
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(
            r.json::<serde_json::Value>().await.expect("json")["error"]["code"],
            code,
            "{body}"
        );
    }
    let r = client
        .post(format!("http://{}/api/devices/a+b/commands", daemon.http))
        .body(r#"{"name":"x"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    let r = client
        .post(&url)
        .body("x".repeat(20_000))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 413);
    let r = daemon.get("/api/commands?device=dev-9&limit=0").await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn a_websocket_from_a_foreign_origin_is_refused() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        "[http]\nallowed_origins = [\"https://ops.example\"]",
    )
    .await;
    let req = |origin: &str| {
        let mut r = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            format!("ws://{}/ws", daemon.http),
        )
        .expect("req");
        r.headers_mut()
            .insert("origin", origin.parse().expect("header"));
        r
    };
    let refused = tokio_tungstenite::connect_async(req("https://evil.example")).await;
    assert!(refused.is_err(), "a foreign origin is refused");
    assert!(
        tokio_tungstenite::connect_async(req("https://ops.example"))
            .await
            .is_ok()
    );
    assert!(
        tokio_tungstenite::connect_async(req(&format!("http://{}", daemon.http)))
            .await
            .is_ok(),
        "the page's own origin"
    );
}

#[tokio::test]
async fn on_shutdown_websockets_get_a_close_frame_and_pending_commands_keep_their_status() {
    let broker = Mosquitto::start().await;
    let mut daemon = Daemon::start(&broker.url(), "").await;
    let _device = FakeDevice::connect(&broker.url(), "dev-10", "devices/dev-10/commands").await;
    let mut ws = Ws::connect(daemon.http).await;
    ws.send_json(json!({"type": "command", "device": "dev-10", "name": "ping"}))
        .await;
    let id = ws.expect("accepted", T).await["id"]
        .as_str()
        .expect("id")
        .to_owned();

    let stopping = tokio::task::spawn_blocking(move || {
        let status = daemon.sigterm();
        (status, daemon)
    });
    let close = ws.close_frame(T).await;
    let (status, mut daemon) = stopping.await.expect("join");

    assert_eq!(close, Some(1001), "a going-away close frame");
    assert!(status.success());
    daemon.spawn().await;
    assert_eq!(
        command_status(&daemon, &id).await["status"],
        "sent",
        "the pending command is still there"
    );
}

#[tokio::test]
async fn a_device_known_only_from_its_answers_is_reachable() {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-11", "devices/dev-11/commands").await;
    device
        .answer(json!({"id": "from-before-a-restart", "ok": true}))
        .await;
    let db = daemon.db().await;
    wait_for(T, "dev-11 known", || async {
        db.device("dev-11").await.map(|_| ())
    })
    .await;
    assert_eq!(
        db.device("dev-11").await.map(|d| d.0),
        Some(true),
        "an answering device is online"
    );

    let mut ws = Ws::connect(daemon.http).await;
    ws.send_json(json!({"type": "command", "device": "dev-11", "name": "ping"}))
        .await;

    assert_eq!(ws.expect("accepted", T).await["status"], "sent");
    assert!(device.next_command(T).await.is_some());
}

/// A daemon, device `id`, and a WebSocket that has sent `n` pings to it (refs `r-0`, ...)
/// without reading a single answer.
async fn pings_in_flight(id: &str, n: usize) -> (Mosquitto, Daemon, FakeDevice, Ws) {
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[commands]\nrate_limit = 1000").await;
    let device = FakeDevice::connect(&broker.url(), id, &format!("devices/{id}/commands")).await;
    let mut ws = Ws::connect(daemon.http).await;
    for i in 0..n {
        ws.send_json(
            json!({"type": "command", "device": id, "name": "ping", "ref": format!("r-{i}")}),
        )
        .await;
    }
    (broker, daemon, device, ws)
}

#[tokio::test]
async fn many_commands_in_flight_on_one_websocket_each_get_their_accepted_and_ack() {
    // Arrange + Act: every command sent before any answer is read; the device answers each.
    const N: usize = 40;
    let (_broker, _daemon, mut device, mut ws) = pings_in_flight("dev-8", N).await;
    for _ in 0..N {
        let cmd = device.next_command(T).await.expect("every command arrives");
        device
            .answer(json!({"id": cmd["id"], "ok": true, "result": cmd["id"]}))
            .await;
    }
    let mut accepted = std::collections::BTreeMap::new();
    let mut acks = std::collections::BTreeMap::new();
    while accepted.len() < N || acks.len() < N {
        let m = ws.recv(T).await.expect("a message for every command");
        let id = m["id"].as_str().expect("id").to_owned();
        match m["type"].as_str() {
            Some("accepted") => {
                accepted.insert(id, m["ref"].as_str().expect("ref").to_owned());
            }
            Some("ack") => {
                assert_eq!(m["result"], id.as_str(), "{m}");
                acks.insert(id, m);
            }
            other => panic!("unexpected {other:?}: {m}"),
        }
    }

    // Assert
    let refs: std::collections::BTreeSet<_> = accepted.values().cloned().collect();
    assert_eq!(refs.len(), N, "one accepted per ref");
    assert!(
        accepted.keys().eq(acks.keys()),
        "every accepted command got its ack on this socket"
    );
}

#[tokio::test]
async fn commands_sent_just_before_the_websocket_closes_still_reach_the_device() {
    // Arrange + Act: send, then drop the connection without reading a single answer.
    let (_broker, daemon, mut device, ws) = pings_in_flight("dev-c", 20).await;
    drop(ws);

    // Assert: each command that was stored is also published.
    let mut got = 0;
    while device.next_command(Duration::from_secs(3)).await.is_some() {
        got += 1;
    }
    let body: serde_json::Value = daemon
        .get("/api/commands?limit=1000")
        .await
        .json()
        .await
        .expect("json");
    let stored = body["commands"].as_array().map(Vec::len).unwrap_or(0);
    assert!(stored > 0, "the daemon read the commands: {body}");
    assert_eq!(got, stored, "every stored command reached the device");
}

#[tokio::test]
async fn the_console_templates_come_from_the_config_and_default_to_the_simulated_commands() {
    // Arrange
    let broker = Mosquitto::start().await;
    let plain = Daemon::start(&broker.url(), "").await;
    let custom = Daemon::start(
        &broker.url(),
        "[commands.templates]\nvalve = { open = true, percent = 40 }\n",
    )
    .await;

    // Act
    let default: Value = plain
        .get("/api/commands/templates")
        .await
        .json()
        .await
        .expect("json");
    let configured: Value = custom
        .get("/api/commands/templates")
        .await
        .json()
        .await
        .expect("json");
    let unknown = plain.get("/api/commands/templates?device=x").await;

    // Assert
    assert_eq!(
        default,
        json!({"templates": [
            {"name": "ping", "params": {}},
            {"name": "reboot", "params": {}},
            {"name": "set_interval", "params": {"seconds": 5}},
        ]})
    );
    assert_eq!(
        configured,
        json!({"templates": [{"name": "valve", "params": {"open": true, "percent": 40}}]})
    );
    assert_eq!(unknown.status(), 400);
    let body: Value = unknown.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("device")),
        "{body}"
    );
}
