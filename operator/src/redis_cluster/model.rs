//! What the cluster step works with: the members it addresses, what each
//! answered, the actions it plans and what it reports.

use std::fmt;
use std::time::Duration;

/// Hash slots of a Redis Cluster.
pub const SLOTS: u32 = 16384;

/// One pod of the cluster, as the operator addresses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Pod name (what the status and events say).
    pub name: String,
    /// Where to reach it: its stable DNS name (an IP in tests).
    pub host: String,
    pub port: u16,
}

impl Member {
    pub fn new(name: impl Into<String>, host: impl Into<String>, port: u16) -> Self {
        Self {
            name: name.into(),
            host: host.into(),
            port,
        }
    }
}

/// Everything a pass needs.
#[derive(Clone)]
pub struct ClusterConfig {
    /// Every pod the spec asks for, in ordinal order: the first `shards`
    /// are the masters of a new cluster.
    pub members: Vec<Member>,
    pub shards: usize,
    pub replicas_per_shard: usize,
    pub password: Option<String>,
    /// Slots moved at most per pass while the cluster grows: the pace of a
    /// reshard (each slot's keys are moved with `MIGRATE`).
    pub slots_per_pass: usize,
    /// Keys per `MIGRATE`.
    pub keys_per_migrate: usize,
    /// Bound of every connect and command.
    pub call_timeout: Duration,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("members", &self.members)
            .field("shards", &self.shards)
            .field("replicas_per_shard", &self.replicas_per_shard)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("slots_per_pass", &self.slots_per_pass)
            .finish_non_exhaustive()
    }
}

/// Slots moved per pass by default: with the 2 s requeue of an unsettled
/// cluster, a fourth shard's 4096 slots move in about half a minute plus
/// the time their keys take.
pub const SLOTS_PER_PASS: usize = 256;

impl ClusterConfig {
    pub fn new(members: Vec<Member>, shards: usize, replicas_per_shard: usize) -> Self {
        Self {
            members,
            shards,
            replicas_per_shard,
            password: None,
            slots_per_pass: SLOTS_PER_PASS,
            keys_per_migrate: 100,
            call_timeout: Duration::from_secs(2),
        }
    }
}

/// One line of `CLUSTER NODES`: a node as the answering node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeLine {
    pub id: String,
    /// Empty while the node does not know its own address yet.
    pub ip: String,
    pub port: u16,
    pub flags: Vec<String>,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges it serves, inclusive.
    pub slots: Vec<(u16, u16)>,
    /// `(slot, to id)`: slots it is handing over (`[slot->-id]`).
    pub migrating: Vec<(u16, String)>,
    /// `(slot, from id)`: slots it is taking over (`[slot-<-id]`).
    pub importing: Vec<(u16, String)>,
}

impl NodeLine {
    pub fn flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    pub fn is_myself(&self) -> bool {
        self.flag("myself")
    }

    pub fn is_master(&self) -> bool {
        self.flag("master")
    }

    /// Failed, or not yet a full member.
    pub fn is_down(&self) -> bool {
        self.flag("fail") || self.flag("noaddr") || self.flag("handshake")
    }

    pub fn slot_count(&self) -> u32 {
        self.slots
            .iter()
            .map(|(a, b)| u32::from(*b) - u32::from(*a) + 1)
            .sum()
    }

    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
}

/// What one member answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `CLUSTER MYID`.
    pub id: String,
    /// Its address as resolved by the operator (what peers meet).
    pub ip: String,
    /// Its cluster bus port.
    pub bus_port: u16,
    /// Its `CLUSTER NODES`.
    pub nodes: Vec<NodeLine>,
    /// `cluster_state:ok`.
    pub state_ok: bool,
    /// `cluster_slots_ok`: slots served by a master it does not think failed.
    pub slots_ok: u32,
    /// As a replica: its link to the master is up.
    pub link_up: bool,
}

impl Seen {
    /// Its own line.
    pub fn myself(&self) -> Option<&NodeLine> {
        self.nodes.iter().find(|n| n.is_myself())
    }

    /// How it sees node `id`.
    pub fn line(&self, id: &str) -> Option<&NodeLine> {
        self.nodes.iter().find(|n| n.id == id)
    }
}

/// Every member's answer, in member order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub members: Vec<(Member, Result<Seen, String>)>,
}

impl Observed {
    pub fn seen(&self, i: usize) -> Option<&Seen> {
        self.members.get(i).and_then(|(_, s)| s.as_ref().ok())
    }

    /// Members that answered, with their index.
    pub fn reachable(&self) -> impl Iterator<Item = (usize, &Seen)> {
        self.members
            .iter()
            .enumerate()
            .filter_map(|(i, (_, s))| Some((i, s.as_ref().ok()?)))
    }

