//! The embedded broker: one process, no Redis. Offsets are kept per room in
//! memory; each room gets a fresh epoch when its counter is (re)created, so a
//! restart is visible to clients as an epoch change.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::{
    Broker, BrokerError, Deliver, Delivery, Health, Position, PublishRequest, Published, new_epoch,
    now_us,
};
use crate::protocol::{MessageFrame, RoomName, encode_message};
use crate::sync::lock;

/// Counters of rooms nobody subscribes to are forgotten once this many rooms
/// are known, so publishing to ever-new rooms cannot grow memory without bound.
const MAX_IDLE_ROOMS: usize = 65_536;

pub struct MemoryBroker {
    /// Room counters. Std mutex: held only for a map lookup, never across
    /// `.await`, and never while taking another lock.
    rooms: Mutex<HashMap<RoomName, Arc<RoomState>>>,
    deliver: Arc<dyn Deliver>,
    health: watch::Sender<Health>,
    idempotency_window: Duration,
}

/// Lock order: a publish holds `seq` while it delivers into the hub (which
/// locks the hub's registry), and the hub calls `subscribe`/`unsubscribe`
/// holding its registry lock — so those two touch only the atomic count,
/// never `seq`.
struct RoomState {
    /// Local subscriptions (the hub subscribes once per room, but keep a count
    /// to be robust against a stray duplicate).
    subscribed: AtomicUsize,
    seq: Mutex<RoomSeq>,
}

struct RoomSeq {
    offset: u64,
    epoch: Arc<str>,
    /// Idempotency keys seen within the window: key → offset, and the keys in
    /// the order they expire.
    keys: HashMap<String, u64>,
    expiry: VecDeque<(Instant, String)>,
}

impl RoomSeq {
    fn new() -> Self {
        Self {
            offset: 0,
            epoch: new_epoch().into(),
            keys: HashMap::new(),
            expiry: VecDeque::new(),
        }
    }

    fn forget_expired_keys(&mut self, now: Instant) {
        while let Some((at, _)) = self.expiry.front() {
            if *at > now {
                break;
            }
            if let Some((_, key)) = self.expiry.pop_front() {
                self.keys.remove(&key);
            }
        }
    }
}

