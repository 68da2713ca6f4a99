//! Redis Cluster broker (`redis+cluster://`): sharded Pub/Sub. A room's
//! keys and channel carry the room as hash tag
//! ([`Keyspace::Tagged`](super::scripts::Keyspace)), so the room lives in
//! one slot: its publish script runs on the master serving that slot and
//! `SPUBLISH`es there, and only nodes that `SSUBSCRIBE`d the room on that
//! shard get the message. A shard's Redis therefore works for its own
//! rooms' messages only, and throughput grows with shards (classic
//! `PUBLISH` on a cluster goes to every shard).
//!
//! The parts of the one-Redis broker, per shard:
//!
//! | module | owns | runs as |
//! |---|---|---|
//! | `topology` | which master serves each slot: `CLUSTER SLOTS` through the redis crate's cluster client, patched by `MOVED` | the topology task |
//! | `shard` | one link per master: command connection (scripts, fence), one RESP3 Pub/Sub connection, the shard's canary, `SSUBSCRIBE`/`SUNSUBSCRIBE` per room, the reader, reconnects | a supervisor and a reader task per shard |
//! | `publisher` | the shard's publishes in call order, pipelined; a `MOVED` sends a publish on to the new master's publisher, an `ASK`/`TRYAGAIN` through the cluster client | a task per shard |
//!
//! and, unchanged, the one-Redis broker's scripts, connection set-up,
//! history reads, epoch check and the broker-agnostic [`Tracker`].
//!
//! Resharding: when a slot moves, its master pushes `SUNSUBSCRIBE` for the
//! slot's channels to the nodes subscribed there; a node then asks for the
//! topology again and subscribes the room on its new master (a `MOVED`
//! answer to a publish, a read or an `SSUBSCRIBE` does the same). While the
//! room's keys are migrating, publishes the old master answers with `ASK`
//! run on the new one through the cluster client, which follows the
//! redirect. In `pubsub` mode what was published on the new master before
//! the node subscribed there is lost to that node's subscribers (they see
//! the offsets jump); in `streams` mode it is filled from the room's history,
//! which moved with the room.
//!
//! Failover: a shard whose master dies is down (its rooms' publishes and
//! subscriptions answer `unavailable`, `/readyz` 503) until the cluster
//! promotes a replica and the topology names it; the shard's link then
//! connects to it and subscribes the shard's rooms again. The other shards
//! deliver meanwhile.

mod publisher;
mod shard;
mod topology;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::await_reply;
use super::connection::Master;
use super::error::{Error, bounded};
use super::history::{self, Acked};
use super::options::RedisOptions;
use super::publisher::PublishCmd;
use super::scripts::{self, Keyspace};
use super::url::{Addr, Target};
use crate::broker::tracker::{ReadPage, Tracker};
use crate::broker::{
    Broker, BrokerError, Deliver, Health, History, Position, PublishRequest, Published, new_epoch,
};
use crate::metrics::Metrics;
use crate::protocol::RoomName;
use crate::sync::lock;

/// Slots of a Redis Cluster.
pub(super) const SLOTS: u16 = 16384;

/// The cluster slot of a key: CRC16 of its hash tag (the part between the
/// first `{` and the next `}`, when not empty), else of the whole key — the
/// function Redis uses.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tag = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tag.unwrap_or(bytes)) % SLOTS
}

/// The slot of a room's keys and channel (the room is their hash tag).
pub fn room_slot(room: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(room.as_bytes()) % SLOTS
}

/// A short hash tag whose slot is `slot`: names (the shard's canary
/// channel) that must live on the shard serving it.
pub(super) fn tag_for(slot: u16) -> String {
    (0u32..)
        .map(|n| n.to_string())
        .find(|tag| room_slot(tag) == slot)
        .unwrap_or_default()
}

