//! Step 11: `delivery: kafka` on an external Kafka. A real broker (the
//! test kit's: Apache Kafka, KRaft, one node) runs on this machine,
//! listening on and advertising the node's IP, so the pods of the one-node
//! cluster reach it as they would a Kafka outside the cluster.
//!
//! `examples/kafka.yaml`, pointed at it, comes up Ready with no Redis at
//! all; messages published on either of two server pods reach both in one
//! order; `status.kafka` says the pods reach Kafka; with `spec.upstream`
//! every acknowledged publish is also on the feed topic, read back from
//! this machine as a backend's consumer would; with `spec.ingest` records a
//! backend writes to a topic reach the room's subscribers, in order. Kafka
//! is then killed:
//! the status and `KafkaReachable` say so, naming the pods and why, `Ready`
//! turns False and the pods' readiness fails. Kafka is started again: the
//! cluster is Ready again, and every publish acknowledged through all of it
//! reached every subscriber.

use chorus_crds::KafkaStatus;
use chorus_testkit::KafkaBroker;
use k8s_openapi::api::core::v1::Node;

use super::faults::{Publisher, conditions_of, nothing_silently_missed};
use super::*;

const KAFKA_MC: &str = "chat-kafka";
const ROOM: &str = "e2e-kafka";
/// The feed's topic: the default for `spec.upstream` on Kafka.
const FEED_TOPIC: &str = "chorus-chat-kafka-upstream";
/// The topic `spec.ingest` reads.
const INGEST_TOPIC: &str = "e2e-ingest";
/// The bootstrap server `examples/kafka.yaml` names, replaced by ours.
const EXAMPLE_BOOTSTRAP: &str = "my-kafka-kafka-bootstrap.kafka.svc:9092";

fn kafka_selector(component: &str) -> String {
    format!("app.kubernetes.io/instance={KAFKA_MC},app.kubernetes.io/component={component}")
}

/// The node's InternalIP: an address of this machine the pods reach.
async fn node_ip(run: &Run) -> String {
    let nodes = Api::<Node>::all(run.client.clone())
        .list(&Default::default())
        .await
        .unwrap();
    nodes
        .items
        .iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
        .expect("a node with an InternalIP")
}

async fn kafka_status(run: &Run) -> Option<KafkaStatus> {
    Api::<MessagingCluster>::namespaced(run.client.clone(), &run.ns)
        .get(KAFKA_MC)
        .await
        .ok()?
        .status?
        .kafka
}

/// Condition `type_` of the Kafka cluster: (status, reason).
async fn condition(run: &Run, type_: &str) -> Option<(String, String)> {
    conditions_of(run, KAFKA_MC).await.remove(type_)
}

async fn wait_ready(run: &Run) {
    kubectl(&[
        "wait",
        &run.ns_flag(),
        "--for=condition=Ready",
        &format!("mc/{KAFKA_MC}"),
        "--timeout=300s",
    ])
    .await;
}

/// `examples/kafka.yaml` with our Kafka, two pods, and no session
/// affinity (every test client comes from this machine's IP: without it
/// they would all land on one pod).
fn manifest(bootstrap: &str) -> String {
    let example = std::fs::read_to_string(repo().join("examples/kafka.yaml")).unwrap();
    assert!(
        example.contains(EXAMPLE_BOOTSTRAP) && example.contains("  replicas: 3\n"),
        "examples/kafka.yaml changed: update this step"
    );
    let ours = example
        .replace(EXAMPLE_BOOTSTRAP, bootstrap)
        .replace("  replicas: 3\n", "  replicas: 2\n");
    format!(
        "{ours}\n  service:\n    sessionAffinity:\n      type: None\n  upstream:\n    rooms: [\"{ROOM}\"]\n  ingest:\n    topics: [\"{INGEST_TOPIC}\"]\n"
    )
}

