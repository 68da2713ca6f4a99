//! Apply step (needs a client): server-side apply of every built object
//! with field manager [`FIELD_MANAGER`] and `force`, deletion of what the
//! spec no longer asks for, and the one-time creation of the generated
//! Redis password Secret (built only when the dereference step found none).

use std::fmt::Debug;

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::{Deployment, StatefulSet},
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{ConfigMap, Secret, Service},
        networking::v1::{Ingress, NetworkPolicy},
        policy::v1::PodDisruptionBudget,
    },
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::build::{ManagedRedis, Resources, redis_group};
use crate::cluster::ValidCluster;

/// The field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "chorus-operator";

/// A write to the API server failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting {kind} {name}: {source}")]
    Delete {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("creating Secret {name}: {source}")]
    CreateSecret {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ApplyError {
    /// The API error behind this failure.
    pub fn kube_error(&self) -> &kube::Error {
        match self {
            ApplyError::Apply { source, .. }
            | ApplyError::Delete { source, .. }
            | ApplyError::CreateSecret { source, .. } => source,
        }
    }
}

/// What the API server returned for the objects status is computed from.
#[derive(Clone, Debug)]
pub struct Applied {
    pub server_deployment: Deployment,
    /// `None` in external mode.
    pub redis: Option<AppliedRedis>,
    /// The password Secret was generated in this reconcile.
    pub generated_secret: bool,
}

#[derive(Clone, Debug)]
pub struct AppliedRedis {
    pub statefulset: StatefulSet,
    pub sentinel_statefulset: StatefulSet,
}

async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, ApplyError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| ApplyError::Apply {
        kind: <K as k8s_openapi::Resource>::KIND,
        name,
        source,
    })
}

/// Deletes `name` if it exists; a missing object is not an error.
async fn delete<K>(client: &Client, namespace: &str, name: &str) -> Result<(), ApplyError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(source) => Err(ApplyError::Delete {
            kind: <K as k8s_openapi::Resource>::KIND,
            name: name.to_owned(),
            source,
        }),
    }
}

/// Creates the generated password Secret. It is never rewritten: it holds
/// the only copy of the password.
async fn create_secret(
    client: &Client,
    namespace: &str,
    secret: &Secret,
) -> Result<bool, ApplyError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    match api.create(&params, secret).await {
        Ok(_) => Ok(true),
        // Created meanwhile (by another operator replica): keep that one.
        Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(false),
        Err(source) => Err(ApplyError::CreateSecret {
            name: secret.name_any(),
            source,
        }),
    }
}

/// Writes the desired state. Destructures `Resources` without `..`, so a
/// new kind that is built but not applied does not compile.
pub async fn apply_all(
    client: &Client,
    c: &ValidCluster,
    resources: &Resources,
    new_secret: Option<&Secret>,
) -> Result<Applied, ApplyError> {
    let names = &c.names;
    let Resources {
        config_map,
        server_deployment,
        service,
        server_pdb,
        redis,
        hpa,
        ingress,
        network_policy,
    } = resources;
    let ns = names.namespace.as_str();
    apply(client, ns, config_map).await?;
    let (applied_redis, generated_secret) = match redis {
        Some(ManagedRedis {
            group_config,
            headless_service,
            statefulset,
            sentinel_service,
            sentinel_statefulset,
            redis_pdb,
            sentinel_pdb,
        }) => {
            let generated = match new_secret {
                Some(secret) => create_secret(client, ns, secret).await?,
                None => false,
            };
            apply(client, ns, group_config).await?;
            apply(client, ns, headless_service).await?;
            let statefulset = apply(client, ns, statefulset).await?;
            apply(client, ns, sentinel_service).await?;
            let sentinel_statefulset = apply(client, ns, sentinel_statefulset).await?;
            apply(client, ns, redis_pdb).await?;
            apply(client, ns, sentinel_pdb).await?;
            (
                Some(AppliedRedis {
                    statefulset,
                    sentinel_statefulset,
                }),
                generated,
            )
        }
        None => {
            // External Redis: the managed group is no longer wanted. The
            // generated Secret stays (owned, so it goes with the cluster).
            delete::<StatefulSet>(client, ns, &names.redis).await?;
            delete::<StatefulSet>(client, ns, &names.sentinel).await?;
            delete::<ConfigMap>(client, ns, &redis_group::config_map_name(names)).await?;
            delete::<Service>(client, ns, &names.redis).await?;
            delete::<Service>(client, ns, &names.sentinel).await?;
            delete::<PodDisruptionBudget>(client, ns, &names.redis).await?;
            delete::<PodDisruptionBudget>(client, ns, &names.sentinel).await?;
            (None, false)
        }
    };
    let server_deployment = apply(client, ns, server_deployment).await?;
    apply(client, ns, service).await?;
    apply(client, ns, server_pdb).await?;
    match hpa {
        Some(hpa) => drop(apply(client, ns, hpa).await?),
        None => delete::<HorizontalPodAutoscaler>(client, ns, &names.service).await?,
    }
    match ingress {
        Some(ingress) => drop(apply(client, ns, ingress).await?),
        None => delete::<Ingress>(client, ns, &names.service).await?,
    }
    match network_policy {
        Some(policy) => drop(apply(client, ns, policy).await?),
        None => delete::<NetworkPolicy>(client, ns, &names.redis).await?,
    }
    Ok(Applied {
        server_deployment,
        redis: applied_redis,
        generated_secret,
    })
}
