//! Apply step (needs a client): server-side apply of every built object
//! with field manager [`FIELD_MANAGER`] and `force`, deletion of what the
//! spec no longer asks for, and the one-time creation of the generated
//! Redis password Secret (built only when the dereference step found none).
//!
//! An object the API server refuses as invalid (e.g. a change to an
//! immutable StatefulSet field) does not stop the step: the other objects
//! are still applied, and the refusals come back in [`Skipped`]. Deletes
//! only touch objects this MessagingCluster controls (owner UID, checked
//! again by a delete precondition); another object of the same name is
//! left alone and named in [`Skipped::not_owned`].

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
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::warn;

use crate::build::{ManagedRedis, ManagedRedisCluster, Resources, redis_group};
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
    #[error("reading {kind} {name}: {source}")]
    Read {
        kind: &'static str,
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
            | ApplyError::CreateSecret { source, .. }
            | ApplyError::Read { source, .. } => source,
        }
    }

    /// The API server refused the request as invalid: sending it again
    /// cannot help; the spec must change.
    pub fn is_refusal(&self) -> bool {
        matches!(self.kube_error(), kube::Error::Api(s) if s.is_invalid() || s.code == 400)
    }
}

/// What the apply step left undone without failing.
#[derive(Debug, Default)]
pub struct Skipped {
    /// Objects the API server refused as invalid; everything else was
    /// applied. The reconcile reports them in `Degraded` and then fails
    /// with the first.
    pub refused: Vec<ApplyError>,
    /// `Kind name` of objects the spec no longer asks for that exist but
    /// are not controlled by this MessagingCluster: left alone.
    pub not_owned: Vec<String>,
}

/// What the API server returned for the objects status is computed from.
#[derive(Clone, Debug)]
pub struct Applied {
    pub server_deployment: Deployment,
    /// `None` unless `redis.mode: managed`.
    pub redis: Option<AppliedRedis>,
    /// The Redis Cluster's StatefulSet; `None` unless `redis.mode: cluster`.
    pub redis_cluster: Option<StatefulSet>,
    /// The password Secret was generated in this reconcile.
    pub generated_secret: bool,
}

#[derive(Clone, Debug)]
pub struct AppliedRedis {
    pub statefulset: StatefulSet,
    pub sentinel_statefulset: StatefulSet,
}

/// A namespaced kind the operator writes, reads and deletes.
trait Owned:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + k8s_openapi::Resource
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
{
}

impl<K> Owned for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
{
}

async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, ApplyError>
where
    K: Owned,
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

