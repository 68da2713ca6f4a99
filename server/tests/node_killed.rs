//! A node dies (SIGKILL) under its clients; they recover on another node.
#![allow(clippy::unwrap_used)]

use chorus_testkit::RedisServer;
use chorus_tests::{Event, TestNode, WsClient, spawn_server, wait_until};
use serde_json::json;

#[tokio::test]
async fn clients_of_a_killed_node_recover_everything_on_another_node() {
    let redis = RedisServer::start().await;
    let mut doomed = spawn_server(
        env!("CARGO_BIN_EXE_chorus-server"),
        &["--broker", &redis.url(), "--delivery", "streams"],
        &[],
    )
    .await;
    let survivor = TestNode::start(&["--broker", &redis.url(), "--delivery", "streams"]).await;
    wait_until("the survivor to be ready", || async {
        survivor.node.ready().is_ok()
    })
    .await;

    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = WsClient::connect(&doomed.ws_url()).await.unwrap();
        c.subscribe("feed").await;
        clients.push(c);
    }
    let mut publisher = survivor.client().await;
    let mut epoch = String::new();
    for n in 1..=30u64 {
        let ok = publisher.publish("feed", json!(n)).await;
        epoch = ok["epoch"].as_str().unwrap().to_string();
    }
    // Each client has seen some of it when the node dies.
    let mut seen = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let upto = 10 + 5 * i as u64;
        for want in 1..=upto {
            assert_eq!(c.message().await["offset"], want);
        }
        seen.push(upto);
    }
    doomed.kill();
    for c in clients.iter_mut() {
        loop {
            if let Event::Closed(_) = c.event().await {
                break;
            }
        }
    }
    for n in 31..=80u64 {
        publisher.publish("feed", json!(n)).await;
    }
    // They come back on the surviving node and get everything they missed.
    for upto in seen {
        let mut c = survivor.client().await;
        let ok = c.request(json!({"op": "subscribe", "room": "feed", "since": {"epoch": epoch, "offset": upto}})).await;
        assert_eq!(
            (ok["recovered"].as_bool(), ok["missed"].as_u64()),
            (Some(true), Some(80 - upto)),
            "{ok}"
        );
        for want in upto + 1..=80 {
            let m = c.message().await;
            assert_eq!(
                (m["offset"].as_u64(), m["data"].as_u64()),
                (Some(want), Some(want))
            );
        }
        c.sync().await;
        assert!(c.pending().is_empty());
    }
}
