//! What a node's `/metrics` tells an operator, scraped over HTTP from a
//! real node while real clients connect, are refused, break the protocol
//! and leave.
#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use chorus_tests::{Event, TestNode, WsClient, wait_until};
use serde_json::json;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn refused(reason: &str) -> String {
    format!("chorus_connections_refused_total{{reason=\"{reason}\"}}")
}

fn closed(reason: &str) -> String {
    format!("chorus_connections_closed_total{{reason=\"{reason}\"}}")
}

fn errors(code: &str) -> String {
    format!("chorus_errors_total{{code=\"{code}\"}}")
}

#[tokio::test]
async fn refused_upgrades_are_counted_by_reason() {
    let node = TestNode::start(&["--max-connections", "1", "--jwt-secret", "s3cret"]).await;
    for reason in ["limit", "draining", "auth", "bad_request"] {
        assert_eq!(node.metric(&refused(reason)).await, 0.0, "{reason}");
    }
    assert_eq!(node.metric("chorus_max_connections").await, 1.0);
    // No token.
    assert!(WsClient::connect(&node.ws_url()).await.is_err());
    // A plain GET, as through a proxy that drops the Upgrade header.
    let plain = reqwest::get(node.http("/ws")).await.unwrap();
    assert!(plain.status().is_client_error(), "{}", plain.status());
    // At the limit.
    let token = token("s3cret", 600);
    let url = format!("{}?token={token}", node.ws_url());
    let _first = WsClient::connect(&url).await.unwrap();
    assert!(WsClient::connect(&url).await.is_err());
    assert_eq!(node.metric(&refused("auth")).await, 1.0);
    assert_eq!(node.metric(&refused("bad_request")).await, 1.0);
    assert_eq!(node.metric(&refused("limit")).await, 1.0);
    assert_eq!(node.metric(&refused("draining")).await, 0.0);
}

#[tokio::test]
async fn a_draining_node_counts_the_upgrades_it_refuses_and_the_clients_it_drained() {
    let node = TestNode::start(&["--drain-seconds", "0"]).await;
    let mut client = node.client().await;
    let n = node.node.clone();
    let drain = tokio::spawn(async move { n.drain().await });
    assert_eq!(client.frame().await["op"], "reconnect");
    assert_eq!(client.event().await, Event::Closed(Some(1001)));
    assert!(WsClient::connect(&node.ws_url()).await.is_err());
    wait_until("the drained connection to be counted", || async {
        node.metric(&closed("drained")).await == 1.0
    })
    .await;
    assert_eq!(node.metric(&refused("draining")).await, 1.0);
    drain.await.unwrap();
}

#[tokio::test]
async fn ended_connections_are_counted_by_reason() {
    let node = TestNode::start(&[]).await;
    for reason in [
        "client_closed",
        "client_gone",
        "binary_frame",
        "slow_consumer",
    ] {
        assert_eq!(node.metric(&closed(reason)).await, 0.0, "{reason}");
    }
    node.client().await.close().await;
    // Gone without a close frame.
    drop(node.client().await);
    let mut binary = node.client().await;
    binary.send_binary(vec![1, 2, 3]).await;
    assert_eq!(binary.event().await, Event::Closed(Some(1003)));
    for reason in ["client_closed", "client_gone", "binary_frame"] {
        wait_until(&format!("a {reason} close to be counted"), || async {
            node.metric(&closed(reason)).await == 1.0
        })
        .await;
    }
    assert_eq!(node.metric(&closed("slow_consumer")).await, 0.0);
    assert_eq!(node.metric("chorus_connections").await, 0.0);
}

#[tokio::test]
async fn error_frames_and_http_error_bodies_are_counted_by_code() {
    let node = TestNode::start(&["--api-key", "k3y"]).await;
    for code in [
        "bad_frame",
        "not_subscribed",
        "unauthorized",
        "bad_room",
        "no_history",
    ] {
        assert_eq!(node.metric(&errors(code)).await, 0.0, "{code}");
    }
    let mut client = node.client().await;
    client.send_text("{").await;
    assert_eq!(client.frame().await["code"], "bad_frame");
    let reply = client
        .request(json!({"op": "unsubscribe", "room": "never"}))
        .await;
    assert_eq!(reply["code"], "not_subscribed");

    let http = reqwest::Client::new();
    let post = |path: &str, key: Option<&str>| {
        let mut req = http.post(node.http(path)).body(r#"{"data": 1}"#);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send()
    };
    let no_key = post("/api/v1/rooms/r/messages", None).await.unwrap();
    assert_eq!(no_key.status(), 401);
    let bad_room = post("/api/v1/rooms/%20/messages", Some("k3y"))
        .await
        .unwrap();
    assert_eq!(bad_room.status(), 400);
    let history = http
        .get(node.http("/api/v1/rooms/r/history"))
        .bearer_auth("k3y")
        .send()
        .await
        .unwrap();
    assert_eq!(history.status(), 404);

    assert_eq!(node.metric(&errors("bad_frame")).await, 1.0);
    assert_eq!(node.metric(&errors("not_subscribed")).await, 1.0);
    assert_eq!(node.metric(&errors("unauthorized")).await, 1.0);
    assert_eq!(node.metric(&errors("bad_room")).await, 1.0);
    assert_eq!(node.metric(&errors("no_history")).await, 1.0);
    assert_eq!(node.metric(&errors("unavailable")).await, 0.0);
}

#[tokio::test]
async fn build_info_process_metrics_and_a_latency_histogram_for_a_p99() {
    let node = TestNode::start(&[]).await;
    let version = env!("CARGO_PKG_VERSION");
    let info = format!("chorus_build_info{{version=\"{version}\"}}");
    assert_eq!(node.metric(&info).await, 1.0);

    let rss = node.metric("process_resident_memory_bytes").await;
    assert!(rss > 1e6, "a node holds more than a megabyte: {rss}");
    let fds = node.metric("process_open_fds").await;
    assert!(fds >= 3.0, "{fds}");
    assert!(node.metric("process_max_fds").await >= fds);
    // In clock ticks (10 ms): a young test process may not have one yet.
    assert!(node.metric("process_cpu_seconds_total").await >= 0.0);
    let started = node.metric("process_start_time_seconds").await;
    assert!(
        started <= now() && started > now() - 86_400.0,
        "started at {started}"
    );

    let mut client = node.client().await;
    client.subscribe("p99").await;
    client.publish("p99", json!(1)).await;
    client.message().await;
    let bucket = |le: &str| format!("chorus_delivery_latency_seconds_bucket{{le=\"{le}\"}}");
    assert_eq!(
        node.metric("chorus_delivery_latency_seconds_count").await,
        1.0
    );
    assert_eq!(node.metric(&bucket("+Inf")).await, 1.0);
    // Fine steps where a healthy fleet is, up to a failover's seconds.
    for le in [
        "0.0001", "0.001", "0.0025", "0.005", "0.01", "0.1", "1.0", "10.0",
    ] {
        let n = node.metric(&bucket(le)).await;
        assert!(n <= 1.0, "{le}: {n}");
    }
}

/// An HS256 token for `sub` "u" expiring in `secs`.
fn token(secret: &str, secs: u64) -> String {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let exp = now() as u64 + secs;
    encode(
        &Header::default(),
        &json!({"sub": "u", "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}