pub async fn kafka_delivery(run: &Run) {
    let ip = node_ip(run).await;
    let t = Instant::now();
    let mut kafka = KafkaBroker::launch_on(&ip)
        .await
        .unwrap_or_else(|e| panic!("Kafka on the node IP {ip}: {e}"));
    run.timed("Kafka started on the node IP", t.elapsed());
    say(format!("Kafka at {}", kafka.bootstrap()));

    kafka.create_topic(INGEST_TOPIC, 2).await;
    let t = Instant::now();
    let path = repo().join("target/e2e-kafka.yaml");
    std::fs::write(&path, manifest(&kafka.bootstrap())).unwrap();
    kubectl(&["apply", &run.ns_flag(), "-f", path.to_str().unwrap()]).await;
    wait_ready(run).await;
    run.timed("Kafka fleet Ready after kubectl apply", t.elapsed());

    // No Redis of its own: no group, no password, no policy around it.
    let owned = kubectl(&[
        "get",
        &run.ns_flag(),
        "statefulsets,secrets,networkpolicies,configmaps",
        "-l",
        &format!("app.kubernetes.io/instance={KAFKA_MC}"),
        "-o",
        "name",
    ])
    .await;
    assert!(
        owned
            .lines()
            .all(|o| !o.starts_with("statefulset") && !o.contains("redis")),
        "Redis objects on Kafka: {owned}"
    );
    let seen = eventually(
        "status.kafka to say both pods reach Kafka",
        POD_WAIT,
        || async {
            kafka_status(run)
                .await
                .filter(|k| k.reachable && k.pods_reaching == 2)
        },
    )
    .await;
    say(format!(
        "status.kafka: {}",
        serde_json::to_string(&seen).unwrap()
    ));
    assert_eq!(seen.bootstrap_servers, [kafka.bootstrap()]);
    assert_eq!(seen.topic, "chorus-chat");
    assert_eq!(
        condition(run, "KafkaReachable").await,
        Some(("True".to_owned(), "KafkaReachable".to_owned()))
    );
    assert_eq!(condition(run, "RedisReady").await, None);

    let published = one_order_on_two_pods(run).await;
    fed_to_backends(run, &kafka, &published).await;
    ingested_from_backends(run, &kafka).await;
    outage(run, &mut kafka).await;

    let t = Instant::now();
    kubectl(&[
        "delete",
        &run.ns_flag(),
        &format!("mc/{KAFKA_MC}"),
        "--wait=true",
        "--timeout=120s",
    ])
    .await;
    run.timed("Kafka fleet deleted", t.elapsed());
}

/// Clients on each of the two pods; publishes from both, alternating: both
/// get every message in one order, each one's `prev` no later than the
/// message before it (nothing missed). Returns each acknowledged publish's
/// (offset, n).
async fn one_order_on_two_pods(run: &Run) -> Vec<(u64, u64)> {
    let servers = ready_pods(&run.client, &run.ns, &kafka_selector("server"), 2, POD_WAIT).await;
    let mut clients = Vec::new();
    for pod in &servers {
        let ip = pod_ip(pod).unwrap();
        let mut c = WsClient::connect(&format!("ws://{ip}:8080/ws"))
            .await
            .unwrap();
        assert_eq!(c.welcome["node"], name(pod), "welcome names the pod");
        c.subscribe(ROOM).await;
        clients.push(c);
    }
    const N: usize = 20;
    let mut published = Vec::new();
    for n in 0..N {
        let reply = clients[n % 2].publish(ROOM, json!({"n": n})).await;
        assert_eq!(reply["op"], "ok", "{reply}");
        published.push((reply["offset"].as_u64().unwrap(), n as u64));
    }
    let mut orders = Vec::new();
    for c in &mut clients {
        let mut order = Vec::new();
        let mut last: Option<u64> = None;
        for _ in 0..N {
            let m = c.message().await;
            let (offset, prev) = (m["offset"].as_u64().unwrap(), m["prev"].as_u64().unwrap());
            if let Some(last) = last {
                assert!(offset > last, "offsets went back: {last} then {m}");
                assert!(prev <= last, "a message missed between {last} and {m}");
            }
            last = Some(offset);
            order.push((m["epoch"].clone(), offset, m["data"]["n"].as_u64().unwrap()));
        }
        orders.push(order);
    }
    assert_eq!(orders[0], orders[1], "one order on both pods");
    let numbers: Vec<u64> = orders[0].iter().map(|(_, _, n)| *n).collect();
    assert_eq!(
        numbers,
        (0..N as u64).collect::<Vec<_>>(),
        "in publish order"
    );
    for c in clients {
        c.close().await;
    }
    published
}

/// The feed for backends (`spec.upstream` on Kafka): a consumer group on
/// this machine reads the feed topic the pods wrote and finds every
/// acknowledged publish once, keyed by its room, in publish order, with the
/// offset its `ok` gave.
async fn fed_to_backends(run: &Run, kafka: &KafkaBroker, published: &[(u64, u64)]) {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let t = Instant::now();
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", "e2e-backend")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[FEED_TOPIC]).unwrap();
    let mut fed = Vec::new();
    while fed.len() < published.len() {
        let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("the feed topic {FEED_TOPIC} stopped after {fed:?}, expected {published:?}")
            })
            .unwrap();
        assert_eq!(m.key(), Some(ROOM.as_bytes()), "keyed by room");
        let record: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(record["room"], ROOM, "{record}");
        fed.push((
            record["offset"].as_u64().unwrap(),
            record["data"]["n"].as_u64().unwrap(),
        ));
    }
    assert_eq!(
        fed, published,
        "the feed holds what was acknowledged, once, in order"
    );
    run.timed(
        "the feed topic read back by a backend's consumer",
        t.elapsed(),
    );
}