pub struct RedisClusterBroker {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

/// What the broker's tasks share.
struct Shared {
    opts: RedisOptions,
    keys: Keyspace,
    view: topology::View,
    /// The redis crate's cluster client, once connected: asks the topology
    /// and carries the calls a master redirected with `ASK`/`TRYAGAIN`.
    cluster: watch::Sender<Option<ClusterConnection>>,
    /// One link per master serving slots.
    shards: Mutex<HashMap<Addr, shard::Handle>>,
    wanted: Wanted,
    health: watch::Sender<Health>,
    /// Why the topology is not known, while it is not.
    topology_error: Mutex<Option<String>>,
    deliver: Arc<dyn Deliver>,
    /// History mode: what each room was handed, and what was acknowledged.
    history: Option<(Arc<Tracker>, Acked)>,
    metrics: Arc<Metrics>,
    /// This node's part of its canary channels' names.
    canary_name: String,
}

impl RedisClusterBroker {
    /// Starts the broker's tasks; the shards' links come up in the
    /// background (`health()` tells when all are up).
    pub fn start(opts: RedisOptions, deliver: Arc<dyn Deliver>, metrics: Arc<Metrics>) -> Self {
        let canary_name = format!("{}:{:08x}", opts.node_id, rand::random::<u32>());
        let history = opts.history.as_ref().map(|_| {
            (
                Arc::new(Tracker::new(deliver.clone(), metrics.clone())),
                Acked::default(),
            )
        });
        let shared = Arc::new(Shared {
            keys: opts.keys(),
            view: topology::View::new(),
            cluster: watch::Sender::new(None),
            shards: Mutex::new(HashMap::new()),
            wanted: Wanted::default(),
            health: watch::Sender::new(Health::Down("asking the cluster for its slots".into())),
            topology_error: Mutex::new(None),
            deliver,
            history,
            metrics,
            canary_name,
            opts,
        });
        let tasks = vec![tokio::spawn(follow(shared.clone()))];
        Self { shared, tasks }
    }
}

impl Drop for RedisClusterBroker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        lock(&self.shared.shards).clear();
    }
}

impl Broker for RedisClusterBroker {
    fn publish(&self, req: PublishRequest) -> BoxFuture<'static, Result<Published, BrokerError>> {
        let (reply, rx) = oneshot::channel();
        self.shared.route(PublishCmd {
            req,
            reply,
            hops: 0,
        });
        // As with one Redis: a pipeline is bounded by op_timeout, queueing
        // behind one adds another, a redirect a third.
        let limit = self.shared.opts.op_timeout * 3;
        await_reply(limit, rx, "publisher stopped")
            .map(move |res| match res {
                Err(BrokerError::Timeout(limit)) => Err(super::publisher::unanswered(limit)),
                other => other,
            })
            .boxed()
    }

    fn subscribe(&self, room: &RoomName) -> BoxFuture<'static, Result<(), BrokerError>> {
        if let Err(down) = self.shared.master_for(room) {
            return std::future::ready(Err(down.into())).boxed();
        }
        let rx = self.shared.wanted.want(room);
        await_reply(self.shared.opts.op_timeout * 3, rx, "link restarted").boxed()
    }

    fn unsubscribe(&self, room: &RoomName) {
        self.shared.wanted.unwant(room);
    }

    fn position(&self, room: &RoomName) -> BoxFuture<'static, Result<Position, BrokerError>> {
        let shared = self.shared.clone();
        let room = room.clone();
        async move {
            let opts = &shared.opts;
            let keys = shared.keys;
            let (ttl, history_key) = (opts.ttl_secs(), opts.history_key(room.as_str()));
            let (offset, epoch) = shared
                .on_room(&room, "position script", |mut via, fence, _| {
                    let mut inv = scripts::POSITION.key(keys.room_key(room.as_str()));
                    inv.key(&history_key).arg(new_epoch()).arg(ttl).arg(&*fence);
                    async move { inv.invoke_async::<(u64, String)>(&mut via).await }
                })
                .await?;
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
        let read = self.shared.pages();
        let room = room.clone();
        async move { Ok(Some(read(room, after, limit, max_bytes).await?)) }.boxed()
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    fn kind(&self) -> &'static str {
        "redis-cluster"
    }
}

/// Redirects a publish, read or subscription may go through before it
/// gives up (`unavailable`): the slot keeps moving.
const MAX_HOPS: u8 = 3;

