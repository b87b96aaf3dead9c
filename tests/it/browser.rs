//! The dashboard and `/events` in a real browser: Debian's Chromium driven by Playwright
//! (`tests/browser/*.mjs`, run with node), against the real daemon, Mosquitto and simulated
//! devices (`telebridge simulate` as its own process). Screenshots go to
//! `target/artifacts/browser/` for a person to look at.
//!
//! These tests never skip: without node, Chromium or `tests/browser/node_modules` they fail
//! and say to run `scripts/test`, which installs them.

use std::io::{BufRead as _, Read as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::Value;

use crate::support::{BIN, Daemon, Mosquitto, Publisher, free_port, wait_for};

/// Upper bound for one browser script.
const SCRIPT_LIMIT: Duration = Duration::from_secs(60);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts/browser");
    std::fs::create_dir_all(&dir).expect("create target/artifacts/browser");
    dir
}

/// Fails (never skips) with what to do when the browser tooling is missing.
fn require_tools() {
    let chromium =
        std::env::var("TELEBRIDGE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: run scripts/test, which installs Debian's chromium with apt-get"
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node is not installed: run scripts/test (or apt-get install nodejs npm)"
    );
    assert!(
        browser_dir()
            .join("node_modules/playwright-core/package.json")
            .exists(),
        "tests/browser/node_modules is missing: run scripts/test (it runs `npm ci --prefix tests/browser`)"
    );
}

/// `telebridge simulate` as a child process; killed on drop.
struct Simulator(Child);

