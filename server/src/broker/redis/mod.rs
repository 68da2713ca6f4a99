//! Redis Pub/Sub broker: fan-out across nodes, with Sentinel failover.
//!
//! Three tasks per node, sharing [`Shared`]:
//! - the **publisher** takes publishes in call order from a bounded queue,
//!   sends whatever is waiting as one pipeline of `EVALSHA` (one round trip,
//!   order kept) on the multiplexed connection, and answers each caller;
//! - the **link supervisor** owns the connection lifecycle: find the master
//!   (directly, or by asking the sentinels and checking `ROLE`), open the
//!   publish connection and the one pub/sub connection, subscribe every room
//!   this node serves, then watch the link — pub/sub stream closed, canary
//!   not coming back, publisher errors, the sentinels naming another master —
//!   and on trouble mark the broker down and reconnect with jittered backoff;
//! - the link's **subscription reconciler** (inside the supervisor loop)
//!   brings the Redis subscriptions to the set of rooms the hub wants.
//!
//! While the link is down, publishes and new subscriptions fail at once with
//! `unavailable`, `/readyz` answers 503, and clients stay connected: when the
//! link is back every served room is subscribed again and delivery resumes.
//!
//! With history (`--delivery streams`) the supervisor also remembers the last
//! offset it delivered per room and the publisher the last one it had
//! acknowledged. A live message that skips offsets is preceded by the
//! missing ones, read from the room's stream, so local subscribers see every
//! offset in order; after a reconnect the rooms are caught up the same way,
//! and a master that lacks offsets this node saw acknowledged (asynchronous
//! replication lost them in a failover) gets a new epoch for the room.
//!
//! Without history (`--delivery pubsub`) no node keeps what it saw, so the
//! link instead learns the master's *fence* when it connects (a token that
//! changes whenever another Redis process is master): a room whose epoch
//! began under another fence starts a new one, because its counter may have
//! gone back with the writes that restart or failover lost.

mod scripts;
mod url;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

pub use url::{Addr, RedisUrl, Target, UrlError};

use super::{
    Broker, BrokerError, Deliver, Delivery, Health, Position, PublishRequest, Published, new_epoch,
    now_us,
};
use crate::broker::History;
use crate::metrics::Metrics;
use crate::protocol::{Frame, Pattern, RoomName, message_parts};
use crate::sync::lock;

/// Tuning of the Redis link.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: RedisUrl,
    pub node_id: String,
    /// A room's state (epoch, offset) expires after this long without a publish.
    pub room_ttl: Duration,
    /// Bound on every Redis call (connect, publish, subscribe).
    pub op_timeout: Duration,
    /// How often the canary goes round through Redis.
    pub canary_interval: Duration,
    /// A canary not back within this long means the subscription is dead.
    pub canary_timeout: Duration,
    /// Keep a history per room (`--delivery streams`).
    pub history: Option<HistoryOptions>,
    /// How long a publish's idempotency key is remembered.
    pub idempotency_window: Duration,
    /// Rooms whose client publishes are also appended for backend consumers.
    pub upstream: Option<UpstreamOptions>,
}

#[derive(Debug, Clone)]
pub struct HistoryOptions {
    /// Approximate number of messages kept per room.
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    pub rooms: Vec<Pattern>,
    /// Approximate number of entries kept per upstream stream.
    pub maxlen: u64,
}

impl UpstreamOptions {
    fn wants(&self, room: &str) -> bool {
        self.rooms.iter().any(|p| p.matches(room))
    }
}

impl RedisOptions {
    pub fn new(url: RedisUrl, node_id: String) -> Self {
        Self {
            url,
            node_id,
            room_ttl: Duration::from_secs(24 * 3600),
            op_timeout: Duration::from_secs(1),
            canary_interval: Duration::from_secs(1),
            canary_timeout: Duration::from_secs(3),
            history: None,
            idempotency_window: Duration::from_secs(300),
            upstream: None,
        }
    }
}

/// Publishes waiting for the publisher task; more are refused (`Overloaded`).
const PUBLISH_QUEUE: usize = 16 * 1024;
/// Publishes sent in one pipeline at most.
const MAX_PIPELINE: usize = 512;
/// Rooms subscribed in one SUBSCRIBE command at most.
const SUBSCRIBE_BATCH: usize = 512;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often the sentinels are asked whether the master moved.
const SENTINEL_POLL: Duration = Duration::from_millis(500);

pub struct RedisBroker {
    shared: Arc<Shared>,
    publish_tx: mpsc::Sender<PublishCmd>,
    tasks: Vec<JoinHandle<()>>,
}

struct PublishCmd {
    req: PublishRequest,
    reply: oneshot::Sender<Result<Published, BrokerError>>,
}

type Waiter = oneshot::Sender<Result<(), BrokerError>>;

struct Shared {
    opts: RedisOptions,
    /// Rooms the hub wants, with the subscribers waiting for the first
    /// confirmation. Std mutex: map updates only, never across `.await`.
    wanted: Mutex<HashMap<RoomName, Vec<Waiter>>>,
    /// Wakes the reconciler when `wanted` changed.
    wake: Notify,
    /// Wakes the supervisor when the publisher saw the link fail.
    trouble: Notify,
    /// Wakes the supervisor when a sentinel announced `+switch-master`.
    switched: Notify,
    health: watch::Sender<Health>,
    /// The publish connection of the current link, if any, with its fence.
    conn: watch::Sender<Option<Master>>,
    deliver: Arc<dyn Deliver>,
    metrics: Arc<Metrics>,
    canary_channel: String,
    /// History mode: the last offset this node had acknowledged per room
    /// (for the epoch check after a reconnect). Capped at [`MAX_TRACKED`].
    acked: Mutex<HashMap<RoomName, Seen>>,
}