impl Shared {
    /// The link of the master serving `room`, when it is up.
    fn master_for(&self, room: &RoomName) -> Result<Master, Error> {
        let slot = room_slot(room.as_str());
        let topology = self.view.get();
        let addr = topology.owner(slot).ok_or(Error::SlotUnserved(slot))?;
        let shards = lock(&self.shards);
        let shard = shards.get(addr).ok_or_else(|| Error::ShardDown {
            shard: addr.clone(),
            why: "connecting".into(),
        })?;
        shard.master().ok_or_else(|| Error::ShardDown {
            shard: addr.clone(),
            why: shard.why_down(),
        })
    }

    /// Hands a publish to the publisher of the master serving its room (or
    /// answers why it cannot).
    fn route(&self, mut cmd: PublishCmd) {
        if cmd.hops > MAX_HOPS {
            let _ = cmd
                .reply
                .send(Err(Error::KeepsMoving(cmd.req.room.clone()).into()));
            return;
        }
        cmd.hops += 1;
        let slot = room_slot(cmd.req.room.as_str());
        let topology = self.view.get();
        let Some(addr) = topology.owner(slot) else {
            let _ = cmd.reply.send(Err(Error::SlotUnserved(slot).into()));
            return;
        };
        let shards = lock(&self.shards);
        let sent = match shards.get(addr) {
            Some(shard) if shard.master().is_some() => shard.publish(cmd),
            Some(shard) => Err((
                cmd,
                Error::ShardDown {
                    shard: addr.clone(),
                    why: shard.why_down(),
                }
                .into(),
            )),
            None => Err((
                cmd,
                Error::ShardDown {
                    shard: addr.clone(),
                    why: "connecting".into(),
                }
                .into(),
            )),
        };
        drop(shards);
        if let Err((cmd, err)) = sent {
            let _ = cmd.reply.send(Err(err));
        }
    }

    /// Runs `call` on the master serving `room`'s slot, with its fence; a
    /// `MOVED` patches the view and runs it once more where it says; an
    /// `ASK` or `TRYAGAIN` (the room's keys are migrating) runs it through
    /// the cluster client, which follows the redirect, without a fence (the
    /// keys just moved: nothing was lost).
    async fn on_room<T, F, Fut>(
        &self,
        room: &RoomName,
        what: &'static str,
        call: F,
    ) -> Result<T, Error>
    where
        F: Fn(Via, Arc<str>, Addr) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let limit = self.opts.op_timeout;
        let mut hops = 0;
        loop {
            let master = self.master_for(room)?;
            let addr = master.addr.clone();
            let call_here = call(Via::Node(master.conn), master.fence, addr.clone());
            let res = bounded(&addr, what, limit, call_here).await;
            let source = match &res {
                Err(Error::Command { source, .. }) => source,
                _ => return res,
            };
            match source.code() {
                Some("MOVED") if hops < MAX_HOPS => {
                    self.view.moved(source);
                    hops += 1;
                }
                Some("ASK" | "TRYAGAIN") => {
                    let cluster = self.cluster()?;
                    let call_there = call(Via::Cluster(cluster), "".into(), addr.clone());
                    return bounded(&addr, what, limit, call_there).await;
                }
                _ => return res,
            }
        }
    }

    fn cluster(&self) -> Result<ClusterConnection, Error> {
        self.cluster.borrow().clone().ok_or(Error::NotConnected)
    }

    /// History pages of any room, read on the master serving it now.
    fn pages(self: &Arc<Self>) -> ReadPage<Error> {
        let shared = self.clone();
        Arc::new(move |room, after, limit, max_bytes| {
            let shared = shared.clone();
            async move {
                let op_timeout = shared.opts.op_timeout;
                let keys = shared.keys;
                let page = shared
                    .on_room(&room, "history script", |mut via, _, addr| {
                        let room = room.clone();
                        async move {
                            history::read(
                                &mut via, &addr, keys, &room, after, limit, max_bytes, op_timeout,
                            )
                            .await
                            .map_err(into_redis)
                        }
                    })
                    .await?;
                Ok(page)
            }
            .boxed()
        })
    }

    /// `/readyz` follows the shards: up when every slot has a master and
    /// every master's link is up.
    fn update_health(&self) {
        let health = self.current_health();
        self.health.send_if_modified(|now| {
            if *now == health {
                return false;
            }
            *now = health;
            true
        });
    }

    fn current_health(&self) -> Health {
        if let Some(why) = lock(&self.topology_error).clone() {
            return Health::Down(why);
        }
        let topology = self.view.get();
        let uncovered = topology.uncovered();
        if uncovered > 0 {
            return Health::Down(format!("{uncovered} slots have no master"));
        }
        let shards = lock(&self.shards);
        for master in topology.masters() {
            match shards.get(master) {
                None => return Health::Down(format!("shard {master}: connecting")),
                Some(shard) if shard.master().is_none() => {
                    return Health::Down(format!("shard {master}: {}", shard.why_down()));
                }
                Some(_) => {}
            }
        }
        Health::Up
    }
}

