//! systemd integration: `READY=1` once everything is up, `STOPPING=1` on shutdown, and a
//! watchdog that is fed only while the storage writer makes progress.

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

/// Feeds systemd's watchdog at a quarter of its interval while the writer makes progress
/// (it committed within half the interval, or has nothing to do) and storage answers
/// reads, until cancelled. A wedged writer stops feeding it, and systemd restarts the
/// service: what was not committed was not acknowledged, so the restart loses nothing.
pub async fn watchdog(store: Store, cancel: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 4);
    let mut starving = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                let progressing = store.health().progressing(interval / 2);
                let readable = tokio::time::timeout(interval / 4, store.readable()).await.unwrap_or(false);
                if progressing && readable {
                    if starving {
                        tracing::info!("storage makes progress again; feeding the systemd watchdog");
                    }
                    starving = false;
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                } else if !starving {
                    starving = true;
                    let why = store.health().report(interval / 2).text;
                    tracing::error!(storage = %why, "the storage writer makes no progress; no longer feeding the systemd watchdog, which will restart the service");
                }
            }
        }
    }
}
