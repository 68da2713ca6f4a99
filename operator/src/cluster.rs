//! The validate step: from a `MessagingCluster` as the API server stores
//! it to a [`ValidCluster`], the value every later step works from.
//!
//! Validation is the only step that can refuse a spec. What it proves is
//! carried in the type: the names of every owned object, the owner
//! reference they all point back with, and the settings derived from the
//! spec, so builders cannot fail and never re-derive them.

use chorus_crds::{MessagingCluster, MessagingClusterSpec, RedisMode, SecretKeyRef};
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
}

impl ValidCluster {
    /// The operator runs the Redis group (Sentinel, StatefulSet, topology).
    pub fn managed_redis(&self) -> bool {
        self.spec.redis.mode == RedisMode::Managed
    }

    /// The generated password Secret's name, when the operator keeps one.
    pub fn generated_secret(&self) -> Option<&str> {
        (self.managed_redis() && self.spec.redis.password_secret_ref.is_none())
            .then_some(self.names.redis_auth_secret.as_str())
    }
}

/// Checks the spec (`chorus_crds::validate`: what the CRD's schema and CEL
/// rules cannot express) and the metadata every owned object needs.
pub fn validate(mc: &MessagingCluster) -> Result<ValidCluster, InvalidSpec> {
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
        }),
        _ => Err(InvalidSpec {
            message: problems.join("; "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::{TestCluster, UID};

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
    fn every_problem_is_named_with_its_field() {
        let mut mc = MessagingCluster::test().with_ingress("not a host");
        mc.metadata.uid = None;
        let err = validate(&mc).expect_err("invalid");
        assert!(err.message.contains("spec.ingress.host"), "{err}");
        assert!(err.message.contains("metadata.uid"), "{err}");
    }
}
