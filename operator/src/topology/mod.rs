//! Redis topology management: one master, the other pods its replicas, every
//! sentinel monitoring that master.
//!
//! The controller calls [`reconcile_topology`] on each reconcile with the
//! Redis pods' and sentinels' addresses (pod IPs, Redis pods in StatefulSet
//! order) and puts the returned [`TopologyReport`] into
//! `status.redis` (`master`, `readyReplicas`, `sentinelsReady`); comparing
//! `report.master` with the previous status tells it a failover happened.
//! This module knows nothing about Kubernetes.
//!
//! One pass is a pipeline:
//!
//! 1. **validate** the config ([`TopologyConfig::validate`]) — pure; the
//!    only step whose failure is returned as an error.
//! 2. **observe** — *network*: `INFO replication` on every Redis pod,
//!    `SENTINEL GET-MASTER-ADDR-BY-NAME` / `MASTER` / `SENTINELS` /
//!    `REPLICAS` on every sentinel, all concurrently, each connect and each
//!    command bounded by `call_timeout`. A member that does not answer is
//!    recorded as unreachable, never fatal.
//! 3. **plan** ([`plan()`]) — pure: who is master and which [`Action`]s bring
//!    the group there. The rules are documented in [`plan`](mod@plan); in
//!    short, Sentinel is never fought (a failover in progress or an
//!    unreachable agreed master means "wait"), the sentinels' majority wins,
//!    pod 0 is master on first start, the highest replication offset breaks
//!    a split without a majority.
//! 4. **apply** — *network*: a promotion first, then the other actions,
//!    members concurrently and one member's actions in plan order, each call
//!    bounded by `call_timeout`. A failed action is recorded in the report.
//! 5. **report** — *network* only if something was applied: the group is
//!    observed again so the report describes the state after the actions.
//!
//! A pass does what it can and returns; the controller calls it again on
//! its next reconcile. [`TopologyReport::converged`] says whether anything
//! is still pending (requeue soon) or the group is healthy (requeue slowly).
//!
//! Addresses are compared as `host:port` strings, the way Sentinel reports
//! them: pass pod IPs (Sentinel runs with `resolve-hostnames no`).
//!
//! Not handled: changing the Redis password of a running group (`auth-pass`
//! and `masterauth` are only written when a sentinel is (re)pointed,
//! re-configured or a replica re-attached), a master Sentinel agrees on that
//! has no replica to fail over to once its pod is gone (the plan waits), and
//! TLS.

mod error;
pub(crate) mod io;
mod model;
mod parse;
pub mod plan;

pub use error::TopologyError;
pub use model::{
    Action, ActionOutcome, MasterBasis, MemberKind, NodeAddr, Observed, Plan, Probe, RedisNode,
    RedisRole, ReplicaStatus, SentinelNode, SentinelView, TopologyConfig, TopologyReport,
    Unreachable, Waiting,
};
pub use plan::plan;

use futures_util::future::join_all;

/// Observes the group, applies the plan and reports what it sees after.
///
/// Returns an error only for an invalid config; unreachable members and
/// failed actions are in the report.
pub async fn reconcile_topology(config: &TopologyConfig) -> Result<TopologyReport, TopologyError> {
    config.validate()?;
    let before = io::observe(config).await;
    let plan = plan(&before, config);
    if plan.actions.is_empty() {
        return Ok(report(plan, Vec::new(), before));
    }
    let outcomes = apply_all(&plan.actions, config).await;
    let after = io::observe(config).await;
    Ok(report(plan, outcomes, after))
}

/// Only observes and plans: what [`reconcile_topology`] would do, without
/// doing it (for a dry run or a status-only pass).
pub async fn inspect_topology(config: &TopologyConfig) -> Result<(Observed, Plan), TopologyError> {
    config.validate()?;
    let observed = io::observe(config).await;
    let plan = plan(&observed, config);
    Ok((observed, plan))
}