/// An error carried through a redis call's result (so `on_room` sees the
/// redirect inside).
fn into_redis(e: Error) -> redis::RedisError {
    match e {
        Error::Command { source, .. } => source,
        other => redis::RedisError::from((redis::ErrorKind::Io, "history read", other.to_string())),
    }
}

/// Where a call goes: a master's own connection, or the cluster client.
enum Via {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Via {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Via::Node(c) => c.req_packed_command(cmd),
            Via::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Via::Node(c) => c.req_packed_commands(cmd, offset, count),
            Via::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

type Waiter = oneshot::Sender<Result<(), BrokerError>>;

/// Rooms the hub wants, with the subscribers waiting for the first
/// confirmation; every shard link subscribes those its master serves.
#[derive(Default)]
struct Wanted {
    /// Std mutex: map updates only, never across `.await`.
    rooms: Mutex<HashMap<RoomName, Vec<Waiter>>>,
    /// Bumped on every change: the shard links watch it.
    version: watch::Sender<u64>,
}

impl Wanted {
    fn want(&self, room: &RoomName) -> oneshot::Receiver<Result<(), BrokerError>> {
        let (tx, rx) = oneshot::channel();
        lock(&self.rooms).entry(room.clone()).or_default().push(tx);
        self.version.send_modify(|v| *v += 1);
        rx
    }

    fn unwant(&self, room: &RoomName) {
        lock(&self.rooms).remove(room);
        self.version.send_modify(|v| *v += 1);
    }

    /// `(to subscribe, to unsubscribe)` for a link whose master serves the
    /// rooms `serves` says, with `active` subscribed now.
    fn diff(
        &self,
        active: &HashSet<RoomName>,
        serves: impl Fn(&RoomName) -> bool,
    ) -> (Vec<RoomName>, Vec<RoomName>) {
        let wanted = lock(&self.rooms);
        let to_sub = wanted
            .keys()
            .filter(|r| serves(r) && !active.contains(*r))
            .cloned()
            .collect();
        let to_unsub = active
            .iter()
            .filter(|r| !serves(r) || !wanted.contains_key(*r))
            .cloned()
            .collect();
        (to_sub, to_unsub)
    }

    fn is_wanted(&self, room: &RoomName) -> bool {
        lock(&self.rooms).contains_key(room)
    }

