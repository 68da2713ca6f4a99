//! The node's room registry and fan-out.
//!
//! Each local room holds the send handles of its local subscribers. A
//! delivery offers the same framed bytes to every subscriber
//! ([`QueueTx::offer`]): a subscriber whose connection waits with nothing in
//! hand is written to at once, with one non-blocking write from the fan-out
//! (no wake-up of its task); the others get a reference-counted clone in
//! their bounded send queue. A full queue marks a slow consumer, which is
//! told to close (1008) and never stalls the room.
//!
//! A room whose fan-out falls behind pushes back on its publishers: when
//! most of its local subscribers have more than half a queue waiting, the
//! node refuses publishes to the room (`rate_limited`) for
//! [`CONGESTION_HOLD`] ([`Hub::congested`]), rather than accept messages
//! that would only shed its subscribers one by one.
//!
//! The hub also owns the node's broker subscriptions: the first local
//! subscriber of a room subscribes the node, the last one leaving
//! unsubscribes it. Both calls are made under the registry lock so the broker
//! sees them in transition order.

mod conn;
mod sent;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use conn::{
    CloseReason, ConnControl, ConnHandle, ConnId, Offered, Outbound, Outbox, QueueRx, QueueTx,
    TrySendError, Wire,
};
pub use sent::SentUpTo;

/// How long a room whose fan-out fell behind refuses publishes; the next
/// fan-out after that looks again.
pub const CONGESTION_HOLD: Duration = Duration::from_millis(100);

/// A message that reaches the fan-out later than this after its publish
/// (the node is behind: starved of CPU, or a burst) is queued for every
/// subscriber instead of written by the fan-out: the connections' tasks then
/// write several messages per system call, the node catches up, and the
/// broker's reader stays free to read (a fan-out that keeps writing one
/// message per system call while behind never catches up).
pub const DIRECT_WRITE_MAX_AGE: Duration = Duration::from_millis(10);

use crate::broker::{Broker, BrokerError, Deliver, Delivery, now_us};
use crate::metrics::Metrics;
use crate::protocol::{self, ErrorCode, RoomName, ServerFrame};
use crate::sync::{lock, read, write};

pub struct Hub {
    /// Std mutex on purpose: every critical section is a map operation (plus
    /// a non-blocking broker call); it is never held across `.await`.
    rooms: Mutex<HashMap<RoomName, Arc<LocalRoom>>>,
    metrics: Arc<Metrics>,
    /// The clock of `LocalRoom::congested_until`.
    started: Instant,
}

struct LocalRoom {
    /// Read-locked for a fan-out (which only offers, never waits),
    /// write-locked to join or leave.
    subs: RwLock<HashMap<ConnId, Member>>,
    /// Whether the node's broker subscription for the room is active.
    state: watch::Sender<SubState>,
    /// Until when (µs after `Hub::started`) publishes to the room are
    /// refused: its last fan-out found most subscribers behind.
    congested_until: AtomicU64,
    /// The room's epoch as the last delivery carried it: each delivery's
    /// epoch is swapped for this `Arc` when equal, so that every
    /// subscriber's mark ([`SentUpTo`]) holds the same one and compares
    /// pointers.
    epoch: Mutex<Arc<str>>,
}

