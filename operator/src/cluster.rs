//! The validate step: from a `MessagingCluster` as the API server stores
//! it to a [`ValidCluster`], the value every later step works from.
//!
//! Validation is the only step that can refuse a spec. What it proves is
//! carried in the type: the names of every owned object, the owner
//! reference they all point back with, and the settings derived from the
//! spec, so builders cannot fail and never re-derive them.

use chorus_crds::{KafkaSpec, MessagingCluster, MessagingClusterSpec, RedisMode, SecretKeyRef};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;

use crate::build::Names;
use crate::build::config_map::redis_password_ref;

/// A spec the operator cannot carry out as written; the user must change it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidSpec {
    /// Every problem found, `field: reason`, joined with `; `.
    pub message: String,
}

/// A MessagingCluster that passed validation.
#[derive(Clone, Debug)]
pub struct ValidCluster {
    pub spec: MessagingClusterSpec,
    pub names: Names,
    /// Controller reference to the MessagingCluster, on every owned object.
    pub owner: OwnerReference,
    /// `metadata.generation`, written to `observedGeneration`.
    pub generation: Option<i64>,
    /// Where the Redis password comes from: the user's Secret, the
    /// generated one (managed Redis without `passwordSecretRef`), or none
    /// (external Redis without `passwordSecretRef`).
    pub password: Option<SecretKeyRef>,
    /// Namespace the operator's own pods run in: the Redis NetworkPolicy
    /// admits the operator from there.
    pub operator_namespace: String,
}

/// Connections a server pod accepts without `limits.maxConnectionsPerPod`
/// and without a memory limit.
pub const DEFAULT_MAX_CONNECTIONS: i32 = 10_000;
/// Memory kept for the process (runtime, rooms, frames being fanned out)
/// before connections are counted.
pub const PROCESS_MEMORY: u64 = 64 << 20;
/// Memory budgeted per connection: an idle subscribed connection costs
/// about 5 KiB (BENCHMARKS.md); three times that leaves room for frames in
/// flight and the kernel's socket buffers charged to the pod.
pub const MEMORY_PER_CONNECTION: u64 = 16 << 10;

/// The connection limit of a server pod: the spec's, else what its memory
/// limit holds at [`MEMORY_PER_CONNECTION`] after [`PROCESS_MEMORY`]
/// (at least 100, at most 1,000,000), else [`DEFAULT_MAX_CONNECTIONS`].
pub fn max_connections(spec: &MessagingClusterSpec) -> i32 {
    if let Some(n) = spec.limits.max_connections_per_pod {
        return n;
    }
    let limit = spec
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .and_then(|q| crate::build::redis_statefulset::parse_quantity(&q.0));
    match limit {
        Some(bytes) => {
            let n = bytes.saturating_sub(PROCESS_MEMORY) / MEMORY_PER_CONNECTION;
            i32::try_from(n.clamp(100, 1_000_000)).unwrap_or(1_000_000)
        }
        None => DEFAULT_MAX_CONNECTIONS,
    }
}

impl ValidCluster {
    /// The operator runs the Redis group (Sentinel, StatefulSet, topology).
    /// Not with `delivery: kafka`: the servers then use no Redis at all.
    pub fn managed_redis(&self) -> bool {
        self.spec.redis.mode == RedisMode::Managed && self.kafka().is_none()
    }

    /// The external Kafka the servers fan out through (`delivery: kafka`).
    pub fn kafka(&self) -> Option<&KafkaSpec> {
        on_kafka(&self.spec)
    }

    /// The operator runs a Redis Cluster (`redis.mode: cluster`; the CRD
    /// refuses it with `delivery: kafka`).
    pub fn managed_cluster(&self) -> bool {
        self.spec.redis.mode == RedisMode::Cluster && self.kafka().is_none()
    }

    /// The operator runs Redis, as a Sentinel group or as a cluster: it
    /// keeps the password and talks to the pods.
    pub fn runs_redis(&self) -> bool {
        self.managed_redis() || self.managed_cluster()
    }

    /// The generated password Secret's name, when the operator keeps one.
    pub fn generated_secret(&self) -> Option<&str> {
        (self.runs_redis() && self.spec.redis.password_secret_ref.is_none())
            .then_some(self.names.redis_auth_secret.as_str())
    }
}

/// `spec.kafka` when the servers use it (`delivery: kafka`; validation
/// proved it is there).
pub fn on_kafka(spec: &MessagingClusterSpec) -> Option<&KafkaSpec> {
    spec.on_kafka()
}

/// Checks the spec (`chorus_crds::validate`: what the CRD's schema and CEL
/// rules cannot express) and the metadata every owned object needs.
/// `operator_namespace` is where this operator runs (`--operator-namespace`).
pub fn validate(
    mc: &MessagingCluster,
    operator_namespace: &str,
) -> Result<ValidCluster, InvalidSpec> {
    let mut problems: Vec<String> = match chorus_crds::validate(mc) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    };
    // The API server sets these on every stored object; a cluster without
    // them has not been created yet.
    let owner = mc.controller_owner_ref(&());
    if owner.is_none() || mc.metadata.uid.is_none() {
        problems.push("metadata.uid: is not set (the object was never stored)".to_owned());
    }
    problems.extend(cluster_shrink(mc));
    let names = Names::of(mc);
    if names.is_none() {
        problems.push("metadata.namespace: is required".to_owned());
    }
    match (owner, names) {
        (Some(owner), Some(names)) if problems.is_empty() => Ok(ValidCluster {
            password: redis_password_ref(&mc.spec, &names),
            spec: mc.spec.clone(),
            names,
            owner,
            generation: mc.metadata.generation,
            operator_namespace: operator_namespace.to_owned(),
        }),
        _ => Err(InvalidSpec {
            message: problems.join("; "),
        }),
    }
}

