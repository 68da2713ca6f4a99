//! The pure part of a pass: from what every member answered to the
//! actions that bring the cluster one step closer to the spec. Each pass
//! does one kind of work, in this order, and the next pass looks again:
//!
//! 1. **Moves in flight** (an operator that stopped mid-move): a slot a
//!    node is handing over (`MIGRATING`) is finished (its remaining keys,
//!    then `SETSLOT NODE`) when its receiver answers and imports or owns
//!    it, rolled back (`SETSLOT STABLE`) when the receiver does neither; a
//!    slot a node imports that nobody hands over is rolled back.
//! 2. **Meeting**: every member that answers must be known, at the address
//!    it has now, to the anchor (the first member serving slots), and know
//!    the anchor; a member seen at an old address (a pod back with a new IP)
//!    is met again. Gossip spreads the rest; the plan waits until every
//!    member knows every other.
//! 3. **Forgetting** (every member answering): a failed node that serves no
//!    slot and is no member's (a pod that came back without its node table
//!    is a new node).
//! 4. **A new cluster** (no slot served anywhere; every pod must answer):
//!    even slot ranges on the first `shards` members, the others replicas,
//!    round-robin.
//! 5. **Shards and replicas**: while fewer masters serve slots than the
//!    spec asks for, empty masters become new shards (lowest member first);
//!    the other empty masters become replicas of the shard with the fewest.
//! 6. **Balance** (every shard's master up): slots move from masters above
//!    their even share to those below, at most `slots_per_pass` a pass.
//!
//! Redis Cluster's own failover replaces a failed master; the plan only
//! waits while a master is down.

use std::collections::{BTreeMap, BTreeSet};

use super::model::{Action, ClusterConfig, Member, NodeLine, Observed, Plan, SLOTS, Seen};

fn waiting(why: String) -> Plan {
    Plan {
        actions: Vec::new(),
        waiting: Some(why),
    }
}

/// `line` places the member at the address it has now.
fn at_current_address(line: &NodeLine, seen: &Seen, member: &Member) -> bool {
    !line.flag("handshake") && line.ip == seen.ip && line.port == member.port
}

/// A handshake with the member's current address is under way on `on`.
fn meeting(on: &Seen, seen: &Seen, member: &Member) -> bool {
    on.nodes
        .iter()
        .any(|l| l.flag("handshake") && l.ip == seen.ip && l.port == member.port)
}

/// The member the others are met with: the first serving slots, else the
/// first that knows another node, else the first that answers.
pub fn anchor(observed: &Observed) -> Option<(usize, &Seen)> {
    let serving = |s: &Seen| s.myself().is_some_and(|m| m.slot_count() > 0);
    observed
        .reachable()
        .find(|(_, s)| serving(s))
        .or_else(|| observed.reachable().find(|(_, s)| s.nodes.len() > 1))
        .or_else(|| observed.reachable().next())
}

/// Decides the next step.
pub fn plan(observed: &Observed, config: &ClusterConfig) -> Plan {
    let Some((a, anchor_seen)) = anchor(observed) else {
        return waiting("no cluster pod answers yet".to_owned());
    };
    let moves = moves_in_flight(observed);
    if moves.waiting.is_some() || !moves.actions.is_empty() {
        return moves;
    }
    let meets = meetings(observed, a, anchor_seen);
    if !meets.is_empty() {
        return Plan {
            actions: meets,
            waiting: None,
        };
    }
    if let Some(stranger) = not_yet_acquainted(observed) {
        return waiting(stranger);
    }
    let everyone = observed.reachable().count() == observed.members.len();
    let mut actions: Vec<Action> = Vec::new();
    if everyone {
        actions.extend(stale_nodes(observed, anchor_seen));
    }
    let table = table(observed, anchor_seen);
    let owners = owners(&table);
    if owners.is_empty() {
        if !everyone {
            let up = observed.reachable().count();
            return waiting(format!(
                "a new cluster waits for every pod: {up}/{} answer",
                observed.members.len()
            ));
        }
        if observed.members.len() < config.shards {
            return waiting(format!(
                "{} pods cannot hold {} shards",
                observed.members.len(),
                config.shards
            ));
        }
        actions.extend(create(observed.members.len(), config.shards));
        return Plan {
            actions,
            waiting: None,
        };
    }
    let (new_masters, free) = empty_masters(observed, &table, &owners, config.shards);
    actions.extend(replicas(observed, &table, &owners, &new_masters, &free));
    let balance = balance(observed, anchor_seen, &owners, &new_masters, config);
    let placing = !actions.is_empty();
    // Slots nobody serves are served at once; but slots move only in a pass
    // of their own, after the new shards' replicas are placed (a failed
    // move would otherwise be all a pass reports of a new shard).
    actions.extend(
        balance
            .moves
            .into_iter()
            .filter(|a| !placing || !matches!(a, Action::MoveSlots { .. })),
    );
    Plan {
        actions,
        waiting: balance.waiting,
    }
}