    /// Answers everyone waiting on a room now in `active`.
    fn confirm(&self, active: &HashSet<RoomName>) {
        let mut wanted = lock(&self.rooms);
        for (room, waiters) in wanted.iter_mut() {
            if active.contains(room) {
                for w in waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
        }
    }

    /// Subscribers waiting on rooms `lost` says (their shard's link went
    /// away) are told so; those rooms are dropped from the wanted set (the
    /// hub forgets them on failure).
    fn fail(&self, lost: impl Fn(&RoomName) -> bool, why: &Error) {
        lock(&self.rooms).retain(|room, waiters| {
            if waiters.is_empty() || !lost(room) {
                return true;
            }
            for w in waiters.drain(..) {
                let _ = w.send(Err(BrokerError::Unavailable(format!(
                    "redis link down: {why}"
                ))));
            }
            false
        });
    }
}

/// The topology task: connects the cluster client, asks it for the slots
/// every [`topology::REFRESH_INTERVAL`] and whenever told to, and keeps one
/// shard link per master serving slots.
async fn follow(shared: Arc<Shared>) {
    let mut changed = shared.view.subscribe();
    let mut tick = tokio::time::interval(topology::REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let asked = ask_topology(&shared).await;
        *lock(&shared.topology_error) = match asked {
            Ok(()) => None,
            // A view already known stays in force; the links find out
            // whether it still holds.
            Err(e) if shared.view.get().uncovered() < SLOTS as usize => {
                tracing::warn!(error = %e, "cannot refresh the redis cluster topology");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot learn the redis cluster topology");
                Some(e.to_string())
            }
        };
        keep_links(&shared);
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.view.refresh_wanted() => {}
            Ok(()) = changed.changed() => {
                // A MOVED named a master: link to it before asking again.
                keep_links(&shared);
            }
        }
    }
}

/// One `CLUSTER SLOTS` through the cluster client (connected first if need
/// be), bounded by the Redis timeout.
async fn ask_topology(shared: &Shared) -> Result<(), Error> {
    let limit = shared.opts.op_timeout;
    let Target::Cluster { seeds } = &shared.opts.url.target else {
        return Err(Error::NotConnected);
    };
    let seed = seeds.first().cloned().unwrap_or(Addr {
        host: String::new(),
        port: 0,
    });
    let known = shared.cluster.borrow().clone();
    let mut cluster = match known {
        Some(cluster) => cluster,
        None => {
            let cluster = bounded(
                &seed,
                "cluster connect",
                limit * 3,
                cluster_client(&shared.opts, seeds)?.get_async_connection(),
            )
            .await?;
            shared.cluster.send_replace(Some(cluster.clone()));
            cluster
        }
    };
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SLOTS");
    let random = redis::cluster_routing::RoutingInfo::SingleNode(
        redis::cluster_routing::SingleNodeRoutingInfo::Random,
    );
    let reply = bounded(
        &seed,
        "CLUSTER SLOTS",
        limit,
        cluster.route_command(cmd, random),
    )
    .await?;
    let topology = topology::Topology::parse(&reply).map_err(Error::Topology)?;
    shared.view.replace(topology);
    Ok(())
}

/// The redis crate's cluster client for the URL's seeds and credentials.
fn cluster_client(
    opts: &RedisOptions,
    seeds: &[Addr],
) -> Result<redis::cluster::ClusterClient, Error> {
    let limit = opts.op_timeout;
    let infos = seeds
        .iter()
        .map(|a| {
            redis::IntoConnectionInfo::into_connection_info(redis::ConnectionAddr::Tcp(
                a.host.clone(),
                a.port,
            ))
        })
        .collect::<redis::RedisResult<Vec<_>>>()
        .map_err(|source| Error::Connect {
            addr: seeds.first().cloned().unwrap_or(Addr {
                host: String::new(),
                port: 0,
            }),
            source,
        })?;
    let mut builder = redis::cluster::ClusterClientBuilder::new(infos)
        .connection_timeout(limit)
        .response_timeout(limit)
        // Our own calls are bounded; the client's retries must fit in them.
        .retries(2)
        .min_retry_wait(10)
        .max_retry_wait(limit.as_millis() as u64 / 4);
    if let Some(user) = &opts.url.username {
        builder = builder.username(user);
    }
    if let Some(pw) = &opts.url.password {
        builder = builder.password(pw);
    }
    builder.build().map_err(|source| Error::Connect {
        addr: seeds.first().cloned().unwrap_or(Addr {
            host: String::new(),
            port: 0,
        }),
        source,
    })
}

/// A link per master serving slots: starts the missing ones and forgets
/// those whose link ended (their master no longer serves slots).
fn keep_links(shared: &Arc<Shared>) {
    let topology = shared.view.get();
    {
        let mut shards = lock(&shared.shards);
        shards.retain(|addr, shard| !shard.finished() || topology.masters().any(|m| m == addr));
        for master in topology.masters() {
            let stale = shards.get(master).is_some_and(shard::Handle::finished);
            if stale || !shards.contains_key(master) {
                shards.insert(master.clone(), shard::start(shared, master.clone()));
            }
        }
    }
    shared.update_health();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_own() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot("chorus:room:{lobby}"), 10294);
        assert_eq!(slot("x"), 16287);
        assert_eq!(slot("{}x"), slot("{}x"));
        assert_eq!(room_slot("lobby"), 10294);
        for s in [0, 1, 5460, 16383] {
            assert_eq!(room_slot(&tag_for(s)), s);
        }
    }
}
