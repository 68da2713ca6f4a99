//! The upstream feed on Kafka (`--upstream-rooms` with `--upstream-kafka`):
//! a broker around the node's own that writes every client publish to a
//! matching room to a Kafka topic once the room has it.
//!
//! A client publish (one with a `from`: HTTP publishes come from backends
//! and are not fed back to them) to a room that a pattern matches is first
//! published through the inner broker, which gives it its offset and
//! epoch; then one record ([`UpstreamRecord`] as JSON, key: the room,
//! headers: room, offset, epoch and the idempotency key when there is one)
//! is produced by an idempotent producer with `acks=all`. The publish is
//! acknowledged only once Kafka acknowledged the record. If it does not
//! (Kafka down, a timeout), the message has reached the room but maybe not
//! the feed: the client gets `outcome_unknown`, and a retry with the same
//! idempotency key writes the record again (the room does not deliver the
//! message twice), so backends dedupe on `(room, epoch, offset)`.
//!
//! Unlike the Redis upstream, where the entry is written atomically with
//! the message, records of one room from concurrent publishers may reach
//! the topic out of offset order: a backend orders by `offset`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use super::kafka::{KafkaUrl, acknowledged, create_topic, reliable_producer};
use super::{Broker, BrokerError, Health, History, Position, PublishRequest, Published, now_us};
use crate::metrics::Metrics;
use crate::protocol::{Pattern, RoomName};
use crate::upstream::{
    EPOCH_HEADER, IDEMPOTENCY_KEY_HEADER, OFFSET_HEADER, ROOM_HEADER, UpstreamRecord,
};

/// How often the topic's creation is tried again while it fails.
const CREATE_RETRY: Duration = Duration::from_secs(1);

/// The feed's settings.
#[derive(Debug, Clone)]
pub struct UpstreamKafkaOptions {
    pub url: KafkaUrl,
    pub rooms: Vec<Pattern>,
    pub node_id: String,
    /// Partitions of the topic when this node creates it.
    pub partitions: u32,
    /// Bound on a record's acknowledgement.
    pub op_timeout: Duration,
}

pub struct UpstreamKafka {
    inner: Arc<dyn Broker>,
    opts: Arc<UpstreamKafkaOptions>,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    _create: AbortOnDropHandle<()>,
}

impl UpstreamKafka {
    /// Wraps `inner`; creates the topic in the background when it is missing.
    pub fn start(
        inner: Arc<dyn Broker>,
        opts: UpstreamKafkaOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KafkaError> {
        let mut config = rdkafka::ClientConfig::new();
        config
            .set("bootstrap.servers", opts.url.bootstrap())
            .set("client.id", format!("chorus-upstream-{}", opts.node_id));
        let producer = reliable_producer(config.clone(), opts.op_timeout)?;
        let opts = Arc::new(opts);
        let o = opts.clone();
        let create = tokio::spawn(async move {
            let mut told = false;
            while let Err(why) =
                create_topic(&config, &o.url.topic, o.partitions, o.op_timeout).await
            {
                if !told {
                    tracing::warn!(topic = %o.url.topic, %why, "cannot create the upstream topic; retrying");
                    told = true;
                }
                tokio::time::sleep(CREATE_RETRY).await;
            }
        });
        Ok(Self {
            inner,
            opts,
            producer,
            metrics,
            _create: AbortOnDropHandle::new(create),
        })
    }

    fn wants(&self, req: &PublishRequest) -> bool {
        req.from.is_some() && self.opts.rooms.iter().any(|p| p.matches(req.room.as_str()))
    }
}

/// The publish reached the room; its feed record did not reach Kafka.
fn not_fed(why: impl std::fmt::Display) -> BrokerError {
    BrokerError::OutcomeUnknown(format!(
        "delivered, but the upstream Kafka record was not acknowledged: {why}"
    ))
}

impl Broker for UpstreamKafka {
    fn publish(&self, req: PublishRequest) -> BoxFuture<'static, Result<Published, BrokerError>> {
        if !self.wants(&req) {
            return self.inner.publish(req);
        }
        let room = req.room.clone();
        let key = req.key.clone();
        let from = req.from.as_deref().unwrap_or_default().to_owned();
        let data = req.data.clone();
        // Called now: publishes keep their call order in the room.
        let published = self.inner.publish(req);
        let producer = self.producer.clone();
        let opts = self.opts.clone();
        let metrics = self.metrics.clone();
        async move {
            let published = published.await?;
            let record = UpstreamRecord {
                room: room.as_str().to_owned(),
                offset: published.offset,
                epoch: published.epoch.to_string(),
                data,
                from,
                ts: now_us(),
            };
            let fed = feed(&producer, &opts, &record, key.as_deref()).await;
            match fed {
                Ok(()) => {
                    metrics.upstream_kafka_records.inc();
                    Ok(published)
                }
                Err(e) => {
                    metrics.upstream_kafka_failed.inc();
                    tracing::warn!(room = %room, offset = published.offset, error = %e, "upstream Kafka record not acknowledged");
                    Err(e)
                }
            }
        }
        .boxed()
    }

