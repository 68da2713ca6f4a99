//! Brokers: how a publish reaches every node that serves the room.
//!
//! The [`Broker`] trait is the seam between a node and the message bus.
//! A broker assigns each message its per-room offset (atomically with the
//! publish, so every node agrees on the order), delivers each message once to
//! every node subscribed to the room (through [`Deliver`]), and reports its
//! health so `/readyz` can follow it.
//!
//! Ordering contract: `publish`, `subscribe` and `unsubscribe` take effect in
//! the order they are *called*, not the order their futures are polled. The
//! hub relies on this to issue subscribe/unsubscribe in transition order
//! under its registry lock, and connections rely on it so that one client's
//! publishes to a room keep their order.
//!
//! - [`memory`]: one process, no bus (the default, and the tests' reference)
//! - [`redis`]: Redis Pub/Sub, or Redis Streams with history, with Sentinel;
//!   on a Redis Cluster, sharded Pub/Sub ([`redis::cluster`])
//! - [`kafka`]: the partitions of one Kafka topic, each node reading those
//!   of the rooms it serves
//! - [`continuity`]: the offset/epoch rules (deliver, drop, fill, report
//!   lost, resume after a reconnect), pure functions
//! - [`tracker`]: those rules applied per served room, with gap fills that
//!   hold only their own room
//! - [`upstream_kafka`]: around any of them, client publishes to
//!   `--upstream-rooms` written to a Kafka topic (`--upstream-kafka`)
//!
//! ## Adding a broker
//!
//! A broker implements [`Broker`] and hands each message of the rooms this
//! node subscribed to [`Deliver`] once, from one reader that never waits on
//! anything but its bus. Without a history that is all (the memory broker).
//! With one, it reuses [`continuity`] and [`tracker`] unchanged: its reader
//! passes live messages to [`Tracker::live`](tracker::Tracker::live), runs
//! the [`FillJob`](tracker::FillJob)s it gets back off its path with a
//! [`ReadPage`](tracker::ReadPage) of its own, and after a reconnect asks its
//! bus the epoch check and applies [`continuity::resume`]. The Redis broker's
//! module doc shows the task split to copy (finding the server, a link
//! supervisor, a reader, a publisher) and what a Redis Cluster or Kafka
//! broker would keep of it.

pub mod continuity;
pub mod kafka;
pub mod memory;
pub mod redis;
pub mod tracker;
pub mod upstream_kafka;

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::protocol::{Frame, RoomName};

pub use self::kafka::{KafkaBroker, KafkaOptions, KafkaUrl};
pub use self::redis::cluster::RedisClusterBroker;
pub use self::redis::{RedisBroker, RedisOptions, RedisUrl};
pub use memory::MemoryBroker;
pub use upstream_kafka::{UpstreamKafka, UpstreamKafkaOptions};

/// A message to publish.
#[derive(Debug)]
pub struct PublishRequest {
    pub room: RoomName,
    pub data: Box<RawValue>,
    /// Publisher session (WebSocket publishes only).
    pub from: Option<Arc<str>>,
    /// Idempotency key.
    pub key: Option<String>,
}

/// What a successful publish was assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub offset: u64,
    pub epoch: Arc<str>,
    /// The idempotency key was seen within the window: this is the original
    /// publish's offset, and nothing was delivered again.
    pub duplicate: bool,
}

/// The last offset of a room (0 when nothing was published yet) and its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// One message as it reaches a node: the `message` frame, already encoded.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub room: RoomName,
    pub offset: u64,
    pub epoch: Arc<str>,
    pub frame: Frame,
    /// When the publish was accepted, in microseconds since the Unix epoch
    /// (for the publish-to-delivery latency histogram).
    pub published_at_us: u64,
}

/// What a room keeps, for recovery and the history API (durable delivery).
#[derive(Debug, Clone)]
pub struct History {
    pub epoch: Arc<str>,
    /// The room's last offset (0 when nothing was published in this epoch).
    pub last: u64,
    /// Kept messages after the requested offset, oldest first, up to the
    /// limit asked for. Their frames are exactly what subscribers were sent.
    pub messages: Vec<Delivery>,
    /// For a broker whose offsets skip (Kafka's positions in a partition
    /// shared by rooms): how far the read went. `None`: offsets grow by one
    /// per message, so the messages show it themselves.
    pub read: Option<ReadSpan>,
}

