//! Pure builders: one function per object kind, from a [`ValidCluster`] to
//! a typed Kubernetes object. They cannot fail (validation proved what they
//! need) and never see a `Client`; every builder is unit-tested beside its
//! code.
//!
//! [`build`] assembles the whole desired state ([`Resources`]) that the
//! reconciler's apply step writes.

pub mod config_map;
pub mod hpa;
pub mod ingress;
pub mod meta;
pub mod network_policy;
pub mod overrides;
pub mod pdb;
pub mod pod_policy;
pub mod redis_auth_secret;
pub mod redis_cluster;
pub mod redis_group;
pub mod redis_statefulset;
pub mod sentinel;
pub mod server_deployment;
pub mod services;

#[cfg(test)]
pub(crate) mod fixtures;

use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{ConfigMap, Secret, Service},
    networking::v1::{Ingress, NetworkPolicy},
    policy::v1::PodDisruptionBudget,
};

pub use meta::Names;

use crate::cluster::ValidCluster;

/// Everything the operator wants to exist for one MessagingCluster.
#[derive(Clone, Debug)]
pub struct Resources {
    pub config_map: ConfigMap,
    pub server_deployment: Deployment,
    pub service: Service,
    pub server_pdb: PodDisruptionBudget,
    /// `None` unless `redis.mode: managed` (and not with `delivery: kafka`).
    pub redis: Option<ManagedRedis>,
    /// `None` unless `redis.mode: cluster`.
    pub redis_cluster: Option<ManagedRedisCluster>,
    /// `None`: an existing HPA is deleted.
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// `None`: an existing Ingress is deleted.
    pub ingress: Option<Ingress>,
    /// `None`: an existing NetworkPolicy is deleted.
    pub network_policy: Option<NetworkPolicy>,
}

/// The Redis + Sentinel group run for a MessagingCluster in managed mode.
#[derive(Clone, Debug)]
pub struct ManagedRedis {
    /// The scripts and member lists every group pod mounts.
    pub group_config: ConfigMap,
    pub headless_service: Service,
    pub statefulset: StatefulSet,
    pub sentinel_service: Service,
    pub sentinel_statefulset: StatefulSet,
    pub redis_pdb: PodDisruptionBudget,
    pub sentinel_pdb: PodDisruptionBudget,
}

/// The Redis Cluster run for a MessagingCluster in cluster mode
/// ([`redis_cluster`]).
#[derive(Clone, Debug)]
pub struct ManagedRedisCluster {
    pub headless_service: Service,
    pub statefulset: StatefulSet,
    pub pdb: PodDisruptionBudget,
}

/// The generated password Secret, when the dereference step found none
/// (`new_password`): created once, never rewritten (it holds the only copy
/// of the password), so it is not part of what is applied.
pub fn new_secret(c: &ValidCluster, new_password: Option<&str>) -> Option<Secret> {
    c.generated_secret()
        .and(new_password)
        .map(|password| redis_auth_secret::build(c, password))
}