/// The current master as publishes see it: the connection, and the fence
/// its writes carry (pubsub mode; `""` in history mode). One value, so that a
/// publish never pairs one master's connection with another's fence.
#[derive(Clone)]
struct Master {
    conn: MultiplexedConnection,
    fence: Arc<str>,
}

/// An offset of a room in an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    epoch: Arc<str>,
    offset: u64,
}

/// Rooms tracked for acknowledged offsets at most; past it, the map is reset.
const MAX_TRACKED: usize = 65_536;

impl RedisBroker {
    /// Starts the broker's tasks; the link comes up in the background
    /// (`health()` tells when).
    pub fn start(opts: RedisOptions, deliver: Arc<dyn Deliver>, metrics: Arc<Metrics>) -> Self {
        let canary_channel = format!(
            "chorus:canary:{}:{:08x}",
            opts.node_id,
            rand::random::<u32>()
        );
        let shared = Arc::new(Shared {
            opts,
            wanted: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            trouble: Notify::new(),
            switched: Notify::new(),
            health: watch::Sender::new(Health::Down("connecting".into())),
            conn: watch::Sender::new(None),
            deliver,
            metrics,
            canary_channel,
            acked: Mutex::new(HashMap::new()),
        });
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let mut tasks = vec![
            tokio::spawn(publisher(shared.clone(), publish_rx)),
            tokio::spawn(supervise(shared.clone())),
        ];
        if let Target::Sentinel { sentinels, master } = &shared.opts.url.target {
            tasks.push(tokio::spawn(watch_switches(
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
        if let Health::Down(why) = &*self.shared.health.borrow() {
            return std::future::ready(Err(BrokerError::Unavailable(why.clone()))).boxed();
        }
        let (reply, rx) = oneshot::channel();
        if let Err(e) = self.publish_tx.try_send(PublishCmd { req, reply }) {
            let err = match e {
                mpsc::error::TrySendError::Full(_) => BrokerError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    BrokerError::Unavailable("publisher stopped".into())
                }
            };
            return std::future::ready(Err(err)).boxed();
        }
        // The publisher bounds each pipeline by op_timeout; queueing behind a
        // full pipeline can add one more. Past that, the publish may be in a
        // pipeline Redis ran: its outcome is unknown.
        await_reply(self.shared.opts.op_timeout * 3, rx, "publisher stopped")
            .map(|res| match res {
                Err(BrokerError::Timeout(limit)) => Err(unanswered(limit)),
                other => other,
            })
            .boxed()
    }

    fn subscribe(&self, room: &RoomName) -> BoxFuture<'static, Result<(), BrokerError>> {
        if let Health::Down(why) = &*self.shared.health.borrow() {
            return std::future::ready(Err(BrokerError::Unavailable(why.clone()))).boxed();
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.wanted)
            .entry(room.clone())
            .or_default()
            .push(tx);
        self.shared.wake.notify_one();
        await_reply(self.shared.opts.op_timeout * 3, rx, "link restarted").boxed()
    }

    fn unsubscribe(&self, room: &RoomName) {
        lock(&self.shared.wanted).remove(room);
        self.shared.wake.notify_one();
    }

    fn position(&self, room: &RoomName) -> BoxFuture<'static, Result<Position, BrokerError>> {
        let Some(Master { mut conn, fence }) = self.shared.conn.borrow().clone() else {
            return std::future::ready(Err(BrokerError::Unavailable("not connected".into())))
                .boxed();
        };
        let mut inv = scripts::POSITION.key(scripts::room_key(room.as_str()));
        inv.key(self.shared.history_key(room.as_str()))
            .arg(new_epoch())
            .arg(self.shared.ttl_secs())
            .arg(&*fence);
        let limit = self.shared.opts.op_timeout;
        async move {
            let (offset, epoch) =
                bounded(limit, inv.invoke_async::<(u64, String)>(&mut conn)).await?;
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
        let conn = self.shared.conn.borrow().clone();
        let room = room.clone();
        let op_timeout = self.shared.opts.op_timeout;
        async move {
            let Some(Master { mut conn, .. }) = conn else {
                return Err(BrokerError::Unavailable("not connected".into()));
            };
            read_history(&mut conn, &room, after, limit, max_bytes, op_timeout)
                .await
                .map(Some)
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

/// A Redis call bounded in time, its failure as a broker error.
async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, BrokerError> {
    match timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(BrokerError::Unavailable(e.to_string())),
        Err(_) => Err(BrokerError::Timeout(limit)),
    }
}

/// The answer one of the broker's tasks sends back, waited for at most
/// `limit`; `gone` says why there is none when the task dropped the request.
async fn await_reply<T>(
    limit: Duration,
    rx: oneshot::Receiver<Result<T, BrokerError>>,
    gone: &'static str,
) -> Result<T, BrokerError> {
    match timeout(limit, rx).await {
        Ok(Ok(res)) => res,
        Ok(Err(_)) => Err(BrokerError::Unavailable(gone.into())),
        Err(_) => Err(BrokerError::Timeout(limit)),
    }
}

impl Shared {
    fn ttl_secs(&self) -> u64 {
        self.opts.room_ttl.as_secs().max(1)
    }

    /// The room's history stream, or `""` (no key) without history.
    fn history_key(&self, room: &str) -> String {
        if self.opts.history.is_some() {
            scripts::history_key(room)
        } else {
            String::new()
        }
    }

    fn note_acked(&self, room: &RoomName, epoch: &Arc<str>, offset: u64) {
        let mut acked = lock(&self.acked);
        if acked.len() >= MAX_TRACKED && !acked.contains_key(room) {
            acked.clear();
        }
        match acked.get_mut(room) {
            Some(seen) if seen.epoch == *epoch => seen.offset = seen.offset.max(offset),
            _ => {
                acked.insert(
                    room.clone(),
                    Seen {
                        epoch: epoch.clone(),
                        offset,
                    },
                );
            }
        }
    }
}

/// Reads the room's epoch, last offset and up to `limit` kept messages after
/// `after` (no more than `max_bytes` of frames, but at least one), in one
/// round trip.
async fn read_history(
    conn: &mut MultiplexedConnection,
    room: &RoomName,
    after: u64,
    limit: usize,
    max_bytes: usize,
    op_timeout: Duration,
) -> Result<History, BrokerError> {
    let mut inv = scripts::HISTORY.key(scripts::room_key(room.as_str()));
    inv.key(scripts::history_key(room.as_str()))
        .arg(after)
        .arg(limit.max(1))
        .arg(max_bytes);
    let (last, epoch, entries) = bounded(
        op_timeout,
        inv.invoke_async::<(Option<u64>, Option<String>, Vec<(String, Vec<u8>)>)>(conn),
    )
    .await?;
    let epoch: Arc<str> = epoch.unwrap_or_default().into();
    let mut messages = Vec::with_capacity(entries.len());
    for (id, frame) in entries {
        let Some(offset) = scripts::entry_offset(&id) else {
            continue;
        };
        let Some(frame) = Frame::from_utf8(frame) else {
            continue;
        };
        messages.push(Delivery {
            room: room.clone(),
            offset,
            epoch: epoch.clone(),
            frame,
            published_at_us: 0,
        });
    }
    Ok(History {
        epoch,
        last: last.unwrap_or(0),
        messages,
    })
}

// ---------------------------------------------------------------- publisher

async fn publisher(shared: Arc<Shared>, mut rx: mpsc::Receiver<PublishCmd>) {
    let conn_rx = shared.conn.subscribe();
    let hash = scripts::PUBLISH.get_hash().to_string();
    let history_len = shared.opts.history.as_ref().map_or(0, |h| h.size.max(1));
    let idem_secs = shared.opts.idempotency_window.as_secs().max(1);
    let upstream_len = shared.opts.upstream.as_ref().map_or(0, |u| u.maxlen.max(1));
    let mut batch: Vec<PublishCmd> = Vec::with_capacity(MAX_PIPELINE);
    while rx.recv_many(&mut batch, MAX_PIPELINE).await > 0 {
        let conn = conn_rx.borrow().clone();
        let Some(Master { mut conn, fence }) = conn else {
            for cmd in batch.drain(..) {
                let _ = cmd
                    .reply
                    .send(Err(BrokerError::Unavailable("not connected".into())));
            }
            continue;
        };
        let ts = now_us().to_string();
        // Arguments of each script call, kept for a retry with EVAL.
        let calls: Vec<(Vec<String>, Vec<String>)> = batch
            .iter()
            .map(|cmd| {
                let room = cmd.req.room.as_str();
                let (head, tail) = message_parts(room, &cmd.req.data, cmd.req.from.as_deref());
                let upstream = cmd.req.from.is_some()
                    && shared.opts.upstream.as_ref().is_some_and(|u| u.wants(room));
                let keys = vec![
                    scripts::room_key(room),
                    shared.history_key(room),
                    cmd.req
                        .key
                        .as_deref()
                        .map(|k| scripts::idempotency_key(room, k))
                        .unwrap_or_default(),
                    if upstream {
                        scripts::upstream_key(room)
                    } else {
                        String::new()
                    },
                ];
                let args = vec![
                    scripts::room_channel(room),
                    head,
                    tail,
                    ts.clone(),
                    new_epoch(),
                    shared.ttl_secs().to_string(),
                    history_len.to_string(),
                    idem_secs.to_string(),
                    upstream_len.to_string(),
                    if upstream {
                        cmd.req.data.get().to_string()
                    } else {
                        String::new()
                    },
                    cmd.req.from.as_deref().unwrap_or("").to_string(),
                    fence.to_string(),
                ];
                (keys, args)
            })
            .collect();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (keys, args) in &calls {
            pipe.cmd("EVALSHA")
                .arg(&hash)
                .arg(keys.len())
                .arg(keys)
                .arg(args);
        }
        let outcome = timeout(
            shared.opts.op_timeout,
            pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn),
        )
        .await;
        let results = match outcome {
            Ok(Ok(results)) => results,
            // The pipeline was (maybe partly) sent: Redis may have run any
            // of its scripts.
            Ok(Err(e)) => {
                shared.trouble.notify_one();
                for cmd in batch.drain(..) {
                    let _ = cmd.reply.send(Err(BrokerError::OutcomeUnknown(format!(
                        "the link failed with the publish in flight: {e}"
                    ))));
                }
                continue;
            }
            Err(_) => {
                shared.trouble.notify_one();
                for cmd in batch.drain(..) {
                    let _ = cmd.reply.send(Err(unanswered(shared.opts.op_timeout)));
                }
                continue;
            }
        };
        for ((cmd, res), (keys, args)) in batch.drain(..).zip(results).zip(calls) {
            let res = match res {
                // The script cache was flushed under us: EVAL loads it again
                // (one call at a time, so the order is kept).
                Err(e) if e.code() == Some("NOSCRIPT") => {
                    let mut inv = scripts::PUBLISH.prepare_invoke();
                    for k in keys {
                        inv.key(k);
                    }
                    for a in args {
                        inv.arg(a);
                    }
                    match timeout(
                        shared.opts.op_timeout,
                        inv.invoke_async::<redis::Value>(&mut conn),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => {
                            let _ = cmd.reply.send(Err(unanswered(shared.opts.op_timeout)));
                            continue;
                        }
                    }
                }
                other => other,
            };
            let reply = match res
                .and_then(|v| redis::from_redis_value::<(u64, String, u8)>(v).map_err(Into::into))
            {
                Ok((offset, epoch, duplicate)) => {
                    let epoch: Arc<str> = epoch.into();
                    if history_len > 0 {
                        shared.note_acked(&cmd.req.room, &epoch, offset);
                    }
                    Ok(Published {
                        offset,
                        epoch,
                        duplicate: duplicate == 1,
                    })
                }
                Err(e) => {
                    if e.code() == Some("READONLY") || e.is_io_error() || e.is_connection_dropped()
                    {
                        shared.trouble.notify_one();
                    }
                    Err(BrokerError::Unavailable(e.to_string()))
                }
            };
            let _ = cmd.reply.send(reply);
        }
    }
}

/// A publish sent to Redis whose answer did not come within `limit`.
fn unanswered(limit: Duration) -> BrokerError {
    BrokerError::OutcomeUnknown(format!("no answer from Redis within {limit:?}"))
}

// --------------------------------------------------------------- supervisor

/// One established link to the current master.
struct Link {
    master: Addr,
    conn: MultiplexedConnection,
    sink: PubSubSink,
    stream: PubSubStream,
    /// Rooms subscribed on this link.
    active: HashSet<RoomName>,
}

/// History mode: the last offset delivered to this node's subscribers per
/// served room. Owned by the supervisor; it outlives links, so a new link
/// can catch up what the old one missed.
type Delivered = HashMap<RoomName, Seen>;

async fn supervise(shared: Arc<Shared>) {
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    let mut delivered = Delivered::new();
    loop {
        match connect(&shared, &mut delivered).await {
            Ok(link) => {
                backoff = BACKOFF_MIN;
                if !first {
                    shared.metrics.broker_reconnects.inc();
                }
                first = false;
                let master = link.master.clone();
                tracing::info!(%master, rooms = link.active.len(), "redis link up");
                let why = run_link(&shared, link, &mut delivered).await;
                tracing::warn!(%master, reason = %why, "redis link lost; reconnecting");
                shared.conn.send_replace(None);
                shared.health.send_replace(Health::Down(why));
            }
            Err(why) => {
                tracing::warn!(reason = %why, retry_in_ms = backoff.as_millis() as u64, "cannot connect to redis");
                shared.health.send_replace(Health::Down(why));
            }
        }
        fail_waiters(&shared);
        // Jitter: sleep between half and the whole backoff.
        let sleep = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        // A failover that completes meanwhile cuts the wait short.
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = shared.switched.notified() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Subscribers waiting for a link that went away are told so; their rooms
/// are dropped from the wanted set (the hub forgets them on failure).
fn fail_waiters(shared: &Shared) {
    let mut wanted = lock(&shared.wanted);
    wanted.retain(|_, waiters| {
        if waiters.is_empty() {
            return true;
        }
        for w in waiters.drain(..) {
            let _ = w.send(Err(BrokerError::Unavailable("redis link down".into())));
        }
        false
    });
}

fn client_for(shared: &Shared, addr: &Addr) -> Result<redis::Client, String> {
    let url = &shared.opts.url;
    let mut settings = RedisConnectionInfo::default().set_db(url.db);
    if let Some(user) = &url.username {
        settings = settings.set_username(user);
    }
    if let Some(pw) = &url.password {
        settings = settings.set_password(pw);
    }
    let info = ConnectionAddr::Tcp(addr.host.clone(), addr.port)
        .into_connection_info()
        .map_err(|e| e.to_string())?
        .set_redis_settings(settings);
    redis::Client::open(info).map_err(|e| e.to_string())
}

fn conn_config(shared: &Shared) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(shared.opts.op_timeout))
        .set_response_timeout(Some(shared.opts.op_timeout))
}

/// Finds the master, connects, checks its role, loads the scripts,
/// subscribes every wanted room plus the canary channel, and (history mode)
/// checks epochs and catches up what this node missed.
async fn connect(shared: &Arc<Shared>, delivered: &mut Delivered) -> Result<Link, String> {
    let master = match &shared.opts.url.target {
        Target::Direct(addr) => addr.clone(),
        Target::Sentinel { sentinels, master } => ask_sentinels(shared, sentinels, master).await?,
    };
    let client = client_for(shared, &master)?;
    let limit = shared.opts.op_timeout;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&conn_config(shared))
        .await
        .map_err(|e| format!("connect {master}: {e}"))?;
    let role: redis::Value = redis::cmd("ROLE")
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("ROLE on {master}: {e}"))?;
    if !is_master(&role) {
        return Err(format!("{master} is not a master"));
    }
    for script in [
        &*scripts::PUBLISH,
        &*scripts::POSITION,
        &*scripts::EPOCH_CHECK,
    ] {
        script
            .load_async(&mut conn)
            .await
            .map_err(|e| format!("SCRIPT LOAD on {master}: {e}"))?;
    }
    let fence = if shared.opts.history.is_none() {
        fence(&mut conn, &master, limit).await?
    } else {
        // History mode keeps epochs across failovers when nothing was lost
        // (each node checks the offsets it saw: `check_epochs`).
        Arc::from("")
    };
    let pubsub = timeout(limit, client.get_async_pubsub())
        .await
        .map_err(|_| format!("pub/sub connect to {master} timed out"))?
        .map_err(|e| format!("pub/sub connect to {master}: {e}"))?;
    let (mut sink, stream) = pubsub.split();
    timeout(limit, sink.subscribe(&shared.canary_channel))
        .await
        .map_err(|_| "canary SUBSCRIBE timed out".to_string())?
        .map_err(|e| format!("canary SUBSCRIBE: {e}"))?;
    let mut link = Link {
        master,
        conn: conn.clone(),
        sink,
        stream,
        active: HashSet::new(),
    };
    reconcile(shared, &mut link, delivered).await?;
    // Rooms left while the link was down are no longer tracked.
    delivered.retain(|room, _| link.active.contains(room));
    if shared.opts.history.is_some() {
        check_epochs(shared, &mut link, delivered).await?;
    }
    shared.conn.send_replace(Some(Master { conn, fence }));
    shared.health.send_replace(Health::Up);
    Ok(link)
}

/// The fence of the master this connection reaches (see `scripts::FENCE`).
async fn fence(
    conn: &mut MultiplexedConnection,
    master: &Addr,
    limit: Duration,
) -> Result<Arc<str>, String> {
    let info: String = bounded(
        limit,
        redis::cmd("INFO").arg("server").query_async(&mut *conn),
    )
    .await
    .map_err(|e| format!("INFO server on {master}: {e}"))?;
    let run_id = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(str::trim)
        .ok_or_else(|| format!("{master} did not tell its run_id"))?;
    let token: String = bounded(
        limit,
        scripts::FENCE
            .key(scripts::FENCE_KEY)
            .arg(run_id)
            .arg(new_epoch())
            .invoke_async(&mut *conn),
    )
    .await
    .map_err(|e| format!("fence on {master}: {e}"))?;
    Ok(token.into())
}

fn is_master(role: &redis::Value) -> bool {
    match role {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::BulkString(b)) => b == b"master",
            Some(redis::Value::SimpleString(s)) => s == "master",
            _ => false,
        },
        _ => false,
    }
}