/// Runs the actions and returns their outcomes in plan order.
///
/// A promotion goes first, so replicas are pointed at a node that already
/// is a master. After that, members are worked on concurrently (a dead one
/// costs one timeout), and the actions for one member run in plan order.
async fn apply_all(actions: &[Action], config: &TopologyConfig) -> Vec<ActionOutcome> {
    let run = |action: &Action| {
        let action = action.clone();
        async move {
            let result = io::apply(&action, config).await;
            match &result {
                Ok(()) => tracing::info!(%action, "redis topology action applied"),
                Err(error) => tracing::warn!(%action, %error, "redis topology action failed"),
            }
            ActionOutcome {
                action,
                result: result.map_err(|e| e.to_string()),
            }
        }
    };
    let (promotions, rest): (Vec<&Action>, Vec<&Action>) = actions
        .iter()
        .partition(|a| matches!(a, Action::Promote { .. }));
    let mut outcomes = Vec::with_capacity(actions.len());
    for action in promotions {
        outcomes.push(run(action).await);
    }
    let mut per_member: Vec<(&NodeAddr, Vec<&Action>)> = Vec::new();
    for action in rest {
        match per_member.iter_mut().find(|(t, _)| *t == action.target()) {
            Some((_, list)) => list.push(action),
            None => per_member.push((action.target(), vec![action])),
        }
    }
    let batches = join_all(per_member.into_iter().map(|(_, list)| async move {
        let mut done = Vec::with_capacity(list.len());
        for action in list {
            done.push(run(action).await);
        }
        done
    }))
    .await;
    outcomes.extend(batches.into_iter().flatten());
    // Back to plan order (each action appears once in a plan).
    outcomes.sort_by_key(|o| actions.iter().position(|a| a == &o.action));
    outcomes
}

fn report(plan: Plan, actions: Vec<ActionOutcome>, observed: Observed) -> TopologyReport {
    let master = plan.master;
    let master_reachable = master.as_ref().is_some_and(|m| {
        observed
            .redis
            .iter()
            .any(|n| &n.addr == m && matches!(n.role, Ok(RedisRole::Master { .. })))
    });
    let replicas = observed
        .redis
        .iter()
        .filter_map(|n| match &n.role {
            Ok(RedisRole::Replica {
                master: of,
                link_up,
                ..
            }) if Some(of) == master.as_ref() => Some(ReplicaStatus {
                addr: n.addr.clone(),
                link_up: *link_up,
            }),
            _ => None,
        })
        .collect();
    let sentinels_agreeing = observed
        .sentinels
        .iter()
        .filter(|s| match (&s.view, &master) {
            (Ok(Some(view)), Some(m)) => &view.master == m,
            _ => false,
        })
        .count();
    TopologyReport {
        master,
        basis: plan.basis,
        master_reachable,
        replicas,
        sentinels_agreeing,
        unreachable: observed.unreachable(),
        waiting: plan.waiting,
        actions,
        observed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> NodeAddr {
        NodeAddr::new("10.0.0.1", 6379 + i)
    }

    fn sentinel_view(master: NodeAddr) -> Option<SentinelView> {
        Some(SentinelView {
            master,
            config_epoch: 1,
            failover_in_progress: false,
            quorum: 2,
            down_after_ms: 5000,
            failover_timeout_ms: 60000,
            known_sentinels: vec![],
            known_replicas: vec![],
        })
    }

    #[test]
    fn report_describes_the_group_around_the_planned_master() {
        let observed = Observed {
            redis: vec![
                RedisNode {
                    addr: addr(0),
                    role: Err("connection refused".to_owned()),
                },
                RedisNode {
                    addr: addr(1),
                    role: Ok(RedisRole::Master { offset: 10 }),
                },
                RedisNode {
                    addr: addr(2),
                    role: Ok(RedisRole::Replica {
                        master: addr(1),
                        link_up: true,
                        offset: 10,
                    }),
                },
            ],
            sentinels: vec![
                SentinelNode {
                    addr: addr(10),
                    view: Ok(sentinel_view(addr(1))),
                },
                SentinelNode {
                    addr: addr(11),
                    view: Ok(sentinel_view(addr(0))),
                },
                SentinelNode {
                    addr: addr(12),
                    view: Ok(None),
                },
            ],
        };
        let plan = Plan {
            master: Some(addr(1)),
            basis: Some(MasterBasis::SentinelMajority),
            waiting: None,
            actions: vec![],
        };
        let report = report(plan, vec![], observed);
        assert_eq!(report.master, Some(addr(1)));
        assert!(report.master_reachable);
        assert_eq!(
            report.replicas,
            vec![ReplicaStatus {
                addr: addr(2),
                link_up: true
            }]
        );
        assert_eq!(report.sentinels_agreeing, 1);
        assert_eq!(
            report.unreachable,
            vec![Unreachable {
                kind: MemberKind::Redis,
                addr: addr(0),
                reason: "connection refused".to_owned()
            }]
        );
        assert!(report.master_changed_since(Some(&addr(0))));
    }
}
