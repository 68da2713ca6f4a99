//! Ingest from backend Kafka topics (`--kafka-ingest`): a consumer group
//! whose records are published to their rooms through the node's publish
//! path, so it works with any `--broker`.
//!
//! - **Room**: the header `chorus-room`, else the record key (UTF-8).
//! - **Idempotency key**: the header `chorus-idempotency-key`, else
//!   `<topic>/<partition>/<offset>`, so a record redelivered after a crash
//!   (its offset was not committed yet) is not delivered twice within
//!   `--idempotency-window`.
//! - **data**: the record's value if it is JSON, else the value as a JSON
//!   string (it must be UTF-8).
//!
//! **At-least-once, in partition order.** Records come in batches (what the
//! consumer has at hand, up to [`BATCH`]); a batch's partitions are handled
//! side by side, each partition's records one after the other: a record is
//! published only once the previous one of its partition was acknowledged
//! (or dead-lettered). The batch's offsets are committed after that.
//!
//! **Failures.** A record that can never be published (no room, a room
//! name or key the protocol refuses, no value or one that is not UTF-8,
//! over `--max-frame-bytes`) goes to the dead-letter topic at once. A
//! publish that fails (a timeout, an overloaded broker, `outcome_unknown`)
//! is tried again with the same key, up to `--kafka-ingest-attempts` in all,
//! then the record goes to the dead-letter topic. While the broker is
//! unavailable, records wait (that is not the record's fault): the
//! partition resumes when it is back. A dead-letter record has the
//! original's key, value and headers, plus `chorus-dead-letter-reason`,
//! `-topic`, `-partition`, `-offset` and `-attempts`; the partition moves on
//! once Kafka acknowledged it.
//!
//! `/readyz` does not depend on the ingest (the node still serves its
//! clients); `chorus_kafka_ingest_up` and the logs tell.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::value::RawValue;
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

use crate::broker::kafka::{
    KafkaUrl, UrlError, acknowledged, create_topic, header, reliable_producer,
};
use crate::broker::{BrokerError, PublishRequest};
use crate::config::Config;
use crate::metrics::{Metrics, TopicPartition};
use crate::node::Node;
use crate::protocol::{RoomName, check_key};
use crate::sync::lock;
use crate::upstream::{IDEMPOTENCY_KEY_HEADER, ROOM_HEADER};

/// Records taken from the consumer at once at most.
pub const BATCH: usize = 256;
/// Longest ingested topic name: the default idempotency key
/// (`<topic>/<partition>/<offset>`) must fit in a key's 128 characters.
pub const MAX_TOPIC_CHARS: usize = 96;
/// Suffix of the default dead-letter topic.
pub const DEAD_LETTER_SUFFIX: &str = ".dead-letter";
/// How often the lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// Longest wait between two tries of a record.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Session timeout of the group membership: a node that died loses its
/// partitions to the others after this long.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Dead-letter headers.
pub const REASON_HEADER: &str = "chorus-dead-letter-reason";
pub const SOURCE_TOPIC_HEADER: &str = "chorus-dead-letter-topic";
pub const SOURCE_PARTITION_HEADER: &str = "chorus-dead-letter-partition";
pub const SOURCE_OFFSET_HEADER: &str = "chorus-dead-letter-offset";
pub const ATTEMPTS_HEADER: &str = "chorus-dead-letter-attempts";

/// What the ingest needs from the configuration.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// `bootstrap.servers`.
    pub servers: String,
    pub topics: Vec<String>,
    pub group: String,
    pub attempts: u32,
    /// One dead-letter topic for all; `None`: `<topic>.dead-letter` each.
    pub dead_letter: Option<String>,
    pub node_id: String,
    pub max_data_bytes: usize,
    pub op_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Not a source: the message already says it, once.
    #[error("--kafka-ingest: {0}")]
    Url(UrlError),
    #[error("--kafka-ingest: topic `{0}` is longer than {MAX_TOPIC_CHARS} characters")]
    TopicTooLong(String),
    #[error("--kafka-ingest-dead-letter: {0}")]
    DeadLetter(UrlError),
    /// Not a source either (rdkafka's message is all there is to say).
    #[error("--kafka-ingest: {0}")]
    Kafka(KafkaError),
}

impl From<KafkaError> for IngestError {
    fn from(e: KafkaError) -> Self {
        IngestError::Kafka(e)
    }
}