/// A local subscriber of a room.
#[derive(Debug, Clone)]
pub struct Member {
    pub handle: ConnHandle,
    /// How far the room went out to it, shared with its session.
    pub sent: Arc<Mutex<SentUpTo>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SubState {
    Pending,
    Active,
    Failed(BrokerError),
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            metrics,
            started: Instant::now(),
        }
    }

    /// Adds a subscriber to a room, subscribing the node first when it is the
    /// room's first local subscriber. Resolves when the node's subscription
    /// is active, or fails (and the subscriber is removed again).
    pub async fn join(
        &self,
        broker: &dyn Broker,
        room: &RoomName,
        id: ConnId,
        member: Member,
    ) -> Result<(), BrokerError> {
        let (local, subscribing) = {
            let mut rooms = lock(&self.rooms);
            let (local, subscribing) = match rooms.get(room) {
                Some(local) => (local.clone(), None),
                None => {
                    let local = Arc::new(LocalRoom {
                        subs: RwLock::new(HashMap::new()),
                        state: watch::Sender::new(SubState::Pending),
                        congested_until: AtomicU64::new(0),
                        epoch: Mutex::new(Arc::from("")),
                    });
                    rooms.insert(room.clone(), local.clone());
                    self.metrics.rooms.set(rooms.len() as i64);
                    (local, Some(broker.subscribe(room)))
                }
            };
            write(&local.subs).insert(id, member);
            (local, subscribing)
        };
        let outcome = match subscribing {
            Some(fut) => {
                let outcome = fut.await;
                local.state.send_replace(match &outcome {
                    Ok(()) => SubState::Active,
                    Err(e) => SubState::Failed(e.clone()),
                });
                outcome
            }
            None => {
                let mut state = local.state.subscribe();
                match state
                    .wait_for(|s| *s != SubState::Pending)
                    .await
                    .map(|s| s.clone())
                {
                    Ok(SubState::Failed(e)) => Err(e),
                    Ok(_) => Ok(()),
                    Err(_) => Err(BrokerError::Unavailable(
                        "room subscription abandoned".into(),
                    )),
                }
            }
        };
        if outcome.is_err() {
            let mut rooms = lock(&self.rooms);
            write(&local.subs).remove(&id);
            // Forget the failed room so the next join tries again.
            if rooms.get(room).is_some_and(|r| Arc::ptr_eq(r, &local)) {
                rooms.remove(room);
                self.metrics.rooms.set(rooms.len() as i64);
            }
        }
        outcome
    }

    /// Removes a subscriber; unsubscribes the node when it was the last one.
    /// Returns whether the subscriber was in the room.
    pub fn leave(&self, broker: &dyn Broker, room: &RoomName, id: ConnId) -> bool {
        let mut rooms = lock(&self.rooms);
        let Some(local) = rooms.get(room).cloned() else {
            return false;
        };
        let mut subs = write(&local.subs);
        let was_member = subs.remove(&id).is_some();
        if subs.is_empty() {
            drop(subs);
            rooms.remove(room);
            self.metrics.rooms.set(rooms.len() as i64);
            broker.unsubscribe(room);
        }
        was_member
    }

    /// Number of local subscribers of a room (0 when the node does not serve it).
    pub fn subscribers(&self, room: &RoomName) -> usize {
        lock(&self.rooms)
            .get(room)
            .map_or(0, |r| read(&r.subs).len())
    }

    /// Rooms this node currently serves.
    pub fn rooms(&self) -> Vec<RoomName> {
        lock(&self.rooms).keys().cloned().collect()
    }
}

impl Hub {
    /// Whether publishes to `room` are refused for now: its last fan-out on
    /// this node found most of its subscribers behind.
    pub fn congested(&self, room: &RoomName) -> bool {
        let Some(local) = lock(&self.rooms).get(room).cloned() else {
            return false;
        };
        local.congested_until.load(Ordering::Relaxed) > self.clock_us()
    }

    fn clock_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Offers `d` to every local subscriber of its room; returns to how
    /// many it went (`None` when the node does not serve the room).
    fn fan_out(&self, mut d: Delivery) -> Option<u64> {
        let local = lock(&self.rooms).get(&d.room).cloned()?;
        {
            let mut epoch = lock(&local.epoch);
            if *epoch == d.epoch {
                d.epoch = epoch.clone();
            } else {
                *epoch = d.epoch.clone();
            }
        }
        // Wall clocks of the publishing node and this one: a skewed clock
        // only turns direct writes on or off, never loses a message.
        let age_us = now_us().saturating_sub(d.published_at_us);
        let direct = age_us < DIRECT_WRITE_MAX_AGE.as_micros() as u64;
        let d = Arc::new(d);
        let (mut delivered, mut written, mut behind) = (0u64, 0u64, 0usize);
        let mut slow = Vec::new();
        let members = {
            let subs = read(&local.subs);
            for member in subs.values() {
                match member.handle.tx.offer(&d, &member.sent, direct) {
                    Ok(Offered::Written) => {
                        delivered += 1;
                        written += 1;
                    }
                    Ok(Offered::HandedOver) => delivered += 1,
                    Ok(Offered::Queued(len)) => {
                        delivered += 1;
                        if len * 2 > member.handle.tx.capacity() {
                            behind += 1;
                        }
                    }
                    Ok(Offered::Skipped) => {}
                    Err(TrySendError::Full) => {
                        behind += 1;
                        slow.push(member.handle.ctl.clone());
                    }
                    Err(TrySendError::Closed) => {}
                }
            }
            subs.len()
        };
        if behind * 2 > members {
            let until = self.clock_us() + CONGESTION_HOLD.as_micros() as u64;
            local.congested_until.store(until, Ordering::Relaxed);
        }
        self.metrics.direct_writes.inc_by(written);
        for ctl in slow {
            if ctl.close(CloseReason::SlowConsumer) {
                self.metrics.slow_consumers.inc();
            }
        }
        Some(delivered)
    }
}

