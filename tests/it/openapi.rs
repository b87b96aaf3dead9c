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