impl IngestOptions {
    /// The options from `--kafka-ingest` and its companions; `None` when
    /// the ingest is off.
    pub fn from_config(config: &Config) -> Result<Option<Self>, IngestError> {
        let Some(url) = config.kafka_ingest.as_deref() else {
            return Ok(None);
        };
        let shape = || IngestError::Url(UrlError::Shape(url.to_owned()));
        let (servers, topics) = url
            .strip_prefix("kafka://")
            .and_then(|rest| rest.split_once('/'))
            .ok_or_else(shape)?;
        let mut parsed = Vec::new();
        let mut bootstrap = String::new();
        for topic in topics.split(',').map(str::trim) {
            let one =
                KafkaUrl::parse(&format!("kafka://{servers}/{topic}")).map_err(IngestError::Url)?;
            if topic.chars().count() > MAX_TOPIC_CHARS {
                return Err(IngestError::TopicTooLong(topic.to_owned()));
            }
            bootstrap = one.bootstrap();
            parsed.push(one.topic);
        }
        if let Some(dlq) = &config.kafka_ingest_dead_letter {
            KafkaUrl::parse(&format!("kafka://{servers}/{dlq}"))
                .map_err(IngestError::DeadLetter)?;
        }
        Ok(Some(Self {
            servers: bootstrap,
            topics: parsed,
            group: config.kafka_ingest_group.clone(),
            attempts: config.kafka_ingest_attempts,
            dead_letter: config.kafka_ingest_dead_letter.clone(),
            node_id: config.node_id(),
            max_data_bytes: config.max_frame_bytes as usize,
            op_timeout: config.kafka_timeout,
        }))
    }

    /// Where `topic`'s poison records go.
    pub fn dead_letter_topic(&self, topic: &str) -> String {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| format!("{topic}{DEAD_LETTER_SUFFIX}"))
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.servers)
            .set("client.id", format!("chorus-ingest-{}", self.node_id));
        config
    }
}

/// Joins the group and starts ingesting; the task ends with the node.
pub fn spawn(node: &Arc<Node>, opts: IngestOptions) -> Result<JoinHandle<()>, IngestError> {
    let consumer: StreamConsumer = opts
        .client_config()
        .set("group.id", &opts.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            SESSION_TIMEOUT.as_millis().to_string(),
        )
        .set("heartbeat.interval.ms", "2000")
        .create()?;
    let topics: Vec<&str> = opts.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    node.metrics.kafka_ingest_topics.set(topics.len() as i64);
    let producer = reliable_producer(opts.client_config(), opts.op_timeout)?;
    let ingest = Ingest {
        node: Arc::downgrade(node),
        metrics: node.metrics.clone(),
        consumer: Arc::new(consumer),
        producer,
        handled: Arc::new(Mutex::new(HashMap::new())),
        opts,
    };
    tracing::info!(
        topics = ?ingest.opts.topics,
        group = ingest.opts.group,
        "ingesting from Kafka"
    );
    Ok(tokio::spawn(ingest.run()))
}

struct Ingest {
    node: Weak<Node>,
    metrics: Arc<Metrics>,
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    /// The next offset to handle of each partition this node handled
    /// records of (for the lag). Std mutex, never held across `.await`.
    handled: Arc<Mutex<HashMap<(String, i32), i64>>>,
    opts: IngestOptions,
}

/// How a record ended.
enum Handled {
    Published,
    DeadLettered,
    /// The node is gone: stop without committing.
    Stopped,
}

