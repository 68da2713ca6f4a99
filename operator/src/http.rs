//! The operator's own HTTP endpoints, on a port apart from any cluster
//! traffic: `/metrics` (Prometheus text) and `/healthz`.
//!
//! `/healthz` answers 200 only while the Kubernetes API server answers: an
//! operator that cannot reach it reconciles nothing, whatever else is fine.

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    http::header,
    response::{IntoResponse, Response},
    routing::get,
};
use kube::Client;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// A successful API server call this recent makes `/healthz` answer 200
/// without asking again.
const API_FRESH: Duration = Duration::from_secs(5);
/// How long `/healthz` waits for the API server (kubelet probes give up
/// after 1 s by default; a slower answer counts as none).
const API_PROBE_TIMEOUT: Duration = Duration::from_millis(900);

struct Shared {
    metrics: Arc<Metrics>,
    client: Client,
    /// When the API server last answered a probe.
    api_ok_at: Mutex<Option<Instant>>,
}

impl Shared {
    /// `Ok` when the API server answered within [`API_FRESH`] or answers now.
    async fn api_server(&self) -> Result<(), String> {
        let fresh = |at: &Option<Instant>| at.is_some_and(|t| t.elapsed() < API_FRESH);
        if fresh(
            &self
                .api_ok_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        ) {
            return Ok(());
        }
        match tokio::time::timeout(API_PROBE_TIMEOUT, self.client.apiserver_version()).await {
            Ok(Ok(_)) => {
                *self
                    .api_ok_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {API_PROBE_TIMEOUT:?}")),
        }
    }
}

pub fn app(metrics: Arc<Metrics>, client: Client) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .with_state(Arc::new(Shared {
            metrics,
            client,
            api_ok_at: Mutex::new(None),
        }))
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    match shared.api_server().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot reach the Kubernetes API server: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(metrics, client))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::mock_api::{self, Reply, expect};
    use http::Method;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get_text(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serves_metrics_and_health_then_stops() {
        let metrics = Arc::new(Metrics::default());
        metrics.reconciled("ok", std::time::Duration::from_millis(5));
        let (client, mut api) = mock_api::pair();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, metrics, client, async move {
            drop(stopped.await)
        }));
        let version = json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "",
            "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "", "platform": ""});
        let answers = tokio::spawn(async move {
            mock_api::serve(
                &mut api,
                vec![expect(Method::GET, "/version", Reply::Json(200, version))],
            )
            .await;
            api
        });
        let health = get_text(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        // Asked once: a second probe right after is answered from that.
        let _api = answers.await.unwrap();
        let health = get_text(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let text = get_text(addr, "/metrics").await;
        assert!(
            text.contains(r#"chorus_operator_reconciles_total{result="ok"} 1"#),
            "{text}"
        );
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn healthz_fails_while_the_api_server_cannot_be_reached() {
        // Nothing listens there.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let client = Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(Metrics::default()),
            client,
            std::future::pending(),
        ));
        let health = get_text(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 503"), "{health}");
        assert!(
            health.contains("cannot reach the Kubernetes API server"),
            "{health}"
        );
    }
}
