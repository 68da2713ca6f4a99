//! `redis.mode: cluster`: the objects of a managed Redis Cluster.
//!
//! - `StatefulSet <name>-redis-cluster`: `shards × (1 + replicasPerShard)`
//!   pods running `redis-server --cluster-enabled yes`
//!   (`scripts/redis-cluster.sh`), the node table (`nodes.conf`) on the data
//!   volume. The pods do not join each other: the operator's cluster step
//!   ([`crate::redis_cluster`]) meets them, assigns slots and replicas,
//!   adds shards and moves slots to them. Pods start in parallel; updates
//!   are `OnDelete` (a pod replaced without its data comes back as a new
//!   node, which the operator makes a replica).
//! - headless `Service <name>-redis-cluster`: a stable DNS name per pod,
//!   `<name>-redis-cluster-<i>.<name>-redis-cluster.<namespace>.svc`.
//! - `PodDisruptionBudget <name>-redis-cluster` (one pod at a time): see
//!   [`super::pdb::redis_cluster`].
//! - `NetworkPolicy <name>-redis` in its cluster form: see
//!   [`super::network_policy::redis_cluster`].
//!
//! The servers get the first three pods as seeds of their
//! `redis+cluster://` URL and learn every shard from `CLUSTER SLOTS`, so
//! growing the cluster changes nothing in their configuration.

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{Container, ExecAction, PodSpec, Probe, Service},
};

use super::config_map::fnv1a;
use super::meta::{CLUSTER_BUS_PORT, Component, Names, REDIS_PORT};
use super::pod_policy::{restricted_security, scratch};
use super::redis_statefulset::{RedisPods, container_port, data_volume, env, pod_env, redis_conf};
use crate::cluster::ValidCluster;

/// What a cluster pod runs: `start`.
pub const SCRIPT: &str = include_str!("scripts/redis-cluster.sh");
/// `cluster-node-timeout`: how long a master may be silent before its
/// replica takes over.
pub const NODE_TIMEOUT_MS: u32 = 5000;
/// Seeds in the servers' broker URL (pods 0, 1 and 2 exist in every
/// cluster: at least three shards).
pub const SEEDS: i32 = 3;

/// `host` of cluster pod `i` (its stable DNS name).
pub fn host(names: &Names, i: i32) -> String {
    format!(
        "{}-{i}.{}.{}.svc",
        names.redis_cluster, names.redis_cluster, names.namespace
    )
}

/// Pod name of cluster pod `i`.
pub fn pod_name(names: &Names, i: i32) -> String {
    format!("{}-{i}", names.redis_cluster)
}

/// Pods the spec asks for.
pub fn pods(c: &ValidCluster) -> i32 {
    c.spec.redis.cluster_shape().pods()
}

/// The servers' broker URL: `redis+cluster://` with the seed pods.
pub fn broker_url(names: &Names) -> String {
    let seeds: Vec<String> = (0..SEEDS)
        .map(|i| format!("{}:{REDIS_PORT}", host(names, i)))
        .collect();
    format!("redis+cluster://{}", seeds.join(","))
}

/// The script's hash, on the pod template.
pub fn script_hash() -> String {
    fnv1a([SCRIPT])
}