/// The ingest (`spec.ingest`): a backend writes records keyed by the room
/// to the ingested topic from this machine; a subscriber on a server pod
/// gets each once, as the room's messages, in the order written.
async fn ingested_from_backends(run: &Run, kafka: &KafkaBroker) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let servers = ready_pods(&run.client, &run.ns, &kafka_selector("server"), 2, POD_WAIT).await;
    let ip = pod_ip(&servers[0]).unwrap();
    let mut c = WsClient::connect(&format!("ws://{ip}:8080/ws"))
        .await
        .unwrap();
    c.subscribe(ROOM).await;
    let t = Instant::now();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()
        .unwrap();
    const N: u64 = 5;
    for n in 1000..1000 + N {
        let value = json!({"n": n}).to_string();
        let record = FutureRecord::to(INGEST_TOPIC).key(ROOM).payload(&value);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {INGEST_TOPIC}: {e}"));
    }
    let got: Vec<u64> = {
        let mut got = Vec::new();
        for _ in 0..N {
            got.push(c.message().await["data"]["n"].as_u64().unwrap());
        }
        got
    };
    assert_eq!(
        got,
        (1000..1000 + N).collect::<Vec<_>>(),
        "ingested once, in order"
    );
    run.timed(
        "records written to the ingested topic until the subscriber had them",
        t.elapsed(),
    );
    c.close().await;
}

/// Kafka killed under traffic, then started again.
async fn outage(run: &Run, kafka: &mut KafkaBroker) {
    let service = run.service_ip_of(KAFKA_MC).await;
    let again = format!("ws://{service}:80/ws");
    let followers: Vec<Follower> = (0..2)
        .map(|_| Follower::start(again.clone(), again.clone(), ROOM))
        .collect();
    all_subscribed(&followers).await;
    publish_marker(&service, ROOM, "kafka-start").await;
    all_saw(&followers, "kafka-start", Duration::from_secs(30)).await;
    let publisher = Publisher::unkeyed(
        format!("http://{service}/api/v1/rooms/{ROOM}/messages"),
        Duration::from_millis(100),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let t = Instant::now();
    kafka.kill();
    let down = eventually(
        "status.kafka and KafkaReachable to say Kafka is unreachable",
        POD_WAIT,
        || async {
            let k = kafka_status(run).await.filter(|k| !k.reachable)?;
            let (status, reason) = condition(run, "KafkaReachable").await?;
            (status == "False" && reason == "KafkaUnreachable").then_some(k)
        },
    )
    .await;
    run.timed("Kafka killed until the status says so", t.elapsed());
    say(format!(
        "status.kafka while down: {}",
        serde_json::to_string(&down).unwrap()
    ));
    assert_eq!(down.pods_reaching, 0);
    assert!(
        down.message.contains("broker kafka unavailable"),
        "the pods' reason is named: {}",
        down.message
    );
    eventually(
        "Ready to turn False and a server pod's readiness to fail",
        POD_WAIT,
        || async {
            let (ready, _) = condition(run, "Ready").await?;
            let servers = pods(&run.client, &run.ns, &kafka_selector("server")).await;
            (ready == "False" && servers.iter().any(|p| !is_ready(p))).then_some(())
        },
    )
    .await;

    let t = Instant::now();
    kafka.restart_kafka().await;
    wait_ready(run).await;
    eventually("status.kafka to say Kafka is back", POD_WAIT, || async {
        kafka_status(run).await.filter(|k| k.reachable)
    })
    .await;
    run.timed("Kafka restarted until the cluster is Ready", t.elapsed());

    // Every acknowledged publish reached every subscriber.
    let acked = publisher.finish().await;
    publish_marker(&service, ROOM, "kafka-end").await;
    all_saw(&followers, "kafka-end", Duration::from_secs(60)).await;
    for (i, f) in followers.into_iter().enumerate() {
        nothing_silently_missed(i, &f.finish().await, &acked);
    }
    say(format!(
        "{} publishes acknowledged across the Kafka outage",
        acked.len()
    ));
}