/// Builds the desired state: every object here is written by server-side
/// apply. The generated password Secret is not among them: see
/// [`new_secret`].
pub fn build(c: &ValidCluster) -> Resources {
    let spec = &c.spec;
    let config_map = config_map::build(c);
    let config_hash = config_map::hash(&config_map, spec);
    let redis = c.managed_redis().then(|| ManagedRedis {
        group_config: redis_group::config_map(c),
        headless_service: services::redis_headless(c),
        statefulset: redis_statefulset::build(c),
        sentinel_service: services::sentinel(c),
        sentinel_statefulset: sentinel::build(c),
        redis_pdb: pdb::redis(c),
        sentinel_pdb: pdb::sentinel(c),
    });
    Resources {
        server_deployment: server_deployment::build(c, &config_hash),
        service: services::client(c),
        server_pdb: pdb::server(c),
        // On connections the operator scales itself (crate::fleet).
        hpa: spec
            .autoscaling
            .as_ref()
            .filter(|a| a.connections_per_pod.is_none())
            .map(|a| hpa::build(c, a)),
        ingress: spec.ingress.as_ref().map(|i| ingress::build(c, i)),
        network_policy: if !spec.network_policy.enabled {
            None
        } else if c.managed_redis() {
            Some(network_policy::build(c))
        } else if c.managed_cluster() {
            Some(network_policy::redis_cluster(c))
        } else {
            None
        },
        redis_cluster: c.managed_cluster().then(|| ManagedRedisCluster {
            headless_service: redis_cluster::headless_service(c),
            statefulset: redis_cluster::statefulset(c),
            pdb: pdb::redis_cluster(c),
        }),
        config_map,
        redis,
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{TestCluster, valid};
    use super::*;
    use chorus_crds::MessagingCluster;

    #[test]
    fn basic_cluster_builds_managed_redis_a_network_policy_and_no_optional_objects() {
        let c = valid(&MessagingCluster::test());
        let resources = build(&c);
        assert!(resources.redis.is_some(), "managed redis");
        assert!(resources.hpa.is_none());
        assert!(resources.ingress.is_none());
        assert!(resources.network_policy.is_some(), "on by default");
        let mut off = MessagingCluster::test();
        off.spec.network_policy.enabled = false;
        assert!(build(&valid(&off)).network_policy.is_none());
        let secret = new_secret(&c, Some("pw")).expect("a new generated Secret");
        assert_eq!(secret.metadata.name.as_deref(), Some("chat-redis-auth"));
    }

    #[test]
    fn cluster_mode_builds_the_cluster_its_policy_and_a_password_but_no_sentinel_group() {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.mode = chorus_crds::RedisMode::Cluster;
        let c = valid(&mc);
        let resources = build(&c);
        assert!(resources.redis.is_none(), "no Sentinel group");
        let cluster = resources.redis_cluster.expect("the cluster");
        assert_eq!(
            cluster.statefulset.metadata.name.as_deref(),
            Some("chat-redis-cluster")
        );
        let policy = resources.network_policy.expect("on by default");
        let ports: Vec<_> = policy
            .spec
            .and_then(|s| s.ingress)
            .expect("rules")
            .iter()
            .flat_map(|r| r.ports.clone().unwrap_or_default())
            .filter_map(|p| p.port)
            .collect();
        assert_eq!(ports.len(), 2, "Redis and the bus: {ports:?}");
        assert!(new_secret(&c, Some("pw")).is_some(), "a generated password");
        assert!(
            build(&valid(&MessagingCluster::test()))
                .redis_cluster
                .is_none()
        );
    }

    #[test]
    fn an_existing_generated_secret_is_not_built_again() {
        assert!(new_secret(&valid(&MessagingCluster::test()), None).is_none());
    }

    #[test]
    fn external_redis_builds_no_redis_objects_and_no_secret() {
        let c = valid(&MessagingCluster::test().with_external_redis("redis://r:6379"));
        assert!(build(&c).redis.is_none());
        assert!(
            build(&c).network_policy.is_none(),
            "no Redis of ours to guard"
        );
        assert!(new_secret(&c, Some("pw")).is_none());
    }

    #[test]
    fn kafka_delivery_builds_no_redis_objects_no_secret_and_no_network_policy() {
        let c = valid(&MessagingCluster::test().with_kafka(&["kafka.infra:9092"]));
        let resources = build(&c);
        assert!(resources.redis.is_none(), "no Redis on Kafka");
        assert!(
            resources.network_policy.is_none(),
            "no Redis of ours to guard"
        );
        assert!(new_secret(&c, Some("pw")).is_none());
        let pod = resources
            .server_deployment
            .spec
            .and_then(|s| s.template.spec)
            .expect("pod spec");
        let volumes: Vec<String> = pod
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert!(
            !volumes.iter().any(|v| v.contains("redis")),
            "no Redis password mounted: {volumes:?}"
        );
    }

    #[test]
    fn user_password_secret_is_not_generated() {
        let c = valid(&MessagingCluster::test().with_password_secret("mine", "pw"));
        assert!(new_secret(&c, Some("pw")).is_none());
    }
}
