//! systemd integration: `READY=1` once everything is up, `STOPPING=1` on shutdown, and a
//! watchdog that is fed only while storage still answers.

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Tells systemd that the daemon is up (no-op outside systemd).
pub fn ready() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not notify systemd of readiness");
    }
}

/// Tells systemd that the daemon is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Feeds systemd's watchdog at half its interval while storage answers, until cancelled.
/// A hung daemon stops feeding it and systemd restarts the service.
pub async fn watchdog(store: Store, cancel: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                let healthy = tokio::time::timeout(interval / 4, store.writable()).await.unwrap_or(false);
                if healthy {
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                } else {
                    tracing::error!("storage does not answer; not feeding the systemd watchdog");
                }
            }
        }
    }
}
