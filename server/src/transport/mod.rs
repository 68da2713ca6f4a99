//! HTTP and WebSocket transport: the axum router and the serve loop.

mod http;
mod ws;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::node::Node;

/// The node's routes: `/` (demo page), `/ws`, the backend API, health and metrics.
pub fn app(node: Arc<Node>) -> Router {
    // HTTP bodies larger than a frame are refused (413, `too_large`) as they
    // arrive, before they are buffered whole.
    let max_body = node.config.max_frame_bytes as usize;
    Router::new()
        .route("/", get(http::demo_page))
        .route("/chorus.js", get(http::js_client))
        .route("/ws", get(ws::upgrade))
        .route("/api/v1/rooms/{room}/messages", post(http::publish))
        .route("/api/v1/rooms/{room}/history", get(http::history))
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(node)
}

/// Serves `node` on `listener` until `shutdown` resolves, then drains the
/// node (clients get `reconnect`, `/readyz` answers 503 meanwhile) and stops.
pub async fn run(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let drain_node = node.clone();
    // Nagle off: a frame queued behind an unacknowledged one would otherwise
    // wait for the peer's delayed ACK (up to 40 ms on Linux) — most
    // deliveries are one small frame per write.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app(node))
        .with_graceful_shutdown(async move {
            shutdown.await;
            drain_node.drain().await;
        })
        .await
}
