//! The HTTP side: routes, JSON errors, and the server with its listener.

use std::net::SocketAddr;
use std::time::Duration;

use salvo::affix_state;
use salvo::conn::tcp::TcpAcceptor;
use salvo::prelude::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::{api, ws};

/// The bound HTTP server.
pub struct Server {
    acceptor: TcpAcceptor,
    addr: SocketAddr,
    shared: Shared,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) with TCP_NODELAY on every accepted socket.
    pub async fn bind(addr: SocketAddr, shared: Shared) -> std::io::Result<Server> {
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

    /// Serves until `cancel` fires, then stops gracefully.
    pub async fn run(self, cancel: CancellationToken) {
        let router = router(self.shared);
        let server = salvo::Server::new(self.acceptor);
        let handle = server.handle();
        tokio::spawn(async move {
            cancel.cancelled().await;
            handle.stop_graceful(Duration::from_secs(3));
        });
        server.serve(router).await;
    }
}

/// Every route.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .hoop(affix_state::inject(shared))
        .push(Router::with_path("healthz").get(healthz))
        .push(Router::with_path("readyz").get(readyz))
        .push(Router::with_path("metrics").get(metrics))
        .push(Router::with_path("events").get(api::events))
        .push(Router::with_path("api/devices").get(api::list_devices))
        .push(Router::with_path("api/devices/{id}/readings").get(api::device_readings))
        .push(Router::with_path("api/devices/{id}/commands").post(api::post_command))
        .push(Router::with_path("api/commands").get(api::list_commands))
        .push(Router::with_path("ws").goal(ws::ws))
        .push(Router::with_path("{**rest}").goal(not_found))
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

/// Readiness: broker connected and storage writable.
#[handler]
async fn readyz(depot: &mut Depot, res: &mut Response) {
    let s = shared(depot);
    let broker = s.mqtt.connected();
    let storage = s.store.writable().await;
    if !(broker && storage) {
        res.status_code(StatusCode::SERVICE_UNAVAILABLE);
    }
    res.render(Json(json!({
        "ready": broker && storage,
        "broker_connected": broker,
        "storage_writable": storage,
        "last_seq": *s.last_seq.borrow(),
    })));
}

/// Prometheus text format.
#[handler]
async fn metrics(depot: &mut Depot, res: &mut Response) {
    let body = shared(depot).metrics.render();
    res.add_header(
        "content-type",
        "text/plain; version=0.0.4; charset=utf-8",
        true,
    )
    .ok();
    res.render(body);
}
