//! Redis broker: fan-out across nodes through Redis Pub/Sub (durable
//! delivery: Redis Streams), with Sentinel failover.
//!
//! Connection management apart from broker logic, after Centrifugo's
//! `centrifuge` (`redis_shard.go` / `broker_redis.go`):
//!
//! | module | owns | runs as |
//! |---|---|---|
//! | `discovery` | where the master is: the URL's, or one long-lived Sentinel connection following `+switch-master` | a task (Sentinel only) |
//! | `connection` | connecting to the master: role, scripts, fence, the Pub/Sub connection | called by the link |
//! | `link` | the link's lifecycle: connect, watch (canary, publisher errors, master moved), reconnect with backoff; health | the supervisor task |
//! | `reader` | reading the Pub/Sub stream and handing each message over; never waits on anything else | a task per link |
//! | `subscriptions` | rooms the hub wants, and bringing the link's SUBSCRIBEs to them | called by the link |
//! | `publisher` | publishes in call order, pipelined, answered | a task |
//! | `history` | history pages, room positions, the epoch check after a reconnect | called by the link and the fills |
//! | `scripts`, `url`, `options`, `error` | Lua scripts and key names; `--broker` URLs; tuning; the typed error | |
//!
//! Broker-agnostic parts it uses: the offset-continuity rules
//! ([`continuity`](crate::broker::continuity)) and the [`Tracker`] that
//! applies them per room and holds a room's live messages behind its gap
//! fill, which runs off the reader's path. So one slow party — a sentinel
//! that stopped answering, a history read — never delays delivery in a room
//! it does not concern.
//!
//! While the link is down, publishes and new subscriptions fail at once with
//! `unavailable`, `/readyz` answers 503, and clients stay connected: when the
//! link is back every served room is subscribed again and delivery resumes.
//!
//! With history (`--delivery streams`) the tracker remembers the last offset
//! delivered per room and the publisher the last one it had acknowledged. A
//! live message that skips offsets is preceded by the missing ones, read
//! from the room's stream, so local subscribers see every offset in order;
//! after a reconnect the rooms are caught up the same way, and a master that
//! lacks offsets this node saw acknowledged (asynchronous replication lost
//! them in a failover) gets a new epoch for the room.
//!
//! Without history (`--delivery pubsub`) no node keeps what it saw, so the
//! link instead learns the master's *fence* when it connects (a token that
//! changes whenever another Redis process is master): a room whose epoch
//! began under another fence starts a new one, because its counter may have
//! gone back with the writes that restart or failover lost.
//!
//! ## Another broker of the same shape
//!
//! What any broker implements and reuses is in the [`broker`](crate::broker)
//! module doc. A Redis Cluster broker (sharded Pub/Sub) would keep
//! `scripts`, `publisher`, `history` and `subscriptions` per shard (with
//! the room's keys hash-tagged so that one script's keys share a slot, and
//! `SSUBSCRIBE`), and replace `discovery` and `link` with per-shard ones; a
//! Kafka broker would keep only the broker-agnostic parts and `error`'s
//! pattern.

mod canary;
pub mod cluster;
mod connection;
mod discovery;
mod error;
mod history;
mod link;
mod options;
mod publisher;
mod reader;
mod scripts;
mod subscriptions;
mod url;

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;

pub use error::Error;
pub use options::{HistoryOptions, RedisOptions, UpstreamOptions};
pub use url::{Addr, RedisUrl, Target, UrlError};

use self::connection::Master;
use self::discovery::Discovery;
use self::history::Acked;
use self::publisher::PublishCmd;
use self::subscriptions::Subscriptions;
use super::tracker::Tracker;
use super::{
    Broker, BrokerError, Deliver, Health, History, Position, PublishRequest, Published, new_epoch,
};
use crate::metrics::Metrics;
use crate::protocol::RoomName;

pub struct RedisBroker {
    shared: Arc<Shared>,
    publish_tx: mpsc::Sender<PublishCmd>,
    tasks: Vec<JoinHandle<()>>,
}

/// What the broker's tasks share.
struct Shared {
    opts: RedisOptions,
    discovery: Discovery,
    subscriptions: Subscriptions,
    /// Wakes the link when the publisher saw it fail.
    trouble: Notify,
    health: watch::Sender<Health>,
    /// The master of the current link, if any.
    conn: watch::Sender<Option<Master>>,
    deliver: Arc<dyn Deliver>,
    /// History mode: what each room was handed, and what was acknowledged.
    history: Option<(Arc<Tracker>, Acked)>,
    metrics: Arc<Metrics>,
    canary_channel: String,
}