/// Step 1: finish or roll back what an interrupted pass left in flight.
fn moves_in_flight(observed: &Observed) -> Plan {
    let mut actions = Vec::new();
    let name = |i: usize| observed.members[i].0.name.clone();
    for (i, s) in observed.reachable() {
        let Some(me) = s.myself() else { continue };
        for (slot, to_id) in &me.migrating {
            let Some(j) = observed.index_of(to_id) else {
                return waiting(format!(
                    "slot {slot} is moving from {} to node {} that does not answer",
                    name(i),
                    observed.name_of(to_id)
                ));
            };
            let receiver = observed.seen(j).and_then(Seen::myself);
            let takes = receiver.is_some_and(|r| {
                r.owns(*slot)
                    || r.importing
                        .iter()
                        .any(|(sl, from)| sl == slot && *from == s.id)
            });
            actions.push(if takes {
                Action::FinishMove {
                    slot: *slot,
                    from: i,
                    to: j,
                }
            } else {
                Action::Stabilize { on: i, slot: *slot }
            });
        }
    }
    for (j, s) in observed.reachable() {
        let Some(me) = s.myself() else { continue };
        for (slot, from_id) in &me.importing {
            let Some(i) = observed.index_of(from_id) else {
                return waiting(format!(
                    "{} imports slot {slot} from node {} that does not answer",
                    name(j),
                    observed.name_of(from_id)
                ));
            };
            let handed = observed
                .seen(i)
                .and_then(Seen::myself)
                .is_some_and(|m| m.migrating.iter().any(|(sl, to)| sl == slot && *to == s.id));
            if !handed {
                actions.push(Action::Stabilize { on: j, slot: *slot });
            }
        }
    }
    Plan {
        actions,
        waiting: None,
    }
}

/// Step 2: meet whoever the anchor does not know where it is now, and
/// whoever knows a member at an old address.
fn meetings(observed: &Observed, a: usize, anchor_seen: &Seen) -> Vec<Action> {
    let member = |i: usize| &observed.members[i].0;
    let mut out = Vec::new();
    for (i, s) in observed.reachable().filter(|(i, _)| *i != a) {
        let known = anchor_seen
            .line(&s.id)
            .is_some_and(|l| at_current_address(l, s, member(i)));
        if !known && !meeting(anchor_seen, s, member(i)) {
            out.push(Action::Meet { on: a, whom: i });
        }
        for (j, other) in observed.reachable().filter(|(j, _)| *j != i) {
            let stale = s
                .line(&other.id)
                .is_some_and(|l| !l.flag("handshake") && !at_current_address(l, other, member(j)));
            if stale && !meeting(s, other, member(j)) {
                let m = Action::Meet { on: i, whom: j };
                if !out.contains(&m) {
                    out.push(m);
                }
            }
        }
    }
    out
}

