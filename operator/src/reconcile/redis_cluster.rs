//! The cluster step of `redis.mode: cluster`: one pass of
//! [`crate::redis_cluster`] over every pod the spec asks for, addressed by
//! its stable DNS name (a pod not up yet simply does not answer), and the
//! Events of what it did.

use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::dereference::Dereferenced;
use crate::build::meta::REDIS_PORT;
use crate::build::redis_cluster::{host, pod_name, pods};
use crate::cluster::ValidCluster;
use crate::redis_cluster::{self, Action, ClusterConfig, ClusterReport, Member};

/// Runs a pass; `None` unless `redis.mode: cluster`, and before any of its
/// pods runs.
pub async fn step(c: &ValidCluster, refs: &Dereferenced) -> Option<ClusterReport> {
    let pods = refs.cluster_pods.as_ref()?;
    if !pods.iter().any(|p| p.running) {
        info!(cluster = %c.names.instance, "redis cluster: waiting for its pods");
        return None;
    }
    let mut config = config_for(c);
    config.password = refs.redis_password.clone();
    let report = redis_cluster::reconcile_cluster(&config).await;
    for (what, _, result) in &report.actions {
        match result {
            Ok(()) => info!(cluster = %c.names.instance, action = %what, "redis cluster"),
            Err(e) => {
                warn!(cluster = %c.names.instance, action = %what, error = %e, "redis cluster: action failed")
            }
        }
    }
    if let Some(why) = &report.waiting {
        info!(cluster = %c.names.instance, waiting = %why, "redis cluster");
    }
    Some(report)
}

/// Every pod the spec asks for, by name, and the cluster's shape.
pub fn config_for(c: &ValidCluster) -> ClusterConfig {
    let shape = c.spec.redis.cluster_shape();
    let members = (0..pods(c))
        .map(|i| {
            Member::new(
                pod_name(&c.names, i),
                host(&c.names, i),
                u16::try_from(REDIS_PORT).unwrap_or(6379),
            )
        })
        .collect();
    ClusterConfig::new(
        members,
        usize::try_from(shape.shards).unwrap_or(3),
        usize::try_from(shape.replicas_per_shard).unwrap_or(0),
    )
}

/// An Event to publish: type, reason, note.
pub type Notice = (EventType, &'static str, String);

/// The Events of a pass: the cluster created, a shard added, slots moved,
/// membership repaired, and actions that failed.
pub fn notices(report: &ClusterReport) -> Vec<Notice> {
    // What succeeded, of the kinds `pick` accepts, joined with "; ".
    let done = |pick: fn(&Action) -> bool| {
        report
            .actions
            .iter()
            .filter(|(_, a, r)| r.is_ok() && pick(a))
            .map(|(what, _, _)| what.as_str())
            .collect::<Vec<&str>>()
            .join("; ")
    };
    let mut out = Vec::new();
    let mut notice = |type_, reason, note: String| {
        if !note.is_empty() {
            out.push((type_, reason, note));
        }
    };
    let created = done(|a| matches!(a, Action::AddSlots { .. }));
    if !created.is_empty() {
        notice(
            EventType::Normal,
            "RedisClusterCreated",
            format!("Redis Cluster slots assigned: {created}"),
        );
    }
    notice(
        EventType::Normal,
        "RedisShardAdded",
        done(|a| {
            matches!(
                a,
                Action::MoveSlots {
                    new_shard: true,
                    ..
                }
            )
        }),
    );
    let moved = done(|a| matches!(a, Action::MoveSlots { .. } | Action::FinishMove { .. }));
    if !moved.is_empty() {
        let left = report.slots_to_move;
        notice(
            EventType::Normal,
            "RedisSlotsMoved",
            format!("{moved}; {left} slots left to move"),
        );
    }
    notice(
        EventType::Normal,
        "RedisClusterRepaired",
        done(|a| {
            matches!(
                a,
                Action::Meet { .. }
                    | Action::Replicate { .. }
                    | Action::Forget { .. }
                    | Action::Stabilize { .. }
            )
        }),
    );
    let failed: Vec<String> = report
        .actions
        .iter()
        .filter_map(|(w, _, r)| Some(format!("{w}: {}", r.as_ref().err()?)))
        .collect();
    notice(
        EventType::Warning,
        "RedisClusterActionFailed",
        failed.join("; "),
    );
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::build::fixtures::{TestCluster, valid};
    use chorus_crds::{MessagingCluster, RedisClusterSpec, RedisMode};

    #[test]
    fn every_pod_the_spec_asks_for_is_a_member_by_its_dns_name() {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.mode = RedisMode::Cluster;
        mc.spec.redis.cluster = Some(RedisClusterSpec {
            shards: 4,
            replicas_per_shard: 1,
        });
        let config = config_for(&valid(&mc));
        assert_eq!(config.members.len(), 8);
        assert_eq!((config.shards, config.replicas_per_shard), (4, 1));
        assert_eq!(
            config.members[7],
            Member::new(
                "chat-redis-cluster-7",
                "chat-redis-cluster-7.chat-redis-cluster.default.svc",
                6379
            )
        );
    }

    #[test]
    fn a_pass_is_told_as_created_shard_added_slots_moved_and_failures() {
        let action = |a: Action, r: Result<(), String>| (format!("{a:?}"), a, r);
        let report = ClusterReport {
            actions: vec![
                action(
                    Action::AddSlots {
                        on: 0,
                        ranges: vec![(0, 5460)],
                    },
                    Ok(()),
                ),
                action(
                    Action::MoveSlots {
                        from: 0,
                        to: 6,
                        slots: vec![1, 2],
                        new_shard: true,
                    },
                    Ok(()),
                ),
                action(Action::Replicate { on: 7, master: 6 }, Err("busy".into())),
            ],
            slots_to_move: 4094,
            ..ClusterReport::default()
        };
        let reasons: Vec<&str> = notices(&report).iter().map(|n| n.1).collect();
        assert_eq!(
            reasons,
            [
                "RedisClusterCreated",
                "RedisShardAdded",
                "RedisSlotsMoved",
                "RedisClusterActionFailed"
            ]
        );
        assert!(notices(&report)[2].2.ends_with("4094 slots left to move"));
        assert!(notices(&ClusterReport::default()).is_empty());
    }
}
