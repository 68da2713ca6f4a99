//! One shard's link: the one-Redis link, for the master serving a set of
//! slots. It connects (command connection: role, scripts, fence; one RESP3
//! connection for the shard's sharded Pub/Sub; the shard's canary), brings
//! the shard's subscriptions to the rooms the hub wants whose slots this
//! master serves — one `SSUBSCRIBE` or `SUNSUBSCRIBE` per room, as a
//! cluster wants each command's channels in one slot, sent together — and
//! in history mode checks epochs and tracks new rooms. Then it watches: the
//! reader ending, the canary, the publisher's errors, the wanted rooms and
//! the topology changing (rooms moving in or out), and `SUNSUBSCRIBE`s the
//! master pushed by itself (the room's slot left it: the topology is asked
//! again and the room subscribed where it went). On trouble the shard is
//! down, its waiting subscribers are told, and it reconnects with jittered
//! backoff — until the topology no longer names its master.
//!
//! The Pub/Sub connection carries nothing but subscription commands, and
//! each one's answer must be its own confirmation: a `SUNSUBSCRIBE` the
//! master pushed while one was in flight would be taken for its answer by
//! the connection, so any other answer restarts the link (every room is
//! subscribed again on a fresh connection).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::publisher;
use super::{Shared, room_slot, tag_for};
use crate::broker::redis::canary::{self, Canary};
use crate::broker::redis::connection::{self, Master};
use crate::broker::redis::error::{Error, bounded};
use crate::broker::redis::history;
use crate::broker::redis::publisher::{PublishCmd, QUEUE};
use crate::broker::redis::reader::{Fills, delivery};
use crate::broker::redis::scripts::Keyspace;
use crate::broker::redis::url::Addr;
use crate::broker::tracker::{FillJob, ReadPage, Tracker};
use crate::broker::{BrokerError, Deliver};
use crate::protocol::RoomName;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Pushes (messages, confirmations) waiting for the reader; past that the
/// reader fell behind and the link restarts.
const PUSH_QUEUE: usize = 64 * 1024;
/// Rooms (un)subscribed at once.
const BATCH: usize = 512;
/// Channels the master dropped by itself (slots that left it) waiting for
/// the link; past that, the link restarts.
const DROPPED_QUEUE: usize = 4096;
/// Canary channels: `chorus:canary:{<tag>}:<node>:<random>`, the tag
/// putting the channel in a slot of the shard.
const CANARY_PREFIX: &str = "chorus:canary:";

/// A shard's link and publisher, as the broker sees them.
pub(super) struct Handle {
    publish_tx: mpsc::Sender<PublishCmd>,
    master: watch::Receiver<Option<Master>>,
    /// Why the link is down (while it is).
    why: watch::Receiver<String>,
    supervisor: JoinHandle<()>,
    publisher: JoinHandle<()>,
    lane: JoinHandle<()>,
}

impl Handle {
    /// The master's connection and fence while the link is up.
    pub fn master(&self) -> Option<Master> {
        self.master.borrow().clone()
    }

    pub fn why_down(&self) -> String {
        self.why.borrow().clone()
    }

    /// Queues a publish, or gives it back with why not.
    pub fn publish(&self, cmd: PublishCmd) -> Result<(), (PublishCmd, BrokerError)> {
        self.publish_tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(cmd) => (cmd, BrokerError::Overloaded),
            mpsc::error::TrySendError::Closed(cmd) => {
                (cmd, Error::Dropped("publisher stopped").into())
            }
        })
    }

    /// The link ended: its master no longer serves slots.
    pub fn finished(&self) -> bool {
        self.supervisor.is_finished()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.supervisor.abort();
        self.publisher.abort();
        self.lane.abort();
    }
}

/// Starts the link and the publisher of the master at `addr`.
pub(super) fn start(shared: &Arc<Shared>, addr: Addr) -> Handle {
    let (publish_tx, publish_rx) = mpsc::channel(QUEUE);
    let (master_tx, master) = watch::channel(None);
    let (why_tx, why) = watch::channel("connecting".to_string());
    let trouble = Arc::new(Notify::new());
    let (lane_tx, lane_rx) = mpsc::channel(publisher::LANE);
    let publisher = tokio::spawn(publisher::run(
        shared.clone(),
        addr.clone(),
        publish_rx,
        master.clone(),
        trouble.clone(),
        lane_tx,
    ));
    let lane = tokio::spawn(publisher::lane(shared.clone(), lane_rx));
    let link = Link {
        shared: shared.clone(),
        addr,
        master_tx,
        why_tx,
        trouble,
    };
    Handle {
        publish_tx,
        master,
        why,
        supervisor: tokio::spawn(link.supervise()),
        publisher,
        lane,
    }
}

