//! telebridge: an IoT telemetry bridge.
//!
//! How data flows:
//!
//! ```text
//! broker ──MQTT──▶ mqtt (poll loop) ──▶ ingest (classify) ──bounded queue──▶ store (one writer)
//!                       ▲                                                      │ commit
//!                       └──────────── acks, only after the commit ◀────────────┤
//!                                                                              ▼
//!        browsers ◀── SSE /events ◀── sse ◀── feed (encoded once) ◀── SQLite: the writer itself
//!                                                                   PostgreSQL: the log's tail
//! browsers ──WebSocket /ws──▶ ws ──▶ commands ──MQTT QoS 1──▶ devices ──ack──▶ mqtt ──▶ store
//!                              ▲                                                      │
//!                              └──────── ack / timeout to the sender, from the log ◀──┘
//! ```
//!
//! With PostgreSQL, N instances share the database and split the ingest through MQTT shared
//! subscriptions; each one's feed is fed by its tail of the shared log, so every instance
//! serves every event, and an ack stored by one reaches the WebSocket on another.
//!
//! - [`config`]: the TOML file, validated with every problem reported.
//! - [`broker`]: the embedded MQTT broker for the demo.
//! - [`mqtt`]: the client connection, reconnects, manual acks.
//! - [`ingest`]: parse at the edge; [`domain`] holds the validated types.
//! - [`store`]: storage behind one interface (`store/mod.rs`) with two backends,
//!   `store/sqlite` and `store/postgres` (all the SQL); the batch loop both share (`writer`),
//!   the event log's presence and command rows (`log`), the writer's health (`health`), and
//!   checkpoints, retention and presence timeouts (`housekeeping`).
//! - [`feed`]: committed events of every kind encoded once, into a shared ring for clients of
//!   every device and routed by device to the inboxes of filtered ones; [`sse`] streams them
//!   to each client with replay and resume; [`api`] serves `/events` and the history.
//! - [`commands`]: operator commands over [`ws`] (`/ws`, wire types in [`protocol`]) and
//!   HTTP, published to devices and followed to their ack, timeout or expiry.
//! - [`auth`]: tokens, roles, device scopes and browser sessions; [`limits`]: connection caps.
//! - [`web`]: the HTTP server, routes and JSON errors; [`tls`]: certificates for HTTPS and MQTT.
//! - [`series`]: aggregated history from the stored rollups (`store/rollup.rs`) or raw
//!   readings, for `/api/devices/{id}/series`.
//! - [`observability`]: logging and metrics.
//! - [`service`]: systemd readiness and watchdog.
//! - [`simulate`]: simulated devices.
//! - [`app`]: wiring and shutdown.

pub mod alerts;
pub mod api;
pub mod app;
pub mod asyncapi;
pub mod auth;
pub mod broker;
pub mod commands;
pub mod config;
pub mod dashboard;
pub mod domain;
pub mod feed;
pub mod ingest;
pub mod limits;
pub mod mqtt;
pub mod observability;
pub mod openapi;
pub mod presence;
pub mod protocol;
pub mod series;
pub mod service;
pub mod simulate;
pub mod sse;
pub mod store;
pub mod tls;
pub mod web;
pub mod ws;

pub use app::App;
pub use config::Config;
