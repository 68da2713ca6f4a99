//! Pure builders: one function per object kind, from a validated
//! `MessagingCluster` to a typed Kubernetes object. Nothing here sees a
//! `Client`; every builder is unit-tested beside its code.
//!
//! [`build`] assembles the whole desired state ([`Resources`]) that the
//! reconciler's apply step writes.

pub mod config_map;
pub mod hpa;
pub mod ingress;
pub mod meta;
pub mod network_policy;
pub mod pdb;
pub mod redis_auth_secret;
pub mod redis_statefulset;
pub mod sentinel;
pub mod server_deployment;
pub mod services;

#[cfg(test)]
pub(crate) mod fixtures;

use chorus_crds::{MessagingCluster, RedisMode};
use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{ConfigMap, Service},
    networking::v1::{Ingress, NetworkPolicy},
    policy::v1::PodDisruptionBudget,
};

pub use meta::Names;

/// A builder could not start: the object lacks what every owned object needs.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Owner references need the uid the API server assigned.
    #[error("MessagingCluster has no metadata.uid yet")]
    MissingUid,
    /// Objects are created in the MessagingCluster's namespace.
    #[error("MessagingCluster has no metadata.namespace")]
    MissingNamespace,
    /// Every name derives from the MessagingCluster's name.
    #[error("MessagingCluster has no metadata.name")]
    MissingName,
}

/// Everything the operator wants to exist for one MessagingCluster.
#[derive(Clone, Debug)]
pub struct Resources {
    pub config_map: ConfigMap,
    pub server_deployment: Deployment,
    pub service: Service,
    pub server_pdb: PodDisruptionBudget,
    /// `None` when `redis.mode: external`.
    pub redis: Option<ManagedRedis>,
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
    pub headless_service: Service,
    pub statefulset: StatefulSet,
    pub sentinel_service: Service,
    pub sentinel_deployment: Deployment,
    pub redis_pdb: PodDisruptionBudget,
    pub sentinel_pdb: PodDisruptionBudget,
    /// `Some(name)`: the operator keeps a generated password in this Secret
    /// (no `passwordSecretRef`). The Secret itself is built by
    /// [`redis_auth_secret::build`] only when it does not exist yet.
    pub generated_secret: Option<String>,
}

/// Builds the desired state. `mc` must have passed `chorus_crds::validate`.
pub fn build(mc: &MessagingCluster) -> Result<Resources, BuildError> {
    let names = Names::of(mc)?;
    let spec = &mc.spec;
    let config_map = config_map::build(mc, &names)?;
    let config_hash = config_map::hash(&config_map, spec);
    let redis = match spec.redis.mode {
        RedisMode::Managed => Some(ManagedRedis {
            headless_service: services::redis_headless(mc, &names)?,
            statefulset: redis_statefulset::build(mc, &names)?,
            sentinel_service: services::sentinel(mc, &names)?,
            sentinel_deployment: sentinel::build(mc, &names)?,
            redis_pdb: pdb::redis(mc, &names)?,
            sentinel_pdb: pdb::sentinel(mc, &names)?,
            generated_secret: spec
                .redis
                .password_secret_ref
                .is_none()
                .then(|| names.redis_auth_secret.clone()),
        }),
        RedisMode::External => None,
    };
    Ok(Resources {
        server_deployment: server_deployment::build(mc, &names, &config_hash)?,
        service: services::client(mc, &names)?,
        server_pdb: pdb::server(mc, &names)?,
        hpa: spec
            .autoscaling
            .as_ref()
            .map(|a| hpa::build(mc, &names, a))
            .transpose()?,
        ingress: spec
            .ingress
            .as_ref()
            .map(|i| ingress::build(mc, &names, i))
            .transpose()?,
        network_policy: (spec.network_policy.enabled && spec.redis.mode == RedisMode::Managed)
            .then(|| network_policy::build(mc, &names))
            .transpose()?,
        config_map,
        redis,
    })
}

#[cfg(test)]
mod tests {
    use super::fixtures::TestCluster;
    use super::*;

    #[test]
    fn basic_cluster_builds_managed_redis_and_no_optional_objects() {
        let resources = build(&MessagingCluster::test()).expect("builds");
        let redis = resources.redis.expect("managed redis");
        assert_eq!(redis.generated_secret.as_deref(), Some("chat-redis-auth"));
        assert!(resources.hpa.is_none());
        assert!(resources.ingress.is_none());
        assert!(resources.network_policy.is_none());
    }

    #[test]
    fn external_redis_builds_no_redis_objects() {
        let resources =
            build(&MessagingCluster::test().with_external_redis("redis://r:6379")).expect("builds");
        assert!(resources.redis.is_none());
    }

    #[test]
    fn user_password_secret_is_not_generated() {
        let resources =
            build(&MessagingCluster::test().with_password_secret("mine", "pw")).expect("builds");
        assert_eq!(resources.redis.expect("managed").generated_secret, None);
    }

    #[test]
    fn unsaved_cluster_is_refused() {
        let mut mc = MessagingCluster::test();
        mc.metadata.uid = None;
        assert!(matches!(build(&mc), Err(BuildError::MissingUid)));
    }
}
