//! `chorus-operator render -f cluster.yaml`: the objects the operator would
//! write for a MessagingCluster, printed as YAML, without a cluster. The
//! same validate and build steps as the reconciler; what needs a cluster is
//! left out: the owner references carry a placeholder uid, and the
//! generated password Secret (a fresh random password) is not printed.

use chorus_crds::MessagingCluster;
use serde::Serialize;

use crate::build::{self, ManagedRedis, ManagedRedisCluster, Resources};
use crate::cluster;

/// The uid written into owner references: the API server assigns the real one.
pub const PLACEHOLDER_UID: &str = "00000000-0000-0000-0000-000000000000";

/// Rendering failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("reading the manifest: {0}")]
    Parse(#[from] serde_saphyr::Error),
    #[error("the MessagingCluster is invalid: {0}")]
    Invalid(#[from] cluster::InvalidSpec),
    #[error("writing YAML: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
}

/// The YAML documents for `manifest` (one MessagingCluster), in the order
/// the operator applies them. `namespace` fills in a missing one.
pub fn render(
    manifest: &str,
    namespace: &str,
    operator_namespace: &str,
) -> Result<String, RenderError> {
    let mut mc: MessagingCluster = serde_saphyr::from_str(manifest)?;
    mc.metadata
        .namespace
        .get_or_insert_with(|| namespace.to_owned());
    mc.metadata.uid = Some(PLACEHOLDER_UID.to_owned());
    mc.metadata.generation.get_or_insert(1);
    let c = cluster::validate(&mc, operator_namespace)?;
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
    } = build::build(&c);
    let mut docs = Vec::new();
    docs.push(yaml(&config_map)?);
    if let Some(ManagedRedis {
        group_config,
        headless_service,
        statefulset,
        sentinel_service,
        sentinel_statefulset,
        redis_pdb,
        sentinel_pdb,
    }) = redis
    {
        docs.push(yaml(&group_config)?);
        docs.push(yaml(&headless_service)?);
        docs.push(yaml(&statefulset)?);
        docs.push(yaml(&sentinel_service)?);
        docs.push(yaml(&sentinel_statefulset)?);
        docs.push(yaml(&redis_pdb)?);
        docs.push(yaml(&sentinel_pdb)?);
    }
    if let Some(ManagedRedisCluster {
        headless_service,
        statefulset,
        pdb,
    }) = redis_cluster
    {
        docs.push(yaml(&headless_service)?);
        docs.push(yaml(&statefulset)?);
        docs.push(yaml(&pdb)?);
    }
    docs.push(yaml(&server_deployment)?);
    docs.push(yaml(&service)?);
    docs.push(yaml(&server_pdb)?);
    for doc in [
        hpa.map(|o| yaml(&o)),
        ingress.map(|o| yaml(&o)),
        network_policy.map(|o| yaml(&o)),
    ]
    .into_iter()
    .flatten()
    {
        docs.push(doc?);
    }
    let mut out = String::new();
    if let Some(secret) = c.generated_secret() {
        out.push_str(&format!(
            "# Also created once, not shown: Secret {secret} with a generated Redis password.\n"
        ));
    }
    out.push_str(&docs.join("---\n"));
    Ok(out)
}

fn yaml<T: Serialize + k8s_openapi::Resource>(object: &T) -> Result<String, RenderError> {
    // apiVersion and kind first, as kubectl prints them.
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".to_owned(), T::API_VERSION.into());
        map.insert("kind".to_owned(), T::KIND.into());
    }
    Ok(serde_saphyr::to_string(&value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rendered documents, and `Kind name` of each.
    fn documents(out: &str) -> (Vec<serde_json::Value>, Vec<String>) {
        let docs: Vec<serde_json::Value> = out
            .split("---\n")
            .map(|d| serde_saphyr::from_str(d).expect("each document is YAML"))
            .collect();
        let kinds = docs
            .iter()
            .map(|d| {
                format!(
                    "{} {}",
                    d["kind"].as_str().unwrap_or(""),
                    d["metadata"]["name"].as_str().unwrap_or("")
                )
            })
            .collect();
        (docs, kinds)
    }

    #[test]
    fn the_kafka_example_renders_the_servers_only() {
        let manifest = include_str!("../../examples/kafka.yaml");
        let out = render(manifest, "team-a", "chorus-system").expect("renders");
        let (docs, kinds) = documents(&out);
        assert_eq!(
            kinds,
            [
                "ConfigMap chat-kafka-server",
                "Deployment chat-kafka-server",
                "Service chat-kafka",
                "PodDisruptionBudget chat-kafka-server",
            ]
        );
        assert_eq!(
            docs[0]["data"]["CHORUS_BROKER"],
            "kafka://my-kafka-kafka-bootstrap.kafka.svc:9092/chorus-chat"
        );
        assert!(!out.contains("redis-auth"), "no password Secret: {out}");
    }

    #[test]
    fn the_basic_example_renders_every_object_it_would_apply() {
        let manifest = include_str!("../../examples/basic.yaml");
        let out = render(manifest, "team-a", "chorus-system").expect("renders");
        let (docs, kinds) = documents(&out);
        assert_eq!(
            kinds,
            [
                "ConfigMap chat-server",
                "ConfigMap chat-redis-group",
                "Service chat-redis",
                "StatefulSet chat-redis",
                "Service chat-sentinel",
                "StatefulSet chat-sentinel",
                "PodDisruptionBudget chat-redis",
                "PodDisruptionBudget chat-sentinel",
                "Deployment chat-server",
                "Service chat",
                "PodDisruptionBudget chat-server",
                "NetworkPolicy chat-redis",
            ]
        );
        assert!(docs.iter().all(|d| d["metadata"]["namespace"] == "team-a"));
        assert!(
            out.contains("Secret chat-redis-auth"),
            "the generated Secret is named"
        );
    }

    #[test]
    fn the_redis_cluster_example_renders_the_cluster_and_no_sentinel_group() {
        let manifest = include_str!("../../examples/redis-cluster.yaml");
        let out = render(manifest, "team-a", "chorus-system").expect("renders");
        let (_, kinds) = documents(&out);
        assert_eq!(
            kinds,
            [
                "ConfigMap chat-sharded-server",
                "Service chat-sharded-redis-cluster",
                "StatefulSet chat-sharded-redis-cluster",
                "PodDisruptionBudget chat-sharded-redis-cluster",
                "Deployment chat-sharded-server",
                "Service chat-sharded",
                "PodDisruptionBudget chat-sharded-server",
                "NetworkPolicy chat-sharded-redis",
            ]
        );
        assert!(out.contains("Secret chat-sharded-redis-auth"));
    }

    #[test]
    fn an_invalid_manifest_is_refused_with_the_field() {
        let manifest = "apiVersion: chorus.dev/v1alpha1\nkind: MessagingCluster\nmetadata: {name: chat}\nspec: {ingress: {host: 'not a host'}}\n";
        let err = render(manifest, "default", "chorus-system").expect_err("invalid");
        assert!(err.to_string().contains("spec.ingress.host"), "{err}");
    }
}
