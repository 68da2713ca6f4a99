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
    /// The external Kafka of `delivery: kafka`, as the server pods see it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaStatus>,
    /// Where clients connect.
    #[serde(default)]
    pub endpoints: EndpointsStatus,
    /// `Ready`, `Progressing`, `Degraded`, `RedisReady` (`KafkaReachable`
    /// with `delivery: kafka`), `FleetHealthy`; at most one of
    /// each type (a list-map keyed by `type`, so server-side apply merges
    /// them by type).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// What the server pods report, read from their `/metrics` by the
    /// operator (every 15 s while the cluster is up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStatus>,
}

/// The server pods' own figures. Rates and the p99 cover the time since
/// the previous reading; totals count since each pod started.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetStatus {
    /// Open WebSocket connections, all pods.
    pub connections: i64,
    /// Rooms with a subscriber, summed over pods (a room with subscribers
    /// on three pods counts three times).
    pub rooms: i64,
    /// Messages handed to subscribers per second, all pods.
    pub deliveries_per_second: i64,
    /// Publish-to-delivery latency under which 99 % of the deliveries
    /// since the previous reading fell (`"2.5ms"`); absent without traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_p99: Option<String>,
    /// Connections closed because they did not read fast enough, summed
    /// over the pods' lifetimes.
    pub slow_consumers_dropped: i64,
    /// Pods that answered.
    pub pods_reporting: i32,
    /// Per pod, by name (at most 100).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub pods: Vec<FleetPodStatus>,
    /// The replica count the connection autoscaler asks for
    /// (`spec.autoscaling.connectionsPerPod`), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaler: Option<AutoscalerStatus>,
}

/// One server pod's figures.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetPodStatus {
    /// Pod name.
    pub name: String,
    /// Open WebSocket connections.
    pub connections: i64,
    /// Rooms with a subscriber on this pod.
    pub rooms: i64,
    /// Messages handed to its subscribers per second.
    pub deliveries_per_second: i64,
    /// Last round trip of its canary through the backplane (`"1.2ms"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_rtt: Option<String>,
    /// Its backplane works end to end (its canary comes back).
    pub broker_up: bool,
    /// Why its backplane is down, as its `/readyz` says, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_down: Option<String>,
    /// Why it could not be read, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The connection autoscaler's last decision.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerStatus {
    /// Server pods it asks for.
    pub desired_replicas: i32,
    /// Why (`"450 connections at 100 per pod"`).
    pub reason: String,
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
    /// Replicas streaming from the master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_linked: Option<i32>,
    /// How far the furthest-behind linked replica trails the master, in
    /// bytes of the replication stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_lag_bytes: Option<i64>,
    /// `redis.mode: cluster`: the Redis Cluster's shards as the operator
    /// saw them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<RedisClusterStatus>,
}

/// A managed Redis Cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisClusterStatus {
    /// `cluster_state` of `CLUSTER INFO` (`ok` or `fail`); absent before
    /// the cluster exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Slots served by a master (all 16384 when whole).
    #[serde(default)]
    pub slots_covered: i32,
    /// Slots still to move before every shard serves an even share
    /// (after `shards` grew).
    #[serde(default)]
    pub slots_to_move: i32,
    /// Each shard: its master and replicas, by pod name.
    #[serde(default)]
    pub shards: Vec<ShardStatus>,
    /// Why the cluster is not whole yet, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One shard of a managed Redis Cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// The master's pod.
    pub master: String,
    /// Slots it serves.
    pub slots: i32,
    /// The slot ranges, e.g. `0-5460` or `0-4095,12288-13652`.
    #[serde(default)]
    pub slot_ranges: String,
    /// Its replicas' pods.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// Replicas whose replication link to the master is up.
    #[serde(default)]
    pub replicas_linked: i32,
}

/// The external Kafka, as the server pods report it: each checks the
/// topic's metadata every second (`chorus_broker_up`, and why not in its
/// `/readyz`), and the operator reads them with the rest of `status.fleet`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaStatus {
    /// Every server pod that answered reaches Kafka (false while none has
    /// answered yet).
    pub reachable: bool,
    /// `spec.kafka.bootstrapServers`.
    #[serde(default)]
    pub bootstrap_servers: Vec<String>,
    /// The topic that carries the rooms.
    #[serde(default)]
    pub topic: String,
    /// Server pods that reach it, of those that answered.
    #[serde(default)]
    pub pods_reaching: i32,
    /// What the pods say: those that cannot reach it, and why.
    #[serde(default)]
    pub message: String,
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
    /// Every server pod is ready and Redis is ready (Kafka reachable).
    pub const READY: &str = "Ready";
    /// A rollout or scale is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// The spec cannot be applied or something is broken.
    pub const DEGRADED: &str = "Degraded";
    /// The Redis group has a master and its sentinels (`redis.mode:
    /// cluster`: the cluster is `ok` and every slot is served).
    pub const REDIS_READY: &str = "RedisReady";
    /// Every server pod answers and delivers through the backplane, none
    /// near its connection limit.
    pub const FLEET_HEALTHY: &str = "FleetHealthy";
    /// `delivery: kafka`, in place of `RedisReady`: every server pod
    /// reaches the external Kafka.
    pub const KAFKA_REACHABLE: &str = "KafkaReachable";
}