/// Every member that answers knows every other (gossip finished spreading
/// the meetings); else what is missing.
fn not_yet_acquainted(observed: &Observed) -> Option<String> {
    for (i, s) in observed.reachable() {
        for (j, other) in observed.reachable() {
            let knows = s.line(&other.id).is_some_and(|l| !l.flag("handshake"));
            if i != j && !knows {
                return Some(format!(
                    "the pods are meeting: {} does not know {} yet",
                    observed.members[i].0.name, observed.members[j].0.name
                ));
            }
        }
    }
    None
}

/// Step 3: failed nodes that serve nothing and are no member's.
fn stale_nodes(observed: &Observed, anchor_seen: &Seen) -> Vec<Action> {
    let members: BTreeSet<&str> = observed.reachable().map(|(_, s)| s.id.as_str()).collect();
    anchor_seen
        .nodes
        .iter()
        .filter(|l| {
            !members.contains(l.id.as_str())
                && (l.flag("fail") || l.flag("noaddr"))
                && !l.flag("handshake")
                && l.slot_count() == 0
        })
        .map(|l| Action::Forget { id: l.id.clone() })
        .collect()
}

/// The cluster's nodes: the anchor's view, each node that answers as it
/// sees itself (its role and slots are news to the others until gossip
/// spreads them).
pub fn table(observed: &Observed, anchor_seen: &Seen) -> Vec<NodeLine> {
    anchor_seen
        .nodes
        .iter()
        .filter(|l| !l.flag("handshake"))
        .map(|l| {
            let own = observed
                .index_of(&l.id)
                .and_then(|i| observed.seen(i))
                .and_then(Seen::myself);
            let mut line = own.unwrap_or(l).clone();
            line.flags.retain(|f| f != "myself");
            line
        })
        .collect()
}

/// Masters serving slots, by node id, with their slot count.
fn owners(table: &[NodeLine]) -> BTreeMap<String, u32> {
    table
        .iter()
        .filter(|l| l.is_master() && l.slot_count() > 0)
        .map(|l| (l.id.clone(), l.slot_count()))
        .collect()
}

/// Replicas of node `id` that are not down.
pub fn replicas_of<'a>(table: &'a [NodeLine], id: &'a str) -> impl Iterator<Item = &'a NodeLine> {
    table
        .iter()
        .filter(move |l| l.master_id.as_deref() == Some(id) && !l.is_down())
}

/// Step 4: even ranges on the first `shards` members, the rest replicas.
fn create(members: usize, shards: usize) -> Vec<Action> {
    let mut out: Vec<Action> = (0..shards)
        .map(|k| Action::AddSlots {
            on: k,
            ranges: vec![even_range(k, shards)],
        })
        .collect();
    out.extend((shards..members).map(|m| Action::Replicate {
        on: m,
        master: (m - shards) % shards,
    }));
    out
}

/// Shard `k` of `shards`' share of a new cluster's slots.
pub fn even_range(k: usize, shards: usize) -> (u16, u16) {
    let total = SLOTS as usize;
    let first = k * total / shards;
    let last = (k + 1) * total / shards - 1;
    (
        u16::try_from(first).unwrap_or(u16::MAX),
        u16::try_from(last).unwrap_or(u16::MAX),
    )
}

/// Step 5a: empty masters (answering, serving and importing nothing): the
/// ones that become new shards while fewer than `shards` masters serve
/// slots (those with replicas already first, then in member order), and
/// the free rest.
fn empty_masters(
    observed: &Observed,
    table: &[NodeLine],
    owners: &BTreeMap<String, u32>,
    shards: usize,
) -> (Vec<usize>, Vec<usize>) {
    let has_replicas = |id: &str| replicas_of(table, id).next().is_some();
    let mut empty: Vec<(bool, usize)> = observed
        .reachable()
        .filter(|(_, s)| {
            s.myself()
                .is_some_and(|m| m.is_master() && m.slot_count() == 0 && m.importing.is_empty())
        })
        .map(|(i, s)| (!has_replicas(&s.id), i))
        .collect();
    empty.sort_unstable();
    let deficit = shards.saturating_sub(owners.len());
    let new_masters: Vec<usize> = empty.iter().take(deficit).map(|(_, i)| *i).collect();
    let free: Vec<usize> = empty.iter().skip(deficit).map(|(_, i)| *i).collect();
    (new_masters, free)
}

