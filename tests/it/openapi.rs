//! The OpenAPI description at `/api/openapi.json`: what it says each endpoint takes is what the
//! endpoint takes, and a schemathesis run against a daemon with data finds no server error, no
//! answer outside the description and no crash.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::{Value, json};

use crate::support::{Daemon, Mosquitto, Publisher};

/// Longest a schemathesis run may take before the test kills it and fails.
const FUZZ_LIMIT: Duration = Duration::from_secs(240);

async fn document(daemon: &Daemon) -> Value {
    let r = daemon.get("/api/openapi.json").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    r.json().await.expect("JSON")
}

/// A daemon with three devices that sent readings.
async fn daemon_with_data(broker: &Mosquitto) -> Daemon {
    let daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "openapi-pub").await;
    for i in 0..30 {
        for d in ["dev-1", "dev-2", "truck-7"] {
            let payload = json!({ "temperature": 20.0 + i as f64 * 0.1, "gps": { "speed": i } });
            publisher
                .publish(
                    &format!("devices/{d}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    payload.to_string(),
                )
                .await;
        }
    }
    daemon
        .db()
        .await
        .wait_count(90, Duration::from_secs(20))
        .await;
    daemon
}

#[tokio::test]
async fn each_operation_documents_exactly_the_query_parameters_its_endpoint_takes() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = daemon_with_data(&broker).await;
    let doc = document(&daemon).await;

    // Act: ask every GET operation with a parameter no endpoint takes; the 400 lists what it
    // takes.
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        // /events and /ws are streams; /events checks its parameters like the rest.
        let Some(op) = item.get("get").filter(|_| path != "/ws") else {
            continue;
        };
        let documented: BTreeSet<String> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        let url = path.replace("{id}", "dev-1");
        let r = daemon.get(&format!("{url}?zzz=1")).await;
        if r.status() != 400 {
            // The service endpoints and the session take no query and ignore one.
            assert!(
                ["/healthz", "/readyz", "/metrics", "/api/session"].contains(&path.as_str()),
                "GET {url}?zzz=1 answered {}, not 400",
                r.status()
            );
            continue;
        }
        let body: Value = r.json().await.expect("JSON");
        let message = body["error"]["message"].as_str().unwrap().to_owned();
        let takes = message
            .split_once("this endpoint takes")
            .unwrap_or_else(|| panic!("GET {url}?zzz=1: {message}"))
            .1
            .trim();
        let accepted: BTreeSet<String> = takes
            .split(", ")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if accepted != documented {
            mismatches.push(format!(
                "{path}: takes {accepted:?}, documented {documented:?}"
            ));
        }
        checked += 1;
    }

    // Assert
    assert!(checked >= 10, "only {checked} operations checked");
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
}

/// schemathesis, installed by scripts/test into `target/tools/venv`.
fn schemathesis() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/venv/bin/schemathesis");
    assert!(
        path.exists(),
        "no {}: run scripts/test, which installs schemathesis from PyPI",
        path.display()
    );
    path
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_no_answer_outside_the_description_and_no_crash() {
    // Arrange
    let broker = Mosquitto::start().await;
    let mut daemon = daemon_with_data(&broker).await;
    let spec = daemon.url("/api/openapi.json");
    let tool = schemathesis();

    // Act: a bounded run (examples per operation and a time limit) of every operation but the
    // two streams, which never end.
    // Its cache goes in a directory of its own, not the repository.
    let scratch = tempfile::tempdir().expect("tempdir");
    let cwd = scratch.path().to_owned();
    let run = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(tool)
            .current_dir(cwd)
            .args(["run", &spec, "--exclude-path", "/events", "--exclude-path", "/ws"])
            .args(["--max-examples", "40", "--request-timeout", "20", "--no-color"])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            ])
            .arg("--generation-deterministic")
            .env("SCHEMATHESIS_HOOKS", "")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run schemathesis");
        let started = Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if started.elapsed() > FUZZ_LIMIT {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        child.wait_with_output().expect("schemathesis output")
    })
    .await
    .expect("join");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );

    // Assert: it passed, it tested the API, and the daemon still answers.
    assert!(run.status.success(), "schemathesis: {}\n{out}", run.status);
    // "Tested: 18" and "1355 generated, 1355 passed" in its summary.
    let tested = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested: "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(
        tested.is_some_and(|n| n >= 16),
        "schemathesis tested too few operations ({tested:?}):\n{out}"
    );
    let cases = out.lines().find_map(|l| {
        let (generated, passed) = l.trim().split_once(" generated, ")?;
        let passed = passed.strip_suffix(" passed")?;
        Some((generated.parse::<u64>().ok()?, passed.parse::<u64>().ok()?))
    });
    assert!(
        cases.is_some_and(|(g, p)| g >= 200 && g == p),
        "test cases (generated, passed): {cases:?}\n{out}"
    );
    assert!(daemon.alive(), "the daemon crashed:\n{out}");
    assert_eq!(daemon.get("/healthz").await.status(), 200);
}

