//! Where each slot is: the cluster's masters and the slots each one serves,
//! as one node of the cluster answers `CLUSTER SLOTS`, patched at once when a
//! master answers `MOVED` (the shard that answers so knows better than the
//! last view), and asked again every [`REFRESH_INTERVAL`] and whenever a
//! link, a publish or a pushed `SUNSUBSCRIBE` says something moved.
//!
//! The view is a watch value. The broker's topology task keeps one shard
//! link per master in it (see `shard`); publishes and subscriptions are
//! routed by it.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use super::SLOTS;
use crate::broker::redis::url::{Addr, parse_addr};

/// How often the view is asked for again without being told to.
pub(super) const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// The masters and which one serves each slot.
#[derive(Clone, PartialEq, Eq)]
pub(in crate::broker::redis) struct Topology {
    /// Masters serving at least one slot (or named by a `MOVED`).
    masters: Vec<Addr>,
    /// Per slot, the index of its master in `masters`.
    owner: Vec<Option<u16>>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_map();
        for (i, master) in self.masters.iter().enumerate() {
            list.entry(&master.to_string(), &self.ranges_of(i));
        }
        list.finish()
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            masters: Vec::new(),
            owner: vec![None; SLOTS as usize],
        }
    }
}

impl Topology {
    /// A `CLUSTER SLOTS` reply: `[[start, end, [host, port, id…], replicas…], …]`.
    /// A master without a usable host (`""`, `"?"`) leaves its slots unknown.
    pub fn parse(reply: &Value) -> Result<Self, String> {
        let Value::Array(ranges) = reply else {
            return Err(format!("CLUSTER SLOTS answered {reply:?}"));
        };
        let mut topology = Self::default();
        for range in ranges {
            let Value::Array(items) = range else {
                return Err(format!("CLUSTER SLOTS range {range:?}"));
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(master)) =
                (items.first(), items.get(1), items.get(2))
            else {
                return Err(format!("CLUSTER SLOTS range {range:?}"));
            };
            let (start, end) = (*start, *end);
            if !(0..SLOTS as i64).contains(&start) || !(start..SLOTS as i64).contains(&end) {
                return Err(format!("CLUSTER SLOTS range {start}-{end}"));
            }
            let Some(addr) = node_addr(master) else {
                continue;
            };
            let index = topology.index_of(&addr);
            for slot in start..=end {
                topology.owner[slot as usize] = Some(index);
            }
        }
        Ok(topology)
    }

    fn index_of(&mut self, addr: &Addr) -> u16 {
        match self.masters.iter().position(|m| m == addr) {
            Some(i) => i as u16,
            None => {
                self.masters.push(addr.clone());
                (self.masters.len() - 1) as u16
            }
        }
    }

    /// The master serving `slot`.
    pub fn owner(&self, slot: u16) -> Option<&Addr> {
        let index = (*self.owner.get(slot as usize)?)?;
        self.masters.get(index as usize)
    }

    /// Masters serving at least one slot.
    pub fn masters(&self) -> impl Iterator<Item = &Addr> {
        self.masters
            .iter()
            .enumerate()
            .filter(|(i, _)| self.owner.contains(&Some(*i as u16)))
            .map(|(_, m)| m)
    }

    /// The lowest slot `master` serves.
    pub fn first_slot_of(&self, master: &Addr) -> Option<u16> {
        let index = self.masters.iter().position(|m| m == master)? as u16;
        self.owner
            .iter()
            .position(|o| *o == Some(index))
            .map(|slot| slot as u16)
    }

    /// Slots nobody is known to serve.
    pub fn uncovered(&self) -> usize {
        self.owner.iter().filter(|o| o.is_none()).count()
    }

    /// This view with `slot` served by `master` (a `MOVED` said so).
    pub fn moved(&self, slot: u16, master: Addr) -> Self {
        let mut next = self.clone();
        let index = next.index_of(&master);
        if let Some(owner) = next.owner.get_mut(slot as usize) {
            *owner = Some(index);
        }
        next
    }

    fn ranges_of(&self, index: usize) -> Vec<(u16, u16)> {
        let mut ranges: Vec<(u16, u16)> = Vec::new();
        for (slot, owner) in self.owner.iter().enumerate() {
            if *owner != Some(index as u16) {
                continue;
            }
            let slot = slot as u16;
            match ranges.last_mut() {
                Some((_, end)) if *end + 1 == slot => *end = slot,
                _ => ranges.push((slot, slot)),
            }
        }
        ranges
    }
}

/// `[host, port, …]` of a `CLUSTER SLOTS` node.
fn node_addr(node: &Value) -> Option<Addr> {
    let Value::Array(fields) = node else {
        return None;
    };
    let host = match fields.first()? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
        Value::SimpleString(s) => s.clone(),
        _ => return None,
    };
    if host.is_empty() || host == "?" {
        return None;
    }
    let Value::Int(port) = fields.get(1)? else {
        return None;
    };
    Some(Addr {
        host,
        port: u16::try_from(*port).ok()?,
    })
}

