//! What bounds a node's memory and lifetime against clients that hold on to
//! it: rooms per connection, replays and history pages, HTTP time limits.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chorus_testkit::ChorusServer;
use chorus_testkit::RedisServer;
use chorus_tests::{TestNode, WAIT, metric, spawn_server, wait_until};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A message of about 60 KB, as an HTTP publish body.
fn large_message(n: u64) -> String {
    json!({"data": {"n": n, "pad": "x".repeat(60_000)}}).to_string()
}

/// Publishes `count` large messages to `room` over HTTP; the room's epoch.
async fn publish_large(base: &str, room: &str, count: u64) -> String {
    let http = reqwest::Client::new();
    let mut epoch = String::new();
    for n in 1..=count {
        let resp = http
            .post(format!("{base}/api/v1/rooms/{room}/messages"))
            .body(large_message(n))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let ok: Value = resp.json().await.unwrap();
        assert_eq!(ok["offset"], n);
        epoch = ok["epoch"].as_str().unwrap().to_string();
    }
    epoch
}

async fn spawn_node(args: &[&str], env: &[(&str, &str)]) -> ChorusServer {
    spawn_server(env!("CARGO_BIN_EXE_chorus-server"), args, env).await
}

/// A connection to `addr` that sent `bytes` and nothing more.
async fn sent(addr: impl tokio::net::ToSocketAddrs, bytes: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    tcp
}

/// A publish whose body stops after 8 of its 100 bytes.
const HALF_BODY: &[u8] = b"POST /api/v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\n\
                           content-length: 100\r\n\r\n{\"data\":";

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn replays_and_history_reads_pin_a_page_each_and_non_readers_end_as_slow_consumers() {
    const CLIENTS: usize = 10;
    const MESSAGES: u64 = 300; // × 60 KB: 18 MB of history
    let redis = RedisServer::start().await;
    let child = spawn_node(
        &["--broker", &redis.url(), "--delivery", "streams"],
        &[("CHORUS_SEND_TIMEOUT", "1s")],
    )
    .await;
    let port = child.port;
    let base = format!("http://127.0.0.1:{port}");
    let epoch = publish_large(&base, "big", MESSAGES).await;
    let before = peak_rss(child.pid().unwrap());

    // Clients that recover the whole history and never read a byte of it.
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
            .await
            .unwrap();
        let subscribe = json!({"op": "subscribe", "id": 1, "room": "big",
                               "since": {"epoch": epoch, "offset": 0}});
        ws.send(Message::text(subscribe.to_string())).await.unwrap();
        clients.push(ws);
    }
    let metrics = format!("{base}/metrics");
    wait_until("every client to be dropped as a slow consumer", || async {
        metric(&metrics, "chorus_slow_consumers_dropped_total").await == CLIENTS as f64
    })
    .await;
    let replayed = metric(&metrics, "chorus_replayed_messages_total").await;
    let grown = peak_rss(child.pid().unwrap()).saturating_sub(before);
    // Each held a page and its socket's buffers, not the 18 MB it asked for.
    assert!(
        grown < 64 << 20,
        "peak RSS grew by {} MiB for {CLIENTS} clients ({replayed} messages replayed)",
        grown >> 20
    );
    assert!(replayed < (CLIENTS as u64 * MESSAGES) as f64, "{replayed}");

    // 20 backends reading the whole history at once get a page of about
    // 1 MiB each, and the node's peak grows by about that much per reader.
    let before = peak_rss(child.pid().unwrap());
    let url = format!("{base}/api/v1/rooms/big/history?since=0&limit=1000");
    let reads = (0..20).map(|_| async {
        let page: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        page["messages"].as_array().unwrap().len()
    });
    let got = futures_util::future::join_all(reads).await;
    let grown = peak_rss(child.pid().unwrap()).saturating_sub(before);
    assert!(
        got.iter().all(|n| (1..MESSAGES as usize).contains(n)),
        "{got:?}"
    );
    assert!(
        grown < 64 << 20,
        "peak RSS grew by {} MiB for 20 history reads",
        grown >> 20
    );
}

#[tokio::test]
async fn a_large_replay_and_the_history_api_go_page_by_page_complete_and_in_order() {
    const MESSAGES: u64 = 60; // × 60 KB
    let redis = RedisServer::start().await;
    let node = chorus_tests::fleet(1, &redis.url(), &["--delivery", "streams"])
        .await
        .remove(0);
    let base = node.http("");
    let epoch = publish_large(&base, "big", MESSAGES).await;

    let mut c = node.client().await;
    let ok = c
        .request(json!({"op": "subscribe", "room": "big",
                        "since": {"epoch": epoch, "offset": 0}}))
        .await;
    assert_eq!(
        (ok["recovered"].as_bool(), ok["missed"].as_u64()),
        (Some(true), Some(MESSAGES)),
        "{ok}"
    );
    for n in 1..=MESSAGES {
        let m = c.message().await;
        assert_eq!(
            (m["offset"].as_u64(), m["data"]["n"].as_u64()),
            (Some(n), Some(n))
        );
    }
    let http = reqwest::Client::new();
    http.post(node.http("/api/v1/rooms/big/messages"))
        .body(r#"{"data":"live"}"#)
        .send()
        .await
        .unwrap();
    let live = c.message().await;
    assert_eq!(
        (live["offset"].as_u64(), live["data"].as_str()),
        (Some(MESSAGES + 1), Some("live"))
    );

    // The history API answers at most about 1 MiB at a time; paging on with
    // `since` = the last offset returned gets every message once, in order.
    let mut since = 0;
    let mut pages = 0;
    while since < MESSAGES + 1 {
        let page: Value = http
            .get(node.http(&format!(
                "/api/v1/rooms/big/history?since={since}&limit=1000"
            )))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            (page["complete"].as_bool(), page["last_offset"].as_u64()),
            (Some(true), Some(MESSAGES + 1))
        );
        let messages = page["messages"].as_array().unwrap();
        assert!(!messages.is_empty());
        let bytes: usize = messages.iter().map(|m| m.to_string().len()).sum();
        assert!(bytes <= (1 << 20) + 61_000, "a page of {bytes} bytes");
        for m in messages {
            since += 1;
            assert_eq!(m["offset"].as_u64(), Some(since));
        }
        pages += 1;
    }
    assert!(pages > 1, "one page held all {MESSAGES} messages");
}