/// A validator for the AsyncAPI message `key`'s payload, its `$ref`s resolved in `doc`.
fn message_validator(doc: &Value, key: &str) -> jsonschema::Validator {
    assert!(
        doc["components"]["messages"][key].is_object(),
        "no message {key} in the AsyncAPI document"
    );
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("#/components/messages/{key}/payload"),
        "components": doc["components"],
    });
    jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("the schema of {key}: {e}"))
}

fn assert_valid(doc: &Value, key: &str, instance: &Value) {
    let v = message_validator(doc, key);
    let errors: Vec<String> = v.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{key} {instance}: {errors:?}");
}

#[tokio::test]
async fn real_sse_events_and_websocket_messages_match_the_asyncapi_document() {
    // Arrange: a device that answers commands, a feed of every kind, a command channel.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[commands]\ntimeout = \"1s\"").await;
    let r = daemon.get("/api/asyncapi.json").await;
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.expect("JSON");
    let mut device =
        crate::support::FakeDevice::connect(&broker.url(), "dev-1", "devices/dev-1/commands").await;
    let mut events = crate::support::SseClient::connect(daemon.http, "/events", None).await;
    let mut ws = crate::support::Ws::connect(daemon.http).await;
    let publisher = Publisher::connect(&broker.url(), "asyncapi-pub").await;
    const T: Duration = Duration::from_secs(20);

    // Act: a reading; a presence change; a command acked and one timing out; a bad message; a
    // resume from an id that does not exist (a gap).
    publisher
        .publish(
            "devices/dev-1/telemetry",
            QoS::AtLeastOnce,
            false,
            json!({"temperature": 21.5, "gps": {"lat": 1.5}}).to_string(),
        )
        .await;
    publisher
        .publish("devices/dev-2/status", QoS::AtLeastOnce, false, "offline")
        .await;
    ws.send_json(json!({"type": "command", "device": "dev-1", "name": "set_interval", "params": {"seconds": 5}, "ref": "r-1"}))
        .await;
    let accepted = ws.expect("accepted", T).await;
    let cmd = device.next_command(T).await.expect("the command");
    device
        .answer(json!({"id": cmd["id"], "ok": true, "result": {"interval": 5}}))
        .await;
    let ack = ws.expect("ack", T).await;
    ws.send_json(json!({"type": "command", "device": "dev-1", "name": "ping"}))
        .await;
    let second = ws.expect("accepted", T).await;
    let timeout = ws.expect("timeout", T).await;
    ws.send("{not json").await;
    let error = ws.expect("error", T).await;
    let mut seen = std::collections::BTreeMap::<String, Vec<Value>>::new();
    let deadline = Instant::now() + T;
    while Instant::now() < deadline
        && !(seen.contains_key("reading")
            && seen.contains_key("status")
            && seen.get("command").is_some_and(|c| c.len() >= 4))
    {
        if let Some(e) = events.next(Duration::from_secs(2)).await {
            seen.entry(e.event.clone()).or_default().push(e.json());
        }
    }
    let mut resumed =
        crate::support::SseClient::connect(daemon.http, "/events", Some("999999")).await;
    let gap = resumed.next(T).await.expect("a gap event");

    // Assert: every frame and message fits its schema.
    for (event, datas) in &seen {
        for data in datas {
            assert_valid(&doc, &format!("sse_{event}"), data);
        }
    }
    assert!(
        ["reading", "status", "command"]
            .iter()
            .all(|k| seen.contains_key(*k)),
        "events seen: {:?}",
        seen.keys().collect::<Vec<_>>()
    );
    assert_eq!(gap.event, "gap");
    assert_valid(&doc, "sse_gap", &gap.json());
    for m in [&accepted, &ack, &second, &timeout, &error] {
        assert_valid(&doc, "ws_answer", m);
    }
    assert_valid(
        &doc,
        "ws_command",
        &json!({"type": "command", "device": "dev-1", "name": "ping", "params": {}, "ref": 7}),
    );
    // The schemas are not empty: a message of the wrong shape is refused.
    let wrong = message_validator(&doc, "ws_answer");
    assert!(!wrong.is_valid(&json!({"type": "ack", "id": 5})));
    let reading = message_validator(&doc, "sse_reading");
    assert!(!reading.is_valid(&json!({"seq": "one"})));
}
