//! `POST /api/v1/admin/shed`: a node moves some of its connections
//! elsewhere (the operator's rebalance after a scale-out): exactly that many
//! clients get `reconnect` with reason `rebalance` and a 1001 close, spread
//! over the given time, counted as closes with reason `rebalanced`; the
//! others stay; the API key guards it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chorus_tests::{Event, TestNode, WsClient, wait_until};
use serde_json::{Value, json};

async fn post(node: &TestNode, key: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(node.http("/api/v1/admin/shed"))
        .json(&body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let reply = req.send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn shedding_moves_exactly_the_asked_connections_with_paced_reconnects() {
    let node = TestNode::start(&["--api-key", "k3y"]).await;
    let mut clients: Vec<WsClient> = Vec::new();
    for _ in 0..10 {
        let mut c = node.client().await;
        c.subscribe("lobby").await;
        clients.push(c);
    }
    let (status, reply) = post(&node, None, json!({"connections": 4})).await;
    assert_eq!(status, 401, "{reply}");
    let (status, reply) = post(&node, Some("k3y"), json!({"connections": "four"})).await;
    assert_eq!(
        (status, &reply["error"]["code"]),
        (400, &json!("bad_frame"))
    );

    let started = tokio::time::Instant::now();
    let (status, reply) = post(&node, Some("k3y"), json!({"connections": 4, "seconds": 1})).await;
    assert_eq!((status, reply), (200, json!({"scheduled": 4})));
    // Every client is watched at once for 3 s: the four asked to go get
    // `reconnect` then 1001 within the second; the others hear nothing.
    let outcomes = futures_util::future::join_all(clients.iter_mut().map(|c| async move {
        match c.read_event(Duration::from_secs(3)).await {
            Some(Event::Frame(f)) => {
                assert_eq!(
                    (f["op"].as_str(), f["reason"].as_str()),
                    (Some("reconnect"), Some("rebalance"))
                );
                let at = started.elapsed();
                assert_eq!(c.event().await, Event::Closed(Some(1001)));
                Some(at)
            }
            None => None,
            other => panic!("unexpected {other:?}"),
        }
    }))
    .await;
    let moved: Vec<Duration> = outcomes.iter().flatten().copied().collect();
    let stayed = outcomes.iter().filter(|o| o.is_none()).count();
    assert_eq!((moved.len(), stayed), (4, 6));
    // Spread over the second, not all at once.
    let first = moved.iter().min().unwrap();
    let last = moved.iter().max().unwrap();
    assert!(*last - *first >= Duration::from_millis(500), "{moved:?}");
    assert_eq!(node.node.connections(), 6);
    // Counted as moved, not as drained.
    let closed = |reason| format!("chorus_connections_closed_total{{reason=\"{reason}\"}}");
    wait_until("the four moves to be counted", || async {
        node.metric(&closed("rebalanced")).await == 4.0
    })
    .await;
    assert_eq!(node.metric(&closed("drained")).await, 0.0);
}