impl Ingest {
    async fn run(self) {
        let dead_letters: std::collections::BTreeSet<String> = self
            .opts
            .topics
            .iter()
            .map(|t| self.opts.dead_letter_topic(t))
            .collect();
        for topic in dead_letters {
            if let Err(why) =
                create_topic(&self.opts.client_config(), &topic, 1, self.opts.op_timeout).await
            {
                tracing::warn!(%topic, %why, "cannot create the dead-letter topic");
            }
        }
        let _lag = AbortOnDropHandle::new(tokio::spawn(measure_lag(
            self.consumer.clone(),
            self.handled.clone(),
            self.metrics.clone(),
            self.opts.op_timeout,
        )));
        loop {
            let first = match self.consumer.recv().await {
                Ok(record) => record.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka ingest consumer");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(record)) => batch.push(record.detach()),
                    _ => break,
                }
            }
            if !self.handle_batch(batch).await {
                return;
            }
        }
    }

    /// Handles a batch, partitions side by side, and commits its offsets.
    /// `false` when the node is gone.
    async fn handle_batch(&self, batch: Vec<OwnedMessage>) -> bool {
        let mut partitions: Vec<((String, i32), Vec<OwnedMessage>)> = Vec::new();
        for record in batch {
            let at = (record.topic().to_owned(), record.partition());
            match partitions.iter_mut().find(|(p, _)| *p == at) {
                Some((_, list)) => list.push(record),
                None => partitions.push((at, vec![record])),
            }
        }
        let done = join_all(partitions.into_iter().map(|(at, records)| async move {
            let mut next = None;
            for record in records {
                match self.handle(&record).await {
                    Handled::Stopped => break,
                    Handled::Published | Handled::DeadLettered => next = Some(record.offset() + 1),
                }
            }
            (at, next)
        }))
        .await;
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &done {
            if let Some(next) = next {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
                lock(&self.handled).insert((topic.clone(), *partition), *next);
            }
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Async)
        {
            // The records come again to whoever reads the partition next;
            // their keys keep them from being delivered twice.
            tracing::warn!(error = %e, "could not commit ingested offsets");
        }
        self.node.strong_count() > 0
    }

    /// Publishes one record, trying again as the failure allows, or
    /// dead-letters it.
    async fn handle(&self, record: &OwnedMessage) -> Handled {
        let parts = match Parts::of(record, self.opts.max_data_bytes) {
            Ok(parts) => parts,
            Err(why) => return self.dead_letter(record, &why, 0).await,
        };
        let mut attempts = 0;
        let mut backoff = Duration::from_millis(50);
        let mut told_down = false;
        loop {
            let Some(node) = self.node.upgrade() else {
                return Handled::Stopped;
            };
            let published = node.publish(parts.request()).await;
            drop(node);
            match published {
                Ok(_) => {
                    self.metrics.kafka_ingested.inc();
                    if told_down {
                        tracing::info!(
                            topic = record.topic(),
                            partition = record.partition(),
                            "ingest resumed"
                        );
                    }
                    return Handled::Published;
                }
                Err(BrokerError::Unavailable(why)) => {
                    if !told_down {
                        tracing::warn!(
                            topic = record.topic(),
                            partition = record.partition(),
                            offset = record.offset(),
                            %why,
                            "the broker is unavailable: ingest waits"
                        );
                        told_down = true;
                    }
                }
                Err(e) => {
                    attempts += 1;
                    if attempts >= self.opts.attempts {
                        return self.dead_letter(record, &e.to_string(), attempts).await;
                    }
                    tracing::warn!(
                        topic = record.topic(),
                        partition = record.partition(),
                        offset = record.offset(),
                        attempts,
                        error = %e,
                        "ingested record not published; trying again"
                    );
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Writes `record` to its dead-letter topic, waiting (and trying again)
    /// until Kafka acknowledged it.
    async fn dead_letter(&self, record: &OwnedMessage, why: &str, attempts: u32) -> Handled {
        let topic = self.opts.dead_letter_topic(record.topic());
        tracing::warn!(
            topic = record.topic(),
            partition = record.partition(),
            offset = record.offset(),
            dead_letter = %topic,
            why,
            "ingested record moved to the dead-letter topic"
        );
        let (partition, offset, attempts) = (
            record.partition().to_string(),
            record.offset().to_string(),
            attempts.to_string(),
        );
        let mut told = false;
        loop {
            if self.node.strong_count() == 0 {
                return Handled::Stopped;
            }
            let mut headers = OwnedHeaders::new();
            if let Some(original) = record.headers() {
                for h in original.iter() {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
            for (key, value) in [
                (REASON_HEADER, why),
                (SOURCE_TOPIC_HEADER, record.topic()),
                (SOURCE_PARTITION_HEADER, partition.as_str()),
                (SOURCE_OFFSET_HEADER, offset.as_str()),
                (ATTEMPTS_HEADER, attempts.as_str()),
            ] {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut out = FutureRecord::<[u8], [u8]>::to(&topic).headers(headers);
            if let Some(key) = record.key() {
                out = out.key(key);
            }
            if let Some(value) = record.payload() {
                out = out.payload(value);
            }
            let sent = match self.producer.send_result(out) {
                Ok(delivery) => acknowledged(delivery, self.opts.op_timeout).await,
                Err((e, _)) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => {
                    self.metrics.kafka_ingest_dead_lettered.inc();
                    return Handled::DeadLettered;
                }
                Err(e) => {
                    if !told {
                        tracing::warn!(dead_letter = %topic, error = %e, "cannot write to the dead-letter topic; the partition waits");
                        told = true;
                    }
                    // It may be missing (it could not be created at start).
                    let config = self.opts.client_config();
                    let _ = create_topic(&config, &topic, 1, self.opts.op_timeout).await;
                }
            }
            tokio::time::sleep(MAX_BACKOFF).await;
        }
    }
}

/// A record's room, key and data, checked against the protocol's rules.
#[derive(Debug)]
struct Parts {
    room: RoomName,
    key: String,
    data: Box<RawValue>,
}

impl Parts {
    /// The record as a publish, or why it can never be one.
    fn of(record: &OwnedMessage, max_data_bytes: usize) -> Result<Self, String> {
        let room = match header(record, ROOM_HEADER) {
            Some(room) => room,
            None => record
                .key()
                .map(|k| std::str::from_utf8(k).map_err(|_| "the key is not UTF-8".to_owned()))
                .transpose()?
                .ok_or("no room: neither a chorus-room header nor a key")?,
        };
        let room = RoomName::parse(room).map_err(|e| format!("room `{room}`: {e}"))?;
        let key = match header(record, IDEMPOTENCY_KEY_HEADER) {
            Some(key) => key.to_owned(),
            None => format!(
                "{}/{}/{}",
                record.topic(),
                record.partition(),
                record.offset()
            ),
        };
        check_key(&key)?;
        let value = record.payload().ok_or("the record has no value")?;
        let text = std::str::from_utf8(value).map_err(|_| "the value is not UTF-8")?;
        let data = as_json(text);
        if data.get().len() > max_data_bytes {
            return Err(format!(
                "data is {} bytes, over --max-frame-bytes ({max_data_bytes})",
                data.get().len()
            ));
        }
        Ok(Self { room, key, data })
    }

    fn request(&self) -> PublishRequest {
        PublishRequest {
            room: self.room.clone(),
            data: self.data.clone(),
            from: None,
            key: Some(self.key.clone()),
        }
    }
}

/// `text` if it is JSON, else `text` as a JSON string.
fn as_json(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.trim().to_owned())
        .or_else(|_| serde_json::value::to_raw_value(text))
        .unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// Sets `chorus_kafka_ingest_lag{topic,partition}` for each partition this
/// node is assigned, every [`LAG_EVERY`]: the high watermark minus the next
/// offset to handle (handled here, else committed, else the first kept).
async fn measure_lag(
    consumer: Arc<StreamConsumer>,
    handled: Arc<Mutex<HashMap<(String, i32), i64>>>,
    metrics: Arc<Metrics>,
    limit: Duration,
) {
    let mut shown: Vec<TopicPartition> = Vec::new();
    let mut up = None;
    loop {
        tokio::time::sleep(LAG_EVERY).await;
        let (consumer, handled_now) = (consumer.clone(), lock(&handled).clone());
        let measured = tokio::task::spawn_blocking(move || -> Result<_, KafkaError> {
            let assignment = consumer.assignment()?;
            let committed = consumer.committed_offsets(assignment.clone(), limit)?;
            let mut lags = Vec::new();
            for elem in assignment.elements() {
                let (topic, partition) = (elem.topic().to_owned(), elem.partition());
                let (low, high) = consumer.fetch_watermarks(&topic, partition, limit)?;
                let committed = committed
                    .find_partition(&topic, partition)
                    .and_then(|e| e.offset().to_raw())
                    .filter(|o| *o >= 0);
                let next = handled_now
                    .get(&(topic.clone(), partition))
                    .copied()
                    .into_iter()
                    .chain(committed)
                    .max()
                    .unwrap_or(low)
                    .max(low);
                lags.push((topic, partition, (high - next).max(0)));
            }
            Ok(lags)
        })
        .await;
        let lags = match measured {
            Ok(Ok(lags)) => lags,
            Ok(Err(e)) => {
                if up != Some(false) {
                    tracing::warn!(error = %e, "Kafka ingest: cannot reach the cluster");
                }
                up = Some(false);
                metrics.kafka_ingest_up.set(0);
                continue;
            }
            Err(_) => continue,
        };
        if up == Some(false) {
            tracing::info!("Kafka ingest: cluster reachable again");
        }
        up = Some(true);
        metrics.kafka_ingest_up.set(1);
        let now: Vec<TopicPartition> = lags
            .iter()
            .map(|(topic, partition, lag)| {
                let labels = TopicPartition {
                    topic: topic.clone(),
                    partition: partition.to_string(),
                };
                metrics.kafka_ingest_lag.get_or_create(&labels).set(*lag);
                labels
            })
            .collect();
        for gone in shown.iter().filter(|l| !now.contains(l)) {
            metrics.kafka_ingest_lag.remove(gone);
        }
        shown = now;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;
    use rdkafka::Timestamp;

    fn options(args: &[&str]) -> Result<Option<IngestOptions>, IngestError> {
        let mut all = vec!["chorus-server"];
        all.extend_from_slice(args);
        IngestOptions::from_config(&Config::try_parse_from(all).unwrap())
    }

    #[test]
    fn the_flag_names_servers_and_topics() {
        assert!(options(&[]).unwrap().is_none());
        let o = options(&["--kafka-ingest", "kafka://k1:9092,k2:9092/orders,payments"])
            .unwrap()
            .unwrap();
        assert_eq!(o.servers, "k1:9092,k2:9092");
        assert_eq!(o.topics, ["orders", "payments"]);
        assert_eq!((o.group.as_str(), o.attempts), ("chorus-ingest", 5));
        assert_eq!(o.dead_letter_topic("orders"), "orders.dead-letter");
        let o = options(&[
            "--kafka-ingest",
            "kafka://k1:9092/orders",
            "--kafka-ingest-dead-letter",
            "poison",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(o.dead_letter_topic("orders"), "poison");
        for bad in [
            "k1:9092/orders",
            "kafka://k1:9092",
            "kafka://k1:9092/orders,",
            "kafka://k1:9092/a b",
        ] {
            let e = options(&["--kafka-ingest", bad]).unwrap_err();
            // Said once: the message names the flag and the URL, and has no
            // source that would repeat it.
            assert!(e.to_string().starts_with("--kafka-ingest: "), "{e}");
            assert!(std::error::Error::source(&e).is_none(), "{e}");
        }
        let long = format!("kafka://k1:9092/{}", "t".repeat(MAX_TOPIC_CHARS + 1));
        assert!(options(&["--kafka-ingest", &long]).is_err());
    }

    fn record(key: Option<&str>, value: Option<&str>, headers: &[(&str, &str)]) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        OwnedMessage::new(
            value.map(|v| v.as_bytes().to_vec()),
            key.map(|k| k.as_bytes().to_vec()),
            "orders".into(),
            Timestamp::NotAvailable,
            3,
            41,
            Some(h),
        )
    }

    #[test]
    fn a_record_gives_room_key_and_data_or_why_it_cannot() {
        let p = Parts::of(&record(Some("orders:eu"), Some(r#"{"n":1}"#), &[]), 100).unwrap();
        assert_eq!(p.room.as_str(), "orders:eu");
        assert_eq!(p.key, "orders/3/41");
        assert_eq!(p.data.get(), r#"{"n":1}"#);
        // Headers win over the key; a value that is not JSON is a string.
        let p = Parts::of(
            &record(
                Some("ignored"),
                Some("hello"),
                &[(ROOM_HEADER, "lobby"), (IDEMPOTENCY_KEY_HEADER, "k-1")],
            ),
            100,
        )
        .unwrap();
        assert_eq!((p.room.as_str(), p.key.as_str()), ("lobby", "k-1"));
        assert_eq!(p.data.get(), r#""hello""#);
        for (r, why) in [
            (record(None, Some("1"), &[]), "no room"),
            (record(Some("bad room"), Some("1"), &[]), "room `bad room`"),
            (record(Some("a"), None, &[]), "no value"),
            (
                record(Some("a"), Some("[1,2,3,4,5]"), &[]),
                "over --max-frame-bytes",
            ),
        ] {
            let err = Parts::of(&r, 8).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }
}
