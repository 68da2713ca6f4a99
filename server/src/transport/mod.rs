//! HTTP and WebSocket transport: the axum router and the serve loop.
//!
//! The serve loop is hyper's HTTP/1 connection driver (rather than
//! `axum::serve`, which sets no timer and so no timeouts) with:
//! - a header-read timeout (`--http-header-timeout`), which also closes an
//!   idle kept-alive connection: hyper waits for the next request's head;
//! - a hard deadline on each request body (`--http-body-timeout`);
//! - at most `--max-http-connections` plain HTTP connections at once (a
//!   connection upgraded to WebSocket leaves them: `--max-connections`
//!   counts it then);
//! - a drain with an end: on shutdown the node drains its WebSocket clients
//!   (still serving HTTP meanwhile), asks every HTTP connection to finish,
//!   and returns by the drain's deadline whatever the clients do.

mod connection;
mod http;
mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Method, header};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::RequestBodyDeadline;

use crate::metrics::Metrics;
use crate::node::Node;
use crate::protocol::ErrorCode;

/// The node's routes: `/` (demo page), `/ws`, the backend API, health and metrics.
pub fn app(node: Arc<Node>) -> Router {
    // HTTP bodies larger than a frame are refused (413, `too_large`) as they
    // arrive, before they are buffered whole.
    let max_body = node.config.max_frame_bytes as usize;
    let api = Router::new()
        .route("/api/v1/rooms/{room}/messages", post(http::publish))
        .route("/api/v1/rooms/{room}/history", get(http::history))
        .route("/api/v1/admin/shed", post(http::shed))
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
        .layer(DefaultBodyLimit::max(max_body))
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
/// node (clients get `reconnect`, `/readyz` answers 503 meanwhile, HTTP
/// requests are still served) and stops, at the latest [`DRAIN_GRACE`]
/// after the drain's spread.
///
/// [`DRAIN_GRACE`]: crate::node::DRAIN_GRACE
pub async fn run(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = &node.config;
    let service = TowerToHyperService::new(RequestBodyDeadline::new(
        app(node.clone()),
        config.http_body_timeout,
    ));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.http_header_timeout);
    let slots = Arc::new(Semaphore::new(config.max_http_connections as usize));
    // Tells every connection to finish its request in flight and close.
    let (finish, finishing) = watch::channel(false);
    let mut conns = JoinSet::new();

    let drain_node = node.clone();
    let drained = async move {
        shutdown.await;
        drain_node.drain().await
    };
    tokio::pin!(drained);
    let deadline = loop {
        tokio::select! {
            deadline = &mut drained => break deadline,
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        accept_error(e).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    refuse(tcp, &node.metrics);
                    continue;
                };
                // Nagle off: a frame queued behind an unacknowledged one would
                // otherwise wait for the peer's delayed ACK (up to 40 ms on
                // Linux) — most deliveries are one small frame per write.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                let conn = http
                    .serve_connection(TokioIo::new(tcp), service.clone())
                    .with_upgrades();
                conns.spawn(serve(conn, HttpSlot::new(slot, &node.metrics), finishing.clone()));
            }
            // Reap finished connections as they go.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    };
    drop(listener);
    let _ = finish.send(true);
    let left = tokio::time::timeout_at(deadline, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if left.is_err() {
        tracing::warn!(
            connections = conns.len(),
            "HTTP connections cut at the drain's deadline"
        );
    }
    // Dropping the set ends whatever is left.
    Ok(())
}

/// A connection as hyper drives it, WebSocket upgrades allowed.
type Connection = hyper::server::conn::http1::UpgradeableConnection<
    TokioIo<TcpStream>,
    TowerToHyperService<RequestBodyDeadline<Router>>,
>;

/// Drives one connection; once `finishing` turns true, it completes the
/// request in flight (if any) and closes.
async fn serve(conn: Connection, slot: HttpSlot, mut finishing: watch::Receiver<bool>) {
    tokio::pin!(conn);
    let mut asked = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "HTTP connection ended");
                }
                break;
            }
            _ = finishing.wait_for(|f| *f), if !asked => {
                asked = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    drop(slot);
}

/// One of the `--max-http-connections` slots, counted in the
/// `chorus_http_connections` gauge while held.
struct HttpSlot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl HttpSlot {
    fn new(permit: OwnedSemaphorePermit, metrics: &Arc<Metrics>) -> Self {
        metrics.http_connections.inc();
        Self {
            _permit: permit,
            metrics: metrics.clone(),
        }
    }
}

impl Drop for HttpSlot {
    fn drop(&mut self) {
        self.metrics.http_connections.dec();
    }
}

/// A connection past `--max-http-connections`: a 503 if the socket takes
/// it at once, then closed.
fn refuse(tcp: TcpStream, metrics: &Metrics) {
    metrics.http_connections_refused.inc();
    metrics.error(ErrorCode::Unavailable);
    const BODY: &str =
        r#"{"error":{"code":"unavailable","message":"too many HTTP connections: retry"}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tcp.try_write(response.as_bytes());
}

/// An `accept` that failed: a connection that went away before it was
/// accepted is nothing; anything else (out of file descriptors, say) is
/// logged and accepting pauses a moment, as `axum::serve` does.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "cannot accept connections");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
