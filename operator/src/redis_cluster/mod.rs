//! A managed Redis Cluster (`redis.mode: cluster`): creation, new shards
//! and paced slot moves, repairs of membership. Like [`crate::topology`]
//! for the Sentinel group, it talks to Redis, never to Kubernetes: the
//! reconcile step ([`crate::reconcile::redis_cluster`]) hands it the pods
//! by their DNS names, and the integration tests hand it `redis-server`
//! processes on loopback.
//!
//! One pass ([`reconcile_cluster`]):
//!
//! 1. **observe** (network): on every member, concurrently and each call
//!    bounded, `CLUSTER MYID`, `CLUSTER NODES`, `CLUSTER INFO`, its bus
//!    port (`CONFIG GET cluster-port`) and `INFO replication`; its DNS
//!    name is resolved to the address its peers meet. A member that does
//!    not answer is recorded, never fatal.
//! 2. **plan** (pure, [`plan()`]): one kind of step at a time: finish or
//!    roll back a slot move an earlier pass left half-way, meet members
//!    the cluster does not know (or knows at an old address), forget
//!    failed nodes no pod is any more, create the cluster, make empty
//!    nodes new shards or replicas, move slots towards an even share at
//!    most `slots_per_pass` at a time.
//! 3. **apply** (network): the actions in order. A slot moves the way
//!    `redis-cli --cluster reshard` moves it: `SETSLOT IMPORTING` on the
//!    receiver, `MIGRATING` on the giver, its keys with `MIGRATE`, then
//!    `SETSLOT NODE` on the receiver, the giver and the other masters.
//!    Slots in flight are written to every node's `nodes.conf`, so an
//!    operator that stops mid-move leaves nothing the next pass cannot
//!    see and finish.
//! 4. **report**: observed again if anything was done: the shards, the
//!    cluster's state, what is left to move.
//!
//! Redis Cluster fails a shard's master over to its replica by itself;
//! the pass only waits (and reports) while a master is down.

mod io;
mod model;
mod parse;
pub mod plan;

pub use model::{
    Action, ClusterConfig, ClusterReport, Member, NodeLine, Observed, Plan, SLOTS, SLOTS_PER_PASS,
    Seen, Shard, ranges_of, ranges_text,
};
pub use plan::plan;

/// Observes the cluster, carries out the plan and reports what it sees
/// after.
pub async fn reconcile_cluster(config: &ClusterConfig) -> ClusterReport {
    let before = io::observe(config).await;
    let plan = plan::plan(&before, config);
    if plan.actions.is_empty() {
        return report(config, &before, Vec::new(), plan.waiting);
    }
    let results = io::apply_all(&plan.actions, &before, config).await;
    let done = plan
        .actions
        .into_iter()
        .zip(results)
        .map(|(action, result)| (action.describe(&before), action, result))
        .collect();
    let after = io::observe(config).await;
    report(config, &after, done, plan.waiting)
}

/// Only observes: what the cluster looks like, without acting.
pub async fn inspect_cluster(config: &ClusterConfig) -> ClusterReport {
    let observed = io::observe(config).await;
    report(config, &observed, Vec::new(), None)
}

fn report(
    config: &ClusterConfig,
    observed: &Observed,
    actions: Vec<(String, Action, Result<(), String>)>,
    waiting: Option<String>,
) -> ClusterReport {
    let unreachable = observed
        .members
        .iter()
        .filter_map(|(m, s)| Some((m.name.clone(), s.as_ref().err()?.clone())))
        .collect();
    let Some((_, view)) = plan::anchor(observed) else {
        return ClusterReport {
            actions,
            waiting,
            unreachable,
            ..ClusterReport::default()
        };
    };
    let table = plan::table(observed, view);
    let mut masters: Vec<&NodeLine> = table
        .iter()
        .filter(|l| l.is_master() && l.slot_count() > 0)
        .collect();
    masters.sort_by_key(|l| l.slots.iter().map(|(a, _)| *a).min());
    let shards = masters
        .into_iter()
        .map(|m| {
            let replicas: Vec<&NodeLine> = plan::replicas_of(&table, &m.id).collect();
            let linked = replicas
                .iter()
                .filter(|r| {
                    observed
                        .index_of(&r.id)
                        .and_then(|i| observed.seen(i))
                        .is_some_and(|s| s.link_up)
                })
                .count();
            let mut ranges = m.slots.clone();
            ranges.sort_unstable();
            Shard {
                master: observed.name_of(&m.id),
                slots: m.slot_count(),
                ranges,
                replicas: replicas.iter().map(|r| observed.name_of(&r.id)).collect(),
                replicas_linked: linked,
            }
        })
        .collect();
    ClusterReport {
        actions,
        waiting,
        unreachable,
        state: Some(if view.state_ok { "ok" } else { "fail" }.to_owned()),
        slots_covered: view.slots_ok,
        slots_to_move: plan::gap(observed, config),
        shards,
    }
}
