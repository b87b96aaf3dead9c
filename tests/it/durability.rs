//! Nothing acknowledged is lost: SIGTERM during a burst, kill -9 during a burst.

use std::collections::BTreeSet;
use std::time::Duration;

use rumqttc::QoS;

use crate::support::{Daemon, Mosquitto, Publisher, reading, wait_for};

const T: Duration = Duration::from_secs(60);

/// Publishes `count` readings numbered from `start` as fast as the broker takes them.
fn burst(
    url: String,
    id: &'static str,
    start: i64,
    count: i64,
) -> tokio::task::JoinHandle<Publisher> {
    tokio::spawn(async move {
        let p = Publisher::connect(&url, id).await;
        for n in start..start + count {
            p.publish(
                &format!("devices/b{}/telemetry", n % 10),
                QoS::AtLeastOnce,
                false,
                reading(n),
            )
            .await;
        }
        p
    })
}

#[tokio::test]
async fn sigterm_during_a_burst_commits_and_acknowledges_everything_taken() {
    // Arrange
    let broker = Mosquitto::start().await;
    let mut daemon = Daemon::start(&broker.url(), "").await;
    let db = daemon.db().await;
    const N: i64 = 20_000;

    // Act: SIGTERM while the burst is flowing.
    let publishing = burst(broker.url(), "term-pub", 0, N);
    db.wait_count(2_000, T).await;
    let status = daemon.sigterm();
    let at_exit = db.count().await;
    let publisher = publishing.await.expect("publisher");
    publisher.wait_acked(N as u64, T).await;

    // Assert: a clean exit, and after a restart the broker redelivers exactly what the
    // daemon had not acknowledged: every message once, none twice.
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        daemon.log_text()
    );
    assert!(at_exit >= 2_000);
    daemon.spawn().await;
    db.wait_count(N, T).await;
    let numbers = db.numbers().await;
    let distinct: BTreeSet<i64> = numbers.iter().copied().collect();
    assert_eq!(distinct.len() as i64, N, "every message stored");
    assert_eq!(
        numbers.len() as i64,
        N,
        "nothing stored twice: all that was committed was acknowledged"
    );
}

#[tokio::test]
async fn kill_9_during_a_qos1_burst_loses_nothing_the_broker_acknowledged() {
    // Arrange
    let broker = Mosquitto::start().await;
    let mut daemon = Daemon::start(&broker.url(), "").await;
    let db = daemon.db().await;
    const N: i64 = 20_000;

    // Act: kill -9 mid-burst, let the burst finish while the daemon is down, restart.
    let publishing = burst(broker.url(), "kill-pub", 0, N);
    db.wait_count(3_000, T).await;
    daemon.kill9();
    let publisher = publishing.await.expect("publisher");
    publisher.wait_acked(N as u64, T).await;
    daemon.spawn().await;

    // Assert: every message the broker acknowledged to the publisher is in SQLite
    // (a few may be stored twice: committed but not yet acknowledged when killed).
    wait_for(T, "every acknowledged message in SQLite", || async {
        let distinct: BTreeSet<i64> = db.numbers().await.into_iter().collect();
        (distinct.len() as i64 == N).then_some(())
    })
    .await;
    let numbers = db.numbers().await;
    let duplicates = numbers.len() as i64 - N;
    assert!(
        duplicates < 5_000,
        "{duplicates} duplicates is more than one batch window"
    );
}

#[tokio::test]
async fn acks_keep_flowing_when_the_broker_allows_only_ten_messages_in_flight() {
    // Arrange: Mosquitto sends at most 10 unacknowledged messages, so every batch waits on
    // the acks of the one before: a stuck or late ack stalls ingest here.
    let broker = Mosquitto::start_with("", "max_inflight_messages 10").await;
    let mut daemon = Daemon::start(&broker.url(), "").await;
    let db = daemon.db().await;
    const N: i64 = 5_000;

    // Act
    let publishing = burst(broker.url(), "inflight-pub", 0, N);
    let stored = db.wait_count(N, T).await;
    let publisher = publishing.await.expect("publisher");
    publisher.wait_acked(N as u64, T).await;
    let status = daemon.sigterm();
    daemon.spawn().await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Assert: all stored, and all acknowledged (nothing comes again after a restart).
    assert_eq!(stored, N);
    assert!(status.success(), "exit status {status:?}");
    let numbers = db.numbers().await;
    assert_eq!(
        numbers.len() as i64,
        N,
        "nothing redelivered after the restart"
    );
    assert_eq!(numbers, (0..N).collect::<Vec<_>>());
}