impl MemoryBroker {
    pub fn new(deliver: Arc<dyn Deliver>) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            deliver,
            health: watch::Sender::new(Health::Up),
            idempotency_window: Duration::from_secs(300),
        }
    }

    /// How long a publish's idempotency key is remembered.
    pub fn with_idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window = window;
        self
    }

    fn room(&self, room: &RoomName) -> Arc<RoomState> {
        let mut rooms = lock(&self.rooms);
        if let Some(state) = rooms.get(room) {
            return state.clone();
        }
        if rooms.len() >= MAX_IDLE_ROOMS {
            rooms.retain(|_, state| state.subscribed.load(Ordering::Acquire) > 0);
        }
        rooms
            .entry(room.clone())
            .or_insert_with(|| {
                Arc::new(RoomState {
                    subscribed: AtomicUsize::new(0),
                    seq: Mutex::new(RoomSeq::new()),
                })
            })
            .clone()
    }

    fn publish_now(&self, req: PublishRequest) -> Published {
        let state = self.room(&req.room);
        // Held while delivering so that concurrent publishers reach the hub in
        // offset order; delivery never awaits (it queues, or makes
        // non-blocking socket writes).
        let mut seq = lock(&state.seq);
        let now = Instant::now();
        seq.forget_expired_keys(now);
        if let Some(offset) = req.key.as_ref().and_then(|k| seq.keys.get(k)) {
            return Published {
                offset: *offset,
                epoch: seq.epoch.clone(),
                duplicate: true,
            };
        }
        seq.offset += 1;
        let offset = seq.offset;
        if let Some(key) = req.key {
            seq.keys.insert(key.clone(), offset);
            seq.expiry.push_back((now + self.idempotency_window, key));
        }
        let published = Published {
            offset,
            epoch: seq.epoch.clone(),
            duplicate: false,
        };
        if state.subscribed.load(Ordering::Acquire) > 0 {
            let frame = encode_message(&MessageFrame {
                room: req.room.as_str(),
                data: &req.data,
                offset,
                epoch: &seq.epoch,
                from: req.from.as_deref(),
            });
            self.deliver.deliver(Delivery {
                room: req.room,
                offset,
                epoch: seq.epoch.clone(),
                frame,
                published_at_us: now_us(),
            });
        }
        published
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, req: PublishRequest) -> BoxFuture<'static, Result<Published, BrokerError>> {
        let published = self.publish_now(req);
        std::future::ready(Ok(published)).boxed()
    }

    fn subscribe(&self, room: &RoomName) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.room(room).subscribed.fetch_add(1, Ordering::AcqRel);
        std::future::ready(Ok(())).boxed()
    }

    fn unsubscribe(&self, room: &RoomName) {
        let rooms = lock(&self.rooms);
        if let Some(state) = rooms.get(room) {
            let _ = state
                .subscribed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    fn position(&self, room: &RoomName) -> BoxFuture<'static, Result<Position, BrokerError>> {
        let state = self.room(room);
        let seq = lock(&state.seq);
        std::future::ready(Ok(Position {
            offset: seq.offset,
            epoch: seq.epoch.clone(),
        }))
        .boxed()
    }

    fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Delivery>>);
    impl Deliver for Collect {
        fn deliver(&self, d: Delivery) {
            lock(&self.0).push(d);
        }
        fn lost(&self, _: &RoomName, _: &Arc<str>, _: u64) {}
    }

    fn req(room: &str, data: &str) -> PublishRequest {
        PublishRequest {
            room: RoomName::parse(room).unwrap(),
            data: RawValue::from_string(data.into()).unwrap(),
            from: None,
            key: None,
        }
    }

    #[tokio::test]
    async fn offsets_count_from_one_per_room_and_only_subscribed_rooms_deliver() {
        let sink = Arc::new(Collect::default());
        let broker = MemoryBroker::new(sink.clone());
        let a = RoomName::parse("a").unwrap();
        broker.subscribe(&a).await.unwrap();
        assert_eq!(broker.publish(req("a", "1")).await.unwrap().offset, 1);
        assert_eq!(broker.publish(req("a", "2")).await.unwrap().offset, 2);
        assert_eq!(broker.publish(req("b", "3")).await.unwrap().offset, 1);
        let got = lock(&sink.0)
            .iter()
            .map(|d| (d.room.to_string(), d.offset))
            .collect::<Vec<_>>();
        assert_eq!(got, vec![("a".to_string(), 1), ("a".to_string(), 2)]);
        let pos = broker.position(&a).await.unwrap();
        assert_eq!(pos.offset, 2);
        let frame: serde_json::Value = serde_json::from_str(&lock(&sink.0)[1].frame).unwrap();
        assert_eq!(frame["data"], 2);
        assert_eq!(frame["epoch"].as_str(), Some(&*pos.epoch));
        broker.unsubscribe(&a);
        broker.publish(req("a", "4")).await.unwrap();
        assert_eq!(lock(&sink.0).len(), 2);
    }

    #[tokio::test]
    async fn a_repeated_key_returns_the_first_offset_within_the_window_only() {
        let sink = Arc::new(Collect::default());
        let broker =
            MemoryBroker::new(sink.clone()).with_idempotency_window(Duration::from_millis(200));
        let a = RoomName::parse("a").unwrap();
        broker.subscribe(&a).await.unwrap();
        let keyed = |k: &str| PublishRequest {
            key: Some(k.into()),
            ..req("a", "1")
        };
        let first = broker.publish(keyed("k1")).await.unwrap();
        let again = broker.publish(keyed("k1")).await.unwrap();
        assert_eq!((first.offset, first.duplicate), (1, false));
        assert_eq!((again.offset, again.duplicate), (1, true));
        assert_eq!(broker.publish(keyed("k2")).await.unwrap().offset, 2);
        assert_eq!(lock(&sink.0).len(), 2, "the repeat was not delivered");
        tokio::time::sleep(Duration::from_millis(250)).await;
        let later = broker.publish(keyed("k1")).await.unwrap();
        assert_eq!(
            (later.offset, later.duplicate),
            (3, false),
            "the window passed"
        );
    }
}
