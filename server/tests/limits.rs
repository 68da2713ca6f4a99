//! What bounds a node's memory and lifetime against clients that hold on to
//! it: rooms per connection, replays and history pages, HTTP time limits.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};

use chorus_tests::redis::RedisServer;
use chorus_tests::{ChildGuard, TestNode, free_port, metric, wait_until};
use futures_util::SinkExt;
use serde_json::{Value, json};
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
async fn replays_to_clients_that_never_read_pin_a_page_each_and_end_as_slow_consumers() {
    const CLIENTS: usize = 10;
    const MESSAGES: u64 = 300; // × 60 KB: 18 MB of history
    let redis = RedisServer::start().await;
    let port = free_port();
    let child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_chorus-server"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--broker", &redis.url(), "--delivery", "streams"])
            .env("CHORUS_SEND_TIMEOUT", "1s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_until("the node to be ready", || async {
        reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let epoch = publish_large(&base, "big", MESSAGES).await;
    let before = peak_rss(child.0.id());

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
    let grown = peak_rss(child.0.id()).saturating_sub(before);
    // Each held a page and its socket's buffers, not the 18 MB it asked for.
    assert!(
        grown < 64 << 20,
        "peak RSS grew by {} MiB for {CLIENTS} clients ({replayed} messages replayed)",
        grown >> 20
    );
    assert!(replayed < (CLIENTS as u64 * MESSAGES) as f64, "{replayed}");
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