#[tokio::test]
async fn a_connection_joins_at_most_max_rooms_per_connection_rooms() {
    // The documented default: 128.
    let node = TestNode::start(&[]).await;
    let mut c = node.client().await;
    for n in 0..128 {
        c.subscribe(&format!("room-{n}")).await;
    }
    let e = c
        .request(json!({"op": "subscribe", "room": "one-too-many"}))
        .await;
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("too_many_rooms")),
        "{e}"
    );
    assert_eq!(node.metric("chorus_rooms").await, 128.0);

    // And as set; leaving a room makes space for another.
    let node = TestNode::start(&["--max-rooms-per-connection", "2"]).await;
    let mut c = node.client().await;
    c.subscribe("a").await;
    c.subscribe("b").await;
    let e = c.request(json!({"op": "subscribe", "room": "c"})).await;
    assert_eq!(e["code"], "too_many_rooms", "{e}");
    // Subscribing again to a room it is in adds no room: not refused.
    let again = c.request(json!({"op": "subscribe", "room": "b"})).await;
    assert_eq!(again["op"], "ok", "{again}");
    let mut other = node.client().await;
    other.subscribe("c").await;
    other
        .publish("c", json!("not for c's refused subscriber"))
        .await;
    c.sync().await;
    assert!(c.pending().is_empty(), "{:?}", c.pending());
    assert_eq!(
        c.request(json!({"op": "unsubscribe", "room": "a"})).await["op"],
        "ok"
    );
    c.subscribe("c").await;
    other.publish("c", json!("now it is")).await;
    assert_eq!(c.message().await["data"], "now it is");
}

/// Everything the node sends on `tcp` until it closes the connection.
async fn read_until_closed(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut got))
        .await
        .expect("the node kept the connection open")
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn idle_and_half_sent_http_requests_are_reaped() {
    let node = TestNode::start(&[
        "--http-header-timeout",
        "300ms",
        "--http-body-timeout",
        "300ms",
    ])
    .await;
    // Nothing sent at all; half a request head.
    let mut silent = TcpStream::connect(node.addr).await.unwrap();
    let mut half_head = sent(node.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    for tcp in [&mut silent, &mut half_head] {
        read_until_closed(tcp).await;
    }
    // A kept-alive connection, idle after its answer.
    let mut idle = sent(node.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let answer = read_until_closed(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A body that stops half-way: 408 with the JSON error body.
    let mut half_body = sent(node.addr, HALF_BODY).await;
    let answer = read_until_closed(&mut half_body).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "bad_frame", "{body}");
    assert_eq!(node.node.metrics.http_connections.get(), 0);
}

#[tokio::test]
async fn plain_http_connections_are_capped_and_upgraded_ones_leave_the_count() {
    let node = TestNode::start(&["--max-http-connections", "2"]).await;
    let ws = node.client().await; // upgraded: counted as a WebSocket connection
    let _idle: Vec<TcpStream> = vec![
        TcpStream::connect(node.addr).await.unwrap(),
        TcpStream::connect(node.addr).await.unwrap(),
    ];
    let mut third = TcpStream::connect(node.addr).await.unwrap();
    let answer = read_until_closed(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let metrics = &node.node.metrics;
    assert_eq!(
        (
            metrics.http_connections.get(),
            metrics.http_connections_refused.get(),
            node.node.connections()
        ),
        (2, 1, 1)
    );
    drop(_idle);
    wait_until("the idle connections to be gone", || async {
        metrics.http_connections.get() == 0
    })
    .await;
    let ok = reqwest::get(node.http("/healthz")).await.unwrap();
    assert_eq!(ok.status(), 200);
    ws.close().await;
}

#[tokio::test]
async fn a_half_sent_request_does_not_keep_a_sigtermed_node_alive() {
    let mut child = spawn_node(&["--drain-seconds", "1"], &[]).await;
    let port = child.port;
    // Half a head, and a head with half its body: both well within the
    // default header and body timeouts (30 s) when the node is told to stop.
    let _half_head = sent(
        ("127.0.0.1", port),
        b"POST /api/v1/rooms/r/messages HTTP/1.1\r\n",
    )
    .await;
    let _half_body = sent(("127.0.0.1", port), HALF_BODY).await;
    // And a WebSocket client that never answers the node's close frame.
    let (_ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .unwrap();
    child.proc().terminate().unwrap();
    // The drain spreads over 1 s, then everything has 5 s: the node is gone
    // well before the 30 s timeouts would have reaped the requests.
    let exited = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(status) = child.proc().exited() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the node is still running 20 s after SIGTERM");
    assert!(exited.success(), "{exited}");
}
