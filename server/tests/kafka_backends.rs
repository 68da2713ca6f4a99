//! Kafka between Chorus and its backends, against one real Apache Kafka
//! broker (`chorus_testkit::KafkaBroker`, started once for the whole file:
//! the steps run one after the other in one test, each on topics and
//! consumer groups of its own):
//!
//! - ingest (`--kafka-ingest`): backend records reach WebSocket subscribers
//!   on two nodes in partition order; poison records go to the dead-letter
//!   topic without holding up their partition; the lag goes back to 0; a
//!   node killed mid-stream and restarted delivers every record once;
//! - the feed (`--upstream-rooms` + `--upstream-kafka`): consumers of one
//!   group share the records, and a member that dies mid-batch has its
//!   batch redelivered to the other;
//! - `examples/kafka_to_postgres.rs`, killed and restarted, leaves every
//!   message exactly once in PostgreSQL.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chorus_server::ingest::{REASON_HEADER, SOURCE_OFFSET_HEADER};
use chorus_server::upstream::{OFFSET_HEADER, ROOM_HEADER, UpstreamRecord};
use chorus_testkit::{ChildGuard, KafkaBroker, Postgres};
use chorus_tests::{Event, TestNode, WsClient, spawn_server};
use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// How long a step waits for what Kafka does in its own time (a group
/// rebalance after a member died waits for its session to expire: 10 s).
const SLOW: Duration = Duration::from_secs(60);

#[tokio::test]
async fn kafka_ingest_and_feed_to_backends() {
    let kafka = KafkaBroker::start().await;
    kafka.create_topic("rooms", 4).await;
    step(
        "ingest keeps partition order on two nodes, poison records go to the dead-letter topic",
        ingest_order_and_poison(&kafka),
    )
    .await;
    step(
        "a killed ingesting node restarted delivers every record once",
        ingest_survives_a_killed_node(&kafka),
    )
    .await;
    step(
        "feed consumers share the records and take over a dead member's batch",
        feed_consumer_group(&kafka),
    )
    .await;
    step(
        "the kafka_to_postgres example stores every message once across its crash",
        example_to_postgres(&kafka),
    )
    .await;
}

async fn step(name: &str, run: impl Future<Output = ()>) {
    let start = Instant::now();
    eprintln!("step: {name}");
    run.await;
    eprintln!(
        "step done in {:.1} s: {name}",
        start.elapsed().as_secs_f64()
    );
}

// ---- helpers ----------------------------------------------------------------

fn ingest_url(kafka: &KafkaBroker, topic: &str) -> String {
    format!("kafka://{}/{topic}", kafka.bootstrap())
}

fn producer(kafka: &KafkaBroker) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create()
        .unwrap()
}

/// Produces one record and waits for Kafka's acknowledgement.
async fn produce(
    p: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: Option<&str>,
    value: &str,
    headers: &[(&str, &str)],
) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut record = FutureRecord::<str, str>::to(topic)
        .payload(value)
        .headers(h);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    p.send(record, Duration::from_secs(10)).await.unwrap();
}

/// A consumer in `group` that commits only by hand, from the first record.
fn consumer(kafka: &KafkaBroker, group: &str, topic: &str) -> Arc<StreamConsumer> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    Arc::new(c)
}

fn header<'m>(m: &'m OwnedMessage, name: &str) -> Option<&'m str> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