    /// The member whose node id is `id`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.reachable().find(|(_, s)| s.id == id).map(|(i, _)| i)
    }

    /// A name for node `id`: its pod's, else its address as the cluster knows it.
    pub fn name_of(&self, id: &str) -> String {
        if let Some(i) = self.index_of(id) {
            return self.members[i].0.name.clone();
        }
        self.reachable().find_map(|(_, s)| s.line(id)).map_or_else(
            || id.chars().take(8).collect(),
            |l| format!("{}:{} ({})", l.ip, l.port, &id[..id.len().min(8)]),
        )
    }
}

/// One step of a pass. Members are named by their index in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `CLUSTER MEET` on `on`, of member `whom`.
    Meet { on: usize, whom: usize },
    /// A new cluster: `CLUSTER ADDSLOTSRANGE` on a first master.
    AddSlots { on: usize, ranges: Vec<(u16, u16)> },
    /// `CLUSTER REPLICATE` on an empty node.
    Replicate { on: usize, master: usize },
    /// `CLUSTER FORGET` on every member: a node that failed, serves no
    /// slot and is no member's (a pod that came back without its data).
    Forget { id: String },
    /// Moves slots, each with `SETSLOT IMPORTING`/`MIGRATING`, `MIGRATE`
    /// of its keys and `SETSLOT NODE` (what `redis-cli --cluster reshard`
    /// does).
    MoveSlots {
        from: usize,
        to: usize,
        slots: Vec<u16>,
        /// `to` served no slot before: a new shard.
        new_shard: bool,
    },
    /// Finishes a move that was interrupted after `from` began handing
    /// the slot over: its remaining keys, then `SETSLOT NODE`.
    FinishMove { slot: u16, from: usize, to: usize },
    /// Rolls back an import nobody hands over (`SETSLOT STABLE`).
    Stabilize { on: usize, slot: u16 },
}

impl Action {
    /// The action with pod names, for logs, events and reports.
    pub fn describe(&self, observed: &Observed) -> String {
        let name = |i: &usize| {
            observed
                .members
                .get(*i)
                .map_or_else(|| format!("#{i}"), |(m, _)| m.name.clone())
        };
        match self {
            Action::Meet { on, whom } => format!("{} met {}", name(on), name(whom)),
            Action::AddSlots { on, ranges } => {
                format!("{} serves slots {}", name(on), ranges_text(ranges))
            }
            Action::Replicate { on, master } => {
                format!("{} replicates {}", name(on), name(master))
            }
            Action::Forget { id } => format!("forgot node {}", observed.name_of(id)),
            Action::MoveSlots {
                from, to, slots, ..
            } => format!(
                "moved {} slots ({}) from {} to {}",
                slots.len(),
                ranges_text(&ranges_of(slots)),
                name(from),
                name(to)
            ),
            Action::FinishMove { slot, from, to } => format!(
                "finished moving slot {slot} from {} to {}",
                name(from),
                name(to)
            ),
            Action::Stabilize { on, slot } => {
                format!("{} stopped importing slot {slot}", name(on))
            }
        }
    }
}

/// `0-5460,5462`.
pub fn ranges_text(ranges: &[(u16, u16)]) -> String {
    ranges
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Sorted slots as inclusive ranges.
pub fn ranges_of(slots: &[u16]) -> Vec<(u16, u16)> {
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for s in sorted {
        match out.last_mut() {
            Some((_, b)) if u32::from(*b) + 1 == u32::from(s) => *b = s,
            _ => out.push((s, s)),
        }
    }
    out
}

/// What a pass decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Why the pass could not go further (the next one looks again).
    pub waiting: Option<String>,
}

/// A shard as the status shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shard {
    pub master: String,
    pub slots: u32,
    pub ranges: Vec<(u16, u16)>,
    pub replicas: Vec<String>,
    pub replicas_linked: usize,
}

/// What a pass saw and did.
#[derive(Clone, Debug, Default)]
pub struct ClusterReport {
    /// The plan's actions, in order, with their outcome.
    pub actions: Vec<(String, Action, Result<(), String>)>,
    pub waiting: Option<String>,
    /// Members that did not answer: `(pod, error)`.
    pub unreachable: Vec<(String, String)>,
    /// `cluster_state` of a member, when one answered: `ok` or `fail`.
    pub state: Option<String>,
    /// Slots served by a master.
    pub slots_covered: u32,
    /// Slots still to move before the shards are even.
    pub slots_to_move: u32,
    /// Shards serving slots, in member order of their masters.
    pub shards: Vec<Shard>,
}

impl ClusterReport {
    /// Nothing done, nothing pending.
    pub fn converged(&self) -> bool {
        self.actions.is_empty() && self.waiting.is_none() && self.slots_to_move == 0
    }

    /// Whole: `ok` and every slot served.
    pub fn whole(&self) -> bool {
        self.state.as_deref() == Some("ok") && self.slots_covered == SLOTS
    }
}