/// `StatefulSet <name>-redis-cluster`.
pub fn statefulset(c: &ValidCluster) -> StatefulSet {
    let names = &c.names;
    let redis = &c.spec.redis;
    // The root file system is read-only: redis.conf goes to /tmp.
    let (tmp, tmp_mount) = scratch("tmp", "/tmp", "16Mi");
    let (mut volumes, mut mounts) = (vec![tmp], vec![tmp_mount]);
    let claims = data_volume(c, Component::RedisCluster, &mut volumes, &mut mounts);
    let (_, container_security) = restricted_security();
    let mut env_vars = pod_env(c, &names.redis_cluster, REDIS_PORT);
    env_vars.extend([
        env("CHORUS_NODE_TIMEOUT_MS", NODE_TIMEOUT_MS.to_string()),
        env("CHORUS_REDIS_CONF", redis_conf(c)),
        env("CHORUS_DATA", "/data"),
        env("CHORUS_CONF", "/tmp/redis.conf"),
    ]);
    let ping = |period: i32, failures: i32| {
        Probe {
        exec: Some(ExecAction {
            command: Some(
                [
                    "sh",
                    "-c",
                    "[ \"$(REDISCLI_AUTH=\"${REDIS_PASSWORD:-}\" redis-cli -p 6379 PING)\" = PONG ]",
                ]
                .map(String::from)
                .into(),
            ),
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Default::default()
    }
    };
    let container = Container {
        name: "redis".to_owned(),
        image: Some(redis.image.clone()),
        command: Some(
            ["sh", "-c", SCRIPT, "redis-cluster.sh", "start"]
                .map(String::from)
                .into(),
        ),
        env: Some(env_vars),
        ports: Some(vec![
            container_port("redis", REDIS_PORT),
            container_port("cluster-bus", CLUSTER_BUS_PORT),
        ]),
        resources: redis.resources.clone(),
        readiness_probe: Some(ping(5, 2)),
        // Loading a large data set can take a while.
        liveness_probe: Some(ping(10, 6)),
        volume_mounts: Some(mounts),
        security_context: Some(container_security),
        ..Default::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        ..Default::default()
    };
    let set = RedisPods {
        name: &names.redis_cluster,
        component: Component::RedisCluster,
        replicas: pods(c),
        scripts_hash: script_hash(),
        claims,
    };
    set.statefulset(c, pod)
}

/// `Service <name>-redis-cluster`: headless, every pod by name, ready or
/// not (the operator meets pods before they serve).
pub fn headless_service(c: &ValidCluster) -> Service {
    super::services::headless(
        c,
        &c.names.redis_cluster,
        Component::RedisCluster,
        vec![
            super::services::port("redis", REDIS_PORT, REDIS_PORT),
            super::services::port("cluster-bus", CLUSTER_BUS_PORT, CLUSTER_BUS_PORT),
        ],
    )
}

#[cfg(test)]
mod tests {

    use super::super::fixtures::{TestCluster, UID, env_of, valid};
    use super::*;
    use chorus_crds::{MessagingCluster, RedisClusterSpec, RedisMode};

    fn cluster_mode(shards: i32, replicas_per_shard: i32) -> MessagingCluster {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.mode = RedisMode::Cluster;
        mc.spec.redis.cluster = Some(RedisClusterSpec {
            shards,
            replicas_per_shard,
        });
        mc
    }

    #[test]
    fn one_pod_per_master_and_replica_in_cluster_mode_with_the_bus_port() {
        let c = valid(&cluster_mode(4, 2));
        let s = statefulset(&c);
        assert_eq!(s.metadata.name.as_deref(), Some("chat-redis-cluster"));
        assert_eq!(
            s.metadata.owner_references.clone().expect("owner")[0].uid,
            UID
        );
        let spec = s.spec.clone().expect("spec");
        assert_eq!(spec.replicas, Some(12), "4 shards × (1 + 2)");
        assert_eq!(spec.service_name.as_deref(), Some("chat-redis-cluster"));
        assert_eq!(
            spec.selector.match_labels.clone().expect("labels")["app.kubernetes.io/component"],
            "redis-cluster"
        );
        assert_eq!(
            spec.update_strategy.and_then(|u| u.type_).as_deref(),
            Some("OnDelete")
        );
        let pod = spec.template.spec.expect("pod");
        let container = &pod.containers[0];
        let ports: Vec<i32> = container
            .ports
            .clone()
            .expect("ports")
            .iter()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [6379, 16379]);
        let command = container.command.clone().expect("command");
        assert_eq!(command[..2], ["sh", "-c"]);
        assert!(command[2].contains("cluster-enabled yes"));
        assert!(command[2].contains("cluster-config-file nodes.conf"));
        assert!(command[2].contains("cluster-announce-hostname"));
        assert_eq!(command[4], "start");
        let env = env_of(&s);
        assert_eq!(
            env["CHORUS_SELF"],
            "$(POD_NAME).chat-redis-cluster.default.svc:6379"
        );
        assert_eq!(env["CHORUS_NODE_TIMEOUT_MS"], "5000");
        assert_eq!(env["CHORUS_DATA"], "/data");
        let password = container.env.clone().expect("env")[1]
            .value_from
            .clone()
            .and_then(|v| v.secret_key_ref)
            .expect("the password from the Secret");
        assert_eq!(
            (password.name.as_str(), password.key.as_str()),
            ("chat-redis-auth", "password")
        );
        assert_eq!(
            crate::build::pod_policy::restricted_violations(&pod),
            Vec::<String>::new()
        );
    }

    #[test]
    fn growing_the_cluster_changes_only_the_pod_count() {
        let three = statefulset(&valid(&cluster_mode(3, 1))).spec.expect("spec");
        let four = statefulset(&valid(&cluster_mode(4, 1))).spec.expect("spec");
        assert_eq!((three.replicas, four.replicas), (Some(6), Some(8)));
        assert_eq!(three.template, four.template);
    }

    #[test]
    fn storage_gives_each_cluster_pod_a_claim_for_its_node_table_and_data() {
        let s = statefulset(&valid(&cluster_mode(3, 1).with_storage("2Gi")));
        let spec = s.spec.clone().expect("spec");
        let claim = &spec.volume_claim_templates.expect("claims")[0];
        assert_eq!(
            claim.metadata.labels.clone().expect("labels")["app.kubernetes.io/component"],
            "redis-cluster"
        );
        assert!(env_of(&s)["CHORUS_REDIS_CONF"].contains("appendonly yes"));
    }

    #[test]
    fn the_headless_service_names_every_pod_on_both_ports() {
        let c = valid(&cluster_mode(3, 1));
        let svc = headless_service(&c);
        assert_eq!(svc.metadata.name.as_deref(), Some("chat-redis-cluster"));
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let ports: Vec<i32> = spec.ports.expect("ports").iter().map(|p| p.port).collect();
        assert_eq!(ports, [6379, 16379]);
        assert_eq!(
            host(&c.names, 4),
            "chat-redis-cluster-4.chat-redis-cluster.default.svc"
        );
        assert_eq!(pod_name(&c.names, 4), "chat-redis-cluster-4");
    }
}
