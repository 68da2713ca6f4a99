//! Kafka broker: fan-out across nodes through the partitions of one Kafka
//! topic (`--broker kafka://host:port[,host:port…]/<topic>`).
//!
//! Rooms hash to partitions ([`feed::partition_of`]); a publish is one
//! record (key: the room, value: the `data`, headers: the idempotency key
//! and the publisher's session) produced to its room's partition by an
//! idempotent producer with `acks=all`: an `ok` means every in-sync
//! replica has it. Each node reads only the partitions of the rooms it
//! serves, assigned by itself (no consumer-group rebalance), from the high
//! watermark at the moment its first subscriber of that partition came.
//!
//! Offsets: a room's offset is the partition's Kafka offset of the message
//! plus one, so offsets grow in the one order Kafka gives the partition,
//! the same on every node, but not by one per message of the room. Each
//! `message` frame carries `prev`: no message of the room lies between
//! `prev` and its `offset`. A client holding offset `o` missed something
//! iff `prev > o`. The epoch is the partition's (`<topic>/<partition>`).
//! A node that finds the partition's offsets skipping (retention deleted
//! records before it read them) sends its subscribers a `gap`.
//!
//! | part | owns | runs as |
//! |---|---|---|
//! | `link` (here) | the topic (created when missing), partition count, health from a metadata request each second | a task |
//! | `reader` (here) | the node's consumer: records of served partitions, in order, to [`feed`] and the hub | a task |
//! | [`feed`] | per served partition: rooms, positions, `prev`, skipped records; idempotency keys seen | pure state |
//! | `url` | `--broker kafka://…` | |

mod feed;
mod url;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use url::{KafkaUrl, UrlError};

use self::feed::{PartitionFeed, SeenKeys, Step, partition_of};
use super::{
    Broker, BrokerError, Deliver, Delivery, Health, History, Position, PublishRequest, Published,
    ReadSpan,
};
use crate::metrics::Metrics;
use crate::protocol::{MessageFrame, RoomName, encode_message_after};
use crate::sync::lock;

/// Record headers.
const KEY_HEADER: &str = "chorus-key";
const FROM_HEADER: &str = "chorus-from";

/// How often the link checks the topic's metadata (health).
const CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct KafkaOptions {
    pub url: KafkaUrl,
    pub node_id: String,
    /// Partitions of the topic when this node creates it.
    pub partitions: u32,
    /// Bound on a publish (librdkafka's `message.timeout.ms`) and on
    /// metadata and watermark requests.
    pub op_timeout: Duration,
    /// How long a publish's idempotency key is remembered.
    pub idempotency_window: Duration,
}

impl KafkaOptions {
    pub fn new(url: KafkaUrl, node_id: String) -> Self {
        Self {
            url,
            node_id,
            partitions: 12,
            op_timeout: Duration::from_secs(5),
            idempotency_window: Duration::from_secs(300),
        }
    }
}

/// The topic's partitions, fixed once learnt: a room's partition must not
/// change under its subscribers.
#[derive(Debug)]
struct Layout {
    epochs: Vec<Arc<str>>,
}

impl Layout {
    fn partitions(&self) -> u32 {
        self.epochs.len() as u32
    }
}

struct Shared {
    opts: KafkaOptions,
    producer: FutureProducer,
    consumer: Arc<StreamConsumer>,
    layout: OnceLock<Layout>,
    /// Served partitions. Std mutex, never held across `.await` nor while
    /// calling into the hub (the hub calls subscribe holding its own lock).
    feeds: Mutex<HashMap<i32, PartitionFeed>>,
    /// Idempotency keys of served rooms. Std mutex, taken alone.
    keys: Mutex<SeenKeys>,
    /// Serialises assigning and unassigning partitions.
    assigning: tokio::sync::Mutex<()>,
    deliver: Arc<dyn Deliver>,
    metrics: Arc<Metrics>,
    health: watch::Sender<Health>,
}

