//! What bounds a node's memory and lifetime against clients that hold on to
//! it: rooms per connection, replays and history pages, HTTP time limits.
#![allow(clippy::unwrap_used)]

use chorus_tests::TestNode;
use serde_json::json;

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
