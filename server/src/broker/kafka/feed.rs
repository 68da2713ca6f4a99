//! What one node reads of the topic, as pure state: the partitions it
//! reads, the rooms it serves in each, and for each room the position
//! after which nothing of the room is unaccounted for. The reader hands it
//! each record; it says what to deliver (with the `prev` a client checks
//! its continuity with) and which rooms lost records a skip in the
//! partition's offsets jumped over.
//!
//! Positions are Kafka offsets plus one (so 0 is "nothing yet" and a
//! message's position is the partition's high watermark just after it).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::protocol::RoomName;

/// One partition a node reads.
#[derive(Debug, Default)]
pub(super) struct PartitionFeed {
    /// Reading from the broker (`false` while its start is being looked up).
    pub assigned: bool,
    /// The position of the last record handled (Kafka's next offset).
    pub position: u64,
    /// Served rooms: the room's last delivered position, or the position
    /// from which on this node has seen every record of the room.
    /// `None` until the partition is assigned.
    pub rooms: HashMap<RoomName, Option<u64>>,
}

/// What to do with one record.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Not for this node (a room it does not serve, or a record from
    /// before the partition's start).
    Skip,
    /// Deliver it: no message of the room lies between `prev` and it.
    Deliver { prev: u64 },
}

impl PartitionFeed {
    /// Starts reading at `position` (the high watermark when the first
    /// room subscribed): every served room is accounted for up to it.
    pub fn start(&mut self, position: u64) {
        self.assigned = true;
        self.position = position;
        for last in self.rooms.values_mut() {
            last.get_or_insert(position);
        }
    }

    /// A room this node starts serving; accounted for from the reader's
    /// position on when the partition is being read already.
    pub fn add(&mut self, room: &RoomName) {
        let at = self.assigned.then_some(self.position);
        self.rooms.entry(room.clone()).or_insert(at);
    }

    /// Whether a record at position `at` of `room` is one to deliver.
    pub fn serves(&self, room: &RoomName, at: u64) -> bool {
        self.assigned && at > self.position && self.rooms.get(room).is_some_and(Option::is_some)
    }

    /// The record at Kafka `offset` of `room` (`None`: not a room's record). `lost` gets every served room
    /// that may have had records between the last one handled and this one
    /// (Kafka skipped them: retention deleted them before this node read
    /// them), with the position they are accounted for up to.
    pub fn record(
        &mut self,
        room: Option<&RoomName>,
        offset: u64,
        mut lost: impl FnMut(&RoomName, u64),
    ) -> Step {
        let at = offset + 1;
        if !self.assigned || at <= self.position {
            return Step::Skip;
        }
        if offset > self.position {
            // Records [position, offset) were never handed to this node.
            for (r, last) in &mut self.rooms {
                if last.is_some_and(|l| l < offset) {
                    lost(r, offset);
                    *last = Some(offset);
                }
            }
        }
        self.position = at;
        match room.and_then(|room| self.rooms.get_mut(room)) {
            Some(Some(last)) => {
                let prev = *last;
                *last = at;
                Step::Deliver { prev }
            }
            _ => Step::Skip,
        }
    }
}

/// Idempotency keys a node saw per room within a window, so that a record
/// published twice with the same key (by two nodes, or a retry) is
/// delivered once.
#[derive(Debug)]
pub(super) struct SeenKeys {
    window: Duration,
    keys: HashMap<(RoomName, String), u64>,
    expiry: VecDeque<(Instant, RoomName, String)>,
}

/// Keys remembered at most, whatever the window (memory stays bounded
/// under a flood of keyed publishes).
const MAX_KEYS: usize = 100_000;

