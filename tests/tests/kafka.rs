//! Fan-out across nodes through a real Apache Kafka broker (KRaft, one
//! node, from `chorus_testkit::KafkaBroker`): what WebSocket clients see.
//!
//! In Kafka mode a room's offsets are positions in its partition: they
//! grow in one order everywhere, and each `message` says `prev`, so a
//! client checks that nothing is missing (`prev` ≤ the last offset it has).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use chorus_testkit::KafkaBroker;
use chorus_tests::{Publisher, WsClient, wait_until};
use serde_json::{Value, json};

/// A fresh broker with `topic` created (`partitions` of it).
async fn kafka(topic: &str, partitions: i32) -> KafkaBroker {
    let kafka = KafkaBroker::start().await;
    kafka.create_topic(topic, partitions).await;
    kafka
}

/// What a client has of each room: the offsets it got, checked against
/// each message's `prev` as it arrives.
#[derive(Default)]
struct Seen {
    last: HashMap<String, u64>,
    /// After a recovered `ok` at N: the replay (offsets up to N) comes
    /// first, and the room is then complete up to N.
    upto: HashMap<String, u64>,
    offsets: HashMap<String, Vec<u64>>,
    data: HashMap<String, Vec<Value>>,
}

impl Seen {
    /// Starts a room at the offset its subscribe's `ok` gave.
    fn start(&mut self, room: &str, ok: &Value) {
        assert_eq!(ok["op"], "ok", "{ok}");
        self.last
            .insert(room.into(), ok["offset"].as_u64().unwrap());
    }

    /// Resumes a room from `since` after a recovered `ok`.
    fn recover(&mut self, room: &str, since: u64, ok: &Value) {
        assert_eq!(
            (ok["op"].as_str(), ok["recovered"].as_bool()),
            (Some("ok"), Some(true)),
            "{ok}"
        );
        self.last.insert(room.into(), since);
        self.upto
            .insert(room.into(), ok["offset"].as_u64().unwrap());
    }

    /// Takes a `message`, asserting that nothing before it went missing.
    fn take(&mut self, m: &Value) {
        assert_eq!(m["op"], "message", "{m}");
        let room = m["room"].as_str().unwrap().to_owned();
        let (offset, prev) = (m["offset"].as_u64().unwrap(), m["prev"].as_u64().unwrap());
        let mut last = self.last.get(&room).copied().unwrap();
        if let Some(upto) = self.upto.get(&room).copied().filter(|u| offset > *u) {
            last = last.max(upto);
            self.upto.remove(&room);
        }
        assert!(
            prev <= last,
            "missed a message of {room}: had {last}, got {m}"
        );
        assert!(
            offset > last,
            "offset went back in {room}: had {last}, got {m}"
        );
        self.last.insert(room.clone(), offset);
        self.offsets.entry(room.clone()).or_default().push(offset);
        self.data.entry(room).or_default().push(m["data"].clone());
    }

    async fn read(&mut self, client: &mut WsClient, n: usize) {
        for _ in 0..n {
            let m = client.message().await;
            self.take(&m);
        }
    }
}