pub struct KafkaBroker {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn client_config(opts: &KafkaOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", opts.url.bootstrap())
        .set("client.id", format!("chorus-{}", opts.node_id));
    config
}

impl KafkaBroker {
    /// Creates the clients (no I/O yet) and starts the link and the reader.
    pub fn start(
        opts: KafkaOptions,
        deliver: Arc<dyn Deliver>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KafkaError> {
        let producer = reliable_producer(client_config(&opts), opts.op_timeout)?;
        // A group id only so that records come through the consumer queue:
        // partitions are assigned by hand, the group is never joined, and
        // nothing is committed.
        let consumer: StreamConsumer = client_config(&opts)
            .set("group.id", format!("chorus-node-{}", opts.node_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let shared = Arc::new(Shared {
            keys: Mutex::new(SeenKeys::new(opts.idempotency_window)),
            opts,
            producer,
            consumer: Arc::new(consumer),
            layout: OnceLock::new(),
            feeds: Mutex::new(HashMap::new()),
            assigning: tokio::sync::Mutex::new(()),
            deliver,
            metrics,
            health: watch::Sender::new(Health::Down("connecting".into())),
        });
        let tasks = vec![
            tokio::spawn(link(shared.clone())),
            tokio::spawn(read(shared.clone())),
        ];
        Ok(Self { shared, tasks })
    }

    /// The room's partition and its epoch, once the topic is known and up.
    fn route(&self, room: &RoomName) -> Result<(i32, Arc<str>), BrokerError> {
        if let Health::Down(why) = &*self.shared.health.borrow() {
            return Err(BrokerError::Unavailable(why.clone()));
        }
        let layout = self
            .shared
            .layout
            .get()
            .ok_or_else(|| BrokerError::Unavailable("topic not known yet".into()))?;
        let p = partition_of(room.as_str(), layout.partitions());
        Ok((p, layout.epochs[p as usize].clone()))
    }
}

fn fail<T: Send + 'static>(e: BrokerError) -> BoxFuture<'static, Result<T, BrokerError>> {
    std::future::ready(Err(e)).boxed()
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl Broker for KafkaBroker {
    fn publish(&self, req: PublishRequest) -> BoxFuture<'static, Result<Published, BrokerError>> {
        let (partition, epoch) = match self.route(&req.room) {
            Ok(route) => route,
            Err(e) => return fail(e),
        };
        if let Some(key) = &req.key
            && let Some(offset) = lock(&self.shared.keys).get(&req.room, key, Instant::now())
        {
            return std::future::ready(Ok(Published {
                offset,
                epoch,
                duplicate: true,
            }))
            .boxed();
        }
        let mut headers = OwnedHeaders::new();
        if let Some(key) = &req.key {
            headers = headers.insert(Header {
                key: KEY_HEADER,
                value: Some(key.as_str()),
            });
        }
        if let Some(from) = &req.from {
            headers = headers.insert(Header {
                key: FROM_HEADER,
                value: Some(&**from),
            });
        }
        let record = FutureRecord::to(self.shared.opts.url.topic.as_str())
            .partition(partition)
            .key(req.room.as_str())
            .payload(req.data.get())
            .headers(headers);
        // Enqueued now, so publishes keep their call order in the partition.
        let delivery = match self.shared.producer.send_result(record) {
            Ok(delivery) => delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return fail(BrokerError::Overloaded);
            }
            Err((e, _)) => return fail(unavailable(e)),
        };
        // librdkafka gives up on the record after op_timeout; a little more
        // for its answer to come back.
        let limit = self.shared.opts.op_timeout + Duration::from_secs(1);
        async move {
            match tokio::time::timeout(limit, delivery).await {
                Ok(Ok(Ok(done))) => Ok(Published {
                    offset: done.offset as u64 + 1,
                    epoch,
                    duplicate: false,
                }),
                Ok(Ok(Err((KafkaError::MessageProduction(code), _)))) if maybe_written(code) => {
                    Err(BrokerError::OutcomeUnknown(code.to_string()))
                }
                Ok(Ok(Err((e, _)))) => Err(unavailable(e)),
                Ok(Err(_canceled)) => Err(BrokerError::OutcomeUnknown("producer stopped".into())),
                Err(_) => Err(BrokerError::OutcomeUnknown(format!(
                    "no answer within {limit:?}"
                ))),
            }
        }
        .boxed()
    }

    fn subscribe(&self, room: &RoomName) -> BoxFuture<'static, Result<(), BrokerError>> {
        let (partition, _) = match self.route(room) {
            Ok(route) => route,
            Err(e) => return fail(e),
        };
        {
            let mut feeds = lock(&self.shared.feeds);
            let feed = feeds.entry(partition).or_default();
            feed.add(room);
            if feed.assigned {
                return std::future::ready(Ok(())).boxed();
            }
        }
        let shared = self.shared.clone();
        let room = room.clone();
        async move {
            let assigned = shared.assign(partition).await;
            if assigned.is_err() {
                let mut feeds = lock(&shared.feeds);
                if let Some(feed) = feeds.get_mut(&partition)
                    && feed.rooms.get(&room).is_some_and(Option::is_none)
                {
                    feed.rooms.remove(&room);
                }
            }
            assigned
        }
        .boxed()
    }

    fn unsubscribe(&self, room: &RoomName) {
        let Some(layout) = self.shared.layout.get() else {
            return;
        };
        let partition = partition_of(room.as_str(), layout.partitions());
        let idle = {
            let mut feeds = lock(&self.shared.feeds);
            feeds.get_mut(&partition).is_some_and(|feed| {
                feed.rooms.remove(room);
                feed.rooms.is_empty()
            })
        };
        if idle {
            let shared = self.shared.clone();
            tokio::spawn(async move { shared.unassign_if_idle(partition).await });
        }
    }

    fn position(&self, room: &RoomName) -> BoxFuture<'static, Result<Position, BrokerError>> {
        let (partition, epoch) = match self.route(room) {
            Ok(route) => route,
            Err(e) => return fail(e),
        };
        let shared = self.shared.clone();
        async move {
            let offset = shared.high_watermark(partition).await?;
            Ok(Position { offset, epoch })
        }
        .boxed()
    }

