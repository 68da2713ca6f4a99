//! Subscription bookkeeping: the rooms the hub wants (with the subscribers
//! waiting for the first confirmation), and bringing a link's Redis
//! subscriptions to that set.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::PubSubSink;
use tokio::sync::{Notify, oneshot};

use super::connection::Master;
use super::error::{Error, bounded};
use super::{history, scripts};
use crate::broker::BrokerError;
use crate::broker::tracker::Tracker;
use crate::protocol::RoomName;
use crate::sync::lock;

/// Rooms subscribed in one SUBSCRIBE command at most.
const BATCH: usize = 512;

type Waiter = oneshot::Sender<Result<(), BrokerError>>;

#[derive(Default)]
pub(super) struct Subscriptions {
    /// Rooms the hub wants, with the subscribers waiting for the first
    /// confirmation. Std mutex: map updates only, never across `.await`.
    wanted: Mutex<HashMap<RoomName, Vec<Waiter>>>,
    /// Wakes the link when `wanted` changed.
    changed: Notify,
}

/// A link's Pub/Sub subscriptions.
pub(super) struct Subscribed {
    pub sink: PubSubSink,
    /// Rooms subscribed on this link.
    pub active: HashSet<RoomName>,
}

impl Subscriptions {
    /// The room is wanted; the answer comes once it is subscribed (or the
    /// link fails).
    pub fn want(&self, room: &RoomName) -> oneshot::Receiver<Result<(), BrokerError>> {
        let (tx, rx) = oneshot::channel();
        lock(&self.wanted).entry(room.clone()).or_default().push(tx);
        self.changed.notify_one();
        rx
    }

    pub fn unwant(&self, room: &RoomName) {
        lock(&self.wanted).remove(room);
        self.changed.notify_one();
    }

    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Subscribers waiting for a link that went away are told so; their
    /// rooms are dropped from the wanted set (the hub forgets them on failure).
    pub fn fail_waiters(&self, why: &Error) {
        lock(&self.wanted).retain(|_, waiters| {
            if waiters.is_empty() {
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

    /// Brings the link's subscriptions to the wanted set, then answers the
    /// waiters of every room now subscribed. With history (`tracker`), each
    /// newly subscribed room is tracked from where it stood just before.
    pub async fn reconcile(
        &self,
        link: &mut Subscribed,
        master: &Master,
        tracker: Option<&Tracker>,
        limit: Duration,
    ) -> Result<(), Error> {
        let (to_sub, to_unsub): (Vec<RoomName>, Vec<RoomName>) = {
            let wanted = lock(&self.wanted);
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
        let addr = &master.addr;
        for chunk in to_unsub.chunks(BATCH) {
            let channels = channels(chunk);
            bounded(addr, "UNSUBSCRIBE", limit, link.sink.unsubscribe(&channels)).await?;
            for room in chunk {
                link.active.remove(room);
                if let Some(tracker) = tracker {
                    tracker.forget(room);
                }
            }
        }
        for chunk in to_sub.chunks(BATCH) {
            let channels = channels(chunk);
            // History mode: where each room stood just before this node
            // subscribed, so that what its subscribers miss while the link is
            // down is caught up from there even if nothing was delivered yet.
            // Read (and tracked) before SUBSCRIBE: a message published in
            // between is then filled from history rather than taken for
            // delivered.
            if let Some(tracker) = tracker {
                let mut conn = master.conn.clone();
                let keys = scripts::Keyspace::Plain;
                let baselines = history::positions(&mut conn, addr, keys, chunk, limit).await?;
                for (room, cursor) in chunk.iter().zip(baselines) {
                    let cursor = cursor.map_err(|source| Error::Command {
                        command: "HMGET room positions",
                        addr: addr.clone(),
                        source,
                    })?;
                    tracker.baseline(room, cursor);
                }
            }
            bounded(addr, "SUBSCRIBE", limit, link.sink.subscribe(&channels)).await?;
            link.active.extend(chunk.iter().cloned());
        }
        // Everyone waiting on a room that is now active can go ahead; a room
        // that was wanted, then unwanted, then wanted again meanwhile is
        // active too.
        let mut wanted = lock(&self.wanted);
        for (room, waiters) in wanted.iter_mut() {
            if link.active.contains(room) {
                for w in waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
        }
        Ok(())
    }
}

fn channels(rooms: &[RoomName]) -> Vec<String> {
    rooms
        .iter()
        .map(|r| scripts::room_channel(r.as_str()))
        .collect()
}