struct Link {
    shared: Arc<Shared>,
    addr: Addr,
    master_tx: watch::Sender<Option<Master>>,
    why_tx: watch::Sender<String>,
    /// The publisher saw an error that may mean the master is gone.
    trouble: Arc<Notify>,
}

/// An established link.
struct Up {
    master: Master,
    /// The sharded Pub/Sub connection (subscription commands only).
    pubsub: MultiplexedConnection,
    /// Rooms subscribed on it.
    active: HashSet<RoomName>,
    /// The canary channel subscribed on it, if any (its slot may leave).
    canary: Option<String>,
    reader: JoinSet<ReaderEnd>,
    stop: Arc<Notify>,
    canary_seen: watch::Receiver<u64>,
    /// Channels the master pushed `SUNSUBSCRIBE` for.
    dropped: mpsc::Receiver<String>,
    overflow: Arc<Notify>,
}

impl Link {
    async fn supervise(self) {
        let shared = &self.shared;
        let mut backoff = BACKOFF_MIN;
        let mut first = true;
        let mut topology = shared.view.subscribe();
        loop {
            let why = match self.connect().await {
                Ok(up) => {
                    backoff = BACKOFF_MIN;
                    if !first {
                        shared.metrics.broker_reconnects.inc();
                    }
                    first = false;
                    tracing::info!(shard = %self.addr, rooms = up.active.len(), "redis shard link up");
                    let why = self.run(up).await;
                    tracing::warn!(shard = %self.addr, reason = %why, "redis shard link lost");
                    why
                }
                Err(why) => {
                    tracing::warn!(shard = %self.addr, reason = %why, retry_in_ms = backoff.as_millis() as u64, "cannot link to redis shard");
                    why
                }
            };
            self.master_tx.send_replace(None);
            self.why_tx.send_replace(why.to_string());
            shared.update_health();
            let serves = self.serves();
            shared.wanted.fail(|room| serves(room), &why);
            // Whatever failed, the slots may have moved.
            shared.view.refresh();
            if !shared.view.get().masters().any(|m| *m == self.addr) {
                tracing::info!(shard = %self.addr, "no longer a master serving slots: link ends");
                return;
            }
            let sleep = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                _ = topology.changed() => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Which rooms this master serves, as the view says now.
    fn serves(&self) -> impl Fn(&RoomName) -> bool + use<> {
        let topology = self.shared.view.get();
        let addr = self.addr.clone();
        move |room: &RoomName| topology.owner(room_slot(room.as_str())) == Some(&addr)
    }

    async fn connect(&self) -> Result<Up, Error> {
        let shared = &self.shared;
        let opts = &shared.opts;
        let limit = opts.op_timeout;
        let (mut master, _) = connection::open_master(opts, &self.addr).await?;
        let (push_tx, pushes) = mpsc::channel::<PushInfo>(PUSH_QUEUE);
        let overflow = Arc::new(Notify::new());
        let full = overflow.clone();
        // Never blocks the connection: a full queue drops the push, and the
        // link restarts.
        let sender = move |push: PushInfo| {
            push_tx.try_send(push).inspect_err(|e| {
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    full.notify_one();
                }
            })
        };
        let pubsub = connection::open_push(&opts.url, &self.addr, limit, sender).await?;
        let mut up_canary = None;
        let mut pubsub = pubsub;
        if let Some(channel) = self.canary_channel() {
            subscription(&mut pubsub, &self.addr, Sub::Subscribe, &channel, limit).await?;
            up_canary = Some(channel);
        }
        let mut active = HashSet::new();
        self.reconcile(&master, &pubsub, &mut active).await?;
        let fills = match &shared.history {
            Some((tracker, acked)) => {
                let serves = self.serves();
                // Rooms of this shard left while the link was down are no
                // longer tracked.
                tracker.retain(|room| !serves(room) || active.contains(room));
                let metrics = &shared.metrics;
                let checked = history::check_epochs(
                    &mut master,
                    shared.keys,
                    tracker,
                    acked,
                    metrics,
                    limit,
                    serves,
                )
                .await?;
                for (_, moved) in &checked.moved {
                    shared.view.moved(moved);
                }
                checked.fills
            }
            None => Vec::new(),
        };
        let (canary, canary_seen) = watch::channel(0);
        let (dropped_tx, dropped) = mpsc::channel(DROPPED_QUEUE);
        let stop = Arc::new(Notify::new());
        let reader = Reader {
            pushes,
            addr: self.addr.clone(),
            keys: shared.keys,
            deliver: shared.deliver.clone(),
            history: shared
                .history
                .as_ref()
                .map(|(tracker, _)| (tracker.clone(), shared.pages())),
            canary,
            dropped: dropped_tx,
            overflow: overflow.clone(),
            stop: stop.clone(),
        };
        let mut tasks = JoinSet::new();
        tasks.spawn(reader.run(fills));
        self.master_tx.send_replace(Some(master.clone()));
        self.why_tx.send_replace(String::new());
        shared.update_health();
        Ok(Up {
            master,
            pubsub,
            active,
            canary: up_canary,
            reader: tasks,
            stop,
            canary_seen,
            dropped,
            overflow,
        })
    }

    /// A canary channel in the lowest slot this master serves.
    fn canary_channel(&self) -> Option<String> {
        let slot = self.shared.view.get().first_slot_of(&self.addr)?;
        Some(format!(
            "{CANARY_PREFIX}{{{}}}:{}",
            tag_for(slot),
            self.shared.canary_name
        ))
    }

    /// Runs an established link until it fails; returns why, once its reader
    /// and fills have stopped.
    async fn run(&self, mut up: Up) -> Error {
        let why = self.watch(&mut up).await;
        up.stop.notify_one();
        while let Some(end) = up.reader.join_next().await {
            if let Some((tracker, _)) = &self.shared.history {
                match end {
                    Ok(end) => {
                        let rooms: HashSet<RoomName> = end.filling.into_iter().collect();
                        tracker.stop_fills_of(|room| rooms.contains(room));
                    }
                    // Which rooms it was filling is unknown: stop them all
                    // (they fill again from their next message).
                    Err(_) => tracker.stop_fills(),
                }
            }
        }
        why
    }

    async fn watch(&self, up: &mut Up) -> Error {
        let shared = &self.shared;
        let opts = &shared.opts;
        let mut wanted = shared.wanted.version.subscribe();
        let mut topology = shared.view.subscribe();
        let mut canary_tick = tokio::time::interval(opts.canary_interval);
        canary_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut canary = Canary::default();
        let (canary_err_tx, mut canary_err_rx) = mpsc::channel::<Error>(1);
        loop {
            tokio::select! {
                done = up.reader.join_next() => {
                    return match done {
                        Some(Ok(ReaderEnd { why: Some(why), .. })) => why,
                        Some(Err(e)) => {
                            tracing::error!(error = %e, "the shard's pub/sub reader panicked");
                            Error::SubscriptionClosed(self.addr.clone())
                        }
                        _ => Error::SubscriptionClosed(self.addr.clone()),
                    };
                }
                Ok(()) = wanted.changed() => {
                    if let Err(e) = self.reconcile(&up.master, &up.pubsub, &mut up.active).await {
                        return e;
                    }
                }
                Ok(()) = topology.changed() => {
                    if !shared.view.get().masters().any(|m| *m == self.addr) {
                        return Error::NoSlots(self.addr.clone());
                    }
                    if let Err(e) = self.reconcile(&up.master, &up.pubsub, &mut up.active).await {
                        return e;
                    }
                }
                () = self.trouble.notified() => {
                    if let Err(e) = connection::check_master(&mut up.master, opts.op_timeout).await {
                        return e;
                    }
                }
                Some(channel) = up.dropped.recv() => {
                    // A slot that moves drops all its rooms at once: take
                    // every one that came, then subscribe them where they went.
                    let mut moved = 0;
                    let mut next = Some(channel);
                    while let Some(channel) = next {
                        if up.canary.as_deref() == Some(channel.as_str()) {
                            // The canary's slot left this master: a new one
                            // at the next tick.
                            up.canary = None;
                            canary.forget();
                        } else if let Some(room) = shared.keys.channel_room(&channel)
                            && let Ok(room) = RoomName::parse(room)
                            && up.active.remove(&room)
                        {
                            moved += 1;
                        }
                        next = up.dropped.try_recv().ok();
                    }
                    shared.view.refresh();
                    if moved > 0 {
                        tracing::info!(shard = %self.addr, rooms = moved, "rooms' slots left the shard: subscribing them where they went");
                        if let Err(e) = self.reconcile(&up.master, &up.pubsub, &mut up.active).await {
                            return e;
                        }
                    }
                }
                () = up.overflow.notified() => return Error::Overflow(self.addr.clone()),
                Ok(()) = up.canary_seen.changed() => {
                    canary.seen(*up.canary_seen.borrow_and_update(), &shared.metrics);
                }
                _ = canary_tick.tick() => {
                    let Some(channel) = &up.canary else {
                        match self.canary_channel() {
                            Some(channel) => {
                                let sub = subscription(&mut up.pubsub, &self.addr, Sub::Subscribe, &channel, opts.op_timeout);
                                if let Err(e) = sub.await {
                                    return e;
                                }
                                up.canary = Some(channel);
                            }
                            None => return Error::NoSlots(self.addr.clone()),
                        }
                        continue;
                    };
                    match canary.tick(opts.canary_timeout) {
                        Err(lost) => return lost,
                        Ok(Some(seq)) => {
                            let errors = canary_err_tx.clone();
                            canary::send(&up.master, "SPUBLISH", channel, seq, opts.op_timeout, errors);
                        }
                        Ok(None) => {}
                    }
                }
                Some(err) = canary_err_rx.recv() => return err,
            }
        }
    }

    /// Brings the shard's subscriptions to the wanted rooms its master
    /// serves, then answers the waiters of every room now subscribed. A
    /// room the master answers `MOVED` for patches the view (its link
    /// subscribes it). With history, each newly subscribed room is tracked
    /// from where it stood just before (unless it is tracked already: a
    /// room that moved here goes on from where it was on its old shard).
    async fn reconcile(
        &self,
        master: &Master,
        pubsub: &MultiplexedConnection,
        active: &mut HashSet<RoomName>,
    ) -> Result<(), Error> {
        let shared = &self.shared;
        let limit = shared.opts.op_timeout;
        let (to_sub, to_unsub) = shared.wanted.diff(active, self.serves());
        let tracker = shared.history.as_ref().map(|(t, _)| &**t);
        for chunk in to_unsub.chunks(BATCH) {
            let done = self.each(pubsub, Sub::Unsubscribe, chunk, limit).await;
            for (room, res) in chunk.iter().zip(done) {
                match res {
                    // MOVED: the slot left this master, and the channel with it.
                    Ok(()) | Err(Redirected::Moved) => {
                        active.remove(room);
                        if let Some(tracker) = tracker
                            && !shared.wanted.is_wanted(room)
                        {
                            tracker.forget(room);
                        }
                    }
                    Err(Redirected::Failed(e)) => return Err(e),
                }
            }
        }
        for chunk in to_sub.chunks(BATCH) {
            let mut rooms = chunk.to_vec();
            // History mode: where each room stood just before this node
            // subscribed (read, and tracked, before SSUBSCRIBE: a message
            // published in between is then filled from history).
            if let Some(tracker) = tracker {
                let mut conn = master.conn.clone();
                let keys = shared.keys;
                let baselines =
                    history::positions(&mut conn, &master.addr, keys, &rooms, limit).await?;
                let mut here = Vec::with_capacity(rooms.len());
                for (room, cursor) in rooms.into_iter().zip(baselines) {
                    match cursor {
                        Ok(cursor) => {
                            tracker.baseline(&room, cursor);
                            here.push(room);
                        }
                        Err(e) if e.redirect_node().is_some() => shared.view.moved(&e),
                        Err(source) => {
                            return Err(Error::Command {
                                command: "HMGET room positions",
                                addr: master.addr.clone(),
                                source,
                            });
                        }
                    }
                }
                rooms = here;
            }
            let done = self.each(pubsub, Sub::Subscribe, &rooms, limit).await;
            for (room, res) in rooms.into_iter().zip(done) {
                match res {
                    Ok(()) => {
                        active.insert(room);
                    }
                    // The view is patched: the room's own link takes it.
                    Err(Redirected::Moved) => {}
                    Err(Redirected::Failed(e)) => return Err(e),
                }
            }
        }
        shared.wanted.confirm(active);
        Ok(())
    }

    /// One subscription command per room, all sent at once.
    async fn each(
        &self,
        pubsub: &MultiplexedConnection,
        sub: Sub,
        rooms: &[RoomName],
        limit: Duration,
    ) -> Vec<Result<(), Redirected>> {
        let keys = self.shared.keys;
        let calls = rooms.iter().map(|room| {
            let mut conn = pubsub.clone();
            let channel = keys.room_channel(room.as_str());
            async move {
                match subscription(&mut conn, &self.addr, sub, &channel, limit).await {
                    Ok(()) => Ok(()),
                    Err(Error::Command { source, .. }) if source.code() == Some("MOVED") => {
                        self.shared.view.moved(&source);
                        Err(Redirected::Moved)
                    }
                    Err(e) => Err(Redirected::Failed(e)),
                }
            }
        });
        join_all(calls).await
    }
}

/// A subscription command's outcome besides success.
enum Redirected {
    /// The master does not serve the room's slot.
    Moved,
    Failed(Error),
}

#[derive(Debug, Clone, Copy)]
enum Sub {
    Subscribe,
    Unsubscribe,
}

impl Sub {
    fn command(self) -> &'static str {
        match self {
            Sub::Subscribe => "SSUBSCRIBE",
            Sub::Unsubscribe => "SUNSUBSCRIBE",
        }
    }