/// A managed Redis Cluster's shape never shrinks: the status names more
/// shards serving slots than the spec asks for (the CRD in the cluster may
/// be older than this operator and lack the rule that refuses it). Fewer
/// pods would remove masters with their slots.
fn cluster_shrink(mc: &MessagingCluster) -> Option<String> {
    if mc.spec.redis.mode != RedisMode::Cluster {
        return None;
    }
    let serving = mc
        .status
        .as_ref()
        .and_then(|s| s.redis.cluster.as_ref())
        .map_or(0, |c| c.shards.iter().filter(|s| s.slots > 0).count());
    let asked = mc.spec.redis.cluster_shape().shards;
    (usize::try_from(asked).unwrap_or(0) < serving).then(|| {
        format!(
            "spec.redis.cluster.shards: cannot shrink from {serving} to {asked}: the operator \
             adds shards and moves slots onto them, but never empties a shard. Set it back to \
             {serving} (or more)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{OPERATOR_NAMESPACE, TestCluster, UID};

    fn validate(mc: &MessagingCluster) -> Result<ValidCluster, InvalidSpec> {
        super::validate(mc, OPERATOR_NAMESPACE)
    }

    #[test]
    fn the_connection_limit_is_the_specs_or_what_the_memory_limit_holds() {
        use k8s_openapi::api::core::v1::ResourceRequirements;
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let mut mc = MessagingCluster::test();
        assert_eq!(max_connections(&mc.spec), DEFAULT_MAX_CONNECTIONS);
        mc.spec.resources = Some(ResourceRequirements {
            limits: Some([("memory".to_owned(), Quantity("512Mi".to_owned()))].into()),
            ..Default::default()
        });
        // (512 - 64) MiB at 16 KiB each.
        assert_eq!(max_connections(&mc.spec), 28_672);
        let env =
            crate::build::config_map::server_env(&mc.spec, &validate(&mc).expect("valid").names);
        assert_eq!(
            env["CHORUS_MAX_CONNECTIONS"], "28672",
            "what the servers get"
        );
        mc.spec.limits.max_connections_per_pod = Some(500);
        assert_eq!(max_connections(&mc.spec), 500);
        mc.spec.limits.max_connections_per_pod = None;
        mc.spec.resources = Some(ResourceRequirements {
            limits: Some([("memory".to_owned(), Quantity("64Mi".to_owned()))].into()),
            ..Default::default()
        });
        assert_eq!(max_connections(&mc.spec), 100, "a floor, not zero");
    }

    #[test]
    fn a_valid_cluster_carries_its_names_owner_and_password_source() {
        let c = validate(&MessagingCluster::test()).expect("valid");
        assert_eq!(c.names.server, "chat-server");
        assert_eq!(c.owner.uid, UID);
        assert_eq!(c.owner.controller, Some(true));
        assert_eq!(c.generation, Some(1));
        assert_eq!(c.generated_secret(), Some("chat-redis-auth"));
        let password = c.password.expect("managed Redis has a password");
        assert_eq!(
            (password.name.as_str(), password.key.as_str()),
            ("chat-redis-auth", "password")
        );
    }

    #[test]
    fn external_redis_without_a_secret_has_no_password_and_generates_none() {
        let c = validate(&MessagingCluster::test().with_external_redis("redis://r:6379"))
            .expect("valid");
        assert!(!c.managed_redis());
        assert_eq!(c.generated_secret(), None);
        assert_eq!(c.password, None);
    }

    #[test]
    fn kafka_delivery_runs_no_redis_and_mounts_no_password() {
        let c =
            validate(&MessagingCluster::test().with_kafka(&["kafka.infra:9092"])).expect("valid");
        assert!(!c.managed_redis());
        assert_eq!(c.kafka().map(|k| k.bootstrap_servers.len()), Some(1));
        assert_eq!(c.generated_secret(), None);
        assert_eq!(c.password, None);
    }

    #[test]
    fn a_cluster_whose_status_serves_more_shards_than_asked_is_refused() {
        use chorus_crds::{MessagingClusterStatus, RedisClusterStatus, ShardStatus};
        let mut mc = MessagingCluster::test();
        mc.spec.redis.mode = RedisMode::Cluster;
        let shard = |master: &str| ShardStatus {
            master: master.to_owned(),
            slots: 4096,
            ..Default::default()
        };
        let mut status = MessagingClusterStatus::default();
        status.redis.cluster = Some(RedisClusterStatus {
            shards: ["a", "b", "c", "d"].map(shard).to_vec(),
            ..Default::default()
        });
        mc.status = Some(status);
        let err = validate(&mc).expect_err("3 < 4");
        assert!(
            err.message
                .contains("spec.redis.cluster.shards: cannot shrink from 4 to 3"),
            "{err}"
        );
        mc.spec.redis.cluster = Some(chorus_crds::RedisClusterSpec {
            shards: 4,
            replicas_per_shard: 1,
        });
        let c = validate(&mc).expect("4 = 4");
        assert!(c.managed_cluster() && c.runs_redis() && !c.managed_redis());
        assert_eq!(c.generated_secret(), Some("chat-redis-auth"));
    }

    #[test]
    fn every_problem_is_named_with_its_field() {
        let mut mc = MessagingCluster::test().with_ingress("not a host");
        mc.metadata.uid = None;
        let err = validate(&mc).expect_err("invalid");
        assert!(err.message.contains("spec.ingress.host"), "{err}");
        assert!(err.message.contains("metadata.uid"), "{err}");
    }
}
