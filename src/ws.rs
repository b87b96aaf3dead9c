//! `GET /ws`: one operator connection. Commands in, `accepted` / `ack` / `timeout` / `error`
//! out. A bad message gets an error frame and the connection stays open; a dead peer is
//! noticed by ping/pong and closed.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt as _, StreamExt as _};
use salvo::prelude::*;
use salvo::websocket::{Message, WebSocket, WebSocketUpgrade};
use tokio::sync::broadcast::error::RecvError;

use crate::app::Shared;
use crate::auth::Principal;
use crate::commands::Update;
use crate::protocol::{self, CommandRequest, Refusal, ServerMessage};
use crate::web::{ApiError, principal, shared};

/// Largest text frame handled; a larger one gets `too_large`.
pub const MAX_MESSAGE: usize = 16 * 1024;
/// Frames above this close the connection (the protocol layer refuses them).
const HARD_LIMIT: usize = 1024 * 1024;
/// Ping interval; a peer silent for three of them is considered dead.
const PING_EVERY: Duration = Duration::from_secs(20);
/// Updates of unknown commands kept while submissions are in flight.
const EARLY_MAX: usize = 256;
/// Commands of one connection being stored and published at once; further frames wait
/// unread (back-pressure through TCP) until one of them is done.
const IN_FLIGHT: usize = 32;

/// `GET /ws`
#[endpoint(
    tags("commands"),
    responses(
        (status_code = 101, description = "a WebSocket of JSON text frames: the client sends {\"type\": \"command\", \"device\", \"name\", \"params\", \"ref\", \"key\", \"ttl\"}; the server answers accepted, ack, timeout, expired, cancelled or error (README.md, WebSocket)"),
        (status_code = 400, description = "not a WebSocket upgrade", body = crate::openapi::ErrorBody),
        (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody),
        (status_code = 403, description = "the Origin is not allowed", body = crate::openapi::ErrorBody),
        (status_code = 503, description = "too many WebSockets (max_ws_clients)", body = crate::openapi::ErrorBody),
    )
)]
pub async fn ws(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let s = shared(depot).clone();
    let who = principal(depot);
    if let Err(e) = check_origin(req, &s) {
        return e.render(res);
    }
    let slot = match crate::web::acquire_slot(&s, crate::limits::Kind::Ws, req) {
        Ok(slot) => slot,
        Err(e) => return e.render(res),
    };
    let upgrade = WebSocketUpgrade::new()
        .max_frame_size(HARD_LIMIT)
        .max_message_size(HARD_LIMIT)
        .upgrade(req, res, move |socket| async move {
            // The session runs on the command path's runtime: its frames are read and its
            // acks written without queueing behind the SSE streams of the main runtime.
            let control = s.control.clone();
            let _ = control.spawn(serve(socket, s, who, slot)).await;
        })
        .await;
    if let Err(e) = upgrade {
        ApiError::bad_request("bad_upgrade", format!("not a WebSocket upgrade: {e}")).render(res);
    }
}

/// Browsers always send `Origin`; it must be the page's own host or an allowed origin, so a
/// foreign page cannot drive an operator's session (cross-site WebSocket hijacking).
pub fn check_origin(req: &Request, s: &Shared) -> Result<(), ApiError> {
    let Some(origin) = req.headers().get("origin").and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let same = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| o == host);
    if same || s.allowed_origins.iter().any(|a| a == origin || a == "*") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("origin {origin:?} is not allowed; add it to [http] allowed_origins"),
        ))
    }
}