    fn confirmation(self) -> PushKind {
        match self {
            Sub::Subscribe => PushKind::SSubscribe,
            Sub::Unsubscribe => PushKind::SUnsubscribe,
        }
    }
}

/// `SSUBSCRIBE` or `SUNSUBSCRIBE` one channel, and check that the answer is
/// its own confirmation.
async fn subscription(
    conn: &mut MultiplexedConnection,
    addr: &Addr,
    sub: Sub,
    channel: &str,
    limit: Duration,
) -> Result<(), Error> {
    let mut cmd = redis::cmd(sub.command());
    cmd.arg(channel);
    let answer: Value = bounded(addr, sub.command(), limit, cmd.query_async(conn)).await?;
    match &answer {
        Value::Push { kind, data }
            if *kind == sub.confirmation()
                && matches!(data.first(), Some(Value::BulkString(c)) if c == channel.as_bytes()) =>
        {
            Ok(())
        }
        other => Err(Error::Unconfirmed {
            addr: addr.clone(),
            command: sub.command(),
            channel: channel.to_string(),
            answer: format!("{other:?}"),
        }),
    }
}

/// How a shard's reader ended.
struct ReaderEnd {
    /// `None`: told to stop.
    why: Option<Error>,
    /// Rooms whose fills it stopped.
    filling: Vec<RoomName>,
}