    /// Kafka keeps what its retention keeps: a room's history is its
    /// partition's records.
    fn durable(&self) -> bool {
        true
    }

    fn history(
        &self,
        room: &RoomName,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'static, Result<Option<History>, BrokerError>> {
        let (partition, epoch) = match self.route(room) {
            Ok(route) => route,
            Err(e) => return fail(e),
        };
        let read = HistoryRead {
            config: client_config(&self.shared.opts),
            topic: self.shared.opts.url.topic.clone(),
            partition,
            epoch,
            room: room.clone(),
            after,
            limit: limit.max(1),
            max_bytes,
            limit_time: self.shared.opts.op_timeout,
        };
        async move {
            tokio::task::spawn_blocking(move || read.run())
                .await
                .map_err(unavailable)?
                .map(Some)
        }
        .boxed()
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }
}

/// One page of a room's history: its partition's records after `after`,
/// read by a consumer of its own (blocking; run off the runtime).
struct HistoryRead {
    config: ClientConfig,
    topic: String,
    partition: i32,
    epoch: Arc<str>,
    room: RoomName,
    after: u64,
    limit: usize,
    max_bytes: usize,
    limit_time: Duration,
}

impl HistoryRead {
    fn run(mut self) -> Result<History, BrokerError> {
        let deadline = Instant::now() + self.limit_time;
        let consumer: BaseConsumer = self
            .config
            .set("group.id", "chorus-history")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(unavailable)?;
        let (low, high) = consumer
            .fetch_watermarks(&self.topic, self.partition, self.limit_time)
            .map_err(unavailable)?;
        let (low, high) = (low.max(0) as u64, high.max(0) as u64);
        // Records before `low` are gone: the read covers only from there.
        let from = self.after.max(low);
        let mut page = History {
            epoch: self.epoch.clone(),
            last: high,
            messages: Vec::new(),
            read: Some(ReadSpan {
                from,
                through: from,
            }),
        };
        if from >= high {
            page.read = Some(ReadSpan {
                from,
                through: high,
            });
            return Ok(page);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(from as i64))
            .and_then(|()| consumer.assign(&tpl))
            .map_err(unavailable)?;
        let (mut prev, mut bytes, mut through) = (from, 0usize, from);
        let mut keys = std::collections::HashSet::new();
        while through < high {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BrokerError::Timeout(self.limit_time));
            }
            let Some(record) = consumer.poll(left.min(Duration::from_millis(100))) else {
                continue;
            };
            let record = record.map_err(unavailable)?;
            let at = record.offset().max(0) as u64 + 1;
            if through == from && at > from + 1 {
                // The first record is past where the read began: the ones
                // between were deleted meanwhile.
                if let Some(span) = page.read.as_mut() {
                    span.from = at - 1;
                }
            }
            through = at;
            let Some(data) = self.message(&record, &mut keys) else {
                continue;
            };
            let frame = encode_message_after(
                &MessageFrame {
                    room: self.room.as_str(),
                    data: data.0,
                    offset: at,
                    epoch: &self.epoch,
                    from: data.1,
                },
                prev,
            );
            prev = at;
            bytes += frame.len();
            page.messages.push(Delivery {
                room: self.room.clone(),
                offset: at,
                epoch: self.epoch.clone(),
                frame,
                published_at_us: 0,
            });
            if page.messages.len() >= self.limit || bytes >= self.max_bytes {
                break;
            }
        }
        if let Some(span) = page.read.as_mut() {
            span.through = through;
        }
        Ok(page)
    }

    /// The record's data and sender if it is a message of the room (its
    /// key's first record in this read).
    fn message<'r>(
        &self,
        record: &'r BorrowedMessage<'_>,
        keys: &mut std::collections::HashSet<String>,
    ) -> Option<(&'r RawValue, Option<&'r str>)> {
        if record.key() != Some(self.room.as_str().as_bytes()) {
            return None;
        }
        let data = record
            .payload()
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(|p| serde_json::from_str::<&RawValue>(p).ok())?;
        if let Some(key) = header(record, KEY_HEADER)
            && !keys.insert(key.to_owned())
        {
            return None;
        }
        Some((data, header(record, FROM_HEADER)))
    }
}

