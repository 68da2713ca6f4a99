//! HTTP and WebSocket transport: the axum router and the serve loop.

mod http;
mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, Method, header};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::node::Node;

/// The node's routes: `/` (demo page), `/ws`, the backend API, health and metrics.
pub fn app(node: Arc<Node>) -> Router {
    let api = Router::new()
        .route("/api/v1/rooms/{room}/messages", post(http::publish))
        .route("/api/v1/rooms/{room}/history", get(http::history))
        .layer(api_cors(&node.config.cors_origins));
    Router::new()
        .route("/", get(http::demo_page))
        .route("/chorus.js", get(http::js_client))
        .route("/chorus.d.ts", get(http::js_client_types))
        .route("/ws", get(ws::upgrade))
        .merge(api)
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics))
        .with_state(node)
}

/// CORS for the backend API: pages on `origins` (`*`: any) may call it,
/// with an API key in `Authorization`; with none, browsers on other origins
/// get no CORS headers and cannot read its answers. (WebSocket upgrades are
/// not subject to CORS; client tokens guard them.)
fn api_cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .expose_headers([header::RETRY_AFTER])
        .max_age(Duration::from_secs(3600))
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
