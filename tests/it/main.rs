//! Integration tests: the real daemon binary on free ports, a real broker (Mosquitto or the
//! embedded one), real storage (a SQLite file, or a PostgreSQL database with
//! `TELEBRIDGE_TEST_BACKEND=postgres`), real HTTP.

mod access;
mod alerts;
mod browser;
mod cli;
mod cluster;
mod commands;
mod durability;
mod event_log;
mod fanout;
mod history;
mod ingest;
mod observability;
mod openapi;
mod pg;
mod series;
mod sse;
mod storage_faults;
mod support;
mod tls;
