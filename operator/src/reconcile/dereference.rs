//! Dereference step (needs a client): reads what the cluster refers to but
//! does not own, before anything is built, so the later steps are
//! functions of values: the Redis password (from the user's Secret, or the
//! generated one; a new password when the generated Secret does not exist
//! yet) and, for a managed group, the Redis and Sentinel pods.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::members::{self, MemberPod, Members, MembersError};
use crate::build::redis_auth_secret::generate_password;
use crate::cluster::ValidCluster;

/// Reading what the cluster refers to failed.
#[derive(Debug, thiserror::Error)]
pub enum DereferenceError {
    #[error("reading Secret {name}: {source}")]
    ReadSecret {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {name} (spec.redis.passwordSecretRef) does not exist")]
    MissingSecret { name: String },
    #[error("Secret {name} (spec.auth.apiKeySecretRef) does not exist")]
    MissingApiKeySecret { name: String },
    #[error("Secret {name} has no key {key}")]
    MissingKey { name: String, key: String },
    #[error(transparent)]
    Members(#[from] MembersError),
}

/// What the cluster refers to, as read at the start of this reconcile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dereferenced {
    /// The password the managed Redis group or cluster runs with (the
    /// topology and cluster steps authenticate with it); `None` for
    /// external Redis.
    pub redis_password: Option<String>,
    /// Set when the generated password Secret does not exist yet: the
    /// password apply creates it with (and `redis_password` equals it).
    pub new_password: Option<String>,
    /// The managed group's pods; `None` unless `redis.mode: managed`.
    pub members: Option<Members>,
    /// The Redis Cluster's pods; `None` unless `redis.mode: cluster`.
    pub cluster_pods: Option<Vec<MemberPod>>,
    /// The servers' API key, when the connection autoscaler needs it to ask
    /// pods to shed connections (`spec.auth.apiKeySecretRef`).
    pub api_key: Option<String>,
}

/// Reads the password and the group's pods of a managed cluster.
pub async fn dereference(
    client: &Client,
    c: &ValidCluster,
) -> Result<Dereferenced, DereferenceError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &c.names.namespace);
    let mut out = Dereferenced::default();
    let scales_on_connections = c
        .spec
        .autoscaling
        .as_ref()
        .is_some_and(|a| a.connections_per_pod.is_some());
    if scales_on_connections && let Some(r) = &c.spec.auth.api_key_secret_ref {
        let secret = secrets
            .get_opt(&r.name)
            .await
            .map_err(|source| DereferenceError::ReadSecret {
                name: r.name.clone(),
                source,
            })?
            .ok_or_else(|| DereferenceError::MissingApiKeySecret {
                name: r.name.clone(),
            })?;
        out.api_key = Some(secret_value(&secret, &r.name, &r.key)?);
    }
    if !c.runs_redis() {
        return Ok(out);
    }
    if let Some(r) = &c.password {
        let secret =
            secrets
                .get_opt(&r.name)
                .await
                .map_err(|source| DereferenceError::ReadSecret {
                    name: r.name.clone(),
                    source,
                })?;
        match secret {
            Some(secret) => out.redis_password = Some(secret_value(&secret, &r.name, &r.key)?),
            None if c.generated_secret() == Some(r.name.as_str()) => {
                let password = generate_password();
                out.redis_password = Some(password.clone());
                out.new_password = Some(password);
            }
            None => {
                return Err(DereferenceError::MissingSecret {
                    name: r.name.clone(),
                });
            }
        }
    }
    if c.managed_cluster() {
        out.cluster_pods = Some(members::observe_cluster(client, &c.names).await?);
    } else {
        out.members = Some(members::observe(client, &c.names).await?);
    }
    Ok(out)
}

/// The value of `key` in `secret`, from `data` or `stringData`.
pub fn secret_value(secret: &Secret, name: &str, key: &str) -> Result<String, DereferenceError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .cloned()
        })
        .ok_or_else(|| DereferenceError::MissingKey {
            name: name.to_owned(),
            key: key.to_owned(),
        })
}
