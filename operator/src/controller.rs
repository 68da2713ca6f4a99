//! Wires the reconciler into a kube-runtime `Controller` that watches
//! MessagingClusters and the objects they own.

use std::{fmt::Debug, future::Future, sync::Arc};

use chorus_crds::MessagingCluster;
use futures_util::StreamExt;
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::{Deployment, StatefulSet},
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{ConfigMap, Service},
        networking::v1::{Ingress, NetworkPolicy},
        policy::v1::PodDisruptionBudget,
    },
};
use kube::{
    Api, Client, Resource,
    runtime::{Controller, watcher},
};
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

use crate::build::meta::MANAGED_BY;
use crate::reconcile::{Context, error_policy, reconcile};

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    // Only watch what this operator manages.
    let owned =
        || watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    Controller::new(
        scoped::<MessagingCluster>(&client, ns),
        watcher::Config::default(),
    )
    .owns(scoped::<ConfigMap>(&client, ns), owned())
    .owns(scoped::<Deployment>(&client, ns), owned())
    .owns(scoped::<StatefulSet>(&client, ns), owned())
    .owns(scoped::<Service>(&client, ns), owned())
    .owns(scoped::<PodDisruptionBudget>(&client, ns), owned())
    .owns(scoped::<HorizontalPodAutoscaler>(&client, ns), owned())
    .owns(scoped::<Ingress>(&client, ns), owned())
    .owns(scoped::<NetworkPolicy>(&client, ns), owned())
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        match result {
            Ok((object, action)) => debug!(%object, ?action, "reconciled"),
            Err(e) => warn!(error = %e, "controller"),
        }
    })
    .await;
}