/// Applies `object` like [`apply`], but when the API server refuses it as
/// invalid, notes the refusal in `skipped` and returns `None` instead of
/// failing, so the rest of the cluster is still applied.
async fn apply_or_skip<K>(
    client: &Client,
    namespace: &str,
    object: &K,
    skipped: &mut Skipped,
) -> Result<Option<K>, ApplyError>
where
    K: Owned,
{
    match apply(client, namespace, object).await {
        Ok(applied) => Ok(Some(applied)),
        Err(refused) if refused.is_refusal() => {
            warn!(error = %refused, "the API server refused an object; applying the rest");
            skipped.refused.push(refused);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Like [`apply_or_skip`], for an object whose status the status step
/// reads: a refused one is read as it runs (an empty object when there is
/// none), so the status still tells how its pods are doing.
async fn apply_and_observe<K>(
    client: &Client,
    namespace: &str,
    object: &K,
    skipped: &mut Skipped,
) -> Result<K, ApplyError>
where
    K: Owned + Default,
{
    if let Some(applied) = apply_or_skip(client, namespace, object, skipped).await? {
        return Ok(applied);
    }
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let live = api
        .get_opt(&name)
        .await
        .map_err(|source| ApplyError::Read {
            kind: <K as k8s_openapi::Resource>::KIND,
            name,
            source,
        })?;
    Ok(live.unwrap_or_default())
}

/// Deletes `name` if it exists and this MessagingCluster is its
/// controller; a missing object is not an error. An object of that name
/// that is not ours (another owner's, or nobody's) is left alone: logged
/// and named in `skipped.not_owned`. The delete carries the uid that was
/// checked as a precondition, so an object re-created under the same name
/// meanwhile is not deleted either.
async fn delete<K>(
    client: &Client,
    c: &ValidCluster,
    name: &str,
    skipped: &mut Skipped,
) -> Result<(), ApplyError>
where
    K: Owned,
{
    let kind = <K as k8s_openapi::Resource>::KIND;
    let failed = |source| ApplyError::Delete {
        kind,
        name: name.to_owned(),
        source,
    };
    let api: Api<K> = Api::namespaced(client.clone(), &c.names.namespace);
    let Some(existing) = api.get_opt(name).await.map_err(failed)? else {
        return Ok(());
    };
    if !controlled_by(existing.meta(), &c.owner.uid) {
        warn!(
            kind,
            name, "not deleting: the object is not controlled by this MessagingCluster"
        );
        skipped.not_owned.push(format!("{kind} {name}"));
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.meta().uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        // Gone meanwhile, or replaced by another object of that name (the
        // uid precondition failed): the next reconcile looks again.
        Err(kube::Error::Api(status)) if status.is_not_found() || status.code == 409 => Ok(()),
        Err(source) => Err(failed(source)),
    }
}

/// `meta` names the object with uid `owner_uid` as its controller.
fn controlled_by(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    owner_uid: &str,
) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == owner_uid)
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
) -> Result<(Applied, Skipped), ApplyError> {
    let names = &c.names;
    let Resources {
        config_map,
        server_deployment,
        service,
        server_pdb,
        redis,
        redis_cluster,
        hpa,
        ingress,
        network_policy,
    } = resources;
    let ns = names.namespace.as_str();
    let mut skipped = Skipped::default();
    let sk = &mut skipped;
    apply_or_skip(client, ns, config_map, sk).await?;
    // Built only when the operator runs Redis and found no Secret.
    let generated_secret = match new_secret {
        Some(secret) => create_secret(client, ns, secret).await?,
        None => false,
    };
    let applied_redis = match redis {
        Some(ManagedRedis {
            group_config,
            headless_service,
            statefulset,
            sentinel_service,
            sentinel_statefulset,
            redis_pdb,
            sentinel_pdb,
        }) => {
            apply_or_skip(client, ns, group_config, sk).await?;
            apply_or_skip(client, ns, headless_service, sk).await?;
            let statefulset = apply_and_observe::<StatefulSet>(client, ns, statefulset, sk).await?;
            apply_or_skip(client, ns, sentinel_service, sk).await?;
            let sentinel_statefulset =
                apply_and_observe::<StatefulSet>(client, ns, sentinel_statefulset, sk).await?;
            apply_or_skip(client, ns, redis_pdb, sk).await?;
            apply_or_skip(client, ns, sentinel_pdb, sk).await?;
            Some(AppliedRedis {
                statefulset,
                sentinel_statefulset,
            })
        }
        None => {
            // External Redis or a Redis Cluster: the managed group is no
            // longer wanted. The generated Secret stays (owned, so it goes
            // with the cluster).
            delete::<StatefulSet>(client, c, &names.redis, sk).await?;
            delete::<StatefulSet>(client, c, &names.sentinel, sk).await?;
            delete::<ConfigMap>(client, c, &redis_group::config_map_name(names), sk).await?;
            delete::<Service>(client, c, &names.redis, sk).await?;
            delete::<Service>(client, c, &names.sentinel, sk).await?;
            delete::<PodDisruptionBudget>(client, c, &names.redis, sk).await?;
            delete::<PodDisruptionBudget>(client, c, &names.sentinel, sk).await?;
            None
        }
    };
    let applied_cluster = match redis_cluster {
        Some(ManagedRedisCluster {
            headless_service,
            statefulset,
            pdb,
        }) => {
            apply_or_skip(client, ns, headless_service, sk).await?;
            let statefulset = apply_and_observe::<StatefulSet>(client, ns, statefulset, sk).await?;
            apply_or_skip(client, ns, pdb, sk).await?;
            Some(statefulset)
        }
        None => {
            delete::<StatefulSet>(client, c, &names.redis_cluster, sk).await?;
            delete::<Service>(client, c, &names.redis_cluster, sk).await?;
            delete::<PodDisruptionBudget>(client, c, &names.redis_cluster, sk).await?;
            None
        }
    };
    let server_deployment =
        apply_and_observe::<Deployment>(client, ns, server_deployment, sk).await?;
    apply_or_skip(client, ns, service, sk).await?;
    apply_or_skip(client, ns, server_pdb, sk).await?;
    match hpa {
        Some(hpa) => drop(apply_or_skip(client, ns, hpa, sk).await?),
        None => delete::<HorizontalPodAutoscaler>(client, c, &names.service, sk).await?,
    }
    match ingress {
        Some(ingress) => drop(apply_or_skip(client, ns, ingress, sk).await?),
        None => delete::<Ingress>(client, c, &names.service, sk).await?,
    }
    match network_policy {
        Some(policy) => drop(apply_or_skip(client, ns, policy, sk).await?),
        None => delete::<NetworkPolicy>(client, c, &names.redis, sk).await?,
    }
    let applied = Applied {
        server_deployment,
        redis: applied_redis,
        redis_cluster: applied_cluster,
        generated_secret,
    };
    Ok((applied, skipped))
}