#[tokio::test]
async fn three_nodes_on_one_kafka_deliver_every_room_in_one_order_everywhere() {
    let kafka = kafka("rooms", 4).await;
    let nodes = chorus_tests::fleet(3, &kafka.url("rooms"), &[]).await;
    let rooms = ["lobby", "news", "chat:1"];
    let mut clients = Vec::new();
    for node in &nodes {
        let mut c = node.client().await;
        let mut seen = Seen::default();
        for room in rooms {
            let ok = c.subscribe(room).await;
            seen.start(room, &ok);
        }
        clients.push((c, seen));
    }

    // Each node publishes to every room, over WebSocket and HTTP.
    let mut acked: HashMap<&str, Vec<u64>> = HashMap::new();
    for round in 0..5 {
        for (i, node) in nodes.iter().enumerate() {
            for room in rooms {
                let data = json!({"node": i, "round": round});
                let offset = if i == 0 {
                    let ok = clients[0].0.publish(room, data).await;
                    assert_eq!(ok["op"], "ok", "{ok}");
                    ok["offset"].as_u64().unwrap()
                } else {
                    let (status, reply) = node.post_message(room, json!({ "data": data })).await;
                    assert_eq!(status, 200, "{reply}");
                    reply["offset"].as_u64().unwrap()
                };
                acked.entry(room).or_default().push(offset);
            }
        }
    }
    for (client, seen) in clients.iter_mut() {
        seen.read(client, 5 * 3 * rooms.len()).await;
    }
    // Every client has every acknowledged offset of every room, in the one
    // order, with the same data.
    let (_, first) = &clients[0];
    for room in rooms {
        let mut want = acked[room].clone();
        want.sort_unstable();
        assert_eq!(first.offsets[room], want, "{room}");
        for (_, seen) in &clients[1..] {
            assert_eq!(seen.offsets[room], first.offsets[room], "{room}");
            assert_eq!(seen.data[room], first.data[room], "{room}");
        }
    }

    // A late subscriber starts at the room's position and goes on from it.
    let mut late = nodes[2].client().await;
    let ok = late.subscribe("lobby").await;
    assert_eq!(
        ok["offset"].as_u64(),
        first.offsets["lobby"].last().copied()
    );
    let mut seen = Seen::default();
    seen.start("lobby", &ok);
    clients[1].0.publish("lobby", json!("after")).await;
    seen.read(&mut late, 1).await;
    assert_eq!(seen.data["lobby"], [json!("after")]);
}

#[tokio::test]
async fn an_idempotency_key_is_delivered_once_across_nodes() {
    let kafka = kafka("keys", 2).await;
    let nodes = chorus_tests::fleet(3, &kafka.url("keys"), &[]).await;
    let mut a = nodes[0].client().await;
    let mut b = nodes[1].client().await;
    let mut seen = Seen::default();
    seen.start("orders", &a.subscribe("orders").await);
    b.subscribe("orders").await;
    let publish = |key: &str| json!({"op": "publish", "room": "orders", "data": 1, "key": key});

    let first = a.request(publish("order-7")).await;
    assert_eq!(first["op"], "ok", "{first}");
    // The same key through a node that serves the room (and has read the
    // first): answered with the first offset. Through one that does not
    // (it cannot know): written again, and dropped by every node that
    // reads it; the next message's `prev` still chains on.
    assert_eq!(b.message().await["data"], 1);
    let again = b.request(publish("order-7")).await;
    assert_eq!(again["offset"], first["offset"], "{again}");
    let (status, blind) = nodes[2]
        .post_message("orders", json!({"data": 1, "key": "order-7"}))
        .await;
    assert_eq!(status, 200, "{blind}");
    a.publish("orders", json!(2)).await;

    seen.read(&mut a, 2).await;
    assert_eq!(seen.data["orders"], [json!(1), json!(2)]);
    assert_eq!(b.message().await["data"], 2, "the duplicate reached node 1");
}

#[tokio::test]
async fn every_acknowledged_publish_is_delivered_across_a_kafka_restart() {
    let mut kafka = kafka("restart", 1).await;
    let nodes = chorus_tests::fleet(2, &kafka.url("restart"), &["--kafka-timeout", "2s"]).await;
    let mut sub = nodes[1].client().await;
    let mut seen = Seen::default();
    seen.start("feed", &sub.subscribe("feed").await);
    let publisher = Publisher::start(nodes[0].client().await, "feed");
    publisher.wait_for(20).await;

    kafka.kill();
    wait_until("node 0 to see Kafka down", || async {
        !nodes[0].node.broker_up()
    })
    .await;
    kafka.restart_kafka().await;
    wait_until("both nodes to see Kafka back", || async {
        nodes.iter().all(|n| n.node.broker_up())
    })
    .await;
    let before = publisher.acked.load(std::sync::atomic::Ordering::SeqCst);
    // The producer reconnects after the restart; a publish in flight then
    // may end `outcome_unknown` (--kafka-timeout) before the next lands,
    // which on a busy machine takes longer than the usual bound.
    publisher
        .wait_for_within(before + 20, std::time::Duration::from_secs(60))
        .await;
    let last = publisher.stop().await;

    // Every message up to the last acknowledged one, with no gap.
    while seen.last["feed"] < last {
        let m = sub.message().await;
        seen.take(&m);
    }
    let numbers: Vec<u64> = seen.data["feed"]
        .iter()
        .map(|d| d["n"].as_u64().unwrap())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "publishes out of order: {numbers:?}"
    );
    eprintln!(
        "{} messages delivered, last offset {last}",
        seen.offsets["feed"].len()
    );
}

