//! The HTTP side: routes, JSON errors, and the server with its listener.

use std::net::SocketAddr;
use std::time::Duration;

use salvo::affix_state;
use salvo::conn::tcp::TcpAcceptor;
use salvo::prelude::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;

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
}

fn shared(depot: &Depot) -> &Shared {
    depot
        .get_typed::<Shared>()
        .expect("Shared is injected by the router")
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