/// A token bucket: `rate` per second, bursts of twice that.
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        RateLimit {
            rate,
            tokens: rate * 2.0,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate * 2.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

async fn serve(socket: WebSocket, s: Shared, who: Principal, _slot: crate::limits::Slot) {
    s.metrics.ws_clients.inc();
    let (mut tx, mut rx) = socket.split();
    let mut updates = s.commands.subscribe();
    let mut mine: HashSet<String> = HashSet::new();
    let mut limit = RateLimit::new(s.command_rate);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_heard = Instant::now();
    let mut submitting = FuturesUnordered::new();
    // Updates for commands not (yet) known as ours, kept while a submission is in flight:
    // under load the device's answer can come back before the submitting task is polled
    // again with its `accepted`.
    let mut early: VecDeque<Arc<Update>> = VecDeque::new();
    // Messages to send after the one of this turn (an early answer after its `accepted`).
    let mut queued: VecDeque<ServerMessage> = VecDeque::new();
    'serve: loop {
        while let Some(msg) = queued.pop_front() {
            let text = serde_json::to_string(&msg).unwrap_or_default();
            if tx.send(Message::text(text)).await.is_err() {
                break 'serve;
            }
        }
        let out: Option<ServerMessage> = tokio::select! {
            biased;
            _ = s.streams_stop.cancelled() => {
                let _ = tx.send(Message::close_with(1001u16, "server shutting down")).await;
                break;
            }
            // Before updates: a device's ack is matched only once its command is known
            // to be this connection's.
            Some(result) = submitting.next(), if !submitting.is_empty() => match result {
                Ok(Ok(msg)) => {
                    if let ServerMessage::Accepted { id, .. } = &msg {
                        mine.insert(id.clone());
                        early.retain(|u| {
                            if u.id != *id {
                                return true;
                            }
                            mine.remove(id);
                            queued.push_back(u.message.clone());
                            false
                        });
                    }
                    if submitting.is_empty() {
                        early.clear();
                    }
                    Some(msg)
                }
                Ok(Err(r)) => Some(refuse(&s, r)),
                Err(e) => {
                    tracing::error!(error = %e, "a command submission task failed");
                    Some(refuse(&s, Refusal { reference: None, code: "unavailable", message: "the command could not be handled; see /api/commands".into() }))
                }
            },
            update = updates.recv() => match update {
                Ok(u) if mine.contains(&u.id) => {
                    if !matches!(u.message, ServerMessage::Accepted { .. }) {
                        mine.remove(&u.id);
                    }
                    Some(u.message.clone())
                }
                Ok(u) if !submitting.is_empty() => {
                    if early.len() == EARLY_MAX {
                        early.pop_front();
                    }
                    early.push_back(u);
                    None
                }
                Ok(_) => None,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "a WebSocket client missed command updates; they are in /api/commands");
                    None
                }
                Err(RecvError::Closed) => break,
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > PING_EVERY * 3 {
                    tracing::info!("closing a WebSocket whose peer stopped answering pings");
                    break;
                }
                if tx.send(Message::ping(Vec::new())).await.is_err() {
                    break;
                }
                None
            }
            frame = rx.next(), if submitting.len() < IN_FLIGHT => {
                let Some(Ok(frame)) = frame else { break };
                last_heard = Instant::now();
                if frame.is_close() {
                    break;
                }
                if frame.is_ping() || frame.is_pong() {
                    continue;
                }
                let checked = match frame.as_str() {
                    Ok(text) => check_text(text, &s, &who, &mut limit),
                    Err(_) => Err(Refusal { reference: None, code: "bad_json", message: "binary frames are not supported; send JSON text".into() }),
                };
                match checked {
                    Ok(req) => {
                        // A task of its own: a command stored before its client goes away
                        // is still published (dropping the handle detaches it).
                        let commands = s.commands.clone();
                        submitting.push(tokio::spawn(async move { commands.submit(req).await }));
                        None
                    }
                    Err(r) => Some(refuse(&s, r)),
                }
            }
        };
        if let Some(msg) = out {
            let text = serde_json::to_string(&msg).unwrap_or_default();
            if tx.send(Message::text(text)).await.is_err() {
                break;
            }
        }
    }
    s.metrics.ws_clients.dec();
}

/// A command that may be submitted, or why not.
fn check_text(
    text: &str,
    s: &Shared,
    who: &Principal,
    limit: &mut RateLimit,
) -> Result<CommandRequest, Refusal> {
    if text.len() > MAX_MESSAGE {
        return Err(Refusal {
            reference: None,
            code: "too_large",
            message: format!(
                "message is {} bytes; the limit is {MAX_MESSAGE}",
                text.len()
            ),
        });
    }
    let req = protocol::parse_client_message(text)?;
    if !who.may_command() || !who.sees(&req.device) {
        s.metrics.forbidden.inc();
        let message = if who.may_command() {
            format!("device {:?} is outside this token's scope", req.device)
        } else {
            format!(
                "token {:?} is a viewer; commands need an operator token",
                who.name
            )
        };
        return Err(Refusal {
            reference: req.reference,
            code: "forbidden",
            message,
        });
    }
    if !limit.allow() {
        return Err(Refusal {
            reference: req.reference,
            code: "rate_limited",
            message: format!(
                "more than {} commands per second on this connection",
                s.command_rate
            ),
        });
    }
    Ok(req)
}

fn refuse(s: &Shared, r: Refusal) -> ServerMessage {
    s.metrics.command_errors.inc();
    r.into_message()
}
