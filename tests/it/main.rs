//! Integration tests: the real daemon binary on free ports, a real broker (Mosquitto or the
//! embedded one), a real SQLite file, real HTTP.

mod access;
mod browser;
mod cli;
mod commands;
mod durability;
mod event_log;
mod history;
mod ingest;
mod sse;
mod storage_faults;
mod support;
mod tls;
