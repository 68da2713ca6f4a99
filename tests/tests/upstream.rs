//! Client publishes flowing to backend consumer groups through upstream streams.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chorus_server::upstream::{Consumer, ConsumerConfig, UpstreamMessage};
use chorus_testkit::RedisServer;
use chorus_tests::{TestNode, WsClient, wait_until};
use serde_json::json;
use tokio::sync::mpsc;

fn config(redis: &RedisServer, consumer: &str) -> ConsumerConfig {
    let mut cfg = ConsumerConfig::new(&redis.url(), "billing", consumer, vec!["orders:eu".into()]);
    cfg.batch = 5;
    cfg.block = Duration::from_millis(100);
    cfg.claim_idle = Duration::from_millis(300);
    cfg.max_attempts = 3;
    cfg
}

async fn node_and_client(redis: &RedisServer) -> (TestNode, WsClient) {
    let node = TestNode::start(&["--broker", &redis.url(), "--upstream-rooms", "orders:*"]).await;
    wait_until("redis", || async { node.node.ready().is_ok() }).await;
    let client = node.client().await;
    (node, client)
}

/// Runs a consumer that reports each message it handled (and acknowledged),
/// failing the ones `fail` says to.
fn worker(
    mut consumer: Consumer,
    name: &'static str,
    report: mpsc::UnboundedSender<(&'static str, UpstreamMessage)>,
    fail: fn(&UpstreamMessage) -> bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for msg in consumer.next_batch().await.unwrap() {
                if fail(&msg) {
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                consumer.ack(&msg).await.unwrap();
                if report.send((name, msg)).is_err() {
                    return;
                }
            }
        }
    })
}

#[tokio::test]
async fn consumers_in_a_group_share_the_work_and_take_over_from_a_dead_one() {
    let redis = RedisServer::start().await;
    let (node, mut client) = node_and_client(&redis).await;
    const COUNT: u64 = 60;
    for i in 1..=COUNT {
        assert_eq!(
            client.publish("orders:eu", json!({"order": i})).await["op"],
            "ok"
        );
    }
    // Only matching rooms and only client publishes go upstream.
    client.publish("chat:lobby", json!("not upstream")).await;
    let resp = reqwest::Client::new()
        .post(node.http("/api/v1/rooms/orders:eu/messages"))
        .json(&json!({"data": "from a backend"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // A consumer takes a batch and dies without acknowledging it.
    let mut doomed = Consumer::connect(config(&redis, "doomed")).await.unwrap();
    let taken = doomed.next_batch().await.unwrap();
    assert_eq!(
        taken.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(taken[0].data, json!({"order": 1}));
    assert_eq!(taken[0].from, client.session());
    drop(doomed);

    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = worker(
        Consumer::connect(config(&redis, "a")).await.unwrap(),
        "a",
        tx.clone(),
        |_| false,
    );
    let b = worker(
        Consumer::connect(config(&redis, "b")).await.unwrap(),
        "b",
        tx,
        |_| false,
    );
    let mut handled: HashMap<u64, Vec<(&str, u64)>> = HashMap::new();
    while handled.len() < COUNT as usize {
        let (who, msg) = tokio::time::timeout(Duration::from_secs(15), rx.recv())
            .await
            .unwrap()
            .unwrap();
        handled
            .entry(msg.offset)
            .or_default()
            .push((who, msg.attempt));
    }
    // A little longer, to catch anything handled twice.
    while let Ok(Some((who, msg))) =
        tokio::time::timeout(Duration::from_millis(800), rx.recv()).await
    {
        handled
            .entry(msg.offset)
            .or_default()
            .push((who, msg.attempt));
    }
    a.abort();
    b.abort();
    assert_eq!(
        handled.keys().copied().collect::<BTreeSet<_>>(),
        (1..=COUNT).collect(),
        "every client publish was processed"
    );
    for (offset, by) in &handled {
        assert_eq!(
            by.len(),
            1,
            "offset {offset} processed more than once: {by:?}"
        );
    }
    let by = |w: &str| handled.values().filter(|v| v[0].0 == w).count();
    assert!(
        by("a") > 0 && by("b") > 0,
        "both replicas took part (a: {}, b: {})",
        by("a"),
        by("b")
    );
    for offset in 1..=5 {
        assert_eq!(
            handled[&offset][0].1, 2,
            "offset {offset} was taken over from the dead consumer"
        );
    }
}

#[tokio::test]
async fn an_entry_that_keeps_failing_goes_to_the_dead_letter_stream() {
    let redis = RedisServer::start().await;
    let (_node, mut client) = node_and_client(&redis).await;
    for i in 1..=3 {
        client.publish("orders:eu", json!({"order": i})).await;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let w = worker(
        Consumer::connect(config(&redis, "a")).await.unwrap(),
        "a",
        tx,
        |m| m.data["order"] == 2,
    );
    let mut ok = BTreeSet::new();
    while ok.len() < 2 {
        let (_, msg) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        ok.insert(msg.offset);
    }
    assert_eq!(ok, BTreeSet::from([1, 3]));
    wait_until("order 2 to be dead-lettered", || async {
        redis
            .query::<i64>(redis::cmd("XLEN").arg("chorus:upstream-dead:orders:eu"))
            .await
            == 1
    })
    .await;
    w.abort();
    let dead: Vec<(String, Vec<(String, String)>)> = redis
        .query(
            redis::cmd("XRANGE")
                .arg("chorus:upstream-dead:orders:eu")
                .arg("-")
                .arg("+"),
        )
        .await;
    let fields: HashMap<String, String> = dead[0].1.iter().cloned().collect();
    assert_eq!(fields["data"], r#"{"order":2}"#);
    assert_eq!(fields["attempts"], "3");
    let pending: Vec<redis::Value> = redis
        .query(
            redis::cmd("XPENDING")
                .arg("chorus:upstream:orders:eu")
                .arg("billing"),
        )
        .await;
    assert_eq!(
        pending.first(),
        Some(&redis::Value::Int(0)),
        "nothing left pending"
    );
}

#[tokio::test]
async fn a_consumer_with_the_default_block_outlives_an_idle_read() {
    let redis = RedisServer::start().await;
    let (_node, mut client) = node_and_client(&redis).await;
    // The default configuration, as the example uses it: a 1 s blocking read.
    let cfg = ConsumerConfig::new(&redis.url(), "billing", "idle-0", vec!["orders:eu".into()]);
    let mut consumer = Consumer::connect(cfg).await.unwrap();
    // Nothing to read: the read waits its whole block and comes back empty
    // (not with a client-side response timeout).
    assert_eq!(consumer.next_batch().await.unwrap(), vec![]);
    client.publish("orders:eu", json!({"order": 1})).await;
    let got = consumer.next_batch().await.unwrap();
    assert_eq!(got.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![1]);
    consumer.ack(&got[0]).await.unwrap();
}
