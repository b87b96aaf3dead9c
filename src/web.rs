//! The HTTP side: routes, JSON errors, and the server with its listener.

use std::net::SocketAddr;
use std::time::Duration;

use salvo::affix_state;
use salvo::conn::Listener as _;
use salvo::conn::rustls::{RustlsAcceptor, RustlsConfig, RustlsListener};
use salvo::conn::tcp::TcpAcceptor;
use salvo::prelude::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::auth::{self, Principal};
use crate::{api, ws};

/// The bound HTTP server.
pub struct Server {
    acceptor: Acceptor,
    addr: SocketAddr,
    shared: Shared,
}

/// Plain HTTP, or HTTPS; kept as two concrete types so the plain path stays unboxed.
enum Acceptor {
    Plain(TcpAcceptor),
    Tls(RustlsAcceptor<TcpAcceptor>),
}

/// Hands an already bound listener to salvo's TLS layer.
struct Bound(TcpAcceptor);

impl salvo::conn::Listener for Bound {
    type Acceptor = TcpAcceptor;

    async fn try_bind(self) -> salvo::Result<TcpAcceptor> {
        Ok(self.0)
    }
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) with TCP_NODELAY on every accepted socket,
    /// speaking TLS when `tls` is given.
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<RustlsConfig>,
        shared: Shared,
    ) -> std::io::Result<Server> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        // Linux copies TCP_NODELAY from the listening socket to accepted ones; without it
        // Nagle's algorithm delays small SSE and WebSocket writes by up to 40 ms.
        socket.set_tcp_nodelay(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener = tokio::net::TcpListener::from_std(socket.into())?;
        let addr = listener.local_addr()?;
        let acceptor = TcpAcceptor::try_from(listener)?;
        let acceptor = match tls {
            None => Acceptor::Plain(acceptor),
            Some(config) => Acceptor::Tls(
                RustlsListener::new(config, Bound(acceptor))
                    .try_bind()
                    .await
                    .map_err(std::io::Error::other)?,
            ),
        };
        Ok(Server {
            acceptor,
            addr,
            shared,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether it speaks HTTPS.
    pub fn is_tls(&self) -> bool {
        matches!(self.acceptor, Acceptor::Tls(_))
    }

    /// Serves until `cancel` fires, then stops gracefully.
    pub async fn run(self, cancel: CancellationToken) {
        let router = router(self.shared);
        match self.acceptor {
            Acceptor::Plain(a) => serve(a, router, cancel).await,
            Acceptor::Tls(a) => serve(a, router, cancel).await,
        }
    }
}

async fn serve<A: salvo::conn::Acceptor + Send>(
    acceptor: A,
    router: Router,
    cancel: CancellationToken,
) {
    let server = salvo::Server::new(acceptor);
    let handle = server.handle();
    tokio::spawn(async move {
        cancel.cancelled().await;
        handle.stop_graceful(Duration::from_secs(3));
    });
    server.serve(router).await;
}

/// Every route.
pub fn router(shared: Shared) -> Router {
    let protected = Router::new()
        .hoop(authenticate)
        .push(Router::with_path("events").get(api::events))
        .push(Router::with_path("api/devices").get(api::list_devices))
        .push(Router::with_path("api/devices/{id}/readings").get(api::device_readings))
        .push(Router::with_path("api/devices/{id}/series").get(api::device_series))
        .push(Router::with_path("api/devices/{id}/status-history").get(api::status_history))
        .push(Router::with_path("api/devices/{id}/commands").post(api::post_command))
        .push(Router::with_path("api/commands").get(api::list_commands))
        .push(Router::with_path("ws").goal(ws::ws));
    Router::new()
        .hoop(affix_state::inject(shared))
        .hoop(cors)
        .push(Router::with_path("healthz").get(healthz))
        .push(Router::with_path("readyz").get(readyz))
        .push(Router::with_path("metrics").get(metrics))
        .push(
            Router::with_path("api/session")
                .get(session::get)
                .post(session::post)
                .delete(session::delete),
        )
        .push(protected)
        .push(crate::dashboard::router())
        .push(Router::with_path("{**rest}").goal(not_found))
}

/// The principal that `authenticate` found for this request.
pub fn principal(depot: &Depot) -> Principal {
    depot
        .get_typed::<Principal>()
        .cloned()
        .unwrap_or_else(|_| Principal::anonymous())
}

/// Finds who is asking (bearer token or session cookie); 401 when auth is on and neither
/// is valid.
#[handler]
async fn authenticate(
    req: &mut Request,
    depot: &mut Depot,
    res: &mut Response,
    ctrl: &mut FlowCtrl,
) {
    let s = shared(depot).clone();
    if !s.auth.enabled() {
        depot.insert_typed(Principal::anonymous());
        return;
    }
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let found = match bearer {
        Some(token) => s.auth.by_token(token.trim()),
        None => req
            .cookie(auth::COOKIE)
            .and_then(|c| s.auth.by_session(c.value(), crate::domain::now_ms())),
    };
    match found {
        Some(p) => {
            depot.insert_typed(p);
        }
        None => {
            s.metrics
                .auth_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            res.add_header("www-authenticate", "Bearer", true).ok();
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid token is needed: send Authorization: Bearer <token>, or log in through POST /api/session",
            )
            .render(res);
            ctrl.skip_rest();
        }
    }
}

/// CORS for browsers on the origins in `[http] allowed_origins`.
#[handler]
async fn cors(req: &mut Request, depot: &mut Depot, res: &mut Response, ctrl: &mut FlowCtrl) {
    let Some(origin) = req
        .headers()
        .get("origin")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return;
    };
    let s = shared(depot);
    let allowed = s.allowed_origins.iter().any(|a| a == &origin);
    if allowed {
        res.add_header("access-control-allow-origin", origin.as_str(), true)
            .ok();
        res.add_header("access-control-allow-credentials", "true", true)
            .ok();
        res.add_header("vary", "Origin", true).ok();
    }
    if req.method() == salvo::http::Method::OPTIONS {
        if allowed {
            res.add_header(
                "access-control-allow-methods",
                "GET, POST, DELETE, OPTIONS",
                true,
            )
            .ok();
            res.add_header(
                "access-control-allow-headers",
                "Authorization, Content-Type, Last-Event-ID",
                true,
            )
            .ok();
            res.add_header("access-control-max-age", "600", true).ok();
            res.status_code(StatusCode::NO_CONTENT);
        } else {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("origin {origin:?} is not allowed"),
            )
            .render(res);
        }
        ctrl.skip_rest();
    }
}