impl RedisBroker {
    /// Starts the broker's tasks; the link comes up in the background
    /// (`health()` tells when).
    pub fn start(opts: RedisOptions, deliver: Arc<dyn Deliver>, metrics: Arc<Metrics>) -> Self {
        let canary_channel = format!(
            "chorus:canary:{}:{:08x}",
            opts.node_id,
            rand::random::<u32>()
        );
        let history = opts.history.as_ref().map(|_| {
            (
                Arc::new(Tracker::new(deliver.clone(), metrics.clone())),
                Acked::default(),
            )
        });
        let shared = Arc::new(Shared {
            discovery: Discovery::new(&opts.url.target),
            subscriptions: Subscriptions::default(),
            trouble: Notify::new(),
            health: watch::Sender::new(Health::Down("connecting".into())),
            conn: watch::Sender::new(None),
            deliver,
            history,
            metrics,
            canary_channel,
            opts,
        });
        let (publish_tx, publish_rx) = mpsc::channel(publisher::QUEUE);
        let mut tasks = vec![
            tokio::spawn(publisher::run(shared.clone(), publish_rx)),
            tokio::spawn(link::supervise(shared.clone())),
        ];
        if let Target::Sentinel { sentinels, master } = &shared.opts.url.target {
            tasks.push(tokio::spawn(discovery::follow(
                shared.clone(),
                sentinels.clone(),
                master.clone(),
            )));
        }
        Self {
            shared,
            publish_tx,
            tasks,
        }
    }

    fn down(&self) -> Option<BrokerError> {
        match &*self.shared.health.borrow() {
            Health::Down(why) => Some(BrokerError::Unavailable(why.clone())),
            Health::Up => None,
        }
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Broker for RedisBroker {
    fn publish(&self, req: PublishRequest) -> BoxFuture<'static, Result<Published, BrokerError>> {
        if let Some(down) = self.down() {
            return std::future::ready(Err(down)).boxed();
        }
        let (reply, rx) = oneshot::channel();
        if let Err(e) = self.publish_tx.try_send(PublishCmd {
            req,
            reply,
            hops: 0,
        }) {
            let err = match e {
                mpsc::error::TrySendError::Full(_) => BrokerError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => Error::Dropped("publisher stopped").into(),
            };
            return std::future::ready(Err(err)).boxed();
        }
        // The publisher bounds each pipeline by op_timeout; queueing behind a
        // full pipeline can add one more. Past that, the publish may be in a
        // pipeline Redis ran: its outcome is unknown.
        let limit = self.shared.opts.op_timeout * 3;
        await_reply(limit, rx, "publisher stopped")
            .map(move |res| match res {
                Err(BrokerError::Timeout(limit)) => Err(publisher::unanswered(limit)),
                other => other,
            })
            .boxed()
    }

    fn subscribe(&self, room: &RoomName) -> BoxFuture<'static, Result<(), BrokerError>> {
        if let Some(down) = self.down() {
            return std::future::ready(Err(down)).boxed();
        }
        let rx = self.shared.subscriptions.want(room);
        await_reply(self.shared.opts.op_timeout * 3, rx, "link restarted").boxed()
    }

    fn unsubscribe(&self, room: &RoomName) {
        self.shared.subscriptions.unwant(room);
    }

    fn position(&self, room: &RoomName) -> BoxFuture<'static, Result<Position, BrokerError>> {
        let Some(Master {
            addr,
            mut conn,
            fence,
        }) = self.shared.conn.borrow().clone()
        else {
            return std::future::ready(Err(Error::NotConnected.into())).boxed();
        };
        let opts = &self.shared.opts;
        let mut inv = scripts::POSITION.key(scripts::room_key(room.as_str()));
        inv.key(opts.history_key(room.as_str()))
            .arg(new_epoch())
            .arg(opts.ttl_secs())
            .arg(&*fence);
        let limit = opts.op_timeout;
        async move {
            let call = inv.invoke_async::<(u64, String)>(&mut conn);
            let (offset, epoch) = error::bounded(&addr, "position script", limit, call).await?;
            Ok(Position {
                offset,
                epoch: epoch.into(),
            })
        }
        .boxed()
    }

    fn durable(&self) -> bool {
        self.shared.opts.history.is_some()
    }

    fn history(
        &self,
        room: &RoomName,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'static, Result<Option<History>, BrokerError>> {
        if self.shared.opts.history.is_none() {
            return std::future::ready(Ok(None)).boxed();
        }
        let master = self.shared.conn.borrow().clone();
        let room = room.clone();
        let op_timeout = self.shared.opts.op_timeout;
        async move {
            let Master { addr, mut conn, .. } = master.ok_or(Error::NotConnected)?;
            let keys = scripts::Keyspace::Plain;
            let page = history::read(
                &mut conn, &addr, keys, &room, after, limit, max_bytes, op_timeout,
            )
            .await?;
            Ok(Some(page))
        }
        .boxed()
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

/// The answer one of the broker's tasks sends back, waited for at most
/// `limit`; `gone` says why there is none when the task dropped the request.
pub(super) async fn await_reply<T>(
    limit: std::time::Duration,
    rx: oneshot::Receiver<Result<T, BrokerError>>,
    gone: &'static str,
) -> Result<T, BrokerError> {
    match timeout(limit, rx).await {
        Ok(Ok(res)) => res,
        Ok(Err(_)) => Err(Error::Dropped(gone).into()),
        Err(_) => Err(BrokerError::Timeout(limit)),
    }
}