impl Simulator {
    fn start(broker_url: &str, devices: usize, rate: f64, prefix: &str) -> Simulator {
        let child = Command::new(BIN)
            .args(["simulate", "--url", broker_url, "--devices"])
            .arg(devices.to_string())
            .arg("--rate")
            .arg(rate.to_string())
            .args(["--prefix", prefix])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start telebridge simulate");
        Simulator(child)
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A browser script (`node tests/browser/NAME.mjs ARGS`) in its own process group, so that
/// the browser it starts ends with it. Its JSON lines arrive on a channel.
struct Script {
    name: String,
    child: Child,
    _stdin: Option<ChildStdin>,
    lines: tokio::sync::mpsc::UnboundedReceiver<Value>,
    stderr: Arc<Mutex<String>>,
    started: Instant,
}

impl Script {
    fn start(name: &str, args: &[&str]) -> Script {
        require_tools();
        let mut child = Command::new("node")
            .arg(browser_dir().join(format!("{name}.mjs")))
            .args(args)
            .current_dir(browser_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start node");
        let stdout = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "stdout": line }));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Script {
            name: name.to_owned(),
            _stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            started: Instant::now(),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The next line that is an event `event`, a result or an error.
    async fn next(&mut self, want: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match tokio::time::timeout(left, self.lines.recv()).await {
                Ok(Some(v)) => v,
                Ok(None) => panic!(
                    "{}.mjs ended before {want} ({:?} in); stderr:\n{}",
                    self.name,
                    self.started.elapsed(),
                    self.stderr()
                ),
                Err(_) => panic!(
                    "{}.mjs: no {want} within {timeout:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                ),
            };
            if let Some(e) = line.get("error") {
                panic!(
                    "{}.mjs failed: {}\nstderr:\n{}",
                    self.name,
                    e.as_str().unwrap_or_default(),
                    self.stderr()
                );
            }
            if line.get("result").is_some() || line["event"] == want {
                return line;
            }
        }
    }

    /// Waits for `{"event": name}`.
    async fn event(&mut self, name: &str, timeout: Duration) -> Value {
        let v = self.next(name, timeout).await;
        assert!(
            v.get("result").is_none(),
            "{}.mjs finished without the event {name}: {v}",
            self.name
        );
        v
    }

    /// The final result.
    async fn result(mut self, timeout: Duration) -> Value {
        let v = self.next("result", timeout).await;
        let status = wait_exit(&mut self.child, Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{}.mjs exited with {status:?}; stderr:\n{}",
            self.name,
            self.stderr()
        );
        v["result"].clone()
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // The whole group: node and the Chromium it started. TERM lets Playwright close the
        // browser and remove its profile; KILL is the backstop.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        if wait_exit(&mut self.child, Duration::from_secs(3)).is_none() {
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = self.child.wait();
        }
    }
}

/// Seqs of `device`'s readings in storage between `first` and `last`, inclusive.
async fn stored_seqs(daemon: &Daemon, device: &str, first: i64, last: i64) -> Vec<i64> {
    daemon
        .db()
        .await
        .rows()
        .await
        .into_iter()
        .filter(|r| r.device == device && (first..=last).contains(&r.seq))
        .map(|r| r.seq)
        .collect()
}

fn seqs(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("an array of seqs")
        .iter()
        .map(|s| s.as_i64().expect("seq"))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Network errors that Chromium logs while the daemon is down (connection refused or reset).
fn outage_noise(message: &str) -> bool {
    message.contains("net::ERR_") || message.contains("WebSocket connection to")
}

/// Waits until `n` devices whose ids start with `prefix` have a stored reading.
async fn wait_for_devices(daemon: &Daemon, prefix: &str, n: usize) {
    let url = format!("http://{}/api/devices", daemon.http);
    // The token-less request is refused when auth is on; then count in the database.
    wait_for(
        Duration::from_secs(20),
        "the simulated devices' readings",
        || {
            let url = url.clone();
            async move {
                let seen = match crate::support::http().get(&url).send().await {
                    Ok(r) if r.status().is_success() => {
                        let body: Value = r.json().await.ok()?;
                        body["devices"]
                            .as_array()?
                            .iter()
                            .filter(|d| {
                                d["id"].as_str().is_some_and(|id| id.starts_with(prefix))
                                    && !d["latest"].is_null()
                            })
                            .count()
                    }
                    _ => {
                        let mut ids: Vec<String> = daemon
                            .db()
                            .await
                            .rows()
                            .await
                            .into_iter()
                            .map(|r| r.device)
                            .filter(|d| d.starts_with(prefix))
                            .collect();
                        ids.sort_unstable();
                        ids.dedup();
                        ids.len()
                    }
                };
                (seen >= n).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn the_dashboard_is_built_in_with_strict_headers() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let client = crate::support::http();
    let url = |p: &str| format!("http://{}{p}", daemon.http);

    // Act
    let index = client.get(url("/")).send().await.expect("GET /");
    let h = index.headers().clone();
    let html = index.text().await.expect("body");
    let js = client.get(url("/assets/app.js")).send().await.expect("js");
    let uplot = client
        .get(url("/assets/vendor/uPlot.iife.min.js"))
        .send()
        .await
        .expect("uPlot");
    let etag = js.headers()["etag"].clone();
    let again = client
        .get(url("/assets/app.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .expect("revalidate");
    let missing = client
        .get(url("/assets/nope.js"))
        .send()
        .await
        .expect("missing");

    // Assert
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let csp = h["content-security-policy"].to_str().expect("csp");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert!(html.contains("assets/app.js") && html.contains("assets/vendor/uPlot.iife.min.js"));
    assert_eq!(js.status(), 200);
    assert_eq!(
        js.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(uplot.status(), 200);
    assert!(
        uplot.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age="),
        "vendor files may be cached"
    );
    assert_eq!(
        again.status(),
        304,
        "an unchanged asset revalidates by ETag"
    );
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.expect("JSON 404");
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test]
async fn the_dashboard_signs_in_lists_devices_charts_live_points_and_shows_command_acks() {
    // Arrange: auth on, so the page must ask for the token once and then use its session for
    // the API, /events and /ws.
    let (token, hash) = telebridge::auth::new_token();
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        &format!(
            "[auth]\ntokens = [ {{ name = \"ops\", role = \"operator\", hash = \"{hash}\" }} ]\n"
        ),
    )
    .await;
    let _devices = Simulator::start(&broker.url(), 3, 5.0, "sim");
    wait_for_devices(&daemon, "sim-", 3).await;
    let dir = artifacts();
    let url = format!("http://{}/", daemon.http);

    // Act
    let script = Script::start(
        "dashboard",
        &[
            "--url",
            &url,
            "--artifacts",
            dir.to_str().unwrap(),
            "--device",
            "sim-02",
            "--devices",
            "3",
            "--token",
            &token,
            "--phone",
        ],
    );
    let r = script.result(SCRIPT_LIMIT).await;

    // Assert
    assert_eq!(
        r["refused"], "That token was not accepted.",
        "a wrong token is refused"
    );
    let refused_errors = strings(&r["refusedErrors"]);
    assert!(
        refused_errors.iter().all(|e| e.contains("401")),
        "only Chromium's own note of the refused sign-in: {refused_errors:?}"
    );
    let ids: Vec<&str> = r["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["sim-01", "sim-02", "sim-03"]);
    assert!(
        r["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["online"] == true)
    );
    let metrics = strings(&r["chartMetrics"]);
    for m in ["battery", "count", "humidity", "rssi", "temperature"] {
        assert!(
            metrics.iter().any(|x| x == m),
            "a chart of {m}: {metrics:?}"
        );
    }
    let chart = seqs(&r["chartSeqs"]);
    let (first, last) = (chart[0], *chart.last().unwrap());
    assert_eq!(
        chart,
        stored_seqs(&daemon, "sim-02", first, last).await,
        "the chart holds every stored reading of sim-02 from its history to the live end, once"
    );
    let ack = r["ack"].as_str().unwrap();
    assert!(
        ack.contains("ping → sim-02")
            && ack.contains("ack")
            && ack.contains("\"pong\"")
            && ack.contains("round trip"),
        "{ack}"
    );
    let failed = r["failed"].as_str().unwrap();
    assert!(
        failed.contains("failed") && failed.contains("unknown command"),
        "{failed}"
    );
    let commands: Value = crate::support::http()
        .get(format!("http://{}/api/commands?device=sim-02", daemon.http))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET /api/commands")
        .json()
        .await
        .expect("JSON");
    let statuses: Vec<(&str, &str)> = commands["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    assert_eq!(statuses, [("selfdestruct", "failed"), ("ping", "acked")]);
    assert_eq!(
        r["logRows"].as_array().unwrap().len(),
        2,
        "{}",
        r["logRows"]
    );
    assert_eq!(
        r["loggedOut"], true,
        "after logging out the page asks for the token again"
    );
    assert!(
        r["phoneOverflow"].as_i64().unwrap() <= 0,
        "no sideways scrolling on a phone"
    );
    assert!(
        strings(&r["consoleErrors"]).is_empty(),
        "{}",
        r["consoleErrors"]
    );
    assert!(strings(&r["pageErrors"]).is_empty(), "{}", r["pageErrors"]);
    // Streams that the page itself closes (logging out, reloading) end as ERR_ABORTED.
    let failed_requests: Vec<String> = strings(&r["failedRequests"])
        .into_iter()
        .filter(|f| !f.ends_with("net::ERR_ABORTED"))
        .collect();
    assert!(failed_requests.is_empty(), "{failed_requests:?}");
    for shot in [
        "dashboard-sign-in",
        "dashboard-desktop",
        "dashboard-phone",
        "dashboard-phone-full",
    ] {
        assert!(dir.join(format!("{shot}.png")).exists(), "{shot}.png");
    }
}

#[tokio::test]
async fn the_dashboard_shows_a_daemon_restart_reconnects_and_the_chart_has_no_gap() {
    // Arrange: a fixed HTTP port, so that the restarted daemon is where the page looks.
    let broker = Mosquitto::start().await;
    let port = free_port();
    let mut daemon = Daemon::start(
        &broker.url(),
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .await;
    let _devices = Simulator::start(&broker.url(), 3, 5.0, "sim");
    wait_for_devices(&daemon, "sim-", 3).await;
    let dir = artifacts();
    let url = format!("http://{}/", daemon.http);
    let mut script = Script::start(
        "dashboard",
        &[
            "--url",
            &url,
            "--artifacts",
            dir.to_str().unwrap(),
            "--device",
            "sim-02",
            "--devices",
            "3",
            "--restart",
            "--prefix",
            "restart",
        ],
    );

    // Act
    script.event("ready", Duration::from_secs(40)).await;
    let status = daemon.sigterm();
    assert!(status.success(), "{status:?}");
    daemon.spawn().await;
    assert_eq!(daemon.http.port(), port);
    let r = script.result(SCRIPT_LIMIT).await;
    eprintln!(
        "reconnected after {} ms; console during the outage: {}",
        r["reconnectMs"], r["consoleErrors"]
    );

    // Assert
    let outage = r["outageBanner"].as_str().unwrap();
    assert!(outage.contains("reconnecting the live feed"), "{outage}");
    assert!(
        r["outageLinks"].to_string().contains("reconnecting")
            || r["outageLinks"].to_string().contains("restarting"),
        "{}",
        r["outageLinks"]
    );
    let back = r["reconnectBanner"].as_str().unwrap();
    assert!(back.contains("nothing was missed"), "{back}");
    // While the feed was down nobody could know presence; after, the daemon's word again.
    let presence = strings(&r["outagePresence"]);
    assert!(
        !presence.is_empty() && presence.iter().all(|p| p == "unknown"),
        "{presence:?}"
    );
    assert!(
        r["outageCount"]
            .as_str()
            .unwrap()
            .contains("presence unknown while the feed is down"),
        "{}",
        r["outageCount"]
    );
    assert!(
        strings(&r["backPresence"]).iter().all(|p| p == "online"),
        "{}",
        r["backPresence"]
    );
    assert!(
        r["sseOpens"].as_i64().unwrap() >= 2,
        "the live feed reopened"
    );
    assert!(
        r["wsOpens"].as_i64().unwrap() >= 2,
        "the command channel reopened"
    );
    let chart = seqs(&r["chartSeqs"]);
    let (first, last) = (chart[0], *chart.last().unwrap());
    let before = r["seqBeforeRestart"].as_i64().unwrap();
    assert!(
        first < before && before < last,
        "the chart spans the restart: {first} < {before} < {last}"
    );
    assert_eq!(
        chart,
        stored_seqs(&daemon, "sim-02", first, last).await,
        "across the restart the chart holds every reading of sim-02, once"
    );
    let again = r["afterRestart"].as_str().unwrap();
    assert!(
        again.contains("\"pong\""),
        "a command after the restart: {again}"
    );
    assert!(strings(&r["pageErrors"]).is_empty(), "{}", r["pageErrors"]);
    let errors: Vec<String> = strings(&r["consoleErrors"])
        .into_iter()
        .filter(|e| !outage_noise(e))
        .collect();
    assert!(
        errors.is_empty(),
        "console errors besides the outage's: {errors:?}"
    );
    for shot in ["restart-outage", "restart-reconnected"] {
        assert!(dir.join(format!("{shot}.png")).exists(), "{shot}.png");
    }
}

#[tokio::test]
async fn a_browser_eventsource_resumes_by_itself_after_a_daemon_restart_with_no_gap() {
    // Arrange
    let broker = Mosquitto::start().await;
    let port = free_port();
    let mut daemon = Daemon::start(
        &broker.url(),
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .await;
    let _devices = Simulator::start(&broker.url(), 3, 10.0, "es");
    let url = format!("http://{}", daemon.http);
    let mut script = Script::start(
        "eventsource",
        &["--url", &url, "--before", "20", "--after", "30"],
    );

    // Act: restart the daemon under the open EventSource.
    script.event("ready", Duration::from_secs(30)).await;
    let status = daemon.sigterm();
    assert!(status.success(), "{status:?}");
    daemon.spawn().await;
    let r = script.result(SCRIPT_LIMIT).await;

    // Assert
    let ids = seqs(&r["ids"]);
    let (first, last) = (ids[0], *ids.last().unwrap());
    let stored: Vec<i64> = daemon
        .db()
        .await
        .rows()
        .await
        .into_iter()
        .map(|row| row.seq)
        .filter(|s| (first..=last).contains(s))
        .collect();
    assert_eq!(
        ids, stored,
        "the browser got every reading stored from its first to its last, in order, once"
    );
    assert!(
        r["shutdowns"].as_i64().unwrap() >= 1,
        "the daemon said it was stopping"
    );
    assert!(r["opens"].as_i64().unwrap() >= 2, "{}", r["states"]);
    assert_eq!(r["readyState"], 1, "the EventSource is open again");
    assert!(strings(&r["pageErrors"]).is_empty(), "{}", r["pageErrors"]);
    let errors: Vec<String> = strings(&r["consoleErrors"])
        .into_iter()
        .filter(|e| !outage_noise(e))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test]
async fn the_dashboard_stays_responsive_with_100_devices_at_10_readings_per_second() {
    dashboard_under_load(100, 10.0, 500.0).await;
}

#[tokio::test]
async fn the_dashboard_list_filters_and_sorts_1000_devices_smoothly() {
    dashboard_under_load(1000, 1.0, 500.0).await;
}

/// The page with `devices` simulated devices at `rate` readings/s each: it keeps up with the
/// feed (at least `min_rate` readings/s reach it), draws frames, and answers picking, filtering
/// and sorting quickly.
async fn dashboard_under_load(devices: usize, rate: f64, min_rate: f64) {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let _devices = Simulator::start(&broker.url(), devices, rate, "load");
    wait_for_devices(&daemon, "load-", devices).await;
    let dir = artifacts();
    let url = format!("http://{}/", daemon.http);

    // Act
    let script = Script::start(
        "load",
        &[
            "--url",
            &url,
            "--devices",
            &devices.to_string(),
            "--artifacts",
            dir.to_str().unwrap(),
            "--seconds",
            "4",
        ],
    );
    let r = script.result(SCRIPT_LIMIT).await;
    eprintln!("dashboard under load ({devices} devices): {r}");

    // Assert
    assert_eq!(r["devices"], devices);
    let got = r["readingsPerSec"].as_f64().unwrap();
    assert!(
        got > min_rate,
        "the page kept up with the feed: {got:.0} readings/s"
    );
    let fps = r["fps"].as_f64().unwrap();
    assert!(fps > 15.0, "frames kept coming: {fps:.1} fps");
    let lag = r["maxLagMs"].as_f64().unwrap();
    assert!(lag < 500.0, "timers ran on time: {lag:.0} ms late at worst");
    let select = r["selectMs"].as_i64().unwrap();
    assert!(select < 3000, "picking a device took {select} ms");
    let filter = r["filterMs"].as_i64().unwrap();
    assert!(filter < 1000, "filtering the list took {filter} ms");
    let presence = r["presenceMs"].as_i64().unwrap();
    assert!(presence < 1000, "the presence filter took {presence} ms");
    for (sort, ms) in r["sortMs"].as_object().expect("sortMs") {
        let ms = ms.as_i64().unwrap();
        assert!(ms < 1000, "sorting by {sort} took {ms} ms");
    }
    let sorted = r["sorted"]["fps"].as_f64().unwrap();
    assert!(
        sorted > 15.0,
        "frames kept coming while sorted by last seen: {}",
        r["sorted"]
    );
    assert!(
        strings(&r["consoleErrors"]).is_empty(),
        "{}",
        r["consoleErrors"]
    );
    assert!(strings(&r["pageErrors"]).is_empty(), "{}", r["pageErrors"]);
}

/// The API's answer to a series request the page made (a path relative to the page).
async fn series(daemon: &Daemon, request: &Value) -> Value {
    let path = format!("/{}", request.as_str().expect("the series request"));
    let r = daemon.get(&path).await;
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.expect("JSON")
}

/// Asserts that the page's buckets are the API's: the same start times, fields and values.
fn assert_same_points(page: &Value, api: &Value, what: &str) {
    let (page, api) = (
        page.as_array().expect("points"),
        api.as_array().expect("points"),
    );
    let times = |ps: &[Value]| -> Vec<i64> {
        ps.iter()
            .map(|p| telebridge::domain::parse_rfc3339_ms(p["t"].as_str().expect("t")).expect("t"))
            .collect()
    };
    assert_eq!(times(page), times(api), "{what}: bucket start times");
    for (p, a) in page.iter().zip(api) {
        let fields = |v: &Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.retain(|k| k != "t");
            k.sort();
            k
        };
        assert_eq!(
            fields(p),
            fields(a),
            "{what}: fields of the bucket at {}",
            a["t"]
        );
        for field in fields(a) {
            for agg in ["avg", "min", "max"] {
                let (x, y) = (p[&field][agg].as_f64(), a[&field][agg].as_f64());
                let close = x
                    .zip(y)
                    .is_some_and(|(x, y)| (x - y).abs() <= 1e-9 * y.abs().max(1.0));
                assert!(
                    close,
                    "{what}: {field}.{agg} at {}: page {x:?}, API {y:?}",
                    a["t"]
                );
            }
        }
    }
}

#[tokio::test]
async fn the_dashboard_draws_24_hours_as_bands_from_the_series_api_extends_them_live_and_keeps_the_range_in_the_url()
 {
    // Arrange: one reading a minute over the last 24 hours, with the device's own ts.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "[units]\nhumidity = \"%RH\"\n").await;
    let publisher = Publisher::connect(&broker.url(), "ranges-pub").await;
    let now = telebridge::domain::now_ms();
    let topic = "devices/range-1/telemetry";
    for i in (0..=1440i64).rev() {
        let payload = serde_json::json!({
            "ts": now - i * 60_000,
            "temperature": 20.0 + (i * 7 % 13) as f64 * 0.25,
            "humidity": 40 + i % 11,
        });
        publisher
            .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
            .await;
    }
    daemon
        .db()
        .await
        .wait_count(1441, Duration::from_secs(30))
        .await;
    let dir = artifacts();
    let url = format!("http://{}/", daemon.http);
    let live_value = 99.5;

    // Act: the page picks 24 h; the API answers the request it made; a live reading follows.
    let mut script = Script::start(
        "ranges",
        &[
            "--url",
            &url,
            "--artifacts",
            dir.to_str().unwrap(),
            "--device",
            "range-1",
            "--live-value",
            &live_value.to_string(),
        ],
    );
    let drawn = script.event("drawn", Duration::from_secs(40)).await;
    let before = series(&daemon, &drawn["series"]["request"]).await;
    let live_ts = telebridge::domain::now_ms();
    publisher
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            serde_json::json!({ "ts": live_ts, "temperature": live_value, "humidity": 50 })
                .to_string(),
        )
        .await;
    let r = script.result(SCRIPT_LIMIT).await;
    let after = series(&daemon, &r["extended"]["request"]).await;

    // Assert: what the page drew at first is the API's answer, as a band and an average.
    let hash = drawn["hash"].clone();
    let drawn = &drawn["series"];
    assert!(
        drawn["request"]
            .as_str()
            .unwrap()
            .starts_with("api/devices/range-1/series?"),
        "{}",
        drawn["request"]
    );
    let points = before["points"].as_array().unwrap().len();
    eprintln!(
        "24 h: {points} buckets of {} from {}",
        before["step"], before["resolution"]
    );
    assert!(
        (280..=1000).contains(&points),
        "24 h of readings in {points} buckets of {}",
        before["step"]
    );
    assert_eq!(drawn["answered"].as_u64(), Some(points as u64));
    assert_eq!(drawn["step_ms"], before["step_ms"]);
    assert_eq!(drawn["resolution"], before["resolution"]);
    assert_same_points(&drawn["points"], &before["points"], "drawn");
    for field in ["temperature", "humidity"] {
        let chart = &drawn["drawn"][field];
        assert_eq!(
            chart["series"],
            serde_json::json!(["min", "max", "avg"]),
            "{field}"
        );
        assert_eq!(chart["bands"], 1, "{field}: a min–max band");
        assert_eq!(chart["points"].as_u64(), Some(points as u64), "{field}");
        assert_eq!(
            chart["filled"],
            serde_json::json!([points, points, points]),
            "{field}: every bucket has a value"
        );
    }
    assert_eq!(strings(&r["pressed24"]), ["24h"]);
    assert_eq!(
        before["units"],
        serde_json::json!({ "humidity": "%RH", "temperature": "°C" })
    );
    for (field, unit) in [("humidity", "%RH"), ("temperature", "°C")] {
        let head = drawn["drawn"][field]["head"].as_str().unwrap();
        assert!(
            head.starts_with(&format!("{field} ({unit})")) && head.contains(&format!(" {unit} ")),
            "{field}'s unit in its name and value: {head}"
        );
        assert_eq!(
            r["live"]["units"][field], unit,
            "the live chart has the unit from GET /api/devices"
        );
    }
    let status = r["status"].as_str().unwrap();
    assert!(
        status.contains(&format!("{points} buckets")) && status.contains("live"),
        "{status}"
    );
    let hover = r["hover"].as_str().unwrap();
    assert!(
        hover.contains("avg ·"),
        "the hovered bucket's average and band: {hover}"
    );

    // The live reading is in its bucket, and the page's buckets are still the API's.
    let extended = &r["extended"];
    let step = before["step_ms"].as_i64().unwrap();
    let bucket = telebridge::domain::format_ms(live_ts - live_ts.rem_euclid(step));
    let last = extended["points"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        telebridge::domain::parse_rfc3339_ms(last["t"].as_str().unwrap()),
        telebridge::domain::parse_rfc3339_ms(&bucket),
        "the live reading's bucket is the last: {last}"
    );
    assert_eq!(last["temperature"]["max"], live_value);
    assert_same_points(
        &extended["points"],
        &after["points"],
        "after the live reading",
    );
    let live_seq = daemon
        .db()
        .await
        .rows()
        .await
        .into_iter()
        .map(|row| row.seq)
        .max()
        .unwrap();
    assert_eq!(
        extended["lastSeq"], live_seq,
        "the page counted the live reading"
    );

    // The URL held the device and range; a reload came back to both.
    assert_eq!(hash, "#device=range-1&range=24h");
    let reloaded = &r["reloaded"];
    assert_eq!(reloaded["hash"], "#device=range-1&range=24h");
    assert_eq!(strings(&reloaded["pressed"]), ["24h"]);
    assert_eq!(reloaded["range"]["key"], "24h");
    let again = series(&daemon, &reloaded["series"]["request"]).await;
    assert_same_points(
        &reloaded["series"]["points"],
        &again["points"],
        "after the reload",
    );

    // A custom range of 5 h is aggregated, in the URL; one of 90 min is raw.
    let long = &r["customLong"];
    let long_hash = long["hash"].as_str().unwrap();
    assert!(
        long_hash.starts_with("#device=range-1&from=") && long_hash.contains("&to="),
        "{long_hash}"
    );
    assert_eq!(strings(&long["pressed"]), ["custom"]);
    let answer = series(&daemon, &long["series"]["request"]).await;
    assert_same_points(
        &long["series"]["points"],
        &answer["points"],
        "a custom range",
    );
    assert!(!answer["points"].as_array().unwrap().is_empty(), "{answer}");
    let short = &r["customShort"];
    assert_eq!(short["chart"]["mode"], "raw");
    let short_hash = short["hash"].as_str().unwrap();
    let from = short_hash
        .strip_prefix("#device=range-1&from=")
        .unwrap_or_else(|| panic!("{short_hash}"));
    assert!(
        !from.contains("&to="),
        "no end: it follows the live feed: {short_hash}"
    );
    let from = telebridge::domain::parse_rfc3339_ms(from).expect("from");
    let stored: Vec<i64> = daemon
        .db()
        .await
        .rows()
        .await
        .into_iter()
        .filter(|row| row.device == "range-1" && row.ts >= from)
        .map(|row| row.seq)
        .collect();
    assert_eq!(
        seqs(&short["chart"]["seqs"]),
        stored,
        "90 min to now: every stored reading since, the live one too"
    );
    assert!((90..=93).contains(&stored.len()), "{}", stored.len());

    // The refused range: the API's message on the page, marked as an error.
    let refused = &r["refused"];
    let path = format!("/{}", refused["request"].as_str().unwrap());
    let answer = daemon.get(&path).await;
    assert_eq!(answer.status(), 400, "GET {path}");
    let body: Value = answer.json().await.expect("JSON");
    let message = body["error"]["message"].as_str().unwrap();
    let status = refused["status"].as_str().unwrap();
    assert!(
        status.starts_with("Could not load the series") && status.ends_with(message),
        "{status} / {message}"
    );
    assert_eq!(refused["kind"], "error");
    assert!(
        strings(&refused["consoleErrors"])
            .iter()
            .all(|e| e.contains("400")),
        "only Chromium's note of the refused request: {}",
        refused["consoleErrors"]
    );

    assert!(
        strings(&r["consoleErrors"]).is_empty(),
        "{}",
        r["consoleErrors"]
    );
    assert!(strings(&r["pageErrors"]).is_empty(), "{}", r["pageErrors"]);
    let failed_requests: Vec<String> = strings(&r["failedRequests"])
        .into_iter()
        .filter(|f| !f.ends_with("net::ERR_ABORTED"))
        .collect();
    assert!(failed_requests.is_empty(), "{failed_requests:?}");
    for shot in [
        "ranges-24h",
        "ranges-24h-hover",
        "ranges-custom",
        "ranges-refused",
    ] {
        assert!(dir.join(format!("{shot}.png")).exists(), "{shot}.png");
    }
}

/// Publishes each `(device, temperature)` every 200 ms for `span`.
async fn hold(p: &Publisher, readings: &[(&str, f64)], span: Duration) {
    let end = Instant::now() + span;
    while Instant::now() < end {
        for (device, value) in readings {
            p.publish(
                &format!("devices/{device}/telemetry"),
                QoS::AtLeastOnce,
                false,
                serde_json::json!({ "temperature": value }).to_string(),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET /api/devices`'s devices.
async fn api_devices(daemon: &Daemon) -> Vec<Value> {
    let body: Value = daemon.get("/api/devices").await.json().await.expect("JSON");
    body["devices"].as_array().expect("devices").clone()
}

/// `GET /api/alerts{query}`'s alerts.
async fn api_alerts(daemon: &Daemon, query: &str) -> Vec<Value> {
    let r = daemon.get(&format!("/api/alerts{query}")).await;
    assert_eq!(r.status(), 200, "GET /api/alerts{query}");
    let body: Value = r.json().await.expect("JSON");
    body["alerts"].as_array().expect("alerts").clone()
}

#[tokio::test]
async fn the_dashboard_shows_an_alert_live_on_its_device_and_chart_acknowledges_it_and_sees_it_resolve()
 {
    // Arrange: a rule on sensor-*; both sensors start normal, and the page is open on sensor-2.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        "[alerts]\nrules = [ { name = \"hot\", devices = [\"sensor-*\"], when = \"temperature > 80\", \
         for = \"1s\", severity = \"critical\", clear = \"temperature < 75\" } ]\n",
    )
    .await;
    let publisher = Publisher::connect(&broker.url(), "alerts-pub").await;
    hold(
        &publisher,
        &[("sensor-1", 20.0), ("sensor-2", 21.0)],
        Duration::from_millis(600),
    )
    .await;
    wait_for_devices(&daemon, "sensor-", 2).await;
    let dir = artifacts();
    let url = format!("http://{}/", daemon.http);
    let mut script = Script::start(
        "alerts",
        &[
            "--url",
            &url,
            "--artifacts",
            dir.to_str().unwrap(),
            "--device",
            "sensor-1",
            "--other",
            "sensor-2",
        ],
    );
    script.event("ready", Duration::from_secs(40)).await;

    // Act: sensor-1 runs hot for 2 s (the rule holds 1 s); the page acknowledges the alert; then
    // sensor-1 cools down below the clear condition.
    hold(
        &publisher,
        &[("sensor-1", 90.0), ("sensor-2", 21.0)],
        Duration::from_secs(2),
    )
    .await;
    let acked = script.event("acked", Duration::from_secs(40)).await;
    let open = api_alerts(&daemon, "?state=open").await;
    hold(
        &publisher,
        &[("sensor-1", 70.0), ("sensor-2", 21.0)],
        Duration::from_secs(1),
    )
    .await;
    // Then silence: both devices turn stale.
    let quiet_since = telebridge::domain::now_ms();
    let r = script.result(SCRIPT_LIMIT).await;
    let all = api_alerts(&daemon, "").await;

    // Assert: nothing open before; then the alert as the API has it, in the panel.
    let before = &r["before"];
    assert_eq!(before["empty"], "No alerts firing.", "{before}");
    assert_eq!(before["rows"], 0);
    assert_eq!(before["count"], "");
    assert_eq!(open.len(), 1, "one open alert: {open:?}");
    let alert = &open[0];
    assert_eq!(
        alert["id"], acked["id"],
        "the page acknowledged the alert that fired"
    );
    assert_eq!(alert["rule"], "hot");
    assert_eq!(alert["device"], "sensor-1");
    assert_eq!(
        (alert["state"].as_str(), alert["acked_by"].as_str()),
        (Some("acknowledged"), Some("anonymous")),
        "the API has the page's acknowledgement: {alert}"
    );
    let firing = &r["firing"];
    assert_eq!(firing["id"], alert["id"]);
    assert_eq!(firing["severity"], "critical");
    assert_eq!(firing["severityText"], "critical");
    assert_eq!(firing["rule"], "hot");
    assert_eq!(firing["device"], "sensor-1");
    assert_eq!(firing["message"], alert["message"], "the alert's message");
    assert!(
        firing["message"]
            .as_str()
            .unwrap()
            .starts_with("temperature > 80 (value 90)"),
        "{}",
        firing["message"]
    );
    assert_eq!(firing["state"], "firing");
    let when = firing["when"].as_str().unwrap();
    assert!(
        when == "fired just now" || (when.starts_with("fired ") && when.ends_with(" ago")),
        "{when}"
    );
    assert_eq!(
        firing["ackButton"], true,
        "an operator (no auth) may acknowledge"
    );
    assert_eq!(firing["count"], "1 firing");
    assert_eq!(firing["emptyShown"], false);
    assert_ne!(
        firing["background"], firing["border"],
        "colored by severity: {firing}"
    );
    assert_eq!(firing["title"], "(1) telebridge");

    // The device list marks sensor-1, only it.
    let row = |rows: &Value, id: &str| -> Value {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap_or_else(|| panic!("no row {id} in {rows}"))
            .clone()
    };
    let hot = row(&firing["rows"], "sensor-1");
    assert_eq!(hot["alert"], "critical", "{hot}");
    assert_eq!(hot["alertState"], "firing");
    assert_eq!(hot["label"], "1 alert firing (critical)");
    assert_eq!(hot["shown"], true);
    let normal = row(&firing["rows"], "sensor-2");
    assert!(
        normal["alert"].is_null() && normal["label"].is_null(),
        "{normal}"
    );

    // Picked from the panel, sensor-1's temperature chart has the threshold and one band.
    assert_eq!(firing["selected"], "sensor-1");
    assert_eq!(firing["hash"], "#device=sensor-1");
    assert_eq!(
        firing["chart"],
        serde_json::json!({ "threshold": "80", "bands": 1 })
    );

    // A refused acknowledgement shows the API's message and leaves the alert firing.
    let refused = &r["refused"];
    assert_eq!(
        refused["error"],
        "Could not acknowledge: token \"guest\" is a viewer; acknowledging alerts needs an operator token"
    );
    assert_eq!(refused["state"], "firing");
    assert_eq!(refused["ackButton"], true, "one may try again");
    assert!(
        strings(&refused["consoleErrors"])
            .iter()
            .all(|e| e.contains("403")),
        "only Chromium's note of the refused request: {}",
        refused["consoleErrors"]
    );

    // Silent devices turn stale (amber), at least 2 s after their last reading, still online.
    let stale = &r["stale"];
    let waited = stale["at"].as_i64().expect("at") - quiet_since;
    assert!(
        (1_500..15_000).contains(&waited),
        "stale {waited} ms after the last reading"
    );
    assert_eq!(stale["detail"], "stale");
    assert_eq!(stale["detailPresence"], "stale");
    assert_eq!(stale["count"], "2 of 2 online, 2 stale");
    assert_ne!(
        stale["dot"], stale["onlineDot"],
        "amber, not green: {stale}"
    );
    let listed = api_devices(&daemon).await;
    assert!(
        listed.iter().all(|d| d["presence"] == "stale"),
        "the API agrees: {listed:?}"
    );

    // Acknowledged: by whom, in the panel and the device list.
    let page_acked = &r["acked"];
    let state = page_acked["state"].as_str().unwrap();
    assert!(
        state.starts_with("acknowledged by anonymous"),
        "{page_acked}"
    );
    assert_eq!(page_acked["ackButton"], false);
    assert_eq!(page_acked["errorShown"], false, "the earlier error is gone");
    assert_eq!(page_acked["count"], "1 acknowledged");
    assert_eq!(page_acked["title"], "telebridge");
    let hot = row(&page_acked["rows"], "sensor-1");
    assert_eq!(
        (hot["alert"].as_str(), hot["alertState"].as_str()),
        (Some("critical"), Some("acknowledged"))
    );
    assert_eq!(hot["label"], "1 alert acknowledged (critical)");

    // Resolved, live: no open alert; the resolved one dimmed below, still a band on the chart.
    let stored = all
        .iter()
        .find(|a| a["id"] == alert["id"])
        .expect("the alert");
    assert_eq!(stored["state"], "resolved", "{stored}");
    let resolved = &r["resolved"];
    assert_eq!(resolved["openRows"], 0);
    assert_eq!(resolved["empty"], "No alerts firing.");
    assert_eq!(resolved["count"], "");
    let text = resolved["resolvedRow"].as_str().unwrap();
    assert!(
        text.contains("hot") && text.contains("sensor-1") && text.contains("resolved"),
        "{text}"
    );
    assert!(
        row(&resolved["rows"], "sensor-1")["alert"].is_null(),
        "{}",
        resolved["rows"]
    );
    assert_eq!(
        resolved["chart"],
        serde_json::json!({ "threshold": "80", "bands": 1 }),
        "the resolved alert's span is in the range"
    );
    assert_eq!(
        resolved["sameDocument"], true,
        "all of it arrived live, without a reload"
    );
    assert_eq!(
        resolved["snapshot"],
        serde_json::json!([{ "id": alert["id"], "rule": "hot", "device": "sensor-1",
            "severity": "critical", "state": "resolved", "acked_by": "anonymous" }])
    );
    assert!(
        r["phoneOverflow"].as_i64().unwrap() <= 0,
        "no sideways scrolling on a phone"
    );
    assert!(
        strings(&r["consoleErrors"]).is_empty(),
        "{}",
        r["consoleErrors"]
    );
    assert!(strings(&r["pageErrors"]).is_empty(), "{}", r["pageErrors"]);
    let failed_requests: Vec<String> = strings(&r["failedRequests"])
        .into_iter()
        .filter(|f| !f.ends_with("net::ERR_ABORTED"))
        .collect();
    assert!(failed_requests.is_empty(), "{failed_requests:?}");
    for shot in [
        "alerts-firing",
        "alerts-acknowledged",
        "alerts-resolved",
        "alerts-phone",
    ] {
        assert!(dir.join(format!("{shot}.png")).exists(), "{shot}.png");
    }
}

/// The devices of the monitoring test: a truck with an outage in its data, a device with one
/// reading, and three more for the list, one of them offline. Returns the outage (Unix s).
async fn monitoring_fleet(broker: &Mosquitto, daemon: &Daemon) -> (f64, f64) {
    let publisher = Publisher::connect(&broker.url(), "monitor-pub").await;
    let now = telebridge::domain::now_ms();
    // 20 readings a second apart, then 61 s of nothing, then 20 more up to a second ago.
    let times: Vec<i64> = (0..20)
        .map(|i| now - 100_000 + i * 1000)
        .chain((0..20).map(|i| now - 20_000 + i * 1000))
        .collect();
    for (k, ts) in times.iter().enumerate() {
        let k = k as f64;
        let payload = serde_json::json!({
            "ts": ts,
            "speed": 40.0 + k,
            "engine": { "temp_c": 80.0 + k * 0.5 },
            "load": 1200.0 + k,
            "units": { "load": "kg" },
        });
        publisher
            .publish(
                "devices/truck-1/telemetry",
                QoS::AtLeastOnce,
                false,
                payload.to_string(),
            )
            .await;
    }
    let reading = |d: &str, v: f64| {
        (
            format!("devices/{d}/telemetry"),
            serde_json::json!({ "temperature": v }).to_string(),
        )
    };
    for (topic, body) in [reading("lonely-1", 21.5), reading("dev-off", 1.0)] {
        publisher
            .publish(&topic, QoS::AtLeastOnce, false, body)
            .await;
    }
    publisher
        .publish("devices/dev-off/status", QoS::AtLeastOnce, false, "offline")
        .await;
    // dev-b is seen last.
    for d in ["dev-a", "dev-b"] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (topic, body) = reading(d, 2.0);
        publisher
            .publish(&topic, QoS::AtLeastOnce, false, body)
            .await;
    }
    daemon
        .db()
        .await
        .wait_count(44, Duration::from_secs(20))
        .await;
    wait_for(Duration::from_secs(10), "dev-off offline", || async {
        api_devices(daemon)
            .await
            .iter()
            .any(|d| d["id"] == "dev-off" && d["presence"] == "offline")
            .then_some(())
    })
    .await;
    (
        (now - 81_000) as f64 / 1000.0,
        (now - 20_000) as f64 / 1000.0,
    )
}

#[tokio::test]
async fn the_dashboard_charts_show_units_gaps_tooltips_and_lone_points_and_the_list_filters_sorts_and_takes_keys()
 {
    // Arrange: units from a device glob, a payload and a name suffix; the console's templates
    // from the config; no stale state, so that presence stays as published.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        "[presence]\nstale_after = 0\n[units.\"truck-*\"]\nspeed = \"mph\"\n\
         [commands.templates]\nping = {}\nset_interval = { seconds = 7 }\n",
    )
    .await;
    let (outage_from, outage_to) = monitoring_fleet(&broker, &daemon).await;
    let dir = artifacts();
    let url = format!("http://{}/", daemon.http);

    // Act
    let script = Script::start(
        "monitor",
        &[
            "--url",
            &url,
            "--artifacts",
            dir.to_str().unwrap(),
            "--truck",
            "truck-1",
            "--lonely",
            "lonely-1",
            "--offline",
            "dev-off",
            "--outage",
            &format!("{outage_from},{outage_to}"),
        ],
    );
    let r = script.result(Duration::from_secs(90)).await;
    let commands: Value = daemon
        .get("/api/commands?device=dev-off")
        .await
        .json()
        .await
        .expect("JSON");

    // Assert: units from the glob (speed), the payload (load) and the name (engine.temp_c).
    let truck = &r["truck"];
    assert_eq!(
        truck["snapshot"]["units"],
        serde_json::json!({ "speed": "mph", "load": "kg", "engine.temp_c": "°C" }),
        "{truck}"
    );
    let speed = &truck["plots"]["speed"];
    assert_eq!(speed["name"], "speed (mph)");
    assert_eq!(speed["points"], 40);
    // The outage is one break, which uPlot clipped out of the line: no stroke in the canvas
    // over it, but on both sides.
    let breaks = speed["breaks"].as_array().expect("breaks");
    assert_eq!(breaks.len(), 1, "one break: {speed}");
    let (b0, b1) = (
        breaks[0][0].as_f64().unwrap(),
        breaks[0][1].as_f64().unwrap(),
    );
    assert!(
        (b0 - outage_from).abs() < 0.01 && (b1 - outage_to).abs() < 0.01,
        "the break is the outage {outage_from}..{outage_to}: {speed}"
    );
    let clipped = speed["gaps"].as_array().expect("gaps").iter().any(|g| {
        g[0].as_f64().unwrap() <= outage_from + 1.0 && g[1].as_f64().unwrap() >= outage_to - 1.0
    });
    assert!(clipped, "uPlot clipped the outage: {speed}");
    let pixels = &truck["pixels"];
    assert_eq!(
        pixels["outage"], 0,
        "no line drawn over the outage: {pixels}"
    );
    assert!(
        pixels["before"].as_u64().unwrap() > 0 && pixels["after"].as_u64().unwrap() > 0,
        "the line is drawn on both sides: {pixels}"
    );
    assert_eq!(
        truck["plots"]["load"]["breaks"].as_array().unwrap().len(),
        1
    );
    // The tooltip by the hovered point gives its value with the unit, inside the card.
    assert_eq!(truck["hovered"]["value"], 77.0);
    let tip = truck["tooltip"]["text"].as_str().unwrap();
    assert!(tip.starts_with("77 mph "), "{tip}");
    assert_eq!(truck["tooltip"]["inside"], true);
    // The text summary, also the chart's label for a screen reader.
    let summary = speed["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("min 40 mph · max 79 mph · latest 79 mph (")
            && summary.ends_with(") · 40 readings"),
        "{summary}"
    );
    assert_eq!(speed["role"], "img");
    assert_eq!(
        speed["label"].as_str().unwrap(),
        format!("speed (mph) over the last 5 min: {summary}")
    );
    assert!(
        truck["plots"]["engine.temp_c"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("min 80 °C · max 99.50 °C"),
        "{truck}"
    );
    // The last time label fits in the card.
    let last = &speed["lastLabel"];
    assert!(
        last["right"].as_f64().unwrap() <= last["width"].as_f64().unwrap(),
        "the last x label is not clipped: {last}"
    );
    // The CSV of the range: one row per reading, a column per numeric field.
    let csv = &truck["csv"];
    assert_eq!(csv["name"], "truck-1-live.csv");
    assert_eq!(csv["rows"], 40, "{csv}");
    assert!(
        csv["header"]
            .as_str()
            .unwrap()
            .contains("engine.temp_c,load,speed"),
        "{csv}"
    );

    // One reading: drawn as a point, on an axis with distinct labels.
    let lonely = &r["lonely"];
    let t = &lonely["plots"]["temperature"];
    assert_eq!(t["points"], 1);
    assert_eq!(t["lone"], serde_json::json!([0]));
    assert!(
        lonely["pointPixels"].as_u64().unwrap() > 0,
        "the point is painted: {lonely}"
    );
    let range = t["xRange"].as_array().unwrap();
    assert!(range[1].as_f64() > range[0].as_f64(), "{t}");
    let labels = strings(&t["labels"]);
    let mut distinct = labels.clone();
    distinct.dedup();
    assert!(
        labels.len() >= 2 && distinct.len() == labels.len(),
        "{labels:?} {t}"
    );
    assert_eq!(lonely["status"], "1 reading in the last 5 min · live");

    // The device list: filter, sort, the URL, and the keys.
    let list = &r["list"];
    let ids = |v: &Value| strings(v);
    assert_eq!(
        ids(&list["all"]),
        ["dev-a", "dev-b", "dev-off", "lonely-1", "truck-1"]
    );
    assert_eq!(ids(&list["offline"]), ["dev-off"]);
    assert!(
        list["offlineHash"]
            .as_str()
            .unwrap()
            .contains("show=offline")
    );
    assert_eq!(
        ids(&list["online"]),
        ["dev-a", "dev-b", "lonely-1", "truck-1"]
    );
    assert_eq!(
        ids(&list["problem"])[0],
        "dev-off",
        "problems first: {list}"
    );
    assert_eq!(ids(&list["seen"])[..2], ["dev-b", "dev-a"], "{list}");
    assert_eq!(ids(&list["filtered"]), ["dev-b", "dev-a", "dev-off"]);
    let hash = list["hash"].as_str().unwrap();
    assert!(
        hash.contains("q=dev-") && hash.contains("sort=seen"),
        "{hash}"
    );
    assert_eq!(list["restored"]["q"], "dev-");
    assert_eq!(list["restored"]["sort"], "seen");
    assert_eq!(
        ids(&list["restored"]["rows"]),
        ["dev-b", "dev-a", "dev-off"]
    );
    let keys = &list["keys"];
    assert_eq!(ids(&keys["stops"]), ["dev-b"], "one Tab stop: {keys}");
    assert_eq!(keys["down"], serde_json::json!(["dev-a", "dev-a", 1]));
    assert_eq!(keys["end"], serde_json::json!(["dev-off", "dev-off"]));
    assert_eq!(keys["home"], "dev-b");
    assert!(
        !keys["tabbedTo"].as_str().unwrap().starts_with("dev-"),
        "Tab leaves the list: {keys}"
    );

    // The console: templates from the config, one wording, a queued command cancelled.
    let console = &r["console"];
    assert_eq!(ids(&console["templates"]), ["ping", "set_interval"]);
    assert_eq!(console["why"], true, "no reason shown while Send can send");
    assert_eq!(console["params"], "{\"seconds\":7}");
    assert_eq!(console["pingParams"], "{}");
    assert_eq!(console["queued"][0], "queued");
    assert!(
        console["cancelled"].as_str().unwrap().contains("cancelled"),
        "{console}"
    );
    let log = console["log"].as_str().unwrap();
    assert!(log.starts_with("ping → dev-off cancelled"), "{log}");
    let stored = &commands["commands"][0];
    assert_eq!(
        (stored["name"].as_str(), stored["status"].as_str()),
        (Some("ping"), Some("cancelled")),
        "{commands}"
    );
    assert_eq!(console["down"]["disabled"], true);
    assert!(
        console["down"]["why"]
            .as_str()
            .unwrap()
            .starts_with("The command channel is"),
        "{console}"
    );
    assert!(strings(&r["errors"]).is_empty(), "{}", r["errors"]);
}

#[tokio::test]
async fn the_dashboard_passes_axe_core_on_desktop_and_phone_in_both_colour_schemes() {
    // Arrange: live simulated devices, so that the list, charts and command results are full.
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let _devices = Simulator::start(&broker.url(), 4, 2.0, "a11y");
    wait_for_devices(&daemon, "a11y-", 4).await;
    let dir = artifacts();
    let url = format!("http://{}/", daemon.http);

    // Act
    let script = Script::start(
        "a11y",
        &[
            "--url",
            &url,
            "--artifacts",
            dir.to_str().unwrap(),
            "--device",
            "a11y-02",
        ],
    );
    let r = script.result(Duration::from_secs(100)).await;

    // Assert: four runs, none with a serious or critical finding; no sideways scroll on a phone.
    let runs = r["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4, "{r}");
    for run in runs {
        let what = format!("{} at {}×{}", run["scheme"], run["width"], run["height"]);
        assert_eq!(
            run["violations"].as_array().map(Vec::len),
            Some(0),
            "axe-core, {what}: {:#}",
            run["violations"]
        );
        assert!(
            run["scrollWidth"].as_u64() <= run["clientWidth"].as_u64(),
            "no horizontal scroll, {what}: {run}"
        );
        assert_eq!(
            run["clipped"],
            serde_json::json!([]),
            "no control cut off at its card's edge, {what}"
        );
        assert_eq!(
            run["chartGrid"], run["grid"],
            "the charts follow the colour scheme, {what}"
        );
    }
    assert!(strings(&r["errors"]).is_empty(), "{}", r["errors"]);
}