async fn wait_for<T>(what: &str, limit: Duration, check: impl AsyncFnMut() -> Option<T>) -> T {
    chorus_testkit::wait::until(what, limit, check)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `chorus_kafka_ingest_lag{topic="<topic>",…}` samples in a metrics text.
fn lags(text: &str, topic: &str) -> Vec<f64> {
    let prefix = format!("chorus_kafka_ingest_lag{{topic=\"{topic}\"");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// The next `message` frame, waiting up to `limit`.
async fn message_within(client: &mut WsClient, limit: Duration) -> Value {
    if !client.pending().is_empty() {
        return client.message().await;
    }
    match client.read_event(limit).await {
        Some(Event::Frame(m)) => {
            assert_eq!(m["op"], "message", "{m}");
            m
        }
        other => panic!("no message within {limit:?}: {other:?}"),
    }
}

/// Reads `n` messages and returns each room's `data.n` values in order.
async fn read_ns(client: &mut WsClient, n: usize, limit: Duration) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..n {
        let m = message_within(client, limit).await;
        out.entry(m["room"].as_str().unwrap().to_owned())
            .or_default()
            .push(m["data"]["n"].as_u64().unwrap());
    }
    out
}

// ---- ingest -----------------------------------------------------------------

async fn ingest_order_and_poison(kafka: &KafkaBroker) {
    kafka.create_topic("orders", 2).await;
    let ingest = ingest_url(kafka, "orders");
    let nodes = chorus_tests::fleet(
        2,
        &kafka.url("rooms"),
        &["--kafka-ingest", &ingest, "--kafka-ingest-group", "order"],
    )
    .await;
    let (a, b) = (&nodes[0], &nodes[1]);
    // The group has settled when each node reads one of the two partitions.
    wait_for("each node to be assigned a partition", SLOW, async || {
        let (ta, tb) = (a.node.metrics.render(), b.node.metrics.render());
        (lags(&ta, "orders").len() == 1 && lags(&tb, "orders").len() == 1).then_some(())
    })
    .await;
    let mut clients = Vec::new();
    for node in [a, b] {
        let mut c = node.client().await;
        c.subscribe("orders:1").await;
        c.subscribe("orders:2").await;
        clients.push(c);
    }
    let p = producer(kafka);
    const N: u64 = 20;
    for n in 1..=N {
        for room in ["orders:1", "orders:2"] {
            produce(
                &p,
                "orders",
                None,
                Some(room),
                &json!({ "n": n }).to_string(),
                &[],
            )
            .await;
        }
    }
    let want: Vec<u64> = (1..=N).collect();
    for c in clients.iter_mut() {
        let got = read_ns(c, 2 * N as usize, SLOW).await;
        assert_eq!(got["orders:1"], want);
        assert_eq!(got["orders:2"], want);
    }

    // Poison records between good ones in one partition: the good ones
    // come through in order, the others land in the dead-letter topic.
    let room = "orders:1";
    type Record<'a> = (Option<&'a str>, &'a str, &'a [(&'a str, &'a str)]);
    let records: [Record; 5] = [
        (Some(room), r#"{"n":101}"#, &[]),
        (None, "no room at all", &[]),
        (Some("bad room"), r#"{"n":0}"#, &[]),
        (Some("ignored"), r#"{"n":102}"#, &[(ROOM_HEADER, room)]),
        (Some(room), r#"{"n":103}"#, &[]),
    ];
    for (key, value, headers) in records {
        produce(&p, "orders", Some(0), key, value, headers).await;
    }
    for c in clients.iter_mut() {
        let got = read_ns(c, 3, SLOW).await;
        assert_eq!(got[room], [101, 102, 103]);
    }
    let dead = consumer(kafka, "dead-letter-reader", "orders.dead-letter");
    let mut reasons = Vec::new();
    let mut sources = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(SLOW, dead.recv())
            .await
            .unwrap()
            .unwrap()
            .detach();
        reasons.push(header(&m, REASON_HEADER).unwrap().to_owned());
        sources.push(
            header(&m, SOURCE_OFFSET_HEADER)
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
        if reasons.len() == 1 {
            assert_eq!(m.payload(), Some(&b"no room at all"[..]));
        }
    }
    assert!(reasons[0].contains("no room"), "{reasons:?}");
    assert!(reasons[1].contains("room `bad room`"), "{reasons:?}");
    assert_eq!(sources[1], sources[0] + 1);
    wait_for("the lag to be 0 on both nodes", SLOW, async || {
        let (ta, tb) = (a.node.metrics.render(), b.node.metrics.render());
        let all: Vec<f64> = lags(&ta, "orders")
            .into_iter()
            .chain(lags(&tb, "orders"))
            .collect();
        (all.len() == 2 && all.iter().all(|l| *l == 0.0)).then_some(())
    })
    .await;
    let dead_lettered = a.node.metrics.kafka_ingest_dead_lettered.get()
        + b.node.metrics.kafka_ingest_dead_lettered.get();
    assert_eq!(dead_lettered, 2);
}

async fn ingest_survives_a_killed_node(kafka: &KafkaBroker) {
    kafka.create_topic("events", 1).await;
    let rooms = kafka.url("rooms");
    let mut doomed = spawn_server(
        env!("CARGO_BIN_EXE_chorus-server"),
        &[
            "--broker",
            &rooms,
            "--node-id",
            "doomed",
            "--kafka-ingest",
            &ingest_url(kafka, "events"),
            "--kafka-ingest-group",
            "crash",
        ],
        &[],
    )
    .await;
    let viewer = TestNode::start(&["--broker", &rooms, "--node-id", "viewer"]).await;
    wait_for("the viewer to connect", SLOW, async || {
        viewer.node.ready().is_ok().then_some(())
    })
    .await;
    let mut client = viewer.client().await;
    client.subscribe("events:1").await;
    // One burst: the node takes the records in large batches and commits
    // each batch's offsets once all of it is published, so the kill falls
    // between publishes and their commit.
    const N: u64 = 400;
    let p = producer(kafka);
    futures_util::future::join_all((1..=N).map(|n| {
        let value = json!({ "n": n }).to_string();
        let p = &p;
        async move { produce(p, "events", None, Some("events:1"), &value, &[]).await }
    }))
    .await;
    let ingested = async |node: &chorus_testkit::ChorusServer| {
        chorus_tests::metric(
            &format!("{}/metrics", node.http_base()),
            "chorus_kafka_ingested_total",
        )
        .await
    };
    let mut got = Vec::new();
    while got.len() < 50 {
        got.push(
            message_within(&mut client, SLOW).await["data"]["n"]
                .as_u64()
                .unwrap(),
        );
    }
    let before = ingested(&doomed).await;
    // What tells the ingest's `up` gauge apart from "no ingest" (alerts).
    assert_eq!(
        chorus_tests::metric(
            &format!("{}/metrics", doomed.http_base()),
            "chorus_kafka_ingest_topics",
        )
        .await,
        1.0
    );
    assert_eq!(
        viewer.metric("chorus_kafka_ingest_topics").await,
        0.0,
        "a node without --kafka-ingest"
    );
    doomed.kill();
    doomed.restart().await;
    while got.len() < N as usize {
        got.push(
            message_within(&mut client, SLOW).await["data"]["n"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(
        got,
        (1..=N).collect::<Vec<_>>(),
        "each record once, in order"
    );
    // Records published before the kill but not committed were published
    // again after the restart; their keys kept them from the subscriber.
    let again = before + ingested(&doomed).await - N as f64;
    eprintln!("records published again after the restart: {again}");
    assert!(again > 0.0, "the kill fell between two batches");
    // Nothing after the last: redelivered records were not delivered again.
    client.sync().await;
    assert!(client.pending().is_empty(), "{:?}", client.pending());
}

// ---- the feed -------------------------------------------------------------

/// A feed consumer: reports what it received and commits it, until told to
/// hold its commits (then it dies mid-batch when dropped).
struct Member {
    consumer: Option<Arc<StreamConsumer>>,
    hold: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Member {
    fn start(
        kafka: &KafkaBroker,
        name: &'static str,
        report: mpsc::UnboundedSender<(&'static str, UpstreamRecord, bool)>,
    ) -> Self {
        let consumer = consumer(kafka, "billing", "upstream");
        let hold = Arc::new(AtomicBool::new(false));
        let (c, h) = (consumer.clone(), hold.clone());
        let task = tokio::spawn(async move {
            loop {
                let m = c.recv().await.unwrap();
                let owned = m.detach();
                let record: UpstreamRecord =
                    serde_json::from_slice(owned.payload().unwrap()).unwrap();
                assert_eq!(header(&owned, ROOM_HEADER), Some(record.room.as_str()));
                let offset = record.offset.to_string();
                assert_eq!(header(&owned, OFFSET_HEADER), Some(offset.as_str()));
                let committed = !h.load(Ordering::SeqCst);
                if committed {
                    c.commit_message(&m, CommitMode::Sync).unwrap();
                }
                if report.send((name, record, committed)).is_err() {
                    return;
                }
            }
        });
        Self {
            consumer: Some(consumer),
            hold,
            task,
        }
    }

    fn partitions(&self) -> usize {
        self.consumer
            .as_ref()
            .map_or(0, |c| c.assignment().map_or(0, |a| a.count()))
    }

    /// Dies: no more commits, the consumer closed without committing.
    fn kill(mut self) {
        self.task.abort();
        drop(self.consumer.take());
    }
}

async fn feed_consumer_group(kafka: &KafkaBroker) {
    kafka.create_topic("upstream", 4).await;
    let node = TestNode::start(&[
        "--upstream-rooms",
        "orders:*",
        "--upstream-kafka",
        &format!("kafka://{}/upstream", kafka.bootstrap()),
    ])
    .await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = Member::start(kafka, "a", tx.clone());
    let b = Member::start(kafka, "b", tx);
    wait_for("both members to be assigned partitions", SLOW, async || {
        (a.partitions() + b.partitions() == 4 && a.partitions() > 0 && b.partitions() > 0)
            .then_some(())
    })
    .await;
    let mut client = node.client().await;
    let rooms: Vec<String> = (0..12).map(|i| format!("orders:{i}")).collect();
    let mut publish_all = async |from: u64, to: u64| {
        let mut sent = BTreeSet::new();
        for n in from..to {
            let room = &rooms[n as usize % rooms.len()];
            let ok = client.publish(room, json!({ "n": n })).await;
            assert_eq!(ok["op"], "ok", "{ok}");
            sent.insert((room.clone(), ok["offset"].as_u64().unwrap()));
        }
        sent
    };
    // HTTP publishes come from backends: they are not fed back to them.
    let (status, _) = node
        .post_message("orders:0", json!({"data": "from a backend"}))
        .await;
    assert_eq!(status, 200);

    let sent = publish_all(0, 40).await;
    let mut by: BTreeMap<&str, BTreeSet<(String, u64)>> = BTreeMap::new();
    while by.values().map(BTreeSet::len).sum::<usize>() < sent.len() {
        let (name, r, _) = tokio::time::timeout(SLOW, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            by.entry(name)
                .or_default()
                .insert((r.room.clone(), r.offset)),
            "{name} got {} {} twice",
            r.room,
            r.offset
        );
    }
    let (got_a, got_b) = (&by["a"], &by["b"]);
    assert!(got_a.is_disjoint(got_b), "{got_a:?} {got_b:?}");
    assert_eq!(&got_a.union(got_b).cloned().collect::<BTreeSet<_>>(), &sent);

    // `a` stops committing, gets part of the next batch, and dies.
    a.hold.store(true, Ordering::SeqCst);
    let sent = publish_all(40, 80).await;
    let mut held = BTreeSet::new();
    let mut done = BTreeSet::new();
    loop {
        let (name, r, committed) = tokio::time::timeout(SLOW, rx.recv())
            .await
            .unwrap()
            .unwrap();
        let id = (r.room.clone(), r.offset);
        if name == "a" {
            assert!(!committed);
            held.insert(id);
        } else {
            done.insert(id);
        }
        if !held.is_empty() && held.len() + done.len() >= sent.len() {
            break;
        }
    }
    a.kill();
    // `b` takes over a's partitions from a's last commit: it gets a's
    // uncommitted batch again, and with it everything sent.
    while !sent.is_subset(&done) {
        let (name, r, _) = tokio::time::timeout(SLOW, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(name, "b");
        done.insert((r.room, r.offset));
    }
    assert!(held.is_subset(&done), "a's batch was redelivered to b");
    b.kill();
}

// ---- the example ------------------------------------------------------------

/// The example's binary, built (or found up to date) by cargo: `cargo test`
/// builds examples, but not with `--test kafka_backends` alone.
fn example(name: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--quiet", "-p", "chorus-server", "--example", name])
        .status()
        .unwrap();
    assert!(status.success(), "cargo build --example {name}");
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

async fn example_to_postgres(kafka: &KafkaBroker) {
    kafka.create_topic("feed", 3).await;
    let pg = Postgres::start().await;
    let node = TestNode::start(&[
        "--upstream-rooms",
        "chat:*",
        "--upstream-kafka",
        &format!("kafka://{}/feed", kafka.bootstrap()),
    ])
    .await;
    let exe = example("kafka_to_postgres");
    let run = |extra: &[&str]| {
        let child = std::process::Command::new(&exe)
            .args([
                "--kafka",
                &format!("kafka://{}/feed", kafka.bootstrap()),
                "--group",
                "archive",
                "--postgres",
                &pg.dsn(),
                "--batch",
                "16",
            ])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        ChildGuard(child)
    };
    let db = pg.client().await;
    let count = async || -> i64 {
        db.query_opt("SELECT count(*) FROM chorus_messages", &[])
            .await
            .ok()
            .flatten()
            .map_or(0, |r| r.get(0))
    };
    // The first run crashes after its third batch is in the table and
    // before its offsets are committed in Kafka.
    let mut archiver = run(&["--crash-after", "3"]);
    let mut client = node.client().await;
    const N: u64 = 300;
    let mut sent = BTreeSet::new();
    for n in 0..N {
        let room = format!("chat:{}", n % 5);
        let ok = client.publish(&room, json!({ "n": n })).await;
        assert_eq!(ok["op"], "ok", "{ok}");
        sent.insert((room, ok["offset"].as_u64().unwrap() as i64));
        if n == N / 2 {
            let crashed = wait_for("the example to crash", SLOW, async || {
                archiver.0.try_wait().unwrap()
            })
            .await;
            assert!(!crashed.success(), "{crashed}");
            let stored = count().await;
            assert!(stored >= 3, "{stored} rows");
            archiver = run(&[]);
        }
    }
    wait_for("every message to be stored", SLOW, async || {
        (count().await == N as i64).then_some(())
    })
    .await;
    let rows = db
        .query("SELECT room, \"offset\" FROM chorus_messages", &[])
        .await
        .unwrap();
    let stored: BTreeSet<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(stored, sent);
    drop(archiver);
}
