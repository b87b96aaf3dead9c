//! The HTTP side: routes, JSON errors, and the server with its listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use salvo::affix_state;
use salvo::conn::Listener as _;
use salvo::conn::rustls::{RustlsAcceptor, RustlsConfig, RustlsListener};
use salvo::conn::tcp::TcpAcceptor;
use salvo::fuse::{ArcFusePolicy, FuseConfig};
use salvo::hyper::server::conn::http1;
use salvo::prelude::*;
use salvo::rt::tokio::TokioTimer;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// How long a stop waits for open connections to finish before it drops them.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Accepts connections until `cancel` fires, each served by [`handoff::connection`] on a
/// task of its own; then stops as salvo's `Server` does on a graceful stop: keep-alive
/// ends, requests in flight may finish (SSE streams end with their shutdown frame), and
/// whatever is still open after [`STOP_GRACE`] is dropped.
///
/// This is salvo's accept loop written out, so that each connection's driver is ours and
/// can take an SSE response away from hyper (see [`handoff`]).
async fn serve<A>(mut acceptor: A, router: Router, cancel: CancellationToken)
where
    A: salvo::conn::Acceptor + Send,
    A::Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = salvo::Service::new(router);
    // salvo's default fuse: TLS handshake and request-head timeouts, nothing that could
    // close a quiet long-lived stream.
    let fuse = FuseConfig::default();
    let policy: ArcFusePolicy = Arc::new(fuse);
    let mut http1 = http1::Builder::new();
    http1.timer(TokioTimer::new());
    http1.header_read_timeout(fuse.http1_header_timeout);
    let http1 = Arc::new(http1);
    let connections = TaskTracker::new();
    let graceful = CancellationToken::new();
    let force = CancellationToken::new();
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = acceptor.accept(Some(policy.clone())) => accepted,
        };
        match accepted {
            Ok(salvo::conn::Accepted {
                stream,
                fuse_config,
                conn_ctrl,
                local_addr,
                remote_addr,
                http_scheme,
                ..
            }) => {
                let handler = service.hyper_handler(
                    local_addr,
                    remote_addr,
                    http_scheme,
                    fuse_config,
                    conn_ctrl,
                    None,
                );
                connections.spawn(handoff::connection(
                    stream,
                    handler,
                    http1.clone(),
                    graceful.clone(),
                    force.clone(),
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "accepting a connection failed");
                // EMFILE and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // No new connections from here on.
    drop(acceptor);
    graceful.cancel();
    connections.close();
    if tokio::time::timeout(STOP_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::info!(
            open = connections.len(),
            "connections still open after the grace period are dropped"
        );
        force.cancel();
        connections.wait().await;
    }
}

/// Every route, with the shared state, and the API's OpenAPI document made from them.
pub fn router(shared: Shared) -> Router {
    let routes = routes();
    let doc = Arc::new(crate::openapi::document(&routes));
    Router::new()
        .hoop(affix_state::inject(shared))
        .hoop(cors)
        .push(Router::with_path("api/openapi.json").get(crate::openapi::Serve(doc)))
        .push(
            Router::with_path("api/asyncapi.json")
                .get(crate::openapi::Serve(Arc::new(crate::asyncapi::document()))),
        )
        .push(routes)
}

/// The routes: the service's, the API's (behind `authenticate`), the dashboard, and a 404.
pub fn routes() -> Router {
    let protected = Router::new()
        .hoop(authenticate)
        .push(
            Router::with_path("events")
                .hoop(handoff::take_sse)
                .get(api::events),
        )
        .push(Router::with_path("api/devices").get(api::list_devices))
        .push(Router::with_path("api/devices/{id}").get(api::one_device))
        .push(Router::with_path("api/devices/{id}/readings").get(api::device_readings))
        .push(Router::with_path("api/devices/{id}/series").get(api::device_series))
        .push(Router::with_path("api/devices/{id}/status-history").get(api::status_history))
        .push(Router::with_path("api/devices/{id}/commands").post(api::post_command))
        .push(Router::with_path("api/commands").get(api::list_commands))
        // Before `{id}`, which would take "templates" for an id.
        .push(Router::with_path("api/commands/templates").get(api::command_templates))
        .push(
            Router::with_path("api/commands/{id}")
                .get(api::get_command)
                .delete(api::cancel_command),
        )
        .push(Router::with_path("api/alerts").get(api::list_alerts))
        .push(Router::with_path("api/alerts/{id}/ack").post(api::ack_alert))
        .push(Router::with_path("ws").get(ws::ws));
    Router::new()
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
            s.metrics.auth_failures.inc();
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
    #[endpoint(tags("session"), responses((status_code = 200, body = crate::openapi::Session)))]
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
    #[endpoint(tags("session"), request_body = crate::openapi::Login, responses((status_code = 204, description = "signed in: the session cookie is set (or auth is off)"), (status_code = 400, description = "a bad body", body = crate::openapi::ErrorBody), (status_code = 401, description = "unknown token", body = crate::openapi::ErrorBody)))]
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
            s.metrics.auth_failures.inc();
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
    #[endpoint(tags("session"), responses((status_code = 204, description = "signed out: the cookie is cleared")))]
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
        s.metrics.limit_refusals.inc();
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
#[endpoint(tags("service"), responses((status_code = 200, body = crate::openapi::Health)))]
async fn healthz(res: &mut Response) {
    res.render(Json(json!({"status": "ok"})));
}

/// Work that waits this long for a commit makes the daemon unready even before a commit
/// failed (a commit stuck on a lock, say).
const READY_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// Readiness: broker connected, storage readable, and the writer committing.
#[endpoint(tags("service"), responses((status_code = 200, description = "ready", body = crate::openapi::Ready), (status_code = 503, description = "not ready: the reason is in the body", body = crate::openapi::Ready)))]
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

/// `GET /metrics`: OpenMetrics for a scraper that asks for it (Prometheus does), the
/// Prometheus text format otherwise.
#[endpoint(tags("service"), responses((status_code = 200, description = "Prometheus text format, or OpenMetrics when the Accept header asks for it", content_type = ["text/plain", "application/openmetrics-text"], body = String)))]
async fn metrics(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let s = shared(depot);
    let format = crate::observability::Format::for_accept(
        req.headers()
            .get(salvo::http::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let writer = s.store.health().report(READY_STALL);
    let gauges = s
        .store
        .gauges()
        .await
        .inspect_err(|e| tracing::debug!(error = %e, "metrics: cannot count devices and alerts"))
        .ok();
    let scrape = crate::observability::Scrape {
        instance: &s.instance,
        backend: s.store.backend_name(),
        writer: &writer,
        gauges: gauges.as_ref(),
    };
    match s.metrics.encode(&scrape, format) {
        Ok(body) => {
            res.add_header("content-type", format.content_type(), true)
                .ok();
            res.render(body);
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics: encoding failed");
            res.status_code(StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
}

/// Each connection's driver, and the hand-off of SSE streams from hyper.
///
/// While a response streams, hyper keeps all it holds for the connection: an 8 KiB read
/// buffer and an 8 KiB write buffer (`INIT_BUFFER_SIZE`; neither can be configured
/// smaller), the response's header map (kept to parse the next request into), its
/// dispatcher and body queue; salvo adds its connection future and task around them. For
/// an idle SSE stream that was 20.6 KB allocated per connection, 11-12 KiB of it resident,
/// and none of it is needed once the head is written. So [`take_sse`], a hoop on
/// `GET /events`, takes a `200 text/event-stream` response to an HTTP/1.1 request (its
/// head and its body stream) into the connection's [`Slot`] instead of letting salvo give
/// it to hyper. The driver then takes the socket back from hyper (`into_parts`), drops all
/// the rest, and sends the response itself as hyper would: the head, then each chunk of
/// the body with its size line in one vectored write, flushed; with `connection: close`, as
/// nothing is served after it. Like hyper, it reads the socket only to notice the client
/// leaving. Everything else (other routes, errors, HTTP/1.0, WebSocket upgrades) stays
/// with hyper.
///
/// What an idle SSE connection then holds: this driver's task (about 0.5 KB: the socket,
/// the body, the bytes being written), the client's stream (about 1 KB, `sse::Client` and
/// its state), tokio's I/O registration (256 B), the client's two timers (224 B) and
/// salvo's `ConnCtrl` (72 B): about 2 KB allocated.
mod handoff {
    use std::future::Future;
    use std::io::IoSlice;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, ready};

    use bytes::{Buf as _, Bytes, BytesMut};
    use salvo::http::body::{Body as _, HyperBody, ResBody};
    use salvo::http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
    use salvo::http::{HeaderMap, Method, StatusCode, Version};
    use salvo::hyper;
    use salvo::hyper::server::conn::http1;
    use salvo::prelude::*;
    use salvo::rt::tokio::TokioIo;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_util::sync::CancellationToken;

    /// Where a handler leaves a response for the driver to send itself.
    #[derive(Default)]
    struct Slot {
        ready: tokio::sync::Notify,
        taken: Mutex<Option<Taken>>,
    }

    /// A response taken from hyper: its encoded head and its body.
    struct Taken {
        head: Bytes,
        body: ResBody,
    }

    impl Slot {
        fn put(&self, taken: Taken) {
            *self.taken.lock().unwrap_or_else(|p| p.into_inner()) = Some(taken);
            self.ready.notify_one();
        }

        fn take(&self) -> Option<Taken> {
            self.taken.lock().unwrap_or_else(|p| p.into_inner()).take()
        }

        fn is_full(&self) -> bool {
            self.taken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        }
    }

    /// The request extension through which [`take_sse`] reaches its connection's slot.
    #[derive(Clone)]
    struct Handoff(Arc<Slot>);

    /// salvo's service for one connection, with the slot put in every request; a response
    /// that was taken is never given to hyper (its future stays pending until the driver
    /// drops the connection).
    struct Handing<H> {
        inner: H,
        slot: Arc<Slot>,
    }

    type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

    impl<H> hyper::service::Service<hyper::Request<HyperBody>> for Handing<H>
    where
        H: hyper::service::Service<hyper::Request<HyperBody>, Response = hyper::Response<ResBody>>,
        H::Future: Send + 'static,
        H::Error: Send,
    {
        type Response = hyper::Response<ResBody>;
        type Error = H::Error;
        type Future = BoxFuture<Result<Self::Response, Self::Error>>;

        fn call(&self, mut req: hyper::Request<HyperBody>) -> Self::Future {
            req.extensions_mut().insert(Handoff(self.slot.clone()));
            let res = self.inner.call(req);
            let slot = self.slot.clone();
            Box::pin(async move {
                let res = res.await;
                if slot.is_full() {
                    std::future::pending::<()>().await;
                }
                res
            })
        }
    }

    /// Serves one connection with hyper until a response is taken, then sends that
    /// response on the bare socket. `graceful` ends keep-alive (a request in flight may
    /// finish), `force` drops the connection.
    pub(super) fn connection<S, H>(
        stream: S,
        handler: H,
        http1: Arc<http1::Builder>,
        graceful: CancellationToken,
        force: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: hyper::service::Service<
                hyper::Request<HyperBody>,
                Response = hyper::Response<ResBody>,
                Error = hyper::Error,
            > + Send
            + Unpin
            + 'static,
        H::Future: Send + 'static,
    {
        // Boxed: everything hyper holds is freed when a stream is taken from it, and this
        // future, which lives as long as the stream, stays small.
        let http = Box::pin(http(stream, handler, http1, graceful, force.clone()));
        async move {
            let Some((io, taken)) = http.await else {
                return;
            };
            tokio::select! {
                () = Sending::new(io, taken) => {}
                () = force.cancelled() => {}
            }
        }
    }

    /// hyper on the connection until it ends (`None`) or a response is taken: then the
    /// socket and that response.
    async fn http<S, H>(
        stream: S,
        handler: H,
        http1: Arc<http1::Builder>,
        graceful: CancellationToken,
        force: CancellationToken,
    ) -> Option<(S, Taken)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: hyper::service::Service<
                hyper::Request<HyperBody>,
                Response = hyper::Response<ResBody>,
                Error = hyper::Error,
            > + Send
            + Unpin
            + 'static,
        H::Future: Send + 'static,
    {
        let slot = Arc::new(Slot::default());
        let service = Handing {
            inner: handler,
            slot: slot.clone(),
        };
        let mut conn = http1
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut stopping = false;
        let taken = loop {
            tokio::select! {
                done = &mut conn => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "HTTP/1 connection ended with an error");
                    }
                    return None;
                }
                () = slot.ready.notified() => {
                    if let Some(taken) = slot.take() {
                        break taken;
                    }
                }
                () = graceful.cancelled(), if !stopping => {
                    stopping = true;
                    Pin::new(&mut conn).graceful_shutdown();
                }
                () = force.cancelled() => return None,
            }
        };
        // Only the socket is kept: the read buffer, the service and hyper's state are
        // dropped on return.
        let io = conn.into_parts()?.io.into_inner();
        Some((io, taken))
    }

    /// Sends a taken response: the head, then each data frame of the body as one chunk
    /// (size line, data and CRLF in one vectored write, then a flush), and the last chunk
    /// when the body ends. It ends there, when the body fails (with no last chunk, as hyper
    /// does, so the client sees the stream cut), or when the client goes away.
    ///
    /// A future written out by hand rather than an `async fn`: it lives as long as the
    /// stream, and this way it holds only the socket, the body and the bytes being written.
    struct Sending<S> {
        io: S,
        body: ResBody,
        /// The current chunk's size line (`size[at..len]` is still to be written).
        size: [u8; 18],
        size_at: u8,
        size_len: u8,
        /// Its data still to be written (the head, at first).
        data: Bytes,
        /// How much of its closing CRLF is still to be written.
        crlf: u8,
        flush: bool,
        /// Whether the socket is read to notice the client leaving: a client sends
        /// nothing after its request, so EOF (or an error) means it left. One that sends
        /// more is not watched further (hyper stops reading there too).
        watch: bool,
        /// The last chunk is written: shut the socket down once it is flushed.
        ending: bool,
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> Sending<S> {
        fn new(io: S, taken: Taken) -> Self {
            Sending {
                io,
                body: taken.body,
                size: [0; 18],
                size_at: 0,
                size_len: 0,
                data: taken.head,
                crlf: 0,
                flush: true,
                watch: true,
                ending: false,
            }
        }

        /// Writes what is pending; `Ready(Err)` on a failed or zero write.
        fn poll_write_pending(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            while self.size_at < self.size_len || !self.data.is_empty() || self.crlf > 0 {
                let crlf = &b"\r\n"[2 - usize::from(self.crlf)..];
                let iov = [
                    IoSlice::new(&self.size[self.size_at.into()..self.size_len.into()]),
                    IoSlice::new(&self.data),
                    IoSlice::new(crlf),
                ];
                let mut n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &iov))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                let size = usize::from(self.size_len - self.size_at).min(n);
                self.size_at += size as u8;
                n -= size;
                let data = self.data.len().min(n);
                self.data.advance(data);
                n -= data;
                self.crlf -= n.min(usize::from(self.crlf)) as u8;
            }
            // Let go of the written chunk now, not when the next one comes: its buffer is
            // freed (and reused for the next chunk) while it is still warm.
            self.data = Bytes::new();
            Poll::Ready(Ok(()))
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> Future for Sending<S> {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let this = self.get_mut();
            loop {
                if ready!(this.poll_write_pending(cx)).is_err() {
                    return Poll::Ready(());
                }
                if this.flush {
                    if ready!(Pin::new(&mut this.io).poll_flush(cx)).is_err() {
                        return Poll::Ready(());
                    }
                    this.flush = false;
                }
                if this.ending {
                    let _ = ready!(Pin::new(&mut this.io).poll_shutdown(cx));
                    return Poll::Ready(());
                }
                if this.watch {
                    let mut probe = [0u8; 64];
                    let mut buf = ReadBuf::new(&mut probe);
                    match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(()),
                        Poll::Ready(Err(_)) => return Poll::Ready(()),
                        Poll::Ready(Ok(())) => this.watch = false,
                        Poll::Pending => {}
                    }
                }
                match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                    None => {
                        this.data = Bytes::from_static(b"0\r\n\r\n");
                        this.flush = true;
                        this.ending = true;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "response body failed");
                        return Poll::Ready(());
                    }
                    Some(Ok(frame)) => {
                        // Trailers are not sent; an empty frame would end the body.
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            this.size_len = chunk_size_line(&mut this.size, data.len()) as u8;
                            this.size_at = 0;
                            this.data = data;
                            this.crlf = 2;
                            this.flush = true;
                        }
                    }
                }
            }
        }
    }

    /// `{len:X}\r\n` into `out`; its length.
    fn chunk_size_line(out: &mut [u8; 18], len: usize) -> usize {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
        for i in 0..digits {
            out[digits - 1 - i] = HEX[(len >> (4 * i)) & 0xf];
        }
        out[digits] = b'\r';
        out[digits + 1] = b'\n';
        digits + 2
    }

    /// The status line and headers hyper would write for this response with a body of
    /// unknown length, plus `connection: close`.
    fn encode_head(status: StatusCode, headers: &HeaderMap) -> Bytes {
        let mut out = BytesMut::with_capacity(256);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"transfer-encoding: chunked\r\nconnection: close\r\ndate: ");
        out.extend_from_slice(http_date().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.freeze()
    }

    /// Now as an HTTP date (`Tue, 02 Dec 2025 08:45:00 GMT`).
    fn http_date() -> String {
        const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        time::OffsetDateTime::now_utc()
            .format(FORMAT)
            .unwrap_or_default()
    }

    /// Runs the route; a `200 text/event-stream` stream over HTTP/1.1 served by
    /// [`connection`] is then taken from hyper, to be sent on the bare socket.
    #[handler]
    pub(super) async fn take_sse(
        req: &mut Request,
        depot: &mut Depot,
        res: &mut Response,
        ctrl: &mut FlowCtrl,
    ) {
        ctrl.call_next(req, depot, res).await;
        let Some(Handoff(slot)) = req.extensions().get::<Handoff>().cloned() else {
            return;
        };
        let status = res.status_code.unwrap_or(StatusCode::OK);
        let headers = res.headers();
        let event_stream = headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        // Anything that frames the body or the connection itself stays with hyper.
        let framed = [CONTENT_LENGTH, TRANSFER_ENCODING, CONNECTION]
            .iter()
            .any(|h| headers.contains_key(h));
        if *req.method() != Method::GET
            || req.version() != Version::HTTP_11
            || status != StatusCode::OK
            || !event_stream
            || framed
            || !res.body.is_stream()
        {
            return;
        }
        let (parts, body) = res.strip_to_hyper().into_parts();
        slot.put(Taken {
            head: encode_head(parts.status, &parts.headers),
            body,
        });
        // Never sent; set so that salvo does not warn about a 200 without a body.
        res.body(Bytes::new());
    }
}
