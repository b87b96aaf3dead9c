//! Tokens, roles, device scopes, browser sessions and connection limits, on every endpoint.

use std::time::Duration;

use rumqttc::QoS;
use serde_json::json;

use crate::support::{Daemon, Mosquitto, Publisher, SseClient, reading};

const T: Duration = Duration::from_secs(20);

struct Tokens {
    viewer: String,
    pump_operator: String,
    admin: String,
}

async fn setup(extra: &str) -> (Mosquitto, Daemon, Tokens) {
    let (viewer, vh) = telebridge::auth::new_token();
    let (pump_operator, ph) = telebridge::auth::new_token();
    let (admin, ah) = telebridge::auth::new_token();
    let broker = Mosquitto::start().await;
    let config = format!(
        // One line: the test config writer merges line by line.
        "{extra}\n[auth]\ntokens = [ {{ name = \"view\", role = \"viewer\", hash = \"{vh}\", devices = [\"sensor-*\"] }}, \
         {{ name = \"pumps\", role = \"operator\", hash = \"{ph}\", devices = [\"pump-*\"] }}, \
         {{ name = \"admin\", role = \"operator\", hash = \"{ah}\" }} ]\n"
    );
    let daemon = Daemon::start(&broker.url(), &config).await;
    let publisher = Publisher::connect(&broker.url(), "acc-pub").await;
    for (n, d) in ["sensor-1", "pump-1", "sensor-2"].iter().enumerate() {
        publisher
            .publish(
                &format!("devices/{d}/telemetry"),
                QoS::AtLeastOnce,
                false,
                reading(n as i64),
            )
            .await;
    }
    daemon.db().await.wait_count(3, T).await;
    (
        broker,
        daemon,
        Tokens {
            viewer,
            pump_operator,
            admin,
        },
    )
}

async fn get_json(daemon: &Daemon, path: &str, token: Option<&str>) -> serde_json::Value {
    get(daemon, path, token)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

fn get(daemon: &Daemon, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
    let r = crate::support::http().get(format!("http://{}{}", daemon.http, path));
    match token {
        Some(t) => r.bearer_auth(t),
        None => r,
    }
}

#[tokio::test]
async fn every_endpoint_refuses_a_missing_or_bad_token() {
    let (_b, daemon, _t) = setup("").await;
    for path in [
        "/api/devices",
        "/api/devices/sensor-1/readings",
        "/api/commands",
        "/events",
        "/ws",
    ] {
        for token in [None, Some("tb_not_a_token")] {
            let r = get(&daemon, path, token).send().await.expect("get");
            assert_eq!(r.status(), 401, "{path} with {token:?}");
            let body: serde_json::Value = r.json().await.expect("json");
            assert_eq!(body["error"]["code"], "unauthorized");
        }
    }
    let r = crate::support::http()
        .post(format!(
            "http://{}/api/devices/pump-1/commands",
            daemon.http
        ))
        .body(r#"{"name":"x"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401);
    assert!(
        daemon.get("/healthz").await.status().is_success(),
        "health stays open for probes"
    );
    assert!(daemon.metric("telebridge_auth_failures_total").await >= 11.0);
}

#[tokio::test]
async fn a_viewer_sees_only_its_devices_and_cannot_command() {
    let (_b, daemon, t) = setup("").await;
    let v = Some(t.viewer.as_str());

    let body: serde_json::Value = get_json(&daemon, "/api/devices", v).await;
    let ids: Vec<&str> = body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["sensor-1", "sensor-2"]);
    assert_eq!(
        get(&daemon, "/api/devices/sensor-1/readings", v)
            .send()
            .await
            .expect("get")
            .status(),
        200
    );
    let r = get(&daemon, "/api/devices/pump-1/readings", v)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["error"]["code"],
        "forbidden"
    );
    assert_eq!(
        get(&daemon, "/events?device=pump-1", v)
            .send()
            .await
            .expect("get")
            .status(),
        403
    );

    // The unfiltered stream carries only what the token may see.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", daemon.http),
    )
    .expect("req");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", t.viewer).parse().expect("h"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("a viewer may open /ws");
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"type":"command","device":"sensor-1","name":"x","ref":"v"})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    let reply = loop {
        if let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = ws.next().await {
            break serde_json::from_str::<serde_json::Value>(t.as_str()).expect("json");
        }
    };
    assert_eq!(reply["code"], "forbidden", "{reply}");
    assert_eq!(reply["ref"], "v");
    let r = crate::support::http()
        .post(format!(
            "http://{}/api/devices/sensor-1/commands",
            daemon.http
        ))
        .bearer_auth(&t.viewer)
        .body(r#"{"name":"x"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = get_json(&daemon, "/api/commands", Some(&t.admin)).await;
    assert_eq!(
        body["commands"].as_array().map(Vec::len),
        Some(0),
        "nothing was stored for refused commands"
    );
}

