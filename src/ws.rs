//! `GET /ws`: one operator connection. Commands in, `accepted` / `ack` / `timeout` / `error`
//! out. A bad message gets an error frame and the connection stays open; a dead peer is
//! noticed by ping/pong and closed.

use std::collections::{HashMap, HashSet, VecDeque};
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
    let mut routing = Routing::default();
    let mut limit = RateLimit::new(s.command_rate);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_heard = Instant::now();
    // Each submission yields the id it was given with its outcome.
    let mut submitting = FuturesUnordered::new();
    // Messages to send after the one of this turn (held answers after their `accepted`).
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
            // Before updates, so that an `accepted` goes out as soon as it is there.
            Some((given, result)) = submitting.next(), if !submitting.is_empty() => {
                // Named for inference: the futures' type is only known further down.
                let given: String = given;
                match result {
                    Ok(Ok(msg)) => {
                        let id = match &msg {
                            ServerMessage::Accepted { id, .. } => Some(id.as_str()),
                            _ => None,
                        };
                        queued.extend(routing.submitted(&given, id));
                        Some(msg)
                    }
                    Ok(Err(r)) => {
                        routing.submitted(&given, None);
                        Some(refuse(&s, r))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "a command submission task failed");
                        routing.submitted(&given, None);
                        Some(refuse(&s, Refusal { reference: None, code: "unavailable", message: "the command could not be handled; see /api/commands".into() }))
                    }
                }
            }
            update = updates.recv() => match update {
                Ok(u) => routing.update(&u),
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
                        let id = uuid::Uuid::new_v4().to_string();
                        routing.submitting(&id);
                        let task = tokio::spawn({
                            let id = id.clone();
                            async move { commands.submit_as(id, req).await }
                        });
                        submitting.push(async move { (id, task.await) });
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

/// Which command updates a session passes on, and when. The id of a command is chosen
/// before it is stored, and updates for it are held from then on: the device's answer
/// can come back before the submitting task's `accepted` is polled (the task published the
/// command, then was descheduled while the answer went round), and must then be neither
/// lost (it is not yet known as this session's) nor sent before its `accepted`.
#[derive(Debug, Default)]
struct Routing {
    /// Commands of this session that are accepted and not finished.
    mine: HashSet<String>,
    /// Updates of the commands being submitted, by the id given to each.
    held: HashMap<String, Vec<ServerMessage>>,
}

impl Routing {
    /// A command is about to be submitted with id `given`.
    fn submitting(&mut self, given: &str) {
        self.held.insert(given.to_owned(), Vec::new());
    }

    /// The submission given `given` is over: accepted as command `accepted` (whose
    /// `accepted` is about to be sent), or refused. Returns the held updates to send right
    /// after that `accepted`.
    fn submitted(&mut self, given: &str, accepted: Option<&str>) -> Vec<ServerMessage> {
        let early = self.held.remove(given).unwrap_or_default();
        let Some(id) = accepted else {
            return Vec::new();
        };
        // With an ending already held, nothing more comes for it. (A repeated idempotency
        // key answers with the existing command's id, for which nothing was held.)
        if early.is_empty() {
            self.mine.insert(id.to_owned());
        }
        early
    }

    /// What to send for an update of any command, if it is one of this session's.
    fn update(&mut self, u: &Arc<Update>) -> Option<ServerMessage> {
        if self.mine.contains(&u.id) {
            if !matches!(u.message, ServerMessage::Accepted { .. }) {
                self.mine.remove(&u.id);
            }
            return Some(u.message.clone());
        }
        if let Some(h) = self.held.get_mut(&u.id) {
            h.push(u.message.clone());
        }
        None
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(id: &str) -> Arc<Update> {
        Arc::new(Update {
            id: id.into(),
            message: ServerMessage::Ack {
                id: id.into(),
                ok: true,
                result: None,
                error: None,
                rtt_ms: 1.0,
            },
        })
    }

    #[test]
    fn an_answer_before_its_accepted_is_sent_right_after_it() {
        let mut r = Routing::default();
        r.submitting("a");
        r.submitting("b");
        // The answer to "a" overtakes its `accepted` while "b" is still being stored.
        assert_eq!(r.update(&ack("a")), None);
        assert_eq!(r.submitted("a", Some("a")), vec![ack("a").message.clone()]);
        assert_eq!(r.submitted("b", Some("b")), vec![]);
        assert_eq!(r.update(&ack("b")), Some(ack("b").message.clone()));
        // Each command is over: nothing more is passed on, nothing is kept.
        assert_eq!(r.update(&ack("a")), None);
        assert_eq!(r.update(&ack("b")), None);
        assert!(r.mine.is_empty() && r.held.is_empty(), "{r:?}");
    }

    #[test]
    fn an_answer_after_its_accepted_is_passed_on_and_others_are_not() {
        let mut r = Routing::default();
        r.submitting("a");
        assert_eq!(r.update(&ack("other")), None);
        assert_eq!(r.submitted("a", Some("a")), vec![]);
        assert_eq!(r.update(&ack("other")), None);
        assert_eq!(r.update(&ack("a")), Some(ack("a").message.clone()));
        assert!(r.mine.is_empty() && r.held.is_empty(), "{r:?}");
    }

    #[test]
    fn a_refused_submission_keeps_nothing() {
        let mut r = Routing::default();
        r.submitting("a");
        assert_eq!(r.submitted("a", None), vec![]);
        assert_eq!(r.update(&ack("a")), None);
        assert!(r.mine.is_empty() && r.held.is_empty(), "{r:?}");
    }

    #[test]
    fn a_repeated_key_follows_the_existing_command() {
        let mut r = Routing::default();
        r.submitting("new");
        // The store answers with the command that has the key.
        assert_eq!(r.submitted("new", Some("old")), vec![]);
        assert_eq!(r.update(&ack("old")), Some(ack("old").message.clone()));
        assert!(r.mine.is_empty() && r.held.is_empty(), "{r:?}");
    }
}
