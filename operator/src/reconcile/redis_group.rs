//! The Redis topology step of a managed group: bring the members and
//! sentinels, addressed by their stable DNS names, to one master with every
//! sentinel monitoring it ([`crate::topology`], which talks to Redis over
//! the network, never to Kubernetes). The group elects and heals itself;
//! this step corrects what Sentinel cannot: no master among the members,
//! split brain, sentinels that lost or never had the master, a sentinel
//! monitoring a host outside the group.
//!
//! Members that are not up yet are not an error: the step reports what it
//! saw and the next reconcile goes on from there.

use tracing::{info, warn};

use super::dereference::Dereferenced;
use crate::build::redis_group::{redis_members, sentinel_members};
use crate::build::sentinel::{DOWN_AFTER, FAILOVER_TIMEOUT, quorum};
use crate::cluster::ValidCluster;
use crate::topology::{self, NodeAddr, TopologyConfig, TopologyReport};

/// Runs the step for a managed group; `None` for external Redis and
/// before the group has pods.
pub async fn step(
    c: &ValidCluster,
    refs: &Dereferenced,
) -> Result<Option<TopologyReport>, topology::TopologyError> {
    let Some(members) = &refs.members else {
        return Ok(None);
    };
    // Nothing to talk to before the first pods exist.
    if !members.started() {
        info!(cluster = %c.names.instance, "redis group: waiting for its pods");
        return Ok(None);
    }
    let mut config = config_for(c);
    config.password = refs.redis_password.clone();
    config.sentinel_password = refs.redis_password.clone();
    let report = topology::reconcile_topology(&config).await?;
    for action in &report.actions {
        info!(cluster = %c.names.instance, ?action, "redis group: topology action");
    }
    for u in &report.unreachable {
        warn!(cluster = %c.names.instance, member = ?u, "redis group: member unreachable");
    }
    Ok(Some(report))
}

fn addr(hostport: &str) -> NodeAddr {
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "0"));
    NodeAddr::new(host, port.parse().unwrap_or(0))
}

/// The topology module's view of the group: every member and sentinel the
/// spec asks for, by name, whether its pod exists yet or not.
pub fn config_for(c: &ValidCluster) -> TopologyConfig {
    let mut config = TopologyConfig::new(
        redis_members(c).iter().map(|m| addr(m)).collect(),
        sentinel_members(c).iter().map(|m| addr(m)).collect(),
        u32::try_from(quorum(c.spec.redis.sentinels)).unwrap_or(2),
    );
    config.down_after = Some(DOWN_AFTER);
    config.failover_timeout = Some(FAILOVER_TIMEOUT);
    config
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::build::fixtures::{TestCluster, valid};
    use chorus_crds::MessagingCluster;

    #[test]
    fn the_group_is_every_member_the_spec_asks_for_by_name() {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.sentinels = 5;
        let config = config_for(&valid(&mc));
        assert_eq!(config.redis.len(), 3);
        assert_eq!(
            config.redis[0],
            NodeAddr::new("chat-redis-0.chat-redis.default.svc", 6379)
        );
        assert_eq!(
            config.sentinels[4],
            NodeAddr::new("chat-sentinel-4.chat-sentinel.default.svc", 26379)
        );
        assert_eq!(config.quorum, 3);
        assert_eq!(config.down_after, Some(DOWN_AFTER));
    }
}