/// `/api/session`: a browser trades its token for an HttpOnly cookie.
mod session {
    use super::*;

    /// `GET /api/session`: whether auth is on, and who the caller is.
    #[handler]
    pub async fn get(req: &mut Request, depot: &mut Depot, res: &mut Response) {
        let s = shared(depot);
        if !s.auth.enabled() {
            return res.render(Json(
                json!({"auth": false, "name": null, "role": "operator"}),
            ));
        }
        let p = req
            .cookie(auth::COOKIE)
            .and_then(|c| s.auth.by_session(c.value(), crate::domain::now_ms()));
        res.render(Json(json!({
            "auth": true,
            "name": p.as_ref().map(|p| p.name.clone()),
            "role": p.as_ref().map(|p| if p.may_command() { "operator" } else { "viewer" }),
        })));
    }

    /// `POST /api/session` with `{"token": "..."}`: sets the session cookie.
    #[handler]
    pub async fn post(req: &mut Request, depot: &mut Depot, res: &mut Response) {
        let s = shared(depot).clone();
        let token = match req.payload_with_max_size(4096).await {
            Ok(b) => serde_json::from_slice::<serde_json::Value>(b)
                .ok()
                .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_owned)),
            Err(_) => None,
        };
        let Some(token) = token else {
            return ApiError::bad_request("bad_json", "send {\"token\": \"...\"}").render(res);
        };
        if !s.auth.enabled() {
            res.status_code(StatusCode::NO_CONTENT);
            return;
        }
        let Some(p) = s.auth.by_token(token.trim()) else {
            s.metrics
                .auth_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token")
                .render(res);
        };
        let value = s
            .auth
            .session_for(&p, crate::domain::now_ms() + auth::SESSION_MS);
        let mut cookie = salvo::http::cookie::Cookie::new(auth::COOKIE, value);
        cookie.set_http_only(true);
        // Over HTTPS the browser must never send it in clear text.
        cookie.set_secure(*req.scheme() == salvo::http::uri::Scheme::HTTPS);
        cookie.set_same_site(salvo::http::cookie::SameSite::Strict);
        cookie.set_path("/");
        cookie.set_max_age(salvo::http::cookie::time::Duration::milliseconds(
            auth::SESSION_MS,
        ));
        res.add_cookie(cookie);
        res.status_code(StatusCode::NO_CONTENT);
    }

    /// `DELETE /api/session`: logs out.
    #[handler]
    pub async fn delete(res: &mut Response) {
        let mut cookie = salvo::http::cookie::Cookie::new(auth::COOKIE, "");
        cookie.set_path("/");
        cookie.set_http_only(true);
        cookie.set_max_age(salvo::http::cookie::time::Duration::ZERO);
        res.add_cookie(cookie);
        res.status_code(StatusCode::NO_CONTENT);
    }
}