/// Step 5b: each free node replicates the shard with the fewest replicas.
fn replicas(
    observed: &Observed,
    table: &[NodeLine],
    owners: &BTreeMap<String, u32>,
    new_masters: &[usize],
    free: &[usize],
) -> Vec<Action> {
    let mut masters: Vec<(usize, usize)> = observed
        .reachable()
        .filter(|(i, s)| owners.contains_key(&s.id) || new_masters.contains(i))
        .map(|(i, s)| (i, replicas_of(table, &s.id).count()))
        .collect();
    let mut out = Vec::new();
    for f in free {
        let Some(target) = masters.iter_mut().min_by_key(|(i, count)| (*count, *i)) else {
            break;
        };
        target.1 += 1;
        out.push(Action::Replicate {
            on: *f,
            master: target.0,
        });
    }
    out
}

/// What step 6 decided.
pub struct Balance {
    pub moves: Vec<Action>,
    /// Slots to move before every shard has its even share.
    pub gap: u32,
    pub waiting: Option<String>,
}

/// Step 6: paced moves towards an even share for every shard.
fn balance(
    observed: &Observed,
    anchor_seen: &Seen,
    owners: &BTreeMap<String, u32>,
    new_masters: &[usize],
    config: &ClusterConfig,
) -> Balance {
    // (member, slots it serves, in order)
    let mut shards: Vec<(usize, Vec<u16>)> = Vec::new();
    for id in owners.keys() {
        let line = observed
            .index_of(id)
            .and_then(|i| Some((i, observed.seen(i)?.myself()?)));
        let Some((i, me)) = line.filter(|(_, me)| !me.is_down()) else {
            return Balance {
                moves: Vec::new(),
                gap: 0,
                waiting: Some(format!(
                    "the master of a shard ({}) does not answer: slots stay where they are until it is back or its replica took over",
                    observed.name_of(id)
                )),
            };
        };
        let slots = me
            .slots
            .iter()
            .flat_map(|(a, b)| *a..=*b)
            .collect::<Vec<u16>>();
        shards.push((i, slots));
    }
    shards.extend(new_masters.iter().map(|i| (*i, Vec::new())));
    shards.sort_by_key(|(i, _)| *i);
    let targets = targets(&shards);
    // Slots nobody serves (a creation that stopped half-way) go to the
    // shards below their share at once: the cluster is down until they do.
    let served: BTreeSet<u16> = shards.iter().flat_map(|(_, s)| s.iter().copied()).collect();
    let mut uncovered = (0..=u16::try_from(SLOTS - 1).unwrap_or(u16::MAX))
        .filter(|s| !served.contains(s))
        .collect::<Vec<u16>>();
    let mut moves: Vec<Action> = Vec::new();
    for ((to, slots), target) in shards.iter_mut().zip(&targets) {
        let need = (*target as usize).saturating_sub(slots.len());
        let n = need.min(uncovered.len());
        if n > 0 {
            let taken: Vec<u16> = uncovered.drain(..n).collect();
            moves.push(Action::AddSlots {
                on: *to,
                ranges: super::model::ranges_of(&taken),
            });
            slots.extend(taken);
        }
    }
    let gap: u32 = shards
        .iter()
        .zip(&targets)
        .map(|((_, slots), t)| t.saturating_sub(slots.len() as u32))
        .sum();
    if gap == 0 || !moves.is_empty() {
        return Balance {
            moves,
            gap,
            waiting: None,
        };
    }
    if !anchor_seen.state_ok {
        return Balance {
            moves: Vec::new(),
            gap,
            waiting: Some("the cluster is not ok: no slot moves until it is".to_owned()),
        };
    }
    // A master that just joined learns who serves each slot by gossip; until
    // it does it calls the cluster down, and a MIGRATE into it fails
    // (`CLUSTERDOWN`).
    let receiving = shards
        .iter()
        .zip(&targets)
        .filter(|((_, s), t)| (s.len() as u32) < **t)
        .map(|((i, _), _)| *i);
    for i in receiving {
        if observed.seen(i).is_some_and(|s| !s.state_ok) {
            return Balance {
                moves: Vec::new(),
                gap,
                waiting: Some(format!(
                    "{} does not see the cluster ok yet: no slot moves to it until it does",
                    observed.members[i].0.name
                )),
            };
        }
    }
    let mut surplus: Vec<(usize, Vec<u16>)> = shards
        .iter()
        .zip(&targets)
        .filter(|((_, s), t)| s.len() as u32 > **t)
        .map(|((i, s), t)| (*i, s[*t as usize..].to_vec()))
        .collect();
    let mut budget = config.slots_per_pass;
    for ((to, slots), target) in shards.iter().zip(&targets) {
        let mut need = (*target as usize).saturating_sub(slots.len());
        while need > 0 && budget > 0 {
            let Some((from, spare)) = surplus
                .iter_mut()
                .filter(|(_, s)| !s.is_empty())
                .max_by_key(|(i, s)| (s.len(), std::cmp::Reverse(*i)))
            else {
                break;
            };
            let n = need.min(budget).min(spare.len());
            let taken: Vec<u16> = spare.drain(..n).collect();
            need -= n;
            budget -= n;
            match moves.last_mut() {
                Some(Action::MoveSlots {
                    from: f,
                    to: t,
                    slots,
                    ..
                }) if f == from && t == to => slots.extend(taken),
                _ => moves.push(Action::MoveSlots {
                    from: *from,
                    to: *to,
                    slots: taken,
                    new_shard: slots.is_empty(),
                }),
            }
        }
    }
    Balance {
        moves,
        gap,
        waiting: None,
    }
}