impl Deliver for Hub {
    fn deliver(&self, d: Delivery) {
        let published_at_us = d.published_at_us;
        let Some(delivered) = self.fan_out(d) else {
            return;
        };
        self.metrics.delivered.inc_by(delivered);
        let latency_us = now_us().saturating_sub(published_at_us);
        self.metrics
            .delivery_latency
            .observe(latency_us as f64 / 1e6);
    }

    /// The notice takes the missing messages' place in each subscriber's
    /// queue, as the last of them (`offset` = `upto`): a subscriber that
    /// joined after them drops it like any message it already has.
    fn lost(&self, room: &RoomName, epoch: &Arc<str>, upto: u64) {
        let frame = protocol::encode(&ServerFrame::Gap {
            room: room.as_str(),
            epoch,
            offset: upto,
            code: ErrorCode::HistoryGone,
        });
        self.fan_out(Delivery {
            room: room.clone(),
            offset: upto,
            epoch: epoch.clone(),
            frame,
            published_at_us: 0,
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::broker::{MemoryBroker, PublishRequest};
    use serde_json::value::RawValue;

    fn member(handle: ConnHandle) -> Member {
        Member {
            handle,
            sent: Arc::default(),
        }
    }

    fn setup() -> (Arc<Hub>, MemoryBroker, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(metrics.clone()));
        let broker = MemoryBroker::new(hub.clone());
        (hub, broker, metrics)
    }

    fn publish(broker: &MemoryBroker, room: &RoomName, n: u64) {
        let req = PublishRequest {
            room: room.clone(),
            data: RawValue::from_string(n.to_string()).unwrap(),
            from: None,
            key: None,
        };
        drop(broker.publish(req));
    }

    fn frame_offset(out: Outbound) -> u64 {
        match out {
            Outbound::Message(d) => {
                let v = serde_json::from_str::<serde_json::Value>(&d.frame).unwrap();
                assert_eq!(v["offset"].as_u64(), Some(d.offset));
                d.offset
            }
        }
    }

    #[tokio::test]
    async fn every_subscriber_gets_the_same_bytes_in_order() {
        let (hub, broker, metrics) = setup();
        let room = RoomName::parse("lobby").unwrap();
        let (a, mut a_rx) = ConnHandle::new(16);
        let (b, mut b_rx) = ConnHandle::new(16);
        hub.join(&broker, &room, ConnId(1), member(a))
            .await
            .unwrap();
        hub.join(&broker, &room, ConnId(2), member(b))
            .await
            .unwrap();
        assert_eq!(hub.subscribers(&room), 2);
        for n in 1..=3 {
            publish(&broker, &room, n);
        }
        for n in 1..=3 {
            let (Outbound::Message(da), Outbound::Message(db)) =
                (a_rx.recv().await.unwrap(), b_rx.recv().await.unwrap());
            assert!(
                Arc::ptr_eq(&da, &db),
                "one encoding shared by all subscribers"
            );
            assert_eq!(frame_offset(Outbound::Message(da)), n);
        }
        assert_eq!(metrics.delivered.get(), 6);
    }

    #[tokio::test]
    async fn last_leave_unsubscribes_the_node() {
        let (hub, broker, metrics) = setup();
        let room = RoomName::parse("r").unwrap();
        let (a, mut a_rx) = ConnHandle::new(16);
        hub.join(&broker, &room, ConnId(1), member(a))
            .await
            .unwrap();
        assert_eq!(metrics.rooms.get(), 1);
        assert!(hub.leave(&broker, &room, ConnId(1)));
        assert!(!hub.leave(&broker, &room, ConnId(1)));
        assert_eq!(metrics.rooms.get(), 0);
        assert!(hub.rooms().is_empty());
        publish(&broker, &room, 1);
        assert!(a_rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_full_queue_marks_a_slow_consumer_without_stalling_others() {
        let (hub, broker, metrics) = setup();
        let room = RoomName::parse("r").unwrap();
        let (slow, _slow_rx) = ConnHandle::new(2);
        let slow_ctl = slow.ctl.clone();
        let (fast, mut fast_rx) = ConnHandle::new(64);
        hub.join(&broker, &room, ConnId(1), member(slow))
            .await
            .unwrap();
        hub.join(&broker, &room, ConnId(2), member(fast))
            .await
            .unwrap();
        for n in 1..=10 {
            publish(&broker, &room, n);
        }
        for n in 1..=10 {
            assert_eq!(frame_offset(fast_rx.recv().await.unwrap()), n);
        }
        assert_eq!(slow_ctl.reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(
            metrics.slow_consumers.get(),
            1,
            "counted once, however many messages it missed"
        );
        assert_eq!(metrics.delivered.get(), 12);
    }

    /// The writing end of a socket that takes everything, and keeps it.
    struct Recorder(Arc<Mutex<Vec<u8>>>);

    impl Wire for Recorder {
        fn try_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }

        fn poll_write_vectored(
            &mut self,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = bufs.first().map_or(0, |b| b.len());
            let _ = self.try_write(bufs.first().map_or(&[][..], |b| &b[..]));
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[tokio::test]
    async fn a_message_that_arrives_late_is_queued_not_written_by_the_fan_out() {
        use futures_util::FutureExt;
        let (hub, broker, metrics) = setup();
        let room = RoomName::parse("r").unwrap();
        let (h, mut rx) = ConnHandle::new(16);
        let wire = Arc::new(Mutex::new(Vec::new()));
        rx.attach(Box::new(Recorder(wire.clone())));
        hub.join(&broker, &room, ConnId(1), member(h))
            .await
            .unwrap();
        let delivery = |offset, published_at_us| Delivery {
            room: room.clone(),
            offset,
            epoch: "e".into(),
            frame: protocol::Frame::from_static("{}"),
            published_at_us,
        };
        // The connection's task waits with nothing in hand.
        let mut out = Vec::new();
        assert!(rx.recv_many(&mut out, 8).now_or_never().is_none());
        hub.deliver(delivery(1, now_us()));
        assert_eq!(metrics.direct_writes.get(), 1, "fresh: written at once");
        assert!(!lock(&wire).is_empty());
        assert!(rx.try_recv().is_none());

        assert!(rx.recv_many(&mut out, 8).now_or_never().is_none());
        let late = now_us() - 2 * DIRECT_WRITE_MAX_AGE.as_micros() as u64;
        hub.deliver(delivery(2, late));
        assert_eq!(metrics.direct_writes.get(), 1, "late: not written");
        assert_eq!(rx.try_recv().map(frame_offset_of), Some(2), "but queued");
    }

    fn frame_offset_of(out: Outbound) -> u64 {
        match out {
            Outbound::Message(d) => d.offset,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn joins_leaves_and_publishes_on_one_room_from_many_threads_do_not_deadlock() {
        let (hub, broker, _) = setup();
        let broker = Arc::new(broker);
        let room = RoomName::parse("hot").unwrap();
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let (hub, broker, room) = (hub.clone(), broker.clone(), room.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..2000u64 {
                    let id = ConnId(t * 10_000 + i);
                    let (h, _rx) = ConnHandle::new(4);
                    hub.join(&*broker, &room, id, member(h)).await.unwrap();
                    hub.leave(&*broker, &room, id);
                }
            }));
        }
        let publishers: Vec<_> = (0..2)
            .map(|_| {
                let (broker, room) = (broker.clone(), room.clone());
                std::thread::spawn(move || {
                    for n in 0..5000 {
                        publish(&broker, &room, n);
                    }
                })
            })
            .collect();
        let joined = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            for t in tasks {
                t.await.unwrap();
            }
        })
        .await;
        assert!(joined.is_ok(), "join/leave stalled: lock-order deadlock");
        for p in publishers {
            p.join().unwrap();
        }
    }
}
