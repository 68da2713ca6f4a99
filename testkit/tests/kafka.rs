//! The kit against a real Kafka broker: what a test relies on when it
//! restarts one (the records stay) and drops it (nothing is left running).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use chorus_testkit::KafkaBroker;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

async fn produce(kafka: &KafkaBroker, topic: &str, payload: &str) -> i64 {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let delivery = producer
        .send(
            FutureRecord::<(), _>::to(topic).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    delivery.offset
}

fn read_all(bootstrap: String, topic: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // Partitions are assigned by hand; librdkafka still wants a group.
        .set("group.id", "kit-test")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(5))
        .unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (out.len() as i64) < high && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            out.push(String::from_utf8_lossy(m.payload().unwrap()).into_owned());
        }
    }
    out
}

#[tokio::test]
async fn a_restarted_kafka_keeps_its_records_and_nothing_is_left_on_drop() {
    let started = Instant::now();
    let mut kafka = KafkaBroker::start().await;
    eprintln!("kafka ready after {:?}", started.elapsed());
    kafka.create_topic("t", 1).await;
    assert_eq!(produce(&kafka, "t", "one").await, 0);

    kafka.kill();
    let restarted = Instant::now();
    kafka.restart_kafka().await;
    eprintln!("kafka back after {:?}", restarted.elapsed());
    assert_eq!(produce(&kafka, "t", "two").await, 1);
    let bootstrap = kafka.bootstrap();
    let read = tokio::task::spawn_blocking(move || read_all(bootstrap, "t"))
        .await
        .unwrap();
    assert_eq!(read, ["one", "two"]);

    let pid = kafka.pid().unwrap();
    let dir = kafka.dir().to_owned();
    drop(kafka);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} left running"
    );
}
