//! A node: the hub, the broker, auth, metrics and the connection registry,
//! shared by every request handler.
//!
//! The node stands between the connections and the message bus: a session
//! subscribes a connection through [`Node::subscribe`] (the hub joins it to
//! the room, subscribing the node to the room's broker channel for its first
//! local subscriber; [`recovery`] says where it starts), leaves with
//! [`Node::leave`] and publishes with [`Node::publish`]. The broker hands
//! each message to the hub, which queues it for every local subscriber.

mod recovery;

pub use recovery::{Page, REPLAY_PAGE, REPLAY_PAGE_BYTES, Recovery, Replay, Subscribed};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::auth::{AuthConfig, Authenticator};
use crate::broker::redis::{HistoryOptions, UpstreamOptions};
use crate::broker::{
    Broker, BrokerError, Health, KafkaBroker, KafkaOptions, KafkaUrl, MemoryBroker, PublishRequest,
    Published, RedisBroker, RedisClusterBroker, RedisOptions, RedisUrl, UpstreamKafka,
    UpstreamKafkaOptions,
};
use crate::config::{Config, DeliveryMode, read_secret};
use crate::hub::{CloseReason, ConnControl, ConnId, Hub, Member};
use crate::metrics::Metrics;
use crate::outbox::OutboxOptions;
use crate::protocol::{Pattern, RoomName, Since};
use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "unsupported --broker URL `{0}` (expected memory://, redis://…, redis+sentinel://…, redis+cluster://… or kafka://…)"
    )]
    BrokerUrl(String),
    #[error(
        "--delivery streams needs a Redis broker (--broker redis://…, redis+sentinel://… or redis+cluster://…)"
    )]
    StreamsNeedRedis,
    #[error("cannot read {what} from {path}: {source}")]
    SecretFile {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    RedisUrl(#[from] crate::broker::redis::UrlError),
    #[error(transparent)]
    KafkaUrl(#[from] crate::broker::kafka::UrlError),
    /// Not a source: rdkafka's message is in the text, once.
    #[error("Kafka client: {0}")]
    Kafka(rdkafka::error::KafkaError),
    #[error(
        "--upstream-rooms needs a Redis broker (--broker redis://…, redis+sentinel://… or redis+cluster://…) \
         or --upstream-kafka"
    )]
    UpstreamNeedsRedis,
    #[error("--upstream-kafka needs --upstream-rooms (which rooms to feed)")]
    UpstreamKafkaNeedsRooms,
    #[error("--upstream-kafka: {0}")]
    UpstreamKafkaUrl(crate::broker::kafka::UrlError),
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestError),
    #[error("--upstream-rooms: `{0}` is not a room name, `prefix:*` or `*`")]
    UpstreamPattern(String),
    #[error("auth configuration: {0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OptionsError),
}

impl From<rdkafka::error::KafkaError> for StartError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        StartError::Kafka(e)
    }
}

pub struct Node {
    pub config: Config,
    pub node_id: Arc<str>,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub metrics: Arc<Metrics>,
    pub auth: Authenticator,
    health: watch::Receiver<Health>,
    /// Open connections, for the drain to tell them. Std mutex:
    /// insert/remove/snapshot only.
    conns: Mutex<HashMap<ConnId, Arc<ConnControl>>>,
    /// Every WebSocket connection's task, from its upgrade to the end of its
    /// closing handshake: what the drain waits for.
    tasks: TaskTracker,
    next_conn: AtomicU64,
    open: AtomicUsize,
    draining: AtomicBool,
    /// The outbox relay's and the Kafka ingest's tasks (`--outbox`,
    /// `--kafka-ingest`), ended with the node. Std mutex: set at start,
    /// taken on drop.
    tasks_to_end: Mutex<Vec<AbortHandle>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        for task in lock(&self.tasks_to_end).drain(..) {
            task.abort();
        }
    }
}