/// What a read of a log shared by rooms saw: every message of the room
/// after `from` up to `through` is in the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSpan {
    pub from: u64,
    pub through: u64,
}

impl History {
    /// Whether every message after `after` up to `last` is in `messages`
    /// (none fell out of the history window).
    pub fn covers(&self, after: u64) -> bool {
        match self.read {
            Some(span) => span.from <= after,
            None => {
                after >= self.last || self.messages.first().is_some_and(|m| m.offset == after + 1)
            }
        }
    }
}

/// Where a broker hands messages for this node's rooms.
pub trait Deliver: Send + Sync + 'static {
    fn deliver(&self, delivery: Delivery);

    /// The room's messages in `epoch` up to offset `upto` that were not
    /// delivered yet will never be: they are gone from the history (durable
    /// delivery) before this node could read them. Told to the room's
    /// subscribers in place of the missing messages.
    fn lost(&self, room: &RoomName, epoch: &Arc<str>, upto: u64);
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The bus cannot be reached (or is failing over); the client should retry.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The bus did not answer in time.
    #[error("broker did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// Too many requests are waiting for the bus; the client should retry.
    #[error("broker overloaded: too many requests in flight")]
    Overloaded,
    /// A publish went out to the bus but no answer came back (it timed out,
    /// or the link broke while it was in flight): it may or may not have been
    /// delivered. Retrying is safe only with the same idempotency key.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
}

impl BrokerError {
    /// The protocol's error code: `outcome_unknown` when a publish may have
    /// been delivered, `unavailable` (nothing happened: retry) otherwise.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        match self {
            BrokerError::OutcomeUnknown(_) => crate::protocol::ErrorCode::OutcomeUnknown,
            _ => crate::protocol::ErrorCode::Unavailable,
        }
    }

    /// What a client is told: the reason without the broker's internals
    /// (addresses, Redis errors), which only the node's logs and `/readyz` show.
    pub fn public_message(&self) -> String {
        match self {
            BrokerError::Unavailable(_) => "the message bus is unreachable: retry later".into(),
            BrokerError::OutcomeUnknown(_) => {
                "the message bus did not answer: the message may have been delivered; \
                 retry with the same key"
                    .into()
            }
            other => other.to_string(),
        }
    }
}

/// Is the broker usable right now, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Up,
    Down(String),
}

impl Health {
    pub fn is_up(&self) -> bool {
        matches!(self, Health::Up)
    }
}

/// The message bus seen from one node.
pub trait Broker: Send + Sync + 'static {
    /// Assigns the next offset of the room and delivers the message to every
    /// node subscribed to it. Resolves within a bounded time.
    fn publish(&self, req: PublishRequest) -> BoxFuture<'static, Result<Published, BrokerError>>;

    /// Starts receiving the room's messages on this node; resolves once
    /// messages published after it resolved are certain to be delivered.
    /// Called once per 0 → 1 transition of local subscribers.
    fn subscribe(&self, room: &RoomName) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Stops receiving the room. Called once per 1 → 0 transition.
    fn unsubscribe(&self, room: &RoomName);

    /// The room's current last offset and epoch.
    fn position(&self, room: &RoomName) -> BoxFuture<'static, Result<Position, BrokerError>>;

    /// Whether rooms keep a history (`--delivery streams`).
    fn durable(&self) -> bool {
        false
    }

    /// Up to `limit` kept messages of the room after offset `after`, with the
    /// room's epoch and last offset; no more than `max_bytes` of frames, but
    /// always the first message when there is one, however large (a page:
    /// the caller asks again after the last offset it got). Brokers without
    /// history answer `Ok(None)`.
    fn history(
        &self,
        _room: &RoomName,
        _after: u64,
        _limit: usize,
        _max_bytes: usize,
    ) -> BoxFuture<'static, Result<Option<History>, BrokerError>> {
        std::future::ready(Ok(None)).boxed()
    }

    /// Follows the broker's health (drives `/readyz`).
    fn health(&self) -> watch::Receiver<Health>;

    /// Short name for logs and metrics (`memory`, `redis`, …).
    fn kind(&self) -> &'static str;
}

/// Microseconds since the Unix epoch, for latency measurement across nodes.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A fresh random epoch identifier (16 hex digits).
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}