#[tokio::test]
async fn a_client_recovers_with_since_from_kafka_on_a_node_that_started_late() {
    let kafka = kafka("log", 1).await;
    let url = kafka.url("log");
    let first = chorus_tests::fleet(1, &url, &[]).await;
    let mut c = first[0].client().await;
    let mut seen = Seen::default();
    let ok = c.subscribe("log").await;
    seen.start("log", &ok);
    let epoch = ok["epoch"].clone();
    for i in 0..3 {
        first[0].post_message("log", json!({"data": i})).await;
    }
    seen.read(&mut c, 3).await;
    let since = seen.last["log"];
    c.close().await;

    // Missed: three of the room's messages among other rooms' records of
    // the same partition.
    for i in 3..6 {
        first[0].post_message("log", json!({"data": i})).await;
        first[0].post_message("other", json!({"data": i})).await;
    }
    let late = chorus_tests::fleet(1, &url, &[]).await;
    let mut c = late[0].client().await;
    let ok = c
        .request(
            json!({"op": "subscribe", "room": "log", "since": {"epoch": epoch, "offset": since}}),
        )
        .await;
    seen.recover("log", since, &ok);
    assert_eq!(ok["missed"], 3, "{ok}");
    seen.read(&mut c, 3).await;
    // Then live, seamlessly.
    late[0].post_message("other", json!({"data": "x"})).await;
    late[0].post_message("log", json!({"data": 6})).await;
    seen.read(&mut c, 1).await;
    let data: Vec<Value> = seen.data["log"].clone();
    assert_eq!(data, (0..7).map(|i| json!(i)).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_position_older_than_retention_is_history_gone() {
    let kafka = kafka("short", 1).await;
    let nodes = chorus_tests::fleet(1, &kafka.url("short"), &[]).await;
    let mut c = nodes[0].client().await;
    let ok = c.subscribe("log").await;
    let epoch = ok["epoch"].clone();
    for i in 0..4 {
        nodes[0].post_message("log", json!({"data": i})).await;
    }
    // Retention removes the first two records.
    kafka.delete_records("short", 0, 2).await;
    let mut late = nodes[0].client().await;
    let ok = late
        .request(json!({"op": "subscribe", "room": "log", "since": {"epoch": epoch, "offset": 1}}))
        .await;
    assert_eq!(
        (ok["recovered"].as_bool(), ok["code"].as_str()),
        (Some(false), Some("history_gone")),
        "{ok}"
    );
    // From what is still kept, it recovers.
    let mut again = nodes[0].client().await;
    let ok = again
        .request(json!({"op": "subscribe", "room": "log", "since": {"epoch": epoch, "offset": 2}}))
        .await;
    assert_eq!(
        (ok["recovered"].as_bool(), ok["missed"].as_u64()),
        (Some(true), Some(2)),
        "{ok}"
    );
}

#[tokio::test]
async fn a_node_reads_only_the_partitions_of_the_rooms_it_serves() {
    // The node creates the topic it does not find.
    let kafka = KafkaBroker::start().await;
    let nodes = chorus_tests::fleet(1, &kafka.url("spread"), &["--kafka-partitions", "8"]).await;
    let node = &nodes[0];
    let read = || node.metric("chorus_kafka_partitions_read");
    assert_eq!(read().await, 0.0);
    let mut c = node.client().await;
    let ok = c.subscribe("one").await;
    assert_eq!(ok["op"], "ok", "{ok}");
    assert_eq!(read().await, 1.0);
    // Publishing to other rooms (all over the 8 partitions) reads nothing more.
    let mut epochs = std::collections::HashSet::new();
    for i in 0..20 {
        let (_, ok) = node
            .post_message(&format!("r{i}"), json!({"data": i}))
            .await;
        epochs.insert(ok["epoch"].as_str().unwrap().to_owned());
    }
    assert!(epochs.len() > 4, "{epochs:?}");
    assert_eq!(read().await, 1.0);
    c.request(json!({"op": "unsubscribe", "room": "one"})).await;
    wait_until("the partition to be dropped", || async {
        read().await == 0.0
    })
    .await;
}