/// The shard's Pub/Sub reader: the one-Redis reader, on the pushes of a
/// RESP3 connection. Hands each message over (through the tracker with
/// history; its fills run off its path), passes canaries to the link and
/// the `SUNSUBSCRIBE`s the master pushes.
struct Reader {
    pushes: mpsc::Receiver<PushInfo>,
    addr: Addr,
    keys: Keyspace,
    deliver: Arc<dyn Deliver>,
    history: Option<(Arc<Tracker>, ReadPage<Error>)>,
    canary: watch::Sender<u64>,
    dropped: mpsc::Sender<String>,
    overflow: Arc<Notify>,
    stop: Arc<Notify>,
}

impl Reader {
    async fn run(mut self, fills: Vec<FillJob>) -> ReaderEnd {
        let mut fills = Fills::new(self.history.clone(), fills);
        let why = loop {
            tokio::select! {
                push = self.pushes.recv() => match push {
                    Some(push) if push.kind == PushKind::Disconnection => {
                        break Some(Error::SubscriptionClosed(self.addr.clone()));
                    }
                    Some(push) => {
                        if let Some(job) = self.dispatch(push) {
                            fills.push(job);
                        }
                    }
                    None => break Some(Error::SubscriptionClosed(self.addr.clone())),
                },
                Some(done) = fills.next_done() => {
                    if let Err(e) = done {
                        break Some(e);
                    }
                }
                () = self.stop.notified() => break None,
            }
        };
        ReaderEnd {
            why,
            filling: fills.stop().await,
        }
    }