impl Node {
    /// Builds a node from its configuration, connecting the broker.
    pub async fn start(config: Config) -> Result<Arc<Self>, StartError> {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(metrics.clone()));
        let broker: Arc<dyn Broker> = match config.broker.scheme() {
            Some("memory") => {
                if config.delivery == DeliveryMode::Streams {
                    return Err(StartError::StreamsNeedRedis);
                }
                Arc::new(
                    MemoryBroker::new(hub.clone())
                        .with_idempotency_window(config.idempotency_window),
                )
            }
            Some("redis" | "redis+sentinel" | "redis+cluster") => {
                let mut url = RedisUrl::parse(config.broker.as_str())?;
                if let Some(path) = &config.redis_password_file {
                    url.password = Some(file_secret("the Redis password", path)?);
                }
                let mut opts = RedisOptions::new(url, config.node_id());
                opts.canary_interval = config.canary_interval;
                opts.canary_timeout = config.canary_timeout;
                opts.op_timeout = config.redis_timeout;
                opts.idempotency_window = config.idempotency_window;
                if config.delivery == DeliveryMode::Streams {
                    opts.history = Some(HistoryOptions {
                        size: config.history_size,
                    });
                    // Room state and history expire together.
                    opts.room_ttl = config.history_ttl;
                }
                if !config.upstream_rooms.is_empty() && config.upstream_kafka.is_none() {
                    opts.upstream = Some(UpstreamOptions {
                        rooms: upstream_patterns(&config)?,
                        maxlen: config.upstream_maxlen,
                    });
                }
                if config.broker.scheme() == Some("redis+cluster") {
                    Arc::new(RedisClusterBroker::start(
                        opts,
                        hub.clone(),
                        metrics.clone(),
                    ))
                } else {
                    Arc::new(RedisBroker::start(opts, hub.clone(), metrics.clone()))
                }
            }
            Some("kafka") => {
                if config.delivery == DeliveryMode::Streams {
                    return Err(StartError::StreamsNeedRedis);
                }
                let mut opts =
                    KafkaOptions::new(KafkaUrl::parse(config.broker.as_str())?, config.node_id());
                opts.partitions = config.kafka_partitions;
                opts.op_timeout = config.kafka_timeout;
                opts.idempotency_window = config.idempotency_window;
                Arc::new(KafkaBroker::start(opts, hub.clone(), metrics.clone())?)
            }
            _ => return Err(StartError::BrokerUrl(config.broker.redacted())),
        };
        let redis = matches!(
            config.broker.scheme(),
            Some("redis" | "redis+sentinel" | "redis+cluster")
        );
        let broker: Arc<dyn Broker> = match &config.upstream_kafka {
            Some(url) => {
                if config.upstream_rooms.is_empty() {
                    return Err(StartError::UpstreamKafkaNeedsRooms);
                }
                let opts = UpstreamKafkaOptions {
                    url: KafkaUrl::parse(url).map_err(StartError::UpstreamKafkaUrl)?,
                    rooms: upstream_patterns(&config)?,
                    node_id: config.node_id(),
                    partitions: config.kafka_partitions,
                    op_timeout: config.kafka_timeout,
                };
                Arc::new(UpstreamKafka::start(broker, opts, metrics.clone())?)
            }
            None if !redis && !config.upstream_rooms.is_empty() => {
                return Err(StartError::UpstreamNeedsRedis);
            }
            None => broker,
        };
        let auth = Authenticator::new(auth_config(&config)?)?;
        let outbox = OutboxOptions::from_config(&config)?;
        let ingest = crate::ingest::IngestOptions::from_config(&config)?;
        let node = Self::assemble(config, hub, broker, metrics, auth);
        if let Some(options) = outbox {
            let relay = crate::outbox::spawn(&node, options);
            lock(&node.tasks_to_end).push(relay.abort_handle());
        }
        if let Some(options) = ingest {
            let ingest = crate::ingest::spawn(&node, options)?;
            lock(&node.tasks_to_end).push(ingest.abort_handle());
        }
        Ok(node)
    }

    pub(crate) fn assemble(
        config: Config,
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        auth: Authenticator,
    ) -> Arc<Self> {
        let health = broker.health();
        metrics
            .max_connections
            .set(i64::try_from(config.max_connections).unwrap_or(i64::MAX));
        Arc::new(Self {
            node_id: config.node_id().into(),
            config,
            hub,
            broker,
            metrics,
            auth,
            health,
            conns: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            next_conn: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            tasks_to_end: Mutex::new(Vec::new()),
        })
    }

    /// `Ok` when the node should receive traffic; otherwise why not.
    pub fn ready(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining".into());
        }
        match &*self.health.borrow() {
            Health::Up => Ok(()),
            Health::Down(why) => Err(format!("broker {} unavailable: {why}", self.broker.kind())),
        }
    }

    pub fn broker_up(&self) -> bool {
        self.health.borrow().is_up()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Joins a connection to `room` (the hub subscribes the node to it for
    /// its first local subscriber: nothing published from then on is
    /// missed), then says where the connection starts and, with `since`,
    /// what it missed ([`Node::recover`]). On an error the connection is not
    /// in the room.
    pub async fn subscribe(
        &self,
        id: ConnId,
        member: Member,
        room: &RoomName,
        since: Option<Since>,
    ) -> Result<Subscribed, BrokerError> {
        self.hub.join(&*self.broker, room, id, member).await?;
        let subscribed = match self.broker.position(room).await {
            Ok(pos) => self.recover(room, since, pos).await,
            Err(e) => Err(e),
        };
        if subscribed.is_err() {
            self.leave(id, room);
        }
        subscribed
    }

    /// Takes a connection out of `room` (the node unsubscribes from it with
    /// its last local subscriber). Whether it was in the room.
    pub fn leave(&self, id: ConnId, room: &RoomName) -> bool {
        self.hub.leave(&*self.broker, room, id)
    }

    /// Whether a publish to `room` is refused because the room's fan-out on
    /// this node is behind (counted); see [`Hub::congested`].
    pub fn congested(&self, room: &RoomName) -> bool {
        let congested = self.hub.congested(room);
        if congested {
            self.metrics.publishes_congested.inc();
        }
        congested
    }

    /// Publishes through the broker and counts the outcome.
    pub fn publish(
        self: &Arc<Self>,
        req: PublishRequest,
    ) -> impl Future<Output = Result<Published, BrokerError>> + Send + 'static {
        let fut = self.broker.publish(req);
        let node = self.clone();
        async move {
            let res = fut.await;
            match &res {
                Ok(_) => node.metrics.published.inc(),
                Err(_) => node.metrics.publish_errors.inc(),
            };
            res
        }
    }

    /// Reserves a connection slot, or `None` at the limit.
    pub(crate) fn reserve_slot(self: &Arc<Self>) -> Option<Slot> {
        let max = self.config.max_connections;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.connections.inc();
        Some(Slot {
            node: self.clone(),
            _task: self.tasks.token(),
        })
    }

    pub(crate) fn register(&self, ctl: Arc<ConnControl>) -> ConnId {
        let id = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        lock(&self.conns).insert(id, ctl);
        id
    }

    pub(crate) fn unregister(&self, id: ConnId) {
        lock(&self.conns).remove(&id);
    }

    /// Open WebSocket connections.
    pub fn connections(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Drains the node: `/readyz` turns 503, new upgrades are refused, every
    /// client gets `reconnect` (spread over `--drain-seconds`) and is closed.
    /// Resolves when the last connection's task has ended (its closing
    /// handshake done), or at the returned deadline ([`DRAIN_GRACE`] after
    /// the spread), by which the node must stop.
    pub async fn drain(&self) -> Instant {
        if self.draining.swap(true, Ordering::AcqRel) {
            return Instant::now();
        }
        let conns: Vec<Arc<ConnControl>> = lock(&self.conns).values().cloned().collect();
        let window = Duration::from_secs(self.config.drain_seconds);
        tracing::info!(
            connections = conns.len(),
            seconds = self.config.drain_seconds,
            "draining"
        );
        let start = Instant::now();
        let n = conns.len().max(1) as u32;
        for (i, ctl) in conns.iter().enumerate() {
            tokio::time::sleep_until(start + window * i as u32 / n).await;
            // A little jitter on top of the spread, so clients told in the same
            // instant do not reconnect in the same instant.
            ctl.close(CloseReason::Draining {
                after_ms: rand::random_range(0..250),
            });
        }
        let deadline = Instant::now() + DRAIN_GRACE;
        self.tasks.close();
        let _ = tokio::time::timeout_at(deadline, self.tasks.wait()).await;
        tracing::info!(left = self.tasks.len(), "drained");
        deadline
    }
}

impl Node {
    /// Sheds up to `count` connections to balance the fleet: each is told
    /// `reconnect` (reason `rebalance`), spread evenly over `over` with a
    /// little jitter, and closed; clients come back through the Service,
    /// to any pod. Returns how many were scheduled; the rest of the node
    /// carries on.
    pub fn shed(self: &Arc<Self>, count: usize, over: Duration) -> usize {
        let mut conns: Vec<Arc<ConnControl>> = lock(&self.conns).values().cloned().collect();
        conns.truncate(count);
        let n = conns.len();
        if n == 0 {
            return 0;
        }
        tracing::info!(
            connections = n,
            seconds = over.as_secs_f64(),
            "shedding connections to rebalance"
        );
        tokio::spawn(async move {
            let start = Instant::now();
            for (i, ctl) in conns.iter().enumerate() {
                tokio::time::sleep_until(start + over * i as u32 / n as u32).await;
                ctl.close(CloseReason::Rebalancing {
                    after_ms: rand::random_range(0..250),
                });
            }
        });
        n
    }
}

/// The `--upstream-rooms` patterns.
fn upstream_patterns(config: &Config) -> Result<Vec<Pattern>, StartError> {
    config
        .upstream_rooms
        .iter()
        .map(|p| Pattern::parse(p.trim()).ok_or_else(|| StartError::UpstreamPattern(p.clone())))
        .collect()
}

/// After the drain's spread, how long closing handshakes and HTTP requests
/// in flight may still take before the node stops regardless.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// A reserved connection slot, held by the connection's task from before
/// its upgrade to the end of its closing handshake: counted against
/// `--max-connections` and waited for by [`Node::drain`]. Released on drop.
pub(crate) struct Slot {
    node: Arc<Node>,
    _task: TaskTrackerToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.node.open.fetch_sub(1, Ordering::AcqRel);
        self.node.metrics.connections.dec();
    }
}

