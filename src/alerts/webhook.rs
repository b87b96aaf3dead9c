//! Webhooks: each alert change is POSTed as JSON to every `[[alerts.webhooks]]` entry that
//! takes its severity, signed with HMAC-SHA256 of the body in `X-Telebridge-Signature`
//! (`sha256=<hex>`, as GitHub does). Each webhook has a task and a bounded queue of its own:
//! a slow or dead receiver delays only its own deliveries, never ingest or another webhook.
//! A delivery is tried up to `webhook_attempts` times, backing off from 1 s (doubling, up to
//! `webhook_backoff_max`) on a network error, a timeout, 408, 429 or 5xx; then it is counted
//! as failed and logged.

use std::sync::Arc;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{AlertsConfig, Severity};
use crate::observability::Metrics;
use crate::store::alert::AlertRow;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-telebridge-signature";

/// Why the webhooks could not be set up.
#[derive(Debug, Error)]
pub enum WebhookError {
    /// The TLS roots for https:// could not be loaded.
    #[error("webhook TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The HTTP client could not be built.
    #[error("webhook HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// One delivery: the body, and what it is about for the logs.
struct Delivery {
    body: Arc<[u8]>,
    rule: String,
    device: String,
}

struct Hook {
    severities: Vec<Severity>,
    tx: mpsc::Sender<Delivery>,
}

/// The webhooks of the config, each with its queue.
pub struct Webhooks {
    hooks: Vec<Hook>,
    metrics: Arc<Metrics>,
}

impl Webhooks {
    /// The webhooks of `cfg`, and the delivery task of each, to be run with [`Runner::run`].
    pub fn new(
        cfg: &AlertsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Webhooks, Vec<Runner>), WebhookError> {
        let mut hooks = Vec::new();
        let mut runners = Vec::new();
        if !cfg.webhooks.is_empty() {
            let files = crate::tls::ClientFiles {
                ca: cfg.webhook_ca.clone(),
                ..Default::default()
            };
            let tls = match (&cfg.webhook_ca, crate::tls::client_config(&files)) {
                (_, Ok(tls)) => tls,
                (Some(_), Err(e)) => return Err(e.into()),
                // Without system CA certificates, http:// receivers still work.
                (None, Err(_)) => {
                    crate::tls::client_config_trusting(rustls::RootCertStore::empty())?
                }
            };
            let client = reqwest::Client::builder()
                .use_preconfigured_tls(Arc::unwrap_or_clone(tls))
                .timeout(cfg.webhook_timeout)
                .user_agent(concat!("telebridge/", env!("CARGO_PKG_VERSION")))
                .build()?;
            for w in &cfg.webhooks {
                let (tx, rx) = mpsc::channel(cfg.webhook_queue);
                let sender = Sender {
                    client: client.clone(),
                    url: w.url.clone(),
                    secret: w.secret.as_ref().map(|s| s.expose().as_bytes().to_vec()),
                    attempts: cfg.webhook_attempts,
                    backoff_max: cfg.webhook_backoff_max,
                    metrics: metrics.clone(),
                };
                runners.push(Runner { sender, rx });
                hooks.push(Hook {
                    severities: w.severities.clone(),
                    tx,
                });
            }
        }
        Ok((Webhooks { hooks, metrics }, runners))
    }

    /// Queues an alert change for every webhook that takes its severity; a full queue drops
    /// it (counted).
    pub fn send(&self, alert: &AlertRow) {
        let severity = match alert.severity.as_str() {
            "info" => Severity::Info,
            "critical" => Severity::Critical,
            _ => Severity::Warning,
        };
        let mut body = None;
        for hook in self
            .hooks
            .iter()
            .filter(|h| h.severities.contains(&severity))
        {
            let body = body
                .get_or_insert_with(|| Arc::<[u8]>::from(alert.to_json().to_string().into_bytes()))
                .clone();
            let delivery = Delivery {
                body,
                rule: alert.rule.clone(),
                device: alert.device.clone(),
            };
            match hook.tx.try_send(delivery) {
                Ok(()) => {
                    self.metrics.webhook_queued.inc();
                }
                Err(_) => {
                    self.metrics.webhook_dropped.inc();
                    tracing::warn!(rule = %alert.rule, device = %alert.device, "webhook queue full: alert change dropped");
                }
            }
        }
    }
}

/// One webhook's delivery task.
pub struct Runner {
    sender: Sender,
    rx: mpsc::Receiver<Delivery>,
}

impl Runner {
    /// Delivers until `shutdown`; what is still queued then is dropped (and logged).
    pub async fn run(self, shutdown: CancellationToken) {
        self.sender.run(self.rx, shutdown).await;
    }
}

/// One webhook's delivery loop.
struct Sender {
    client: reqwest::Client,
    url: String,
    secret: Option<Vec<u8>>,
    attempts: u32,
    backoff_max: Duration,
    metrics: Arc<Metrics>,
}

/// The `X-Telebridge-Signature` value of `body` under `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Sender {
    async fn run(self, mut rx: mpsc::Receiver<Delivery>, shutdown: CancellationToken) {
        loop {
            let d = tokio::select! {
                _ = shutdown.cancelled() => break,
                d = rx.recv() => match d {
                    Some(d) => d,
                    None => break,
                },
            };
            self.metrics.webhook_queued.dec();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.deliver(&d) => {}
            }
        }
        let left = rx.len();
        if left > 0 {
            tracing::warn!(url = %self.url, left, "webhook: deliveries still queued at shutdown are dropped");
        }
    }

    async fn deliver(&self, d: &Delivery) {
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                self.metrics.webhook_retries.inc();
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(self.backoff_max);
            }
            let mut req = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("x-telebridge-event", "alert");
            if let Some(secret) = &self.secret {
                req = req.header(SIGNATURE_HEADER, sign(secret, &d.body));
            }
            let why = match req.body(d.body.to_vec()).send().await {
                Ok(r) if r.status().is_success() => {
                    self.metrics.webhook_delivered.inc();
                    return;
                }
                Ok(r) => {
                    let status = r.status();
                    let retry = status.is_server_error()
                        || status == reqwest::StatusCode::REQUEST_TIMEOUT
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                    if !retry {
                        self.metrics.webhook_failed.inc();
                        tracing::warn!(url = %self.url, rule = %d.rule, device = %d.device, %status, "webhook refused the alert; not retried");
                        return;
                    }
                    format!("answered {status}")
                }
                Err(e) => e.to_string(),
            };
            tracing::debug!(url = %self.url, attempt, why, "webhook delivery failed");
            if attempt == self.attempts {
                self.metrics.webhook_failed.inc();
                tracing::warn!(url = %self.url, rule = %d.rule, device = %d.device, attempts = self.attempts, last_error = why, "webhook delivery failed; giving up");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