    /// Hands one push over; a gap fill to start, if it opened one.
    fn dispatch(&self, push: PushInfo) -> Option<FillJob> {
        let channel = match push.data.first() {
            Some(Value::BulkString(c)) => std::str::from_utf8(c).ok()?,
            _ => return None,
        };
        match push.kind {
            PushKind::SMessage => {
                let payload = match push.data.get(1) {
                    Some(Value::BulkString(p)) => p.as_slice(),
                    _ => return None,
                };
                if channel.starts_with(CANARY_PREFIX) {
                    if let Some(seq) = std::str::from_utf8(payload)
                        .ok()
                        .and_then(|s| s.parse().ok())
                    {
                        self.canary.send_replace(seq);
                    }
                    return None;
                }
                let room = self.keys.channel_room(channel)?;
                let d = delivery(room, payload)?;
                match &self.history {
                    None => {
                        self.deliver.deliver(d);
                        None
                    }
                    Some((tracker, _)) => tracker.live(d),
                }
            }
            // Ours are answered to the link; one the master pushed by itself
            // (the slot left it) the link must act on. It tells them apart.
            PushKind::SUnsubscribe => {
                if let Err(mpsc::error::TrySendError::Full(_)) =
                    self.dropped.try_send(channel.to_string())
                {
                    self.overflow.notify_one();
                }
                None
            }
            _ => None,
        }
    }
}