#[tokio::test]
async fn a_scoped_token_never_sees_other_devices_on_the_live_stream_or_in_a_replay() {
    let (_b, daemon, t) = setup("").await;
    // Replay from 0 through a session cookie, the way a browser connects.
    let client = crate::support::http_builder()
        .cookie_store(true)
        .build()
        .expect("client");
    let r = client
        .post(format!("http://{}/api/session", daemon.http))
        .body(json!({"token": t.viewer}).to_string())
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 204);
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("cookie")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let who: serde_json::Value = client
        .get(format!("http://{}/api/session", daemon.http))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(who["name"], "view");
    assert_eq!(who["role"], "viewer");

    let mut resp = client
        .get(format!("http://{}/events?last_event_id=0", daemon.http))
        .send()
        .await
        .expect("events with the cookie");
    assert_eq!(resp.status(), 200);
    let mut text = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.matches("event: reading").count() >= 2 {
                break;
            }
        }
    })
    .await;
    assert_eq!(text.matches("event: reading").count(), 2, "{text}");
    assert!(!text.contains("pump-1"), "{text}");

    // After logout the cookie no longer works.
    let r = client
        .delete(format!("http://{}/api/session", daemon.http))
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 204);
    let r = client
        .get(format!("http://{}/api/devices", daemon.http))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn an_operator_commands_only_devices_in_its_scope() {
    let (_b, daemon, t) = setup("").await;
    let post = |device: &str, token: &str| {
        crate::support::http()
            .post(format!(
                "http://{}/api/devices/{device}/commands",
                daemon.http
            ))
            .bearer_auth(token.to_owned())
            .body(r#"{"name":"ping"}"#)
            .send()
    };
    assert_eq!(
        post("pump-1", &t.pump_operator)
            .await
            .expect("post")
            .status(),
        202
    );
    assert_eq!(
        post("sensor-1", &t.pump_operator)
            .await
            .expect("post")
            .status(),
        403
    );
    assert_eq!(
        post("sensor-1", &t.admin).await.expect("post").status(),
        202
    );
    let body: serde_json::Value = get_json(&daemon, "/api/commands", Some(&t.pump_operator)).await;
    let devices: Vec<&str> = body["commands"]
        .as_array()
        .expect("c")
        .iter()
        .filter_map(|c| c["device"].as_str())
        .collect();
    assert_eq!(
        devices,
        vec!["pump-1"],
        "the log shows only what the token may see"
    );
    // One command, and cancelling, follow the same scope and roles.
    let admin_log: serde_json::Value = get_json(&daemon, "/api/commands", Some(&t.admin)).await;
    let sensor_cmd = admin_log["commands"]
        .as_array()
        .expect("c")
        .iter()
        .find(|c| c["device"] == "sensor-1")
        .and_then(|c| c["id"].as_str())
        .expect("the admin's command")
        .to_owned();
    let one =
        |token: &str| get(&daemon, &format!("/api/commands/{sensor_cmd}"), Some(token)).send();
    assert_eq!(one(&t.pump_operator).await.expect("get").status(), 403);
    assert_eq!(one(&t.admin).await.expect("get").status(), 200);
    let cancel = |token: &str| {
        crate::support::http()
            .delete(format!("http://{}/api/commands/{sensor_cmd}", daemon.http))
            .bearer_auth(token.to_owned())
            .send()
    };
    assert_eq!(cancel(&t.viewer).await.expect("delete").status(), 403);
    assert_eq!(
        cancel(&t.pump_operator).await.expect("delete").status(),
        403
    );
}

#[tokio::test]
async fn connection_limits_refuse_extra_streams_with_a_clear_error() {
    let (_b, daemon, t) = setup("[http]\nmax_sse_clients = 2").await;
    let _a = SseClient::connect_with_token(daemon.http, "/events", &t.admin).await;
    let _b2 = SseClient::connect_with_token(daemon.http, "/events", &t.admin).await;
    let r = get(&daemon, "/events", Some(&t.admin))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["error"]["code"],
        "too_many_clients"
    );
    assert_eq!(daemon.metric("telebridge_limit_refusals_total").await, 1.0);
    drop(_a);
    // The slot comes back once the stream is gone.
    crate::support::wait_for(T, "a slot to free up", || async {
        (get(&daemon, "/events", Some(&t.admin))
            .send()
            .await
            .ok()?
            .status()
            == 200)
            .then_some(())
    })
    .await;
}

#[test]
fn telebridge_refuses_to_listen_publicly_without_tokens() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[http]\nlisten = \"0.0.0.0:0\"\n").expect("write");
    let out = std::process::Command::new(crate::support::BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("http.listen") && err.contains("no [[auth.tokens]]"),
        "{err}"
    );
}

#[test]
fn the_token_command_prints_a_config_entry_that_check_accepts() {
    let out = std::process::Command::new(crate::support::BIN)
        .args([
            "token",
            "--name",
            "ops",
            "--role",
            "operator",
            "--devices",
            "sensor-*,pump-1",
        ])
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("# tb_"))
        .map(|t| format!("tb_{t}"))
        .expect("token line");
    assert!(text.contains(&format!(
        "hash = \"{}\"",
        telebridge::auth::hash_token(&token)
    )));
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, &text).expect("write");
    let check = std::process::Command::new(crate::support::BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