fn file_secret(what: &'static str, path: &std::path::Path) -> Result<String, StartError> {
    read_secret(path).map_err(|source| StartError::SecretFile {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn auth_config(config: &Config) -> Result<AuthConfig, StartError> {
    let file = file_secret;
    let api_key = match (&config.api_key, &config.api_key_file) {
        (Some(k), _) => Some(k.expose().to_owned()),
        (None, Some(p)) => Some(file("the API key", p)?),
        (None, None) => None,
    };
    let jwt_secret = match (&config.jwt_secret, &config.jwt_secret_file) {
        (Some(s), _) => Some(s.expose().as_bytes().to_vec()),
        (None, Some(p)) => Some(file("the JWT secret", p)?.into_bytes()),
        (None, None) => None,
    };
    let jwt_public_key_pem = match &config.jwt_public_key_file {
        Some(p) => Some(std::fs::read(p).map_err(|source| StartError::SecretFile {
            what: "the JWT public key",
            path: p.display().to_string(),
            source,
        })?),
        None => None,
    };
    Ok(AuthConfig {
        jwt_secret,
        jwt_public_key_pem,
        api_key,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::hub::ConnHandle;

    #[tokio::test(start_paused = true)]
    async fn the_drain_ends_when_the_last_connection_does() {
        let mut config = Config::defaults();
        config.drain_seconds = 0;
        let node = Node::start(config).await.unwrap();
        let (handle, _queue) = ConnHandle::new(1);
        let slot = node.reserve_slot().unwrap();
        let id = node.register(handle.ctl.clone());
        let conn = node.clone();
        tokio::spawn(async move {
            handle.ctl.closed().await;
            conn.unregister(id);
            // The closing handshake.
            tokio::time::sleep(Duration::from_millis(1005)).await;
            drop(slot);
        });
        let start = Instant::now();
        node.drain().await;
        assert_eq!(start.elapsed(), Duration::from_millis(1005));
    }
}