    fn subscribe(&self, room: &RoomName) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.inner.subscribe(room)
    }

    fn unsubscribe(&self, room: &RoomName) {
        self.inner.unsubscribe(room)
    }

    fn position(&self, room: &RoomName) -> BoxFuture<'static, Result<Position, BrokerError>> {
        self.inner.position(room)
    }

    fn durable(&self) -> bool {
        self.inner.durable()
    }

    fn history(
        &self,
        room: &RoomName,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'static, Result<Option<History>, BrokerError>> {
        self.inner.history(room, after, limit, max_bytes)
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.inner.health()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

/// Produces the record and waits for Kafka's acknowledgement.
async fn feed(
    producer: &FutureProducer,
    opts: &UpstreamKafkaOptions,
    record: &UpstreamRecord,
    key: Option<&str>,
) -> Result<(), BrokerError> {
    let value = serde_json::to_vec(record).map_err(not_fed)?;
    let offset = record.offset.to_string();
    let mut headers = OwnedHeaders::new()
        .insert(Header {
            key: ROOM_HEADER,
            value: Some(record.room.as_str()),
        })
        .insert(Header {
            key: OFFSET_HEADER,
            value: Some(offset.as_str()),
        })
        .insert(Header {
            key: EPOCH_HEADER,
            value: Some(record.epoch.as_str()),
        });
    if let Some(key) = key {
        headers = headers.insert(Header {
            key: IDEMPOTENCY_KEY_HEADER,
            value: Some(key),
        });
    }
    let out = FutureRecord::to(opts.url.topic.as_str())
        .key(record.room.as_str())
        .payload(&value)
        .headers(headers);
    match producer.send_result(out) {
        Ok(delivery) => acknowledged(delivery, opts.op_timeout)
            .await
            .map_err(not_fed),
        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
            Err(not_fed("the producer's queue is full"))
        }
        Err((e, _)) => Err(not_fed(e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::broker::MemoryBroker;
    use crate::hub::Hub;
    use serde_json::value::RawValue;

    /// Kafka is never reached here (nothing listens on the port): only
    /// which publishes are fed is checked.
    #[tokio::test]
    async fn only_client_publishes_to_matching_rooms_wait_for_the_feed() {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(metrics.clone()));
        let inner: Arc<dyn Broker> = Arc::new(MemoryBroker::new(hub));
        let opts = UpstreamKafkaOptions {
            url: KafkaUrl::parse("kafka://127.0.0.1:9/feed").unwrap(),
            rooms: vec![Pattern::parse("orders:*").unwrap()],
            node_id: "t".into(),
            partitions: 1,
            op_timeout: Duration::from_millis(200),
        };
        let feed = UpstreamKafka::start(inner, opts, metrics.clone()).unwrap();
        let req = |room: &str, from: Option<&str>| PublishRequest {
            room: RoomName::parse(room).unwrap(),
            data: RawValue::from_string("1".into()).unwrap(),
            from: from.map(Arc::from),
            key: None,
        };
        // Not fed: another room, or a backend's (HTTP) publish.
        assert!(feed.publish(req("lobby", Some("s1"))).await.is_ok());
        assert!(feed.publish(req("orders:eu", None)).await.is_ok());
        // Fed: delivered, but Kafka cannot acknowledge it.
        let err = feed
            .publish(req("orders:eu", Some("s1")))
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::OutcomeUnknown(_)), "{err:?}");
        assert_eq!(metrics.upstream_kafka_failed.get(), 1);
    }
}