/// A record's header as text.
pub(crate) fn header<'r, M: Message>(record: &'r M, name: &str) -> Option<&'r str> {
    record.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    })
}

/// Whether a failed produce may still have been written (the broker may
/// have appended it before the answer was lost).
fn maybe_written(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
    )
}

impl Shared {
    fn topic(&self) -> &str {
        &self.opts.url.topic
    }

    /// The partition's high watermark (its next offset), as a position.
    async fn high_watermark(self: &Arc<Self>, partition: i32) -> Result<u64, BrokerError> {
        let consumer = self.consumer.clone();
        let topic = self.topic().to_owned();
        let limit = self.opts.op_timeout;
        tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic, partition, limit))
            .await
            .map_err(unavailable)?
            .map(|(_, high)| high.max(0) as u64)
            .map_err(unavailable)
    }

    /// Starts reading `partition` at its high watermark, unless it is read
    /// already.
    async fn assign(self: &Arc<Self>, partition: i32) -> Result<(), BrokerError> {
        let _turn = self.assigning.lock().await;
        if lock(&self.feeds)
            .get(&partition)
            .is_some_and(|f| f.assigned)
        {
            return Ok(());
        }
        let start = self.high_watermark(partition).await?;
        // Accounted for before the first record can arrive.
        lock(&self.feeds).entry(partition).or_default().start(start);
        let mut tpl = TopicPartitionList::new();
        let assigned = tpl
            .add_partition_offset(self.topic(), partition, Offset::Offset(start as i64))
            .and_then(|()| self.consumer.incremental_assign(&tpl));
        if let Err(e) = assigned {
            if let Some(feed) = lock(&self.feeds).get_mut(&partition) {
                feed.assigned = false;
            }
            return Err(unavailable(e));
        }
        self.metrics.kafka_partitions_read.inc();
        tracing::debug!(partition, start, "reading partition");
        Ok(())
    }

    /// Stops reading `partition` if no served room is left in it.
    async fn unassign_if_idle(self: &Arc<Self>, partition: i32) {
        let _turn = self.assigning.lock().await;
        {
            let mut feeds = lock(&self.feeds);
            match feeds.get_mut(&partition) {
                Some(feed) if feed.assigned && feed.rooms.is_empty() => feed.assigned = false,
                _ => return,
            }
        }
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition(self.topic(), partition);
        self.metrics.kafka_partitions_read.dec();
        if let Err(e) = self.consumer.incremental_unassign(&tpl) {
            tracing::warn!(partition, error = %e, "could not stop reading a partition");
        }
    }

    fn set_health(&self, health: Health) {
        self.metrics.broker_up.set(i64::from(health.is_up()));
        self.health.send_if_modified(|h| {
            if *h == health {
                return false;
            }
            match &health {
                Health::Up => tracing::info!(topic = self.topic(), "kafka reachable"),
                Health::Down(why) => tracing::warn!(topic = self.topic(), why, "kafka unreachable"),
            }
            *h = health;
            true
        });
    }

    /// The topic's partition count from the broker; creates the topic when
    /// it is missing.
    async fn check(self: &Arc<Self>) -> Result<u32, String> {
        let producer = self.producer.clone();
        let topic = self.topic().to_owned();
        let limit = self.opts.op_timeout.min(CHECK_EVERY * 2);
        let partitions = tokio::task::spawn_blocking(move || {
            let metadata = producer.client().fetch_metadata(Some(&topic), limit)?;
            let found = metadata.topics().iter().find(|t| t.name() == topic);
            Ok::<_, KafkaError>(found.and_then(|t| {
                (t.error().is_none() && !t.partitions().is_empty())
                    .then_some(t.partitions().len() as u32)
            }))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        match partitions {
            Some(n) => Ok(n),
            None => {
                self.create_topic().await?;
                Err("topic created; waiting for its metadata".into())
            }
        }
    }

    async fn create_topic(&self) -> Result<(), String> {
        create_topic(
            &client_config(&self.opts),
            self.topic(),
            self.opts.partitions,
            self.opts.op_timeout,
        )
        .await
    }
}

/// Creates `topic` with `partitions` partitions (the cluster's default
/// replication) when it is missing; an existing one is left as it is.
pub(crate) async fn create_topic(
    config: &ClientConfig,
    topic: &str,
    partitions: u32,
    limit: Duration,
) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = config.create().map_err(|e| e.to_string())?;
    let new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(-1));
    let options = AdminOptions::new().operation_timeout(Some(limit));
    let results = admin
        .create_topics([&new], &options)
        .await
        .map_err(|e| e.to_string())?;
    for result in results {
        match result {
            Ok(_) => tracing::info!(topic, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("create topic {name}: {code}")),
        }
    }
    Ok(())
}

