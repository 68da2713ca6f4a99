//! What the Redis and Sentinel pods of a managed group share: their stable
//! DNS names, and `ConfigMap <name>-redis-group` holding the scripts they
//! run (`scripts/redis.sh`, `scripts/sentinel.sh`: how a member picks its
//! role, how a sentinel finds what to monitor) and the member lists, which
//! the scripts re-read, so scaling the group changes no pod template.
//!
//! Every member is addressed by name,
//! `<name>-redis-<i>.<name>-redis.<namespace>.svc:6379`: the sentinels
//! resolve and announce host names, so a pod that comes back with a new IP
//! keeps its identity, and the operator, the servers and the members all
//! speak of the same addresses.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::meta::{Component, Names, REDIS_PORT, SENTINEL_PORT, object_meta};
use crate::cluster::ValidCluster;

/// What both scripts share (sourced).
pub const LIB_SCRIPT: &str = include_str!("scripts/lib.sh");
/// The member script: `start`, `ready`, `alive`, `prestop`.
pub const REDIS_SCRIPT: &str = include_str!("scripts/redis.sh");
/// The sentinel script: `start`, `ready`.
pub const SENTINEL_SCRIPT: &str = include_str!("scripts/sentinel.sh");
/// Where the group ConfigMap is mounted in Redis and Sentinel pods.
pub const GROUP_DIR: &str = "/etc/chorus";
/// Where a member waits before it knows its role: its port + 1.
pub const WAITING_PORT: i32 = REDIS_PORT + 1;

/// `host:port` of Redis member `i`.
pub fn redis_member(names: &Names, i: i32) -> String {
    format!(
        "{}-{i}.{}.{}.svc:{REDIS_PORT}",
        names.redis, names.redis, names.namespace
    )
}

/// `host:port` of sentinel `i`.
pub fn sentinel_member(names: &Names, i: i32) -> String {
    format!(
        "{}-{i}.{}.{}.svc:{SENTINEL_PORT}",
        names.sentinel, names.sentinel, names.namespace
    )
}

/// Every Redis member, in ordinal order.
pub fn redis_members(c: &ValidCluster) -> Vec<String> {
    (0..c.spec.redis.replicas)
        .map(|i| redis_member(&c.names, i))
        .collect()
}

/// Every sentinel, in ordinal order.
pub fn sentinel_members(c: &ValidCluster) -> Vec<String> {
    (0..c.spec.redis.sentinels)
        .map(|i| sentinel_member(&c.names, i))
        .collect()
}

/// A hash of the scripts, on the pod templates: a new script rolls the pods
/// (the member lists are read live and are not part of it).
pub fn scripts_hash() -> String {
    super::config_map::fnv1a([LIB_SCRIPT, REDIS_SCRIPT, SENTINEL_SCRIPT])
}

/// `ConfigMap <name>-redis-group`.
pub fn config_map(c: &ValidCluster) -> ConfigMap {
    let name = format!("{}-group", c.names.redis);
    ConfigMap {
        metadata: object_meta(c, &name, Component::Redis),
        data: Some(BTreeMap::from([
            ("lib.sh".to_owned(), LIB_SCRIPT.to_owned()),
            ("redis.sh".to_owned(), REDIS_SCRIPT.to_owned()),
            ("sentinel.sh".to_owned(), SENTINEL_SCRIPT.to_owned()),
            ("members".to_owned(), redis_members(c).join(" ")),
            ("sentinels".to_owned(), sentinel_members(c).join(" ")),
        ])),
        ..Default::default()
    }
}

/// Name of the group ConfigMap.
pub fn config_map_name(names: &Names) -> String {
    format!("{}-group", names.redis)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TestCluster, valid};
    use super::*;
    use chorus_crds::MessagingCluster;

    #[test]
    fn members_are_named_by_their_stable_dns_names() {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.replicas = 2;
        mc.spec.redis.sentinels = 3;
        let c = valid(&mc);
        assert_eq!(
            redis_members(&c),
            [
                "chat-redis-0.chat-redis.default.svc:6379",
                "chat-redis-1.chat-redis.default.svc:6379"
            ]
        );
        assert_eq!(
            sentinel_members(&c)[2],
            "chat-sentinel-2.chat-sentinel.default.svc:26379"
        );
        let cm = config_map(&c);
        assert_eq!(cm.metadata.name.as_deref(), Some("chat-redis-group"));
        let data = cm.data.expect("data");
        assert_eq!(data["members"], redis_members(&c).join(" "));
        assert!(data["redis.sh"].starts_with("#!/bin/sh"));
    }
}
