//! Durable delivery (`--delivery streams`) against a real redis-server.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use chorus_testkit::RedisServer;
use chorus_tests::proxy::SilencingProxy;
use chorus_tests::{Publisher, TestNode, WsClient};
use serde_json::{Value, json};

async fn durable_nodes(n: usize, broker: &str, extra: &[&str]) -> Vec<TestNode> {
    let mut flags = vec!["--delivery", "streams"];
    flags.extend_from_slice(extra);
    chorus_tests::fleet(n, broker, &flags).await
}

/// Reads messages until `offset` arrives; asserts they are contiguous from `first`.
async fn read_contiguous(c: &mut WsClient, first: u64, through: u64) {
    let mut want = first;
    while want <= through {
        let m = c.message().await;
        assert_eq!(
            m["offset"].as_u64(),
            Some(want),
            "expected offset {want}, got {m}"
        );
        want += 1;
    }
}

#[tokio::test]
async fn a_client_that_was_away_gets_exactly_what_it_missed_then_live_messages() {
    let redis = RedisServer::start().await;
    let nodes = durable_nodes(2, &redis.url(), &[]).await;
    let mut sub = nodes[1].client().await;
    let ok = sub.subscribe("seam").await;
    let epoch = ok["epoch"].as_str().unwrap().to_string();
    let publisher = Publisher::start(nodes[0].client().await, "seam");

    read_contiguous(&mut sub, 1, 10).await;
    sub.close().await;
    let away_from = 10;
    publisher.wait_for(away_from + 100).await;

    // Back, on the other node, while publishing goes on.
    let mut back = nodes[0].client().await;
    let ok = back.request(json!({"op": "subscribe", "room": "seam", "since": {"epoch": epoch, "offset": away_from}})).await;
    assert_eq!(ok["op"], "ok", "{ok}");
    assert_eq!(ok["recovered"], true, "{ok}");
    let at_subscribe = ok["offset"].as_u64().unwrap();
    assert!(at_subscribe >= away_from + 100);
    assert_eq!(ok["missed"].as_u64(), Some(at_subscribe - away_from));
    // Everything missed, then live ones, with no gap and no duplicate at the seam.
    read_contiguous(&mut back, away_from + 1, at_subscribe + 50).await;
    let last = publisher.stop().await;
    read_contiguous(&mut back, at_subscribe + 51, last).await;
    back.sync().await;
    assert!(
        back.pending().is_empty(),
        "nothing after the last publish: {:?}",
        back.pending()
    );
    assert!(nodes[0].metric("chorus_replayed_messages_total").await >= 100.0);
}

#[tokio::test]
async fn recovery_past_the_history_window_or_epoch_says_history_gone() {
    let redis = RedisServer::start().await;
    let nodes = durable_nodes(1, &redis.url(), &["--history-size", "10"]).await;
    let mut c = nodes[0].client().await;
    let epoch = c.subscribe("small").await["epoch"]
        .as_str()
        .map(String::from)
        .unwrap_or_default();
    for i in 0..200 {
        c.publish("small", json!(i)).await;
    }
    let mut other = nodes[0].client().await;
    let ok = other
        .request(
            json!({"op": "subscribe", "room": "small", "since": {"epoch": epoch, "offset": 5}}),
        )
        .await;
    assert_eq!(
        (
            ok["op"].as_str(),
            ok["recovered"].as_bool(),
            ok["code"].as_str()
        ),
        (Some("ok"), Some(false), Some("history_gone")),
        "{ok}"
    );
    // Still subscribed: live messages come.
    c.publish("small", json!("live")).await;
    assert_eq!(other.message().await["data"], "live");

    let mut third = nodes[0].client().await;
    let ok = third.request(json!({"op": "subscribe", "room": "small", "since": {"epoch": "not-the-epoch", "offset": 195}})).await;
    assert_eq!(
        (ok["recovered"].as_bool(), ok["code"].as_str()),
        (Some(false), Some("history_gone")),
        "{ok}"
    );
    let ok = third
        .request(
            json!({"op": "subscribe", "room": "small", "since": {"epoch": epoch, "offset": 195}}),
        )
        .await;
    assert_eq!(
        (ok["recovered"].as_bool(), ok["missed"].as_u64()),
        (Some(true), Some(6)),
        "{ok}"
    );
    for want in 196..=201 {
        assert_eq!(third.message().await["offset"], want);
    }
    assert!(nodes[0].metric("chorus_history_gone_total").await >= 2.0);
}