/// The shared view: read by routing, patched by `MOVED`s, replaced by
/// refreshes.
pub(super) struct View {
    now: tokio::sync::watch::Sender<Arc<Topology>>,
    refresh: tokio::sync::Notify,
}

impl View {
    pub fn new() -> Self {
        Self {
            now: tokio::sync::watch::Sender::new(Arc::new(Topology::default())),
            refresh: tokio::sync::Notify::new(),
        }
    }

    pub fn get(&self) -> Arc<Topology> {
        self.now.borrow().clone()
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Topology>> {
        self.now.subscribe()
    }

    /// Something moved: ask the cluster again now.
    pub fn refresh(&self) {
        self.refresh.notify_one();
    }

    pub async fn refresh_wanted(&self) {
        self.refresh.notified().await;
    }

    /// A fresh view from the cluster.
    pub fn replace(&self, topology: Topology) {
        self.now.send_if_modified(|now| {
            if **now == topology {
                return false;
            }
            tracing::info!(slots = ?topology, "redis cluster topology");
            *now = Arc::new(topology);
            true
        });
    }

    /// A master answered `MOVED <slot> <addr>`: the slot is served there.
    /// Also asks for a fresh view (more slots probably moved with it).
    pub fn moved(&self, error: &redis::RedisError) {
        if let Some((slot, addr)) = moved_to(error) {
            self.now.send_if_modified(|now| {
                if now.owner(slot) == Some(&addr) {
                    return false;
                }
                *now = Arc::new(now.moved(slot, addr));
                true
            });
        }
        self.refresh();
    }
}

/// The slot and master of a `MOVED` error.
pub(super) fn moved_to(error: &redis::RedisError) -> Option<(u16, Addr)> {
    if error.code() != Some("MOVED") {
        return None;
    }
    let (addr, slot) = error.redirect_node()?;
    Some((slot, parse_addr(addr, 6379)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    fn range(start: i64, end: i64, nodes: Vec<Value>) -> Value {
        let mut items = vec![Value::Int(start), Value::Int(end)];
        items.extend(nodes);
        Value::Array(items)
    }

    fn addr(port: u16) -> Addr {
        Addr {
            host: "10.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn a_slots_reply_tells_each_slots_master() {
        let reply = Value::Array(vec![
            range(
                0,
                5460,
                vec![node("10.0.0.1", 7000), node("10.0.0.2", 7003)],
            ),
            range(5461, 10922, vec![node("10.0.0.1", 7001)]),
            range(10923, 16000, vec![node("10.0.0.1", 7002)]),
            range(16001, 16383, vec![node("10.0.0.1", 7000)]),
        ]);
        let t = Topology::parse(&reply).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.owner(0), Some(&addr(7000)));
        assert_eq!(t.owner(5461), Some(&addr(7001)));
        assert_eq!(t.owner(16383), Some(&addr(7000)));
        assert_eq!(t.uncovered(), 0);
        assert_eq!(t.masters().count(), 3);
        assert_eq!(t.first_slot_of(&addr(7002)), Some(10923));
        assert_eq!(
            format!("{t:?}"),
            "{\"10.0.0.1:7000\": [(0, 5460), (16001, 16383)], \
             \"10.0.0.1:7001\": [(5461, 10922)], \"10.0.0.1:7002\": [(10923, 16000)]}"
        );

        let unknown = Value::Array(vec![range(0, 100, vec![node("?", 7000)])]);
        let t = Topology::parse(&unknown).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.uncovered(), SLOTS as usize);
        assert!(Topology::parse(&Value::Array(vec![range(5, 2, vec![node("a", 1)])])).is_err());
    }

    #[test]
    fn a_moved_slot_changes_hands_alone() {
        let reply = Value::Array(vec![range(0, 16383, vec![node("10.0.0.1", 7000)])]);
        let t = Topology::parse(&reply).unwrap_or_else(|e| panic!("{e}"));
        let moved = t.moved(42, addr(7009));
        assert_eq!(moved.owner(42), Some(&addr(7009)));
        assert_eq!(moved.owner(43), Some(&addr(7000)));
        assert_eq!(moved.masters().count(), 2);
        // A master that lost its last slot is no longer one to link to.
        let reply = Value::Array(vec![range(0, 0, vec![node("10.0.0.1", 7000)])]);
        let t = Topology::parse(&reply).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t.moved(0, addr(7001)).masters().collect::<Vec<_>>(),
            [&addr(7001)]
        );
    }

    #[test]
    fn a_moved_error_names_the_slot_and_its_master() {
        let e = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::Moved),
            "An error was signalled by the server",
            "3999 127.0.0.1:6381".to_string(),
        ));
        assert_eq!(
            moved_to(&e),
            Some((
                3999,
                Addr {
                    host: "127.0.0.1".into(),
                    port: 6381
                }
            ))
        );
    }
}
