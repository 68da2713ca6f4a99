//! The Redis topology step of a managed group: bring the Redis pods and
//! sentinels the dereference step found to one master with every sentinel
//! monitoring it ([`crate::topology`], which talks to Redis over the
//! network, never to Kubernetes).
//!
//! Pods that are not up yet are not an error: the step reports what it saw
//! and the next reconcile goes on from there.

use std::time::Duration;

use chorus_crds::MessagingClusterSpec;
use tracing::{info, warn};

use super::dereference::Dereferenced;
use super::members::Members;
use crate::build::meta::{REDIS_PORT, SENTINEL_PORT};
use crate::build::sentinel::quorum;
use crate::cluster::ValidCluster;
use crate::topology::{self, NodeAddr, TopologyConfig, TopologyReport};

/// How long sentinels wait before they call a silent master down.
pub const DOWN_AFTER: Duration = Duration::from_secs(5);
/// Sentinel's failover timeout for the group.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the step for a managed group; `None` for external Redis or while no
/// pod of the group has an address yet.
pub async fn step(
    c: &ValidCluster,
    refs: &Dereferenced,
) -> Result<Option<TopologyReport>, topology::TopologyError> {
    let Some(members) = &refs.members else {
        return Ok(None);
    };
    let Some(mut config) = config_for(&c.spec, members) else {
        info!(cluster = %c.names.instance, "redis group: waiting for pod 0 and a sentinel to have addresses");
        return Ok(None);
    };
    config.password = refs.redis_password.clone();
    let report = topology::reconcile_topology(&config).await?;
    for action in &report.actions {
        info!(cluster = %c.names.instance, ?action, "redis group: topology action");
    }
    for u in &report.unreachable {
        warn!(cluster = %c.names.instance, member = ?u, "redis group: member unreachable");
    }
    Ok(Some(report))
}

/// The topology module's view of the group: Redis pods in ordinal order up
/// to the first without an address (so pod 0 is always first), and every
/// sentinel with one. `None` until pod 0 and one sentinel have addresses.
pub fn config_for(spec: &MessagingClusterSpec, members: &Members) -> Option<TopologyConfig> {
    let redis: Vec<NodeAddr> = members
        .redis
        .iter()
        .map_while(|ip| {
            ip.as_ref()
                .map(|ip| NodeAddr::new(ip.clone(), REDIS_PORT as u16))
        })
        .collect();
    if redis.is_empty() || members.sentinels.is_empty() {
        return None;
    }
    let sentinels = members
        .sentinels
        .iter()
        .map(|ip| NodeAddr::new(ip.clone(), SENTINEL_PORT as u16))
        .collect();
    let mut config = TopologyConfig::new(
        redis,
        sentinels,
        u32::try_from(quorum(spec.redis.sentinels)).unwrap_or(2),
    );
    config.down_after = Some(DOWN_AFTER);
    config.failover_timeout = Some(FAILOVER_TIMEOUT);
    Some(config)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::build::fixtures::TestCluster;
    use chorus_crds::MessagingCluster;

    fn members(redis: &[Option<&str>], sentinels: &[&str]) -> Members {
        Members {
            redis: redis.iter().map(|r| r.map(String::from)).collect(),
            sentinels: sentinels.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn pod_zero_comes_first_and_gaps_end_the_list() {
        let mc = MessagingCluster::test();
        let c = config_for(
            &mc.spec,
            &members(&[Some("10.0.0.1"), None, Some("10.0.0.3")], &["10.0.1.1"]),
        )
        .unwrap();
        assert_eq!(c.redis, vec![NodeAddr::new("10.0.0.1", 6379)]);
        assert_eq!(c.sentinels, vec![NodeAddr::new("10.0.1.1", 26379)]);
        assert_eq!(c.quorum, 2, "3 sentinels by default");
        assert_eq!(c.down_after, Some(DOWN_AFTER));
    }

    #[test]
    fn nothing_to_do_until_pod_zero_and_a_sentinel_have_addresses() {
        let mc = MessagingCluster::test();
        assert!(config_for(&mc.spec, &members(&[None, Some("10.0.0.2")], &["10.0.1.1"])).is_none());
        assert!(config_for(&mc.spec, &members(&[Some("10.0.0.1")], &[])).is_none());
    }
}