#[tokio::test]
async fn the_same_idempotency_key_on_two_nodes_is_delivered_once() {
    let redis = RedisServer::start().await;
    let nodes = durable_nodes(2, &redis.url(), &[]).await;
    let mut sub = nodes[1].client().await;
    sub.subscribe("orders").await;
    let mut a = nodes[0].client().await;
    let mut b = nodes[1].client().await;
    let first = a
        .request(json!({"op": "publish", "room": "orders", "data": {"order": 7}, "key": "order-7"}))
        .await;
    let again = b
        .request(json!({"op": "publish", "room": "orders", "data": {"order": 7}, "key": "order-7"}))
        .await;
    assert_eq!(first["op"], "ok");
    assert_eq!(
        (first["offset"].clone(), first["epoch"].clone()),
        (again["offset"].clone(), again["epoch"].clone())
    );
    // Over HTTP too.
    let resp = reqwest::Client::new()
        .post(nodes[1].http("/api/v1/rooms/orders/messages"))
        .json(&json!({"data": {"order": 7}, "key": "order-7"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap()["offset"],
        first["offset"]
    );
    let other = a
        .request(json!({"op": "publish", "room": "orders", "data": {"order": 8}, "key": "order-8"}))
        .await;
    assert_eq!(
        other["offset"].as_u64(),
        first["offset"].as_u64().map(|o| o + 1)
    );
    assert_eq!(sub.message().await["data"]["order"], 7);
    assert_eq!(sub.message().await["data"]["order"], 8);
    sub.sync().await;
    assert!(
        sub.pending().is_empty(),
        "delivered twice: {:?}",
        sub.pending()
    );
}

#[tokio::test]
async fn a_node_whose_subscription_dropped_fills_the_gap_from_history() {
    // The subscriber's node reaches Redis through a proxy that can silence
    // its subscription; its canary notices within half a second.
    let link = cut_link("500ms", &[]).await;
    let mut sub = link.node.client().await;
    sub.subscribe("gap").await;
    let publisher = Publisher::start(link.publisher.client().await, "gap");
    publisher.wait_for(20).await;
    // Live notifications stop reaching the node while messages keep coming:
    // it must take what it missed from the stream when it reconnects.
    link.proxy.silence_subscribers();
    let silenced_at = publisher.acked.load(Ordering::SeqCst);
    publisher.wait_for(silenced_at + 100).await;
    // And a plain dropped subscription on top.
    let _: i64 = link
        .redis
        .query(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"))
        .await;
    let now = publisher.acked.load(Ordering::SeqCst);
    publisher.wait_for(now + 50).await;
    let last = publisher.stop().await;
    // The same client connection sees every offset, in order, once.
    read_contiguous(&mut sub, 1, last).await;
    assert!(link.node.metric("chorus_broker_reconnects_total").await >= 1.0);
    assert!(
        link.node.metric("chorus_gap_filled_messages_total").await > 0.0,
        "the missed notifications came from history"
    );
}

#[tokio::test]
async fn the_history_api_returns_kept_messages() {
    let redis = RedisServer::start().await;
    let nodes = durable_nodes(1, &redis.url(), &["--api-key", "k"]).await;
    let mut c = nodes[0].client().await;
    for i in 1..=5 {
        c.publish("h", json!({"i": i})).await;
    }
    let http = reqwest::Client::new();
    let resp = http
        .get(nodes[0].http("/api/v1/rooms/h/history?since=2&limit=2"))
        .bearer_auth("k")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["last_offset"], 5);
    assert_eq!(body["complete"], true);
    let offsets: Vec<u64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![3, 4]);
    assert_eq!(body["messages"][0]["data"]["i"], 3);
    let resp = http
        .get(nodes[0].http("/api/v1/rooms/h/history"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

/// Redis, a node publishing to it directly, and a subscriber's node that
/// reaches it through a proxy that can silence its subscription (its canary
/// notices after `canary_timeout`); both nodes run with `extra`.
struct CutLink {
    redis: RedisServer,
    proxy: SilencingProxy,
    publisher: TestNode,
    node: TestNode,
}

async fn cut_link(canary_timeout: &str, extra: &[&str]) -> CutLink {
    let redis = RedisServer::start().await;
    let proxy = SilencingProxy::start(redis.port).await;
    let publisher = durable_nodes(1, &redis.url(), extra).await.remove(0);
    let mut flags = vec![
        "--canary-interval",
        "100ms",
        "--canary-timeout",
        canary_timeout,
    ];
    flags.extend_from_slice(extra);
    let node = durable_nodes(1, &proxy.url(), &flags).await.remove(0);
    CutLink {
        redis,
        proxy,
        publisher,
        node,
    }
}

async fn wait_for_reconnect(node: &TestNode) {
    chorus_tests::wait_until("the node to reconnect", || async {
        node.metric("chorus_broker_reconnects_total").await >= 1.0
    })
    .await;
}

#[tokio::test]
async fn a_room_with_nothing_delivered_yet_is_caught_up_after_the_link_is_cut() {
    let link = cut_link("500ms", &[]).await;
    let mut sub = link.node.client().await;
    assert_eq!(sub.subscribe("quiet").await["offset"], 0);
    // Cut before the node delivered anything in the room: it has no "last
    // delivered" offset of its own for it.
    link.proxy.silence_subscribers();
    let mut p = link.publisher.client().await;
    for i in 1..=10 {
        assert_eq!(p.publish("quiet", json!(i)).await["offset"], i);
    }
    wait_for_reconnect(&link.node).await;
    p.publish("quiet", json!(11)).await;
    read_contiguous(&mut sub, 1, 11).await;
}

#[tokio::test]
async fn a_gap_the_history_no_longer_covers_is_told_to_subscribers() {
    let link = cut_link("3s", &["--history-size", "10"]).await;
    let mut sub = link.node.client().await;
    let epoch = sub.subscribe("hole").await["epoch"].clone();
    let mut p = link.publisher.client().await;
    for i in 1..=5 {
        p.publish("hole", json!(i)).await;
    }
    read_contiguous(&mut sub, 1, 5).await;
    // Far more than the history keeps is published while the node's
    // subscription is silent (well within the canary's 3 s).
    link.proxy.silence_subscribers();
    for i in 6..=300 {
        p.publish("hole", json!(i)).await;
    }
    wait_for_reconnect(&link.node).await;
    p.publish("hole", json!(301)).await;
    // The subscriber is told what it cannot get, in its place: a `gap` with
    // `history_gone` up to some offset, then every message after it.
    let gap = sub.frame().await;
    assert_eq!(
        (
            gap["op"].as_str(),
            gap["code"].as_str(),
            gap["room"].as_str()
        ),
        (Some("gap"), Some("history_gone"), Some("hole")),
        "{gap}"
    );
    assert_eq!(gap["epoch"], epoch);
    let lost_upto = gap["offset"].as_u64().unwrap();
    assert!((5..=291).contains(&lost_upto), "{gap}");
    read_contiguous(&mut sub, lost_upto + 1, 301).await;
    assert_eq!(
        link.node.metric("chorus_gap_lost_messages_total").await,
        (lost_upto - 5) as f64
    );
}

#[tokio::test]
async fn a_gap_of_more_than_a_page_of_large_messages_is_filled_in_order() {
    let link = cut_link("500ms", &["--max-frame-bytes", "200000"]).await;
    let mut sub = link.node.client().await;
    sub.subscribe("large").await;
    let mut p = link.publisher.client().await;
    p.publish("large", json!(0)).await;
    read_contiguous(&mut sub, 1, 1).await;
    // About 2.5 MB missed while the link is cut: the node reads it back from
    // history over several pages (1 MiB each).
    link.proxy.silence_subscribers();
    let pad = "x".repeat(100_000);
    for i in 2..=26 {
        p.publish("large", json!({"i": i, "pad": pad})).await;
    }
    wait_for_reconnect(&link.node).await;
    p.publish("large", json!(27)).await;
    read_contiguous(&mut sub, 2, 27).await;
    assert!(link.node.metric("chorus_gap_filled_messages_total").await >= 25.0);
    assert_eq!(
        link.node.metric("chorus_gap_lost_messages_total").await,
        0.0
    );
}
