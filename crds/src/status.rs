//! `MessagingCluster.status`: what the operator observed and did.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a MessagingCluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagingClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Server pods (scale subresource `statusReplicasPath`).
    #[serde(default)]
    pub replicas: i32,
    /// Server pods passing `/readyz`.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the server pods (scale subresource `labelSelectorPath`).
    #[serde(default)]
    pub selector: String,
    /// The Redis group.
    #[serde(default)]
    pub redis: RedisStatus,
    /// Where clients connect.
    #[serde(default)]
    pub endpoints: EndpointsStatus,
    /// `Ready`, `Progressing`, `Degraded`, `RedisReady`; at most one of
    /// each type (a list-map keyed by `type`, so server-side apply merges
    /// them by type).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Observed state of the Redis group.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisStatus {
    /// `host:port` of the current master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    /// Redis pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Sentinel pods that are ready.
    #[serde(default)]
    pub sentinels_ready: i32,
}

/// In-cluster URLs of the fleet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointsStatus {
    /// WebSocket URL (`ws://<service>.<namespace>.svc:<port>/ws`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket: Option<String>,
    /// HTTP publish base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<String>,
}

/// Condition types set on a MessagingCluster.
pub mod condition {
    /// Every server pod is ready and Redis is ready.
    pub const READY: &str = "Ready";
    /// A rollout or scale is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// The spec cannot be applied or something is broken.
    pub const DEGRADED: &str = "Degraded";
    /// The Redis group has a master and its sentinels.
    pub const REDIS_READY: &str = "RedisReady";
}