/// The shared state injected into every request.
pub fn shared(depot: &Depot) -> &Shared {
    depot
        .get_typed::<Shared>()
        .expect("Shared is injected by the router")
}

/// An API error: a status, a stable code and a message, rendered as
/// `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// Any error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// A 400.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// Writes the error; server errors are logged once, with their cause.
    pub fn render(self, res: &mut Response) {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        res.status_code(self.status);
        res.render(Json(
            json!({"error": {"code": self.code, "message": self.message}}),
        ));
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_error",
            e.to_string(),
        )
    }
}

/// Takes a connection slot, or the error to answer with.
pub fn acquire_slot(
    s: &Shared,
    kind: crate::limits::Kind,
    req: &Request,
) -> Result<crate::limits::Slot, ApiError> {
    let ip = req
        .remote_addr()
        .as_ipv4()
        .map(|a| std::net::IpAddr::V4(*a.ip()))
        .or_else(|| {
            req.remote_addr()
                .as_ipv6()
                .map(|a| std::net::IpAddr::V6(*a.ip()))
        });
    s.limits.acquire(kind, ip).map_err(|r| {
        s.metrics
            .limit_refusals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match r {
            crate::limits::Refused::Total(n) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_clients",
                format!(
                    "{n} connections of this kind are open, the configured maximum; retry later"
                ),
            ),
            crate::limits::Refused::PerAddress(n) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                format!("this address already has {n} streams open, the configured maximum"),
            ),
        }
    })
}

/// Unknown paths get a JSON 404 too.
#[handler]
async fn not_found(req: &mut Request, res: &mut Response) {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
    .render(res);
}

/// Liveness: the process answers.
#[handler]
async fn healthz(res: &mut Response) {
    res.render(Json(json!({"status": "ok"})));
}

/// Work that waits this long for a commit makes the daemon unready even before a commit
/// failed (a commit stuck on a lock, say).
const READY_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// Readiness: broker connected, storage readable, and the writer committing.
#[handler]
async fn readyz(depot: &mut Depot, res: &mut Response) {
    let s = shared(depot);
    let broker = s.mqtt.connected();
    let readable = tokio::time::timeout(READY_STALL, s.store.readable())
        .await
        .unwrap_or(false);
    let writer = s.store.health().report(READY_STALL);
    let ready = broker && readable && writer.ok;
    if !ready {
        res.status_code(StatusCode::SERVICE_UNAVAILABLE);
    }
    let storage = if readable {
        writer.text
    } else {
        format!("not readable; writer: {}", writer.text)
    };
    res.render(Json(json!({
        "ready": ready,
        "instance": &*s.instance,
        "backend": s.store.backend_name(),
        "database": readable,
        "broker_connected": broker,
        "storage_writable": writer.ok,
        "storage": storage,
        "storage_waiting": writer.waiting,
        "checkpoint": writer.checkpoint.unwrap_or_else(|| "ok".into()),
        "last_seq": *s.last_seq.borrow(),
    })));
}

/// Prometheus text format.
#[handler]
async fn metrics(depot: &mut Depot, res: &mut Response) {
    let s = shared(depot);
    let mut body = s.metrics.render();
    crate::observability::render_instance(
        &mut body,
        &s.instance,
        s.store.backend_name(),
        &s.metrics,
    );
    crate::observability::render_storage(&mut body, &s.store.health().report(READY_STALL));
    res.add_header(
        "content-type",
        "text/plain; version=0.0.4; charset=utf-8",
        true,
    )
    .ok();
    res.render(body);
}
