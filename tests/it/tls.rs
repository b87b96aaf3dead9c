//! TLS on both sides, with certificates the test makes: HTTPS for the API, SSE and WebSocket,
//! and MQTT over TLS with a client certificate and a password against Mosquitto.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rumqttc::QoS;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::support::{
    self, Daemon, FakeDevice, Mosquitto, Publisher, check, free_port, reading, wait_for,
};

const T: Duration = Duration::from_secs(20);

/// A test CA with a server certificate (localhost, 127.0.0.1) and a client certificate,
/// written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "telebridge test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let mut p = CertificateParams::new(names).expect("params");
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, &ca).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "localhost",
        );
        let (client, client_key) = leaf(
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            "telebridge",
        );
        for (name, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server),
            ("server.key", server_key),
            ("client.pem", client),
            ("client.key", client_key),
        ] {
            std::fs::write(dir.path().join(name), pem).expect("write pem");
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A rustls client config that trusts only the test CA.
    fn client_config(&self) -> rustls::ClientConfig {
        let files = telebridge::tls::ClientFiles {
            ca: Some(self.path("ca.pem")),
            ..Default::default()
        };
        Arc::unwrap_or_clone(telebridge::tls::client_config(&files).expect("client config"))
    }

    /// An HTTP client that trusts only the test CA.
    fn http(&self) -> reqwest::Client {
        support::http_builder()
            .tls_backend_preconfigured(self.client_config())
            .build()
            .expect("client")
    }
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

#[tokio::test]
async fn https_serves_the_api_events_and_websocket_to_clients_that_trust_its_certificate() {
    // Arrange
    let pki = Pki::new();
    let (token, hash) = telebridge::auth::new_token();
    let broker = Mosquitto::start().await;
    let config = format!(
        "[http]\ntls_cert = {}\ntls_key = {}\n[auth]\ntokens = [ {{ name = \"ops\", role = \"operator\", hash = \"{hash}\" }} ]\n",
        toml_path(&pki.path("server.pem")),
        toml_path(&pki.path("server.key")),
    );
    let daemon = Daemon::start_with(&broker.url(), &config, pki.http(), true).await;
    let publisher = Publisher::connect(&broker.url(), "tls-pub").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-1", "devices/dev-1/commands").await;

    // Act
    publisher
        .publish(
            "devices/dev-1/telemetry",
            QoS::AtLeastOnce,
            false,
            reading(7),
        )
        .await;
    daemon.db().await.wait_count(1, T).await;
    let history = daemon
        .client
        .get(daemon.url("/api/devices/dev-1/readings"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET history over HTTPS");
    let session = daemon
        .client
        .post(daemon.url("/api/session"))
        .body(json!({ "token": token }).to_string())
        .send()
        .await
        .expect("POST /api/session over HTTPS");
    let mut events = daemon
        .client
        .get(daemon.url("/events?last_event_id=0"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("GET /events over HTTPS");
    let mut sse = String::new();
    tokio::time::timeout(T, async {
        while !sse.contains("event: reading") {
            let chunk = events
                .chunk()
                .await
                .expect("SSE chunk")
                .expect("stream open");
            sse.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("a reading on the HTTPS event stream");
    let mut request = format!("wss://localhost:{}/ws", daemon.http.port())
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let connector = tokio_tungstenite::Connector::Rustls(Arc::new(pki.client_config()));
    let (mut ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(request, None, false, Some(connector))
            .await
            .expect("wss:// /ws");
    ws.send(Message::Text(
        json!({"type": "command", "device": "dev-1", "name": "ping", "ref": "r"})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    let command = device.next_command(T).await.expect("the device gets it");
    device
        .answer(json!({"id": command["id"], "ok": true, "result": "pong"}))
        .await;
    let mut replies = Vec::new();
    tokio::time::timeout(T, async {
        while !replies
            .iter()
            .any(|r: &serde_json::Value| r["type"] == "ack")
        {
            if let Some(Ok(Message::Text(t))) = ws.next().await {
                replies.push(serde_json::from_str(t.as_str()).expect("JSON"));
            }
        }
    })
    .await
    .expect("the ack comes back over wss://");
    let untrusting = support::http().get(daemon.url("/healthz")).send().await;
    let plain = support::http()
        .get(format!("http://{}/healthz", daemon.http))
        .send()
        .await;

    // Assert
    assert_eq!(
        daemon.scheme, "https",
        "the daemon prints an https:// address"
    );
    assert_eq!(history.status(), 200);
    let body: serde_json::Value = history.json().await.expect("json");
    assert_eq!(body["readings"][0]["payload"]["n"], 7, "{body}");
    let cookie = session
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "over HTTPS the session cookie is Secure: {cookie}"
    );
    assert!(sse.contains("\"n\":7"), "{sse}");
    assert_eq!(replies[0]["type"], "accepted", "{replies:?}");
    assert_eq!(
        replies.last().map(|r| r["result"].clone()),
        Some(json!("pong"))
    );
    let err = untrusting.expect_err("a client that does not trust the CA is refused");
    assert!(
        format!("{err:?}").contains("UnknownIssuer"),
        "the failure is the unknown issuer: {err:?}"
    );
    assert!(
        plain.is_err() || plain.is_ok_and(|r| !r.status().is_success()),
        "plain HTTP is not served on the HTTPS port"
    );
}

/// Mosquitto with an anonymous plain listener (for the test's devices) and a TLS listener
/// that wants a client certificate from our CA and a password.
async fn tls_mosquitto(pki: &Pki, tls_port: u16) -> Mosquitto {
    let passwords = pki.path("passwords");
    let status = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwords)
        .args(["telebridge", "s3cret"])
        .status()
        .expect("mosquitto_passwd");
    assert!(status.success(), "mosquitto_passwd failed");
    let tail = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
         require_certificate true\nallow_anonymous false\npassword_file {}\n",
        pki.path("ca.pem").display(),
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
        passwords.display(),
    );
    let broker = Mosquitto::start_with("per_listener_settings true", &tail).await;
    wait_for(T, "the TLS listener", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    broker
}

fn mqtt_tls_config(pki: &Pki, cert: bool, ca: bool, password: &str) -> String {
    let mut s = format!("[mqtt]\nusername = \"telebridge\"\npassword = \"{password}\"\n");
    if ca {
        s += &format!("tls_ca = {}\n", toml_path(&pki.path("ca.pem")));
    }
    if cert {
        s += &format!(
            "tls_cert = {}\ntls_key = {}\n",
            toml_path(&pki.path("client.pem")),
            toml_path(&pki.path("client.key"))
        );
    }
    s
}

#[tokio::test]
async fn mqtt_over_tls_with_a_client_certificate_and_password_carries_readings_and_commands() {
    // Arrange
    let pki = Pki::new();
    let tls_port = free_port();
    let broker = tls_mosquitto(&pki, tls_port).await;
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let daemon = Daemon::start(&url, &mqtt_tls_config(&pki, true, true, "s3cret")).await;
    let publisher = Publisher::connect(&broker.url(), "tls-dev").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-9", "devices/dev-9/commands").await;

    // Act
    for n in 0..20 {
        publisher
            .publish(
                "devices/dev-9/telemetry",
                QoS::AtLeastOnce,
                false,
                reading(n),
            )
            .await;
    }
    let stored = daemon.db().await.wait_count(20, T).await;
    let posted = daemon
        .client
        .post(daemon.url("/api/devices/dev-9/commands"))
        .body(r#"{"name":"reboot"}"#)
        .send()
        .await
        .expect("POST command");
    let command = device.next_command(T).await;

    // Assert
    assert_eq!(stored, 20, "every reading came in over the TLS connection");
    assert_eq!(
        daemon.db().await.numbers().await,
        (0..20).collect::<Vec<_>>()
    );
    assert_eq!(posted.status(), 202, "{:?}", posted.text().await);
    let command = command.expect("the command went out over the TLS connection");
    assert_eq!(command["name"], "reboot");
}

#[tokio::test]
async fn mqtt_over_tls_refuses_a_missing_client_certificate_a_wrong_password_and_an_unknown_ca() {
    // Arrange
    let pki = Pki::new();
    let tls_port = free_port();
    let _broker = tls_mosquitto(&pki, tls_port).await;
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let cases = [
        (
            "no client certificate",
            mqtt_tls_config(&pki, false, true, "s3cret"),
        ),
        ("wrong password", mqtt_tls_config(&pki, true, true, "wrong")),
        ("unknown CA", mqtt_tls_config(&pki, true, false, "s3cret")),
    ];

    // Act
    let mut daemons = Vec::new();
    for (what, config) in &cases {
        let d = Daemon::start_with(&url, config, support::http(), false).await;
        daemons.push((*what, d));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Assert
    for (what, d) in &daemons {
        let ready: serde_json::Value = d.get("/readyz").await.json().await.expect("json");
        assert_eq!(ready["broker_connected"], false, "{what}: {ready}");
        let log = d.log_text();
        let expected = match *what {
            "wrong password" => "NotAuthorized",
            "unknown CA" => "UnknownIssuer",
            _ => "CertificateRequired",
        };
        assert!(
            log.contains(expected),
            "{what}: the log says why ({expected}):\n{log}"
        );
    }
}

#[test]
fn check_names_each_tls_mistake_with_its_key() {
    let pki = Pki::new();
    let run = |config: String| check(&config);
    let p = |n: &str| toml_path(&pki.path(n));

    let (code, err) = run(format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\ntls_ca = {}\n",
        p("ca.pem")
    ));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("line 3: mqtt.tls_ca: is only used over TLS: write mqtt.url as mqtts://"),
        "{err}"
    );

    let (code, err) = run(format!("[http]\ntls_cert = {}\n", p("server.pem")));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("http.tls_cert: needs http.tls_key too"),
        "{err}"
    );

    let (code, err) = run(format!(
        "[mqtt]\nurl = \"mqtts://127.0.0.1:8883\"\ntls_ca = \"/nonexistent/ca.pem\"\n\
         [http]\ntls_cert = {}\ntls_key = {}\n",
        p("server.key"),
        p("client.key"),
    ));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("line 3: mqtt.tls_ca: cannot read /nonexistent/ca.pem"),
        "{err}"
    );
    assert!(
        err.contains("http.tls_cert:") && err.contains("holds no PEM certificate"),
        "{err}"
    );

    let (code, err) = run(format!(
        "[http]\ntls_cert = {}\ntls_key = {}\n",
        p("server.pem"),
        p("client.key"),
    ));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("line 3: http.tls_key: the private key in") && err.contains("does not match"),
        "{err}"
    );

    let (code, err) = run(format!(
        "[mqtt]\nurl = \"mqtts://127.0.0.1:8883\"\ntls_ca = {}\ntls_cert = {}\ntls_key = {}\n\
         [http]\ntls_cert = {}\ntls_key = {}\n",
        p("ca.pem"),
        p("client.pem"),
        p("client.key"),
        p("server.pem"),
        p("server.key"),
    ));
    assert_eq!(code, 0, "a complete TLS config passes: {err}");
}

#[test]
fn check_refuses_a_tls_file_that_never_ends_instead_of_reading_it_forever() {
    let (code, err) = check("[mqtt]\nurl = \"mqtts://127.0.0.1:8883\"\ntls_ca = \"/dev/zero\"\n");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("line 3: mqtt.tls_ca: /dev/zero: larger than 1048576 bytes"),
        "{err}"
    );
}

/// An HTTPS server with the test PKI's certificate that answers 200 to one request per
/// connection and hands each body over.
async fn https_receiver(pki: &Pki) -> (u16, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let certs = telebridge::tls::load_certs(&pki.path("server.pem")).expect("certs");
    let key = telebridge::tls::load_key(&pki.path("server.key")).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = tls.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        let _ = tx.send(buf[end + 4..end + 4 + len].to_vec()).await;
                        let _ = tls
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        let _ = tls.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn alert_webhooks_go_over_https_to_a_receiver_the_configured_ca_signs() {
    // Arrange: an HTTPS receiver with a certificate of the test CA, and a daemon that checks
    // webhooks against that CA.
    let pki = Pki::new();
    let (port, mut bodies) = https_receiver(&pki).await;
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(
        &broker.url(),
        &format!(
            "[alerts]\nrules = [ {{ name = \"any\", when = \"temperature > 0\" }} ]\n\
             webhooks = [ {{ url = \"https://localhost:{port}/hook\" }} ]\n\
             webhook_ca = {}\nwebhook_attempts = 1\n",
            toml_path(&pki.path("ca.pem"))
        ),
    )
    .await;
    let p = Publisher::connect(&broker.url(), "https-hook-pub").await;

    // Act
    p.publish("devices/d-1/telemetry", QoS::AtLeastOnce, false, reading(1))
        .await;

    // Assert: delivered over TLS, the alert in the body.
    let body = tokio::time::timeout(T, bodies.recv())
        .await
        .expect("a delivery within 20 s")
        .expect("body");
    let alert: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(alert["rule"], "any");
    assert_eq!(alert["state"], "firing");
    wait_for(T, "the delivery to be counted", || async {
        (daemon.metric("telebridge_webhook_deliveries_total").await == 1.0).then_some(())
    })
    .await;

    // A daemon on the system's roots, which do not know the test CA, refuses the receiver:
    // a counted failure, and nothing delivered.
    let other = Daemon::start(
        &broker.url(),
        &format!(
            "[alerts]\nrules = [ {{ name = \"any\", when = \"temperature > 0\" }} ]\n\
             webhooks = [ {{ url = \"https://localhost:{port}/hook\" }} ]\nwebhook_attempts = 1\n"
        ),
    )
    .await;
    drop(daemon);
    p.publish("devices/d-2/telemetry", QoS::AtLeastOnce, false, reading(2))
        .await;
    wait_for(T, "the refused delivery to be counted", || async {
        (other.metric("telebridge_webhook_failures_total").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        other.metric("telebridge_webhook_deliveries_total").await,
        0.0
    );
    assert!(
        bodies.try_recv().is_err(),
        "a receiver the CA does not sign got a body"
    );
}

#[test]
fn check_names_an_unreadable_webhook_ca() {
    let (code, out) = check("[alerts]\nwebhook_ca = \"/no/such/ca.pem\"\n");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("line 2: alerts.webhook_ca"), "{out}");
}