/// Waits for Kafka's answer to a produced record, a little longer than
/// librdkafka's own `limit` (`message.timeout.ms`) on it.
pub(crate) async fn acknowledged(
    delivery: rdkafka::producer::DeliveryFuture,
    limit: Duration,
) -> Result<(), String> {
    let limit = limit + Duration::from_secs(1);
    match tokio::time::timeout(limit, delivery).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err((e, _)))) => Err(e.to_string()),
        Ok(Err(_canceled)) => Err("producer stopped".to_owned()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// An idempotent producer whose records are acknowledged by every in-sync
/// replica (`acks=all`), giving up on a record after `limit`.
pub(crate) fn reliable_producer(
    mut config: ClientConfig,
    limit: Duration,
) -> Result<FutureProducer, KafkaError> {
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", limit.as_millis().max(1).to_string())
        .set("linger.ms", "1")
        .create()
}

/// Learns the topic, then follows the broker's health.
async fn link(shared: Arc<Shared>) {
    loop {
        match shared.check().await {
            Ok(partitions) => {
                let layout = shared.layout.get_or_init(|| Layout {
                    epochs: (0..partitions)
                        .map(|p| format!("{}/{p}", shared.topic()).into())
                        .collect(),
                });
                if layout.partitions() != partitions {
                    // Rooms keep the partitions they were hashed to.
                    tracing::warn!(
                        was = layout.partitions(),
                        now = partitions,
                        "the topic's partition count changed: restart the nodes to use the new ones"
                    );
                }
                shared.set_health(Health::Up);
            }
            Err(why) => shared.set_health(Health::Down(why)),
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

/// The node's consumer: every record of the partitions it reads, in order.
async fn read(shared: Arc<Shared>) {
    let consumer = shared.consumer.clone();
    loop {
        match consumer.recv().await {
            Ok(record) => shared.handle(&record),
            Err(e) => {
                tracing::debug!(error = %e, "kafka consumer");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Shared {
    fn handle(&self, record: &BorrowedMessage<'_>) {
        let partition = record.partition();
        let offset = record.offset().max(0) as u64;
        let Some(epoch) = self
            .layout
            .get()
            .and_then(|l| l.epochs.get(partition as usize))
        else {
            return;
        };
        let room = record
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| RoomName::parse(k).ok());
        let header = |name: &str| header(record, name);
        let data = record
            .payload()
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(|p| serde_json::from_str::<&RawValue>(p).ok());
        if data.is_none() && room.is_some() {
            tracing::warn!(
                partition,
                offset,
                "skipped a record whose value is not JSON"
            );
        }
        // Only a room's well-formed record is its message.
        let room = room.filter(|_| data.is_some());
        let at = offset + 1;
        let mut lost = Vec::new();
        let step = {
            let mut feeds = lock(&self.feeds);
            let Some(feed) = feeds.get_mut(&partition) else {
                return;
            };
            // A record whose key the room already had is not the room's
            // message: its `prev` chain goes on from the first one.
            let served = room.as_ref().filter(|r| feed.serves(r, at));
            let duplicate = served.zip(header(KEY_HEADER)).is_some_and(|(r, key)| {
                lock(&self.keys).first(r, key, at, Instant::now()).is_some()
            });
            let room = if duplicate { None } else { room.as_ref() };
            feed.record(room, offset, |r, upto| lost.push((r.clone(), upto)))
        };
        for (r, upto) in lost {
            self.metrics.lost_from_history.inc();
            self.deliver.lost(&r, epoch, upto);
        }
        let (Step::Deliver { prev }, Some(room), Some(data)) = (step, room, data) else {
            return;
        };
        let frame = encode_message_after(
            &MessageFrame {
                room: room.as_str(),
                data,
                offset: at,
                epoch,
                from: header(FROM_HEADER),
            },
            prev,
        );
        let published_at_us = record
            .timestamp()
            .to_millis()
            .map_or(0, |ms| ms.max(0) as u64 * 1000);
        self.deliver.deliver(Delivery {
            room,
            offset: at,
            epoch: epoch.clone(),
            frame,
            published_at_us,
        });
    }
}
