//! The embedded MQTT broker (rumqttd), for the demo and first tries. It keeps sessions in
//! memory only, so production runs against an external broker.

#[cfg(feature = "embedded-broker")]
use std::net::TcpListener;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
#[cfg(feature = "embedded-broker")]
use std::time::Instant;

use thiserror::Error;

use crate::config::{BrokerConfig, BrokerMode};

/// Why the broker could not be set up.
#[derive(Debug, Error)]
pub enum BrokerError {
    /// The embedded broker's port is taken.
    #[error(
        "cannot start the embedded MQTT broker: {addr} is already in use ({source}). \
         Stop whatever listens there, set [broker] listen to a free address, \
         or use that broker with [broker] mode = \"external\""
    )]
    PortTaken {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// This build has no embedded broker.
    #[error(
        "this build of telebridge has no embedded MQTT broker (cargo feature \"embedded-broker\"); \
         set [broker] mode = \"external\" and point [mqtt] url at your broker"
    )]
    NotBuilt,
    /// The broker thread failed to come up.
    #[error("the embedded MQTT broker did not start listening on {0} within 5 s")]
    NoStart(SocketAddr),
}

/// What `[broker] mode` resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerChoice {
    /// An external broker is used.
    External,
    /// The embedded broker runs in this process.
    Embedded,
}

/// Whether something accepts TCP connections at `addr`.
fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// Resolves the mode and starts the embedded broker if needed.
pub fn start(cfg: &BrokerConfig) -> Result<BrokerChoice, BrokerError> {
    match cfg.mode {
        BrokerMode::External => {
            tracing::info!("broker mode external: using the broker at [mqtt] url");
            Ok(BrokerChoice::External)
        }
        BrokerMode::Auto if listening(cfg.listen) => {
            tracing::info!(listen = %cfg.listen, "broker mode auto: a broker already listens there, using it");
            Ok(BrokerChoice::External)
        }
        BrokerMode::Auto | BrokerMode::Embedded => {
            start_embedded(cfg.listen)?;
            tracing::warn!(
                listen = %cfg.listen,
                "started the EMBEDDED MQTT broker (mode {:?}): it keeps sessions and queued messages in memory only, \
                 so a crash loses messages it already acknowledged to devices. Use an external broker \
                 (Mosquitto, EMQX) in production",
                cfg.mode
            );
            Ok(BrokerChoice::Embedded)
        }
    }
}

#[cfg(feature = "embedded-broker")]
fn start_embedded(addr: SocketAddr) -> Result<(), BrokerError> {
    // rumqttd reports a bind failure only inside its thread; check the port first.
    drop(TcpListener::bind(addr).map_err(|source| BrokerError::PortTaken { addr, source })?);
    let toml = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "{addr}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 16777216
max_inflight_count = 100
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&toml).map_err(|_| BrokerError::NoStart(addr))?;
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .map_err(|_| BrokerError::NoStart(addr))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if listening(addr) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NoStart(addr))
}

#[cfg(not(feature = "embedded-broker"))]
fn start_embedded(_addr: SocketAddr) -> Result<(), BrokerError> {
    Err(BrokerError::NotBuilt)
}