/// After (re)connecting in history mode: for every room this node saw
/// offsets of, make sure the master still has them (else give the room a new
/// epoch: acknowledged messages were lost), and deliver what was published
/// while this node was away.
async fn check_epochs(
    shared: &Shared,
    link: &mut Link,
    delivered: &mut Delivered,
) -> Result<(), String> {
    let mut known: HashMap<RoomName, Seen> = lock(&shared.acked).clone();
    for (room, seen) in delivered.iter() {
        match known.get_mut(room) {
            Some(k) if k.epoch == seen.epoch => k.offset = k.offset.max(seen.offset),
            _ => {
                known.insert(room.clone(), seen.clone());
            }
        }
    }
    if known.is_empty() {
        return Ok(());
    }
    let rooms: Vec<(RoomName, Seen)> = known.into_iter().collect();
    let mut pipe = redis::pipe();
    for (room, seen) in &rooms {
        pipe.cmd("EVALSHA")
            .arg(scripts::EPOCH_CHECK.get_hash())
            .arg(2)
            .arg(scripts::room_key(room.as_str()))
            .arg(scripts::history_key(room.as_str()))
            .arg(&*seen.epoch)
            .arg(seen.offset)
            .arg(new_epoch());
    }
    let replies: Vec<(u8, u64, String)> =
        timeout(shared.opts.op_timeout * 2, pipe.query_async(&mut link.conn))
            .await
            .map_err(|_| "epoch check timed out".to_string())?
            .map_err(|e| format!("epoch check: {e}"))?;
    for ((room, seen), (changed, last, epoch)) in rooms.into_iter().zip(replies) {
        let epoch: Arc<str> = epoch.into();
        if changed == 1 {
            shared.metrics.epoch_resets.inc();
            tracing::warn!(
                %room, had = seen.offset, master_has = last, old_epoch = %seen.epoch, new_epoch = %epoch,
                "the master lacks acknowledged messages of the room (lost in a failover): new epoch"
            );
            lock(&shared.acked).remove(&room);
            if delivered.contains_key(&room) {
                delivered.insert(
                    room,
                    Seen {
                        epoch,
                        offset: last,
                    },
                );
            }
            continue;
        }
        let Some(mine) = delivered.get(&room).cloned() else {
            continue;
        };
        if epoch.is_empty() {
            // The room is gone: its next message starts a new epoch, all of
            // which is new to this node's subscribers.
            delivered.insert(room.clone(), Seen { epoch, offset: 0 });
        } else if epoch != mine.epoch {
            // A new epoch began while this node was away: its subscribers
            // have seen none of it yet.
            let fresh = Seen { epoch, offset: 0 };
            delivered.insert(room.clone(), fresh.clone());
            if last > 0 {
                fill_gap(shared, &mut link.conn, &room, &fresh, last, delivered)
                    .await
                    .map_err(|e| format!("catching up `{room}` from history: {e}"))?;
            }
        } else if last > mine.offset {
            // A failed read keeps the mark: the next link tries again.
            fill_gap(shared, &mut link.conn, &room, &mine, last, delivered)
                .await
                .map_err(|e| format!("catching up `{room}` from history: {e}"))?;
        }
    }
    Ok(())
}