impl SeenKeys {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            keys: HashMap::new(),
            expiry: VecDeque::new(),
        }
    }

    /// The position of the first record of `room` with `key` within the
    /// window, if one was seen; otherwise remembers this one at `at`.
    pub fn first(&mut self, room: &RoomName, key: &str, at: u64, now: Instant) -> Option<u64> {
        self.forget_expired(now);
        let id = (room.clone(), key.to_owned());
        if let Some(first) = self.keys.get(&id) {
            return Some(*first);
        }
        self.keys.insert(id, at);
        self.expiry
            .push_back((now + self.window, room.clone(), key.to_owned()));
        None
    }

    /// The position of an earlier record of `room` with `key`, if seen
    /// within the window.
    pub fn get(&mut self, room: &RoomName, key: &str, now: Instant) -> Option<u64> {
        self.forget_expired(now);
        self.keys.get(&(room.clone(), key.to_owned())).copied()
    }

    fn forget_expired(&mut self, now: Instant) {
        while let Some((t, _, _)) = self.expiry.front() {
            if *t > now && self.expiry.len() < MAX_KEYS {
                break;
            }
            if let Some((_, r, k)) = self.expiry.pop_front() {
                self.keys.remove(&(r, k));
            }
        }
    }
}

/// The partition of a room: FNV-1a of its name, modulo the partition
/// count. Every node computes the same.
pub fn partition_of(room: &str, partitions: u32) -> i32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in room.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as i32
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    #[test]
    fn prev_chains_a_rooms_messages_through_other_rooms_records() {
        let (a, b) = (room("a"), room("b"));
        let mut feed = PartitionFeed::default();
        feed.add(&a);
        feed.start(10);
        let mut lost = Vec::new();
        let mut step = |r: &RoomName, o| feed.record(Some(r), o, |r, u| lost.push((r.clone(), u)));
        assert_eq!(step(&a, 10), Step::Deliver { prev: 10 });
        assert_eq!(step(&b, 11), Step::Skip);
        assert_eq!(step(&a, 12), Step::Deliver { prev: 11 });
        // Redelivered after a reconnect: already handled.
        assert_eq!(step(&a, 12), Step::Skip);
        assert!(lost.is_empty());
    }

    #[test]
    fn a_room_added_while_reading_starts_at_the_readers_position() {
        let (a, b) = (room("a"), room("b"));
        let mut feed = PartitionFeed::default();
        feed.add(&a);
        feed.start(0);
        assert_eq!(feed.record(Some(&b), 0, |_, _| {}), Step::Skip);
        feed.add(&b);
        assert_eq!(
            feed.record(Some(&b), 1, |_, _| {}),
            Step::Deliver { prev: 1 }
        );
    }

    #[test]
    fn skipped_offsets_are_told_as_lost_to_every_served_room() {
        let (a, b) = (room("a"), room("b"));
        let mut feed = PartitionFeed::default();
        feed.add(&a);
        feed.add(&b);
        feed.start(5);
        let mut lost = Vec::new();
        let step = feed.record(Some(&a), 9, |r, u| lost.push((r.to_string(), u)));
        lost.sort();
        assert_eq!(lost, [("a".into(), 9), ("b".into(), 9)]);
        assert_eq!(step, Step::Deliver { prev: 9 });
    }

    #[test]
    fn keys_are_remembered_within_the_window_only() {
        let a = room("a");
        let mut keys = SeenKeys::new(Duration::from_secs(60));
        let t = Instant::now();
        assert_eq!(keys.first(&a, "k", 3, t), None);
        assert_eq!(keys.first(&a, "k", 7, t), Some(3));
        assert_eq!(keys.first(&room("b"), "k", 8, t), None);
        assert_eq!(keys.get(&a, "k", t), Some(3));
        assert_eq!(keys.get(&a, "k", t + Duration::from_secs(61)), None);
        assert_eq!(keys.first(&a, "k", 9, t + Duration::from_secs(61)), None);
    }

    #[test]
    fn rooms_spread_over_partitions_the_same_way_everywhere() {
        assert_eq!(partition_of("lobby", 12), partition_of("lobby", 12));
        let used: std::collections::HashSet<_> = (0..100)
            .map(|i| partition_of(&format!("r{i}"), 4))
            .collect();
        assert_eq!(used.len(), 4);
        assert_eq!(partition_of("x", 1), 0);
    }
}