/// Even shares: `SLOTS / n` each, one more for the `SLOTS % n` that serve
/// the most now (fewest moves).
fn targets(shards: &[(usize, Vec<u16>)]) -> Vec<u32> {
    let n = shards.len().max(1) as u32;
    let (base, extra) = (SLOTS / n, SLOTS % n);
    let mut order: Vec<usize> = (0..shards.len()).collect();
    order.sort_by_key(|k| (std::cmp::Reverse(shards[*k].1.len()), shards[*k].0));
    let mut out = vec![base; shards.len()];
    for k in order.into_iter().take(extra as usize) {
        out[k] += 1;
    }
    out
}

/// Slots still to move before the shards are even ([`plan`]'s step 6
/// without moving anything), 0 when that cannot be told.
pub fn gap(observed: &Observed, config: &ClusterConfig) -> u32 {
    let Some((_, anchor_seen)) = anchor(observed) else {
        return 0;
    };
    let table = table(observed, anchor_seen);
    let owners = owners(&table);
    if owners.is_empty() {
        return 0;
    }
    let (new_masters, _) = empty_masters(observed, &table, &owners, config.shards);
    balance(observed, anchor_seen, &owners, &new_masters, config).gap
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A member answering with `nodes` (its own line first is `myself`).
    fn seen(id: &str, port: u16, nodes: Vec<NodeLine>) -> Seen {
        Seen {
            id: id.to_owned(),
            ip: "10.0.0.1".to_owned(),
            bus_port: port + 10000,
            nodes,
            state_ok: true,
            slots_ok: SLOTS,
            link_up: true,
        }
    }

    fn line(
        id: &str,
        port: u16,
        flags: &str,
        master: Option<&str>,
        slots: &[(u16, u16)],
    ) -> NodeLine {
        NodeLine {
            id: id.to_owned(),
            ip: "10.0.0.1".to_owned(),
            port,
            flags: flags.split(',').map(str::to_owned).collect(),
            master_id: master.map(str::to_owned),
            slots: slots.to_vec(),
            ..NodeLine::default()
        }
    }

    fn add(on: usize, first: u16, last: u16) -> Action {
        Action::AddSlots {
            on,
            ranges: vec![(first, last)],
        }
    }

    fn config(n: usize, shards: usize) -> ClusterConfig {
        let members = (0..n)
            .map(|i| Member::new(format!("rc-{i}"), "10.0.0.1", 7000 + i as u16))
            .collect();
        ClusterConfig::new(members, shards, 1)
    }

    /// Every member answers and sees the same `lines` (ids `n0`, `n1`…
    /// on ports 7000…), each marking itself.
    fn agreed(config: &ClusterConfig, lines: &[NodeLine]) -> Observed {
        let members = config
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let id = format!("n{i}");
                let nodes = lines
                    .iter()
                    .map(|l| {
                        let mut l = l.clone();
                        if l.id == id {
                            l.flags.push("myself".to_owned());
                        }
                        l
                    })
                    .collect();
                (m.clone(), Ok(seen(&id, m.port, nodes)))
            })
            .collect();
        Observed { members }
    }

    fn alone(config: &ClusterConfig) -> Observed {
        let members = config
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let id = format!("n{i}");
                let me = line(&id, m.port, "myself,master", None, &[]);
                (m.clone(), Ok(seen(&id, m.port, vec![me])))
            })
            .collect();
        Observed { members }
    }

    fn masters(n: usize, ranges: &[(u16, u16)]) -> Vec<NodeLine> {
        (0..n)
            .map(|i| {
                let slots: Vec<(u16, u16)> = ranges.get(i).copied().into_iter().collect();
                line(&format!("n{i}"), 7000 + i as u16, "master", None, &slots)
            })
            .collect()
    }

    #[test]
    fn strangers_are_met_by_the_first_pod_then_wait_for_gossip() {
        let config = config(6, 3);
        let p = plan(&alone(&config), &config);
        assert_eq!(
            p.actions,
            (1..6)
                .map(|whom| Action::Meet { on: 0, whom })
                .collect::<Vec<_>>()
        );
        let mut one_met = alone(&config);
        if let Ok(s) = &mut one_met.members[0].1 {
            for i in 1..6u16 {
                s.nodes
                    .push(line(&format!("n{i}"), 7000 + i, "master", None, &[]));
            }
        }
        let p = plan(&one_met, &config);
        assert!(p.actions.is_empty(), "{p:?}");
        assert!(p.waiting.unwrap().contains("does not know"));
    }

    #[test]
    fn a_new_cluster_gets_even_ranges_on_the_first_shards_and_replicas_round_robin() {
        let config = config(6, 3);
        let p = plan(&agreed(&config, &masters(6, &[])), &config);
        assert_eq!(
            p.actions,
            [
                add(0, 0, 5460),
                add(1, 5461, 10921),
                add(2, 10922, 16383),
                Action::Replicate { on: 3, master: 0 },
                Action::Replicate { on: 4, master: 1 },
                Action::Replicate { on: 5, master: 2 },
            ]
        );
        let mut missing = agreed(&config, &masters(6, &[]));
        missing.members[5].1 = Err("refused".to_owned());
        let p = plan(&missing, &config);
        assert!(p.actions.is_empty());
        assert!(p.waiting.unwrap().contains("5/6 answer"));
    }

    fn three_shards_and_replicas(extra: usize) -> Vec<NodeLine> {
        let mut lines = masters(3, &[(0, 5460), (5461, 10921), (10922, 16383)]);
        for r in 0..3 {
            lines.push(line(
                &format!("n{}", 3 + r),
                7003 + r as u16,
                "slave",
                Some(&format!("n{r}")),
                &[],
            ));
        }
        for e in 0..extra {
            let i = 6 + e;
            lines.push(line(&format!("n{i}"), 7000 + i as u16, "master", None, &[]));
        }
        lines
    }

    /// Three shards with their replicas, and n6 a new empty master that n7
    /// already replicates.
    fn fourth_shard_with_its_replica() -> Vec<NodeLine> {
        let mut lines = three_shards_and_replicas(2);
        let n7 = lines.iter_mut().find(|l| l.id == "n7").unwrap();
        n7.master_id = Some("n6".to_owned());
        n7.flags = vec!["slave".to_owned()];
        lines
    }

    #[test]
    fn a_whole_cluster_needs_nothing() {
        let config = config(6, 3);
        let observed = agreed(&config, &three_shards_and_replicas(0));
        assert_eq!(plan(&observed, &config), Plan::default());
        assert_eq!(gap(&observed, &config), 0);
    }

    #[test]
    fn a_fourth_shard_gets_a_replica_and_slots_from_every_shard_at_a_pace() {
        let mut config = config(8, 4);
        config.slots_per_pass = 1000;
        let observed = agreed(&config, &three_shards_and_replicas(2));
        assert_eq!(gap(&observed, &config), 4096);
        let p = plan(&observed, &config);
        assert_eq!(p.waiting, None);
        // The new shard's replica first, in a pass of its own…
        assert_eq!(p.actions, [Action::Replicate { on: 7, master: 6 }]);
        // …then the slots, paced.
        let observed = agreed(&config, &fourth_shard_with_its_replica());
        let p = plan(&observed, &config);
        assert_eq!(p.waiting, None);
        let moved: Vec<(usize, usize, usize, bool)> = p.actions[..]
            .iter()
            .map(|a| match a {
                Action::MoveSlots {
                    from,
                    to,
                    slots,
                    new_shard,
                } => (*from, *to, slots.len(), *new_shard),
                other => panic!("{other:?}"),
            })
            .collect();
        let total: usize = moved.iter().map(|m| m.2).sum();
        assert_eq!(total, 1000, "paced: {moved:?}");
        assert!(moved.iter().all(|m| m.1 == 6 && m.3), "{moved:?}");
        // The slots come from the shards' own ranges.
        let Action::MoveSlots { from, slots, .. } = &p.actions[0] else {
            unreachable!()
        };
        let first = [(0, 5460), (5461, 10921), (10922, 16383)][*from];
        assert!(slots.iter().all(|s| (first.0..=first.1).contains(s)));
    }

    #[test]
    fn no_slot_moves_into_a_master_that_does_not_see_the_cluster_ok_yet() {
        let config = config(8, 4);
        let mut observed = agreed(&config, &fourth_shard_with_its_replica());
        if let Ok(seen) = &mut observed.members[6].1 {
            seen.state_ok = false;
        }
        let p = plan(&observed, &config);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert!(
            p.waiting
                .as_deref()
                .is_some_and(|w| w.contains("does not see the cluster ok")),
            "{:?}",
            p.waiting
        );
    }

    #[test]
    fn an_even_cluster_after_growing_needs_nothing() {
        let config = config(8, 4);
        let mut lines = masters(3, &[(0, 4095), (5461, 9556), (10922, 15017)]);
        for i in 0..3usize {
            lines.push(line(
                &format!("n{}", 3 + i),
                7003 + i as u16,
                "slave",
                Some(&format!("n{i}")),
                &[],
            ));
        }
        lines.push(line(
            "n6",
            7006,
            "master",
            None,
            &[(4096, 5460), (9557, 10921), (15018, 16383)],
        ));
        lines.push(line("n7", 7007, "slave", Some("n6"), &[]));
        let observed = agreed(&config, &lines);
        let covered: u32 = lines.iter().map(NodeLine::slot_count).sum();
        assert_eq!(covered, SLOTS);
        assert_eq!(gap(&observed, &config), 0);
        assert_eq!(plan(&observed, &config), Plan::default());
    }

    #[test]
    fn an_interrupted_move_is_finished_or_rolled_back() {
        let config = config(6, 3);
        let mut lines = three_shards_and_replicas(0);
        lines[0].migrating.push((5, "n1".to_owned()));
        lines[1].importing.push((5, "n0".to_owned()));
        let p = plan(&agreed(&config, &lines), &config);
        assert_eq!(
            p.actions,
            [Action::FinishMove {
                slot: 5,
                from: 0,
                to: 1
            }]
        );
        // Stopped between IMPORTING and MIGRATING: the import is undone.
        lines[0].migrating.clear();
        let p = plan(&agreed(&config, &lines), &config);
        assert_eq!(p.actions, [Action::Stabilize { on: 1, slot: 5 }]);
        // The receiver forgot the import: the hand-over is undone.
        lines[1].importing.clear();
        lines[0].migrating.push((5, "n1".to_owned()));
        let p = plan(&agreed(&config, &lines), &config);
        assert_eq!(p.actions, [Action::Stabilize { on: 0, slot: 5 }]);
    }

    #[test]
    fn a_pod_back_with_a_new_address_is_met_again() {
        let config = config(6, 3);
        let mut observed = agreed(&config, &three_shards_and_replicas(0));
        // Pod 4 came back on another IP; the others know the old one.
        if let Ok(s) = &mut observed.members[4].1 {
            s.ip = "10.0.0.99".to_owned();
        }
        let p = plan(&observed, &config);
        assert!(
            p.actions.contains(&Action::Meet { on: 0, whom: 4 }),
            "{p:?}"
        );
        assert!(
            p.actions.contains(&Action::Meet { on: 1, whom: 4 }),
            "{p:?}"
        );
        assert!(
            p.actions
                .iter()
                .all(|a| matches!(a, Action::Meet { whom: 4, .. }))
        );
    }

    #[test]
    fn a_pod_back_without_its_data_replaces_the_failed_node_it_was() {
        let config = config(6, 3);
        let mut lines = three_shards_and_replicas(0);
        // Pod 3 (n0's replica) came back empty as n9; n3 failed.
        lines[3].flags.push("fail".to_owned());
        lines[3].id = "old3".to_owned();
        lines.push(line("n3", 7003, "master", None, &[]));
        let p = plan(&agreed(&config, &lines), &config);
        assert_eq!(
            p.actions,
            [
                Action::Forget {
                    id: "old3".to_owned()
                },
                Action::Replicate { on: 3, master: 0 }
            ]
        );
    }

    #[test]
    fn a_creation_that_stopped_half_way_serves_the_remaining_slots_at_once() {
        let config = config(6, 3);
        let mut lines = masters(6, &[(0, 5460)]);
        lines[3].master_id = Some("n0".to_owned());
        lines[3].flags = vec!["slave".to_owned()];
        let p = plan(&agreed(&config, &lines), &config);
        assert_eq!(
            p.actions,
            [
                Action::Replicate { on: 4, master: 1 },
                Action::Replicate { on: 5, master: 2 },
                add(0, 5461, 5461),
                add(1, 5462, 10922),
                add(2, 10923, 16383),
            ]
        );
    }

    #[test]
    fn no_slot_moves_while_a_master_is_down() {
        let config = config(8, 4);
        let mut observed = agreed(&config, &three_shards_and_replicas(2));
        observed.members[1].1 = Err("timed out".to_owned());
        let p = plan(&observed, &config);
        assert!(
            p.actions
                .iter()
                .all(|a| !matches!(a, Action::MoveSlots { .. }))
        );
        assert!(p.waiting.unwrap().contains("does not answer"));
    }

    #[test]
    fn even_ranges_cover_every_slot_once() {
        for shards in 3..10 {
            let ranges: Vec<(u16, u16)> = (0..shards).map(|k| even_range(k, shards)).collect();
            assert_eq!(ranges[0].0, 0);
            assert_eq!(ranges[shards - 1].1, 16383);
            assert!(ranges.windows(2).all(|w| w[0].1 + 1 == w[1].0));
        }
    }
}