/// Bytes of frames read from history per round trip while filling a gap (a
/// larger message comes alone): a long gap of large messages is read, and
/// handed to the subscribers' bounded queues, a page at a time, never whole.
const GAP_PAGE_BYTES: usize = 1024 * 1024;

/// Delivers the room's kept messages after `seen.offset` up to `upto`, in
/// order, page by page. Those no longer kept (trimmed from the history, or
/// dropped with an epoch change) are told to the subscribers as lost, in
/// their place; only a failed read leaves the rest of the range (after what
/// the pages before it delivered) to the caller.
async fn fill_gap(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    room: &RoomName,
    seen: &Seen,
    upto: u64,
    delivered: &mut Delivered,
) -> Result<(), BrokerError> {
    let mut next = seen.offset + 1;
    while next <= upto {
        let want = usize::try_from(upto + 1 - next).unwrap_or(usize::MAX);
        let page = read_history(
            conn,
            room,
            next - 1,
            want,
            GAP_PAGE_BYTES,
            shared.opts.op_timeout,
        )
        .await?;
        if page.epoch != seen.epoch {
            break;
        }
        let before = next;
        for m in page.messages.into_iter().take_while(|m| m.offset <= upto) {
            if m.offset > next {
                report_lost(shared, room, &seen.epoch, next, m.offset - 1);
            }
            next = m.offset + 1;
            shared.metrics.gap_filled.inc();
            delivered.insert(
                room.clone(),
                Seen {
                    epoch: seen.epoch.clone(),
                    offset: m.offset,
                },
            );
            shared.deliver.deliver(m);
        }
        if next == before {
            // Nothing of the range is kept any more.
            break;
        }
    }
    if next <= upto {
        report_lost(shared, room, &seen.epoch, next, upto);
        delivered.insert(
            room.clone(),
            Seen {
                epoch: seen.epoch.clone(),
                offset: upto,
            },
        );
    }
    Ok(())
}

/// Messages `from..=to` of the room will never reach this node's
/// subscribers: they are told so, in the messages' place.
fn report_lost(shared: &Shared, room: &RoomName, epoch: &Arc<str>, from: u64, to: u64) {
    tracing::warn!(%room, from, to, "messages missing from history: subscribers are told history_gone");
    shared.metrics.lost_from_history.inc_by(to + 1 - from);
    shared.deliver.lost(room, epoch, to);
}

/// Asks the sentinels, in turn, where the master is.
async fn ask_sentinels(shared: &Shared, sentinels: &[Addr], name: &str) -> Result<Addr, String> {
    let mut errors = Vec::new();
    for s in sentinels {
        match ask_sentinel(shared, s, name).await {
            Ok(addr) => return Ok(addr),
            Err(e) => errors.push(format!("{s}: {e}")),
        }
    }
    Err(format!(
        "no sentinel named a master for `{name}` ({})",
        errors.join("; ")
    ))
}

async fn ask_sentinel(shared: &Shared, sentinel: &Addr, name: &str) -> Result<Addr, String> {
    // Sentinels usually have no password of their own; try without first,
    // then with the Redis password if the sentinel asks for one.
    let plain = ConnectionAddr::Tcp(sentinel.host.clone(), sentinel.port)
        .into_connection_info()
        .map_err(|e| e.to_string())?;
    let mut attempts = vec![plain.clone()];
    if let Some(pw) = &shared.opts.url.password {
        attempts.push(plain.set_redis_settings(RedisConnectionInfo::default().set_password(pw)));
    }
    let mut last = String::new();
    for info in attempts {
        let client = redis::Client::open(info).map_err(|e| e.to_string())?;
        let mut conn = match client
            .get_multiplexed_async_connection_with_config(&conn_config(shared))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let reply: redis::RedisResult<Option<(String, u16)>> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(name)
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(Some((host, port))) => return Ok(Addr { host, port }),
            Ok(None) => return Err(format!("does not know master `{name}`")),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Brings the link's subscriptions to the wanted set; answers waiters.
async fn reconcile(
    shared: &Shared,
    link: &mut Link,
    delivered: &mut Delivered,
) -> Result<(), String> {
    let limit = shared.opts.op_timeout;
    let (to_sub, to_unsub): (Vec<RoomName>, Vec<RoomName>) = {
        let wanted = lock(&shared.wanted);
        (
            wanted
                .keys()
                .filter(|r| !link.active.contains(*r))
                .cloned()
                .collect(),
            link.active
                .iter()
                .filter(|r| !wanted.contains_key(*r))
                .cloned()
                .collect(),
        )
    };
    for chunk in to_unsub.chunks(SUBSCRIBE_BATCH) {
        let channels: Vec<String> = chunk
            .iter()
            .map(|r| scripts::room_channel(r.as_str()))
            .collect();
        timeout(limit, link.sink.unsubscribe(&channels))
            .await
            .map_err(|_| "UNSUBSCRIBE timed out".to_string())?
            .map_err(|e| format!("UNSUBSCRIBE: {e}"))?;
        for r in chunk {
            link.active.remove(r);
            delivered.remove(r);
        }
    }
    for chunk in to_sub.chunks(SUBSCRIBE_BATCH) {
        let channels: Vec<String> = chunk
            .iter()
            .map(|r| scripts::room_channel(r.as_str()))
            .collect();
        // History mode: where each room stood just before this node
        // subscribed, so that what its subscribers miss while the link is
        // down is caught up from there even if nothing was delivered yet.
        // Read before SUBSCRIBE: a message published in between is then
        // filled from history rather than taken for delivered.
        let baselines = if shared.opts.history.is_some() {
            positions(&mut link.conn, chunk, limit).await?
        } else {
            Vec::new()
        };
        timeout(limit, link.sink.subscribe(&channels))
            .await
            .map_err(|_| "SUBSCRIBE timed out".to_string())?
            .map_err(|e| format!("SUBSCRIBE: {e}"))?;
        link.active.extend(chunk.iter().cloned());
        for (room, seen) in chunk.iter().zip(baselines) {
            delivered.entry(room.clone()).or_insert(seen);
        }
    }
    // Everyone waiting on a room that is now active can go ahead; a room
    // that was wanted, then unwanted, then wanted again meanwhile is active too.
    let mut wanted = lock(&shared.wanted);
    for (room, waiters) in wanted.iter_mut() {
        if link.active.contains(room) {
            for w in waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
        }
    }
    Ok(())
}

/// The rooms' epochs and last offsets (a room not created yet: no epoch,
/// offset 0), in one round trip.
async fn positions(
    conn: &mut MultiplexedConnection,
    rooms: &[RoomName],
    limit: Duration,
) -> Result<Vec<Seen>, String> {
    let mut pipe = redis::pipe();
    for room in rooms {
        pipe.cmd("HMGET")
            .arg(scripts::room_key(room.as_str()))
            .arg("o")
            .arg("e");
    }
    let replies: Vec<(Option<u64>, Option<String>)> = bounded(limit, pipe.query_async(conn))
        .await
        .map_err(|e| format!("reading room positions: {e}"))?;
    Ok(replies
        .into_iter()
        .map(|(offset, epoch)| Seen {
            epoch: epoch.unwrap_or_default().into(),
            offset: offset.unwrap_or(0),
        })
        .collect())
}

/// Runs an established link until it fails; returns why.
async fn run_link(shared: &Arc<Shared>, mut link: Link, delivered: &mut Delivered) -> String {
    let mut canary_tick = tokio::time::interval(shared.opts.canary_interval);
    canary_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sentinel_tick = tokio::time::interval(SENTINEL_POLL);
    sentinel_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The canary in flight: its number and when it was sent.
    let mut canary: Option<(u64, Instant)> = None;
    let mut canary_seq = 0u64;
    let (canary_err_tx, mut canary_err_rx) = mpsc::channel::<String>(1);
    let sentinel_target = match &shared.opts.url.target {
        Target::Sentinel { sentinels, master } => Some((sentinels.clone(), master.clone())),
        Target::Direct(_) => None,
    };
    loop {
        tokio::select! {
            msg = link.stream.next() => {
                let Some(msg) = msg else { return "pub/sub connection closed".into() };
                let channel = msg.get_channel_name();
                if let Some(room) = channel.strip_prefix(scripts::ROOM_CHANNEL_PREFIX) {
                    on_notification(shared, &mut link.conn, room, msg.get_payload_bytes(), delivered).await;
                } else if channel == shared.canary_channel {
                    let seq: Option<u64> = std::str::from_utf8(msg.get_payload_bytes()).ok().and_then(|s| s.parse().ok());
                    if let (Some(seq), Some((want, sent))) = (seq, canary)
                        && seq == want
                    {
                        shared.metrics.canary_rtt.set(sent.elapsed().as_secs_f64());
                        canary = None;
                    }
                }
            }
            () = shared.wake.notified() => {
                if let Err(e) = reconcile(shared, &mut link, delivered).await {
                    return e;
                }
            }
            () = shared.trouble.notified() => {
                let ping = timeout(shared.opts.op_timeout, redis::cmd("PING").query_async::<String>(&mut link.conn)).await;
                match ping {
                    Ok(Ok(_)) => {
                        // The connection answers; a READONLY error means the
                        // master was demoted: check the role again.
                        let role = timeout(shared.opts.op_timeout, redis::cmd("ROLE").query_async::<redis::Value>(&mut link.conn)).await;
                        if let Ok(Ok(role)) = role
                            && !is_master(&role)
                        {
                            return format!("{} is no longer a master", link.master);
                        }
                    }
                    Ok(Err(e)) => return format!("publish connection failed: {e}"),
                    Err(_) => return "publish connection does not answer".into(),
                }
            }
            _ = canary_tick.tick() => {
                match canary {
                    Some((_, sent)) if sent.elapsed() > shared.opts.canary_timeout => {
                        return format!("canary not delivered within {:?}: subscription is dead", shared.opts.canary_timeout);
                    }
                    Some(_) => {}
                    None => {
                        canary_seq += 1;
                        canary = Some((canary_seq, Instant::now()));
                        let mut conn = link.conn.clone();
                        let channel = shared.canary_channel.clone();
                        let seq = canary_seq;
                        let limit = shared.opts.op_timeout;
                        let err_tx = canary_err_tx.clone();
                        tokio::spawn(async move {
                            let sent = timeout(limit, redis::cmd("PUBLISH").arg(channel).arg(seq).query_async::<i64>(&mut conn)).await;
                            let err = match sent {
                                Ok(Ok(_)) => return,
                                Ok(Err(e)) => format!("canary publish failed: {e}"),
                                Err(_) => "canary publish timed out".to_string(),
                            };
                            let _ = err_tx.try_send(err);
                        });
                    }
                }
            }
            Some(err) = canary_err_rx.recv() => return err,
            () = shared.switched.notified() => {
                if let Some((sentinels, name)) = &sentinel_target
                    && let Ok(now) = ask_sentinels(shared, sentinels, name).await
                    && now != link.master
                {
                    return format!("sentinels switched the master from {} to {now}", link.master);
                }
            }
            _ = sentinel_tick.tick(), if sentinel_target.is_some() => {
                if let Some((sentinels, name)) = &sentinel_target
                    && let Ok(now) = ask_sentinels(shared, sentinels, name).await
                    && now != link.master
                {
                    return format!("sentinels moved the master from {} to {now}", link.master);
                }
            }
        }
    }
}

/// Listens to the sentinels' `+switch-master` announcements (one sentinel
/// at a time, moving on when it fails) and wakes the supervisor, so a node
/// follows a failover as soon as it completes instead of at its next poll.
async fn watch_switches(shared: Arc<Shared>, sentinels: Vec<Addr>, name: String) {
    let prefix = format!("{name} ");
    let mut turn = 0usize;
    loop {
        let sentinel = &sentinels[turn % sentinels.len().max(1)];
        turn += 1;
        let subscribed = async {
            let info = ConnectionAddr::Tcp(sentinel.host.clone(), sentinel.port)
                .into_connection_info()
                .ok()?;
            let client = redis::Client::open(info).ok()?;
            let mut pubsub = timeout(shared.opts.op_timeout, client.get_async_pubsub())
                .await
                .ok()?
                .ok()?;
            timeout(shared.opts.op_timeout, pubsub.subscribe("+switch-master"))
                .await
                .ok()?
                .ok()?;
            Some(pubsub)
        };
        if let Some(mut pubsub) = subscribed.await {
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                // "<master-name> <old-ip> <old-port> <new-ip> <new-port>"
                if msg.get_payload_bytes().starts_with(prefix.as_bytes()) {
                    tracing::info!(sentinel = %sentinel, announcement = %String::from_utf8_lossy(msg.get_payload_bytes()), "sentinel announced a failover");
                    shared.switched.notify_one();
                }
            }
        }
        tokio::time::sleep(BACKOFF_MAX).await;
    }
}

/// A live message: in history mode, fill a gap first and drop what was
/// already delivered; then hand it to the hub.
async fn on_notification(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    room: &str,
    payload: &[u8],
    delivered: &mut Delivered,
) {
    let Some(n) = scripts::split_notification(payload) else {
        tracing::warn!(room, "ignoring a malformed notification");
        return;
    };
    let (Ok(room), Some(frame)) = (
        RoomName::parse(room),
        Frame::from_utf8(bytes::Bytes::copy_from_slice(n.frame)),
    ) else {
        tracing::warn!(
            room,
            "ignoring a notification for a bad room or with bad UTF-8"
        );
        return;
    };
    let epoch: Arc<str> = n.epoch.into();
    if shared.opts.history.is_some() {
        if let Some(seen) = delivered.get(&room).cloned()
            && seen.epoch == epoch
        {
            if n.offset <= seen.offset {
                return;
            }
            if n.offset > seen.offset + 1
                && let Err(e) = fill_gap(shared, conn, &room, &seen, n.offset - 1, delivered).await
            {
                // The live message goes out now: what it skipped, past what
                // the pages read before the failure delivered, is lost.
                tracing::warn!(%room, error = %e, "cannot read history to fill a gap");
                let from = delivered.get(&room).map_or(seen.offset, |s| s.offset) + 1;
                report_lost(shared, &room, &epoch, from, n.offset - 1);
            }
        }
        delivered.insert(
            room.clone(),
            Seen {
                epoch: epoch.clone(),
                offset: n.offset,
            },
        );
    }
    shared.deliver.deliver(Delivery {
        room,
        offset: n.offset,
        epoch,
        frame,
        published_at_us: n.published_at_us,
    });
}
