//! `MessagingCluster.spec`: the desired fleet.
//!
//! Every optional field has a default, written twice on purpose: as a serde
//! default (so the API server stores it, via the schema's `default`) and in
//! the `Default` impls (so code that builds a spec in Rust sees the same
//! values). `spec_defaults_match_empty_manifest` keeps the two in step.

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::MessagingClusterStatus;

/// A horizontally scaled Chorus WebSocket fleet with its Redis Sentinel group.
#[allow(clippy::duplicated_attributes)] // several `printcolumn(type_ = ...)`: not duplicates
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "chorus.dev",
    version = "v1alpha1",
    kind = "MessagingCluster",
    plural = "messagingclusters",
    shortname = "mc",
    category = "all",
    namespaced,
    status = "MessagingClusterStatus",
    derive = "PartialEq",
    doc = "A horizontally scaled Chorus WebSocket messaging fleet",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        description = "Desired WebSocket server pods",
        json_path = ".spec.replicas"
    ),
    printcolumn(
        name = "Pods",
        type_ = "integer",
        description = "Ready WebSocket server pods",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Every server pod ready and Redis ready",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        description = "Open WebSocket connections, all pods",
        json_path = ".status.fleet.connections"
    ),
    printcolumn(
        name = "Delivery",
        type_ = "string",
        description = "pubsub (at-most-once), streams (history + recovery) or kafka (an external Kafka)",
        json_path = ".spec.delivery"
    ),
    printcolumn(
        name = "Master",
        type_ = "string",
        description = "Current Redis master",
        json_path = ".status.redis.master"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.autoscaling) || has(self.autoscaling.connectionsPerPod) || (has(self.resources) && has(self.resources.requests) && 'cpu' in self.resources.requests)",
        "message": "spec.resources.requests.cpu is required when spec.autoscaling scales on CPU (no connectionsPerPod): the autoscaler measures CPU use against it"
    },
    {
        "rule": "!has(self.autoscaling) || !has(self.autoscaling.deliveriesPerSecondPerPod) || has(self.autoscaling.connectionsPerPod)",
        "message": "spec.autoscaling.deliveriesPerSecondPerPod needs spec.autoscaling.connectionsPerPod: the operator's autoscaler reads both from the pods (the CPU autoscaler cannot)"
    },
    {
        "rule": "!has(self.delivery) || self.delivery != 'kafka' || has(self.kafka)",
        "message": "spec.kafka (with its bootstrapServers) is required when spec.delivery is kafka"
    },
    {
        "rule": "!has(self.kafka) || (has(self.delivery) && self.delivery == 'kafka')",
        "message": "spec.kafka is only used with spec.delivery: kafka; set delivery: kafka or remove spec.kafka"
    },
    {
        "rule": "!has(self.ingest) || has(self.ingest.bootstrapServers) || (has(self.delivery) && self.delivery == 'kafka')",
        "message": "spec.ingest.bootstrapServers is required unless delivery is kafka (whose spec.kafka.bootstrapServers it then uses)"
    },
    {
        "rule": "!has(self.upstream) || !has(self.upstream.topic) || (has(self.delivery) && self.delivery == 'kafka')",
        "message": "spec.upstream.topic is only used with delivery: kafka (with Redis the feed is the streams chorus:upstream:<room>); remove it"
    },
    {
        "rule": "!has(self.delivery) || self.delivery != 'kafka' || !has(self.redis) || !has(self.redis.mode) || self.redis.mode == 'managed'",
        "message": "spec.redis.mode must be left managed (the default) with delivery: kafka: the servers use Kafka only and the operator runs no Redis; remove spec.redis"
    }
]))]
pub struct MessagingClusterSpec {
    /// Number of WebSocket server pods.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Server image. Default: `chorus-server:<operator version>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Message delivery: `pubsub` (at-most-once fan-out), `streams`
    /// (durable history with recovery) or `kafka` (through the topic of an
    /// external Kafka, `spec.kafka`; no Redis).
    #[serde(default)]
    pub delivery: Delivery,

    /// The external Kafka of `delivery: kafka`; required with it, refused
    /// without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSpec>,

    /// Per-room history kept when `delivery: streams`.
    #[serde(default)]
    pub history: HistorySpec,

    /// Resources of the server containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// The client-facing Service.
    #[serde(default)]
    pub service: ServiceSpec,

    /// Redis used for fan-out: a managed Sentinel group, or an external one.
    #[serde(default)]
    pub redis: RedisSpec,

    /// Secrets the servers use to authenticate clients.
    #[serde(default)]
    pub auth: AuthSpec,

    /// Per-pod limits of the server.
    #[serde(default)]
    pub limits: LimitsSpec,

    /// Seconds a stopping pod spends asking its clients to reconnect elsewhere.
    #[serde(default = "default_drain_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub drain_seconds: i32,

    /// A HorizontalPodAutoscaler on this MessagingCluster; absent: no HPA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// Disruption budget of the server pods.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,

    /// An Ingress with cookie affinity in front of the Service; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSpec>,

    /// A NetworkPolicy letting only this cluster's pods (and the operator) reach Redis.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,

    /// Settings for the pods of each component (scheduling, labels, pull
    /// secrets, security context).
    #[serde(default, skip_serializing_if = "crate::overrides::PodsSpec::is_empty")]
    pub pods: crate::overrides::PodsSpec,

    /// Client publishes in matching rooms also go to backends: to Redis
    /// streams `chorus:upstream:<room>`, or with `delivery: kafka` to a
    /// Kafka topic keyed by room; absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamSpec>,

    /// Backend Kafka topics whose records the server pods publish into
    /// rooms (a consumer group shared by the pods); absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<IngestSpec>,

    /// A transactional outbox in PostgreSQL that every server pod relays
    /// to rooms in commit order; absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxSpec>,

    /// The servers' logs.
    #[serde(default)]
    pub logging: LoggingSpec,
}

impl Default for MessagingClusterSpec {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            image: None,
            delivery: Delivery::default(),
            kafka: None,
            history: HistorySpec::default(),
            resources: None,
            service: ServiceSpec::default(),
            redis: RedisSpec::default(),
            auth: AuthSpec::default(),
            limits: LimitsSpec::default(),
            drain_seconds: default_drain_seconds(),
            autoscaling: None,
            pod_disruption_budget: PodDisruptionBudgetSpec::default(),
            ingress: None,
            network_policy: NetworkPolicySpec::default(),
            pods: crate::overrides::PodsSpec::default(),
            upstream: None,
            ingest: None,
            outbox: None,
            logging: LoggingSpec::default(),
        }
    }
}

impl MessagingClusterSpec {
    /// The server image, falling back to the one matching this operator.
    pub fn image(&self) -> String {
        self.image.clone().unwrap_or_else(default_server_image)
    }

    /// `spec.kafka` when the servers use it (`delivery: kafka`).
    pub fn on_kafka(&self) -> Option<&KafkaSpec> {
        self.kafka
            .as_ref()
            .filter(|_| self.delivery == Delivery::Kafka)
    }
}

/// The server image matching this operator's version.
pub fn default_server_image() -> String {
    format!("chorus-server:{}", env!("CARGO_PKG_VERSION"))
}

fn default_replicas() -> i32 {
    3
}

fn default_drain_seconds() -> i32 {
    30
}

/// How messages reach subscribers on other pods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// At-most-once fan-out through Redis Pub/Sub.
    #[default]
    Pubsub,
    /// Durable history with recovery through Redis Streams.
    Streams,
    /// Fan-out, ordering and recovery through the partitions of one topic
    /// of an external Kafka (`spec.kafka`); no Redis.
    Kafka,
}

impl Delivery {
    /// The value as written in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Pubsub => "pubsub",
            Delivery::Streams => "streams",
            Delivery::Kafka => "kafka",
        }
    }

    /// The value of the server's `--delivery` flag: its modes are the
    /// Redis backplane's; on Kafka (`--broker kafka://…`) the servers run
    /// `pubsub`, and Kafka keeps the history.
    pub fn server_mode(self) -> &'static str {
        match self {
            Delivery::Pubsub | Delivery::Kafka => "pubsub",
            Delivery::Streams => "streams",
        }
    }
}

/// An external Kafka (e.g. one run by Strimzi) that the servers fan out
/// through: rooms hash to the partitions of one topic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// `host:port` of brokers to bootstrap from (the servers learn the
    /// others from them); two or more keep working when one is down.
    #[schemars(length(min = 1, max = 32), inner(pattern(r"^[^\s,/@]+:[0-9]{1,5}$")))]
    pub bootstrap_servers: Vec<String>,
    /// The topic that carries the rooms; absent: `chorus-<metadata.name>`.
    /// Created by the servers when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), pattern(r"^[A-Za-z0-9._-]+$"))]
    pub topic: Option<String>,
    /// Partitions of the topic when the servers create it (an existing
    /// topic keeps its own count).
    #[serde(default = "default_kafka_partitions")]
    #[schemars(range(min = 1, max = 10_000))]
    pub partitions: i32,
    /// Bound on a publish (acknowledged by every in-sync replica) and on
    /// metadata requests, e.g. `5s`, `1500ms`; a publish not acknowledged
    /// in time gets `outcome_unknown`.
    #[serde(default = "default_kafka_timeout")]
    #[schemars(pattern(r"^[1-9][0-9]{0,6}(ms|s|m)$"))]
    pub timeout: String,
}

impl KafkaSpec {
    /// The topic, given the MessagingCluster's name.
    pub fn topic_of(&self, cluster: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("chorus-{cluster}"))
    }
}

fn default_kafka_partitions() -> i32 {
    12
}

fn default_kafka_timeout() -> String {
    "5s".to_owned()
}

/// Room history kept in Redis Streams.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistorySpec {
    /// Messages kept per room.
    #[serde(default = "default_history_size")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub size: i32,
    /// How long messages are kept, e.g. `90s`, `10m`, `24h`.
    #[serde(default = "default_history_ttl")]
    #[schemars(pattern(r"^[1-9][0-9]{0,6}(s|m|h)$"))]
    pub ttl: String,
}

impl Default for HistorySpec {
    fn default() -> Self {
        Self {
            size: default_history_size(),
            ttl: default_history_ttl(),
        }
    }
}

fn default_history_size() -> i32 {
    1000
}

fn default_history_ttl() -> String {
    "10m".to_owned()
}

/// The client-facing Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP`, `LoadBalancer` or `NodePort`.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Port clients connect to.
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Sticky sessions: a client IP keeps reaching the same pod (or, with
    /// `type: None`, any pod: a reconnecting client recovers from the
    /// backplane wherever it lands).
    #[serde(default)]
    pub session_affinity: SessionAffinitySpec,
    /// Annotations of the Service (a cloud load balancer's settings, say).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_service_port(),
            session_affinity: SessionAffinitySpec::default(),
            annotations: std::collections::BTreeMap::new(),
        }
    }
}

fn default_service_port() -> i32 {
    80
}

/// Kubernetes Service type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    LoadBalancer,
    NodePort,
}

impl ServiceType {
    /// The Service's `spec.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::NodePort => "NodePort",
        }
    }
}

/// Session affinity of the Service (and the Ingress's cookie).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinitySpec {
    /// `ClientIP`: a client IP keeps reaching the same pod (the Ingress,
    /// if any, pins with a cookie). `None`: every connection may land on
    /// any pod, which spreads clients that share an IP (behind a NAT or a
    /// load balancer that does not keep source IPs) and lets the
    /// operator's rebalance move clients after a scale-out.
    #[serde(default, rename = "type")]
    pub type_: AffinityType,
    /// How long a client IP sticks to its pod (Kubernetes allows up to a day).
    #[serde(default = "default_affinity_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: i32,
}

impl Default for SessionAffinitySpec {
    fn default() -> Self {
        Self {
            type_: AffinityType::default(),
            timeout_seconds: default_affinity_timeout(),
        }
    }
}

/// Kubernetes Service session affinity.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AffinityType {
    #[default]
    ClientIP,
    None,
}

impl SessionAffinitySpec {
    /// Clients are pinned to their pods.
    pub fn sticky(&self) -> bool {
        self.type_ == AffinityType::ClientIP
    }
}

fn default_affinity_timeout() -> i32 {
    10800
}

/// Redis used by the servers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.mode != 'external' || has(self.external)",
        "message": "spec.redis.external (with its url) is required when spec.redis.mode is external"
    },
    {
        "rule": "self.mode == 'external' || !has(self.external)",
        "message": "spec.redis.external must not be set when spec.redis.mode is managed or cluster"
    },
    {
        "rule": "self.sentinels % 2 == 1",
        "message": "spec.redis.sentinels must be odd (1, 3, 5...) so that a majority can agree on a failover"
    },
    {
        "rule": "self.mode == 'external' || self.mode != oldSelf.mode || (has(self.storage) == has(oldSelf.storage) && (!has(self.storage) || self.storage == oldSelf.storage))",
        "message": "spec.redis.storage cannot change while the managed Redis group exists: a StatefulSet's volumes are fixed when it is created. Create a new MessagingCluster with the storage you want and move clients to it, or delete and re-create this one (its Redis data is lost)"
    },
    {
        "rule": "self.mode == 'cluster' || !has(self.cluster)",
        "message": "spec.redis.cluster is only read when spec.redis.mode is cluster: remove it, or set the mode"
    },
    {
        "rule": "self.mode != 'cluster' || oldSelf.mode != 'cluster' || (has(self.cluster) ? self.cluster.shards : 3) >= (has(oldSelf.cluster) ? oldSelf.cluster.shards : 3)",
        "message": "spec.redis.cluster.shards cannot shrink: the operator adds shards and moves slots onto them, but never empties a shard (its pods would be removed with their slots). Create a new MessagingCluster with fewer shards and move clients to it"
    },
    {
        "rule": "self.mode != 'cluster' || oldSelf.mode != 'cluster' || (has(self.cluster) ? self.cluster.replicasPerShard : 1) >= (has(oldSelf.cluster) ? oldSelf.cluster.replicasPerShard : 1)",
        "message": "spec.redis.cluster.replicasPerShard cannot shrink: removing pods could remove a shard's master with its slots"
    }
]))]
pub struct RedisSpec {
    /// `managed` (the operator runs Redis + Sentinel), `cluster` (the
    /// operator runs a Redis Cluster: sharded Pub/Sub) or `external`.
    #[serde(default)]
    pub mode: RedisMode,
    /// Redis pods in the managed group (1 master + replicas).
    #[serde(default = "default_redis_replicas")]
    #[schemars(range(min = 1, max = 9))]
    pub replicas: i32,
    /// Sentinel pods in the managed group (odd).
    #[serde(default = "default_sentinels")]
    #[schemars(range(min = 1, max = 9))]
    pub sentinels: i32,
    /// Redis image of the managed group (also runs the sentinels).
    #[serde(default = "default_redis_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Persistent volumes with AOF persistence; absent: data lives on the
    /// pods' own volumes (AOF on them in `delivery: streams`). Fixed while
    /// the managed group exists: the API server refuses a change (a
    /// StatefulSet's volume claims are immutable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// Resources of the Redis containers. Default: requests 100m CPU and
    /// 128Mi, limit 512Mi. A memory limit sets Redis's `maxmemory` to 80 % of
    /// it, with no eviction: a full Redis refuses publishes instead of
    /// dropping history.
    #[serde(default = "default_redis_resources")]
    pub resources: Option<ResourceRequirements>,
    /// The external Redis, required when `mode: external`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRedisSpec>,
    /// Shape of the Redis Cluster when `mode: cluster`; absent: 3 shards of
    /// a master and a replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<RedisClusterSpec>,
    /// Secret key holding the Redis password; absent: the operator generates
    /// one in `Secret <name>-redis-auth` and keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
}

impl Default for RedisSpec {
    fn default() -> Self {
        Self {
            mode: RedisMode::default(),
            replicas: default_redis_replicas(),
            sentinels: default_sentinels(),
            image: default_redis_image(),
            storage: None,
            resources: default_redis_resources(),
            external: None,
            cluster: None,
            password_secret_ref: None,
        }
    }
}

impl RedisSpec {
    /// The cluster's shape in `mode: cluster` (the defaults when absent).
    pub fn cluster_shape(&self) -> RedisClusterSpec {
        self.cluster.clone().unwrap_or_default()
    }
}

/// The shape of a managed Redis Cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisClusterSpec {
    /// Masters, each serving an even share of the 16384 slots. May grow
    /// (the operator adds pods and moves slots to them, a bounded number
    /// per reconcile), never shrink.
    #[serde(default = "default_cluster_shards")]
    #[schemars(range(min = 3, max = 100))]
    pub shards: i32,
    /// Replicas of each shard's master; one takes over when the master
    /// fails (Redis Cluster's own failover). May grow, never shrink.
    #[serde(default = "default_replicas_per_shard")]
    #[schemars(range(min = 0, max = 5))]
    pub replicas_per_shard: i32,
}

impl Default for RedisClusterSpec {
    fn default() -> Self {
        Self {
            shards: default_cluster_shards(),
            replicas_per_shard: default_replicas_per_shard(),
        }
    }
}

impl RedisClusterSpec {
    /// Pods of the cluster: every shard's master and replicas.
    pub fn pods(&self) -> i32 {
        self.shards * (1 + self.replicas_per_shard)
    }
}

fn default_cluster_shards() -> i32 {
    3
}

fn default_replicas_per_shard() -> i32 {
    1
}

fn default_redis_replicas() -> i32 {
    3
}

fn default_sentinels() -> i32 {
    3
}

fn default_redis_resources() -> Option<ResourceRequirements> {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let q = |s: &str| Quantity(s.to_owned());
    Some(ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_owned(), q("100m")),
                ("memory".to_owned(), q("128Mi")),
            ]
            .into(),
        ),
        limits: Some([("memory".to_owned(), q("512Mi"))].into()),
        ..Default::default()
    })
}

fn default_redis_image() -> String {
    "redis:7.0".to_owned()
}

/// Who runs Redis.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// The operator runs a Redis + Sentinel group for this cluster.
    #[default]
    Managed,
    /// The servers use the Redis given in `external.url`.
    External,
    /// The operator runs a Redis Cluster (`cluster`: shards and replicas)
    /// and the servers use sharded Pub/Sub on it.
    Cluster,
}

/// Persistent storage of the managed Redis pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each Redis pod's volume, e.g. `1Gi`.
    #[serde(default = "default_storage_size")]
    #[schemars(
        length(max = 64),
        pattern(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
    )]
    pub size: String,
    /// StorageClass of the volumes; absent: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

fn default_storage_size() -> String {
    "1Gi".to_owned()
}

/// An existing Redis.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalRedisSpec {
    /// `redis://host:port[/db]`,
    /// `redis+sentinel://host:port[,host:port...]/<master-name>` or
    /// `redis+cluster://host:port[,host:port...]` (a Redis Cluster: sharded
    /// Pub/Sub), without a password (use `passwordSecretRef`).
    #[schemars(pattern(r"^redis(\+sentinel|\+cluster)?://[^@\s]+$"))]
    pub url: String,
}

/// A key in a Secret of the MessagingCluster's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Client authentication of the servers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Secret key holding the HMAC secret that client JWTs are signed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding the API key for HTTP publishing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding a PEM public key that client JWTs are signed
    /// for (RS256 or ES256), instead of or besides `jwtSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_public_key_secret_ref: Option<SecretKeyRef>,
}

/// Per-pod limits of the server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Largest WebSocket frame accepted from a client, in bytes.
    #[serde(default = "default_max_frame_bytes")]
    #[schemars(range(min = 256, max = 16_777_216))]
    pub max_frame_bytes: i32,
    /// Messages queued per subscriber before it counts as a slow consumer.
    #[serde(default = "default_send_queue")]
    #[schemars(range(min = 1, max = 65536))]
    pub send_queue: i32,
    /// WebSocket connections one pod accepts. Absent: derived from the
    /// server pods' memory limit (`resources.limits.memory`), 16 KiB per
    /// connection after 64 MiB for the process; 10000 without a limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections_per_pod: Option<i32>,
    /// Publishes per second one connection may send (burst: one second's
    /// worth); more are answered `rate_limited`. 0: no limit.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_publish_rate: i32,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_frame_bytes: default_max_frame_bytes(),
            send_queue: default_send_queue(),
            max_connections_per_pod: None,
            max_publish_rate: 0,
        }
    }
}

fn default_max_frame_bytes() -> i32 {
    65536
}

fn default_send_queue() -> i32 {
    256
}

/// HorizontalPodAutoscaler settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.minReplicas <= self.maxReplicas",
        "message": "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas"
    }
]))]
pub struct AutoscalingSpec {
    /// Fewest server pods.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most server pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilisation the autoscaler aims at.
    #[serde(default = "default_target_cpu")]
    #[schemars(range(min = 1, max = 100))]
    #[serde(rename = "targetCPUUtilizationPercentage")]
    pub target_cpu_utilization_percentage: i32,
    /// Scale on WebSocket connections instead of CPU: the operator reads
    /// them from the pods and keeps about this many per pod (no
    /// HorizontalPodAutoscaler, no metrics adapter). A pod it removes is
    /// drained first; after a scale-out it moves connections to the new
    /// pods with paced `reconnect`s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub connections_per_pod: Option<i32>,
    /// With `connectionsPerPod`: also keep deliveries (messages handed to
    /// subscribers) under this many per second per pod; the larger of the
    /// two pod counts wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub deliveries_per_second_per_pod: Option<i32>,
}

fn default_min_replicas() -> i32 {
    2
}

fn default_target_cpu() -> i32 {
    70
}

/// Disruption budget of the server pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Server pods that may be down at once during voluntary disruptions.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 0))]
    pub max_unavailable: i32,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
        }
    }
}

fn default_max_unavailable() -> i32 {
    1
}

/// An Ingress in front of the client Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// Host name clients use, e.g. `chat.example.com`.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// IngressClass; absent: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Secret with the TLS certificate for `host`; absent: plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
}

/// NetworkPolicy for the managed Redis.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create `NetworkPolicy <name>-redis`: only this cluster's pods and the
    /// operator's namespace reach Redis and Sentinel.
    #[serde(default = "default_network_policy_enabled")]
    pub enabled: bool,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: default_network_policy_enabled(),
        }
    }
}

/// On by default: whoever reaches a sentinel can point it at a host of
/// their own and collect the Redis password from every server.
fn default_network_policy_enabled() -> bool {
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn spec_defaults_match_empty_manifest() {
        let parsed: MessagingClusterSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, MessagingClusterSpec::default());
        assert_eq!(parsed.replicas, 3);
        assert_eq!(parsed.delivery, Delivery::Pubsub);
        assert_eq!(parsed.history.size, 1000);
        assert_eq!(parsed.history.ttl, "10m");
        assert_eq!(parsed.service.type_, ServiceType::ClusterIP);
        assert_eq!(parsed.service.port, 80);
        assert_eq!(parsed.service.session_affinity.timeout_seconds, 10800);
        assert_eq!(parsed.redis.mode, RedisMode::Managed);
        assert_eq!((parsed.redis.replicas, parsed.redis.sentinels), (3, 3));
        assert_eq!(parsed.pod_disruption_budget.max_unavailable, 1);
        assert!(parsed.network_policy.enabled, "NetworkPolicy on by default");
        assert_eq!(
            parsed.image(),
            format!("chorus-server:{}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn nested_defaults_fill_partial_objects() {
        let parsed: MessagingClusterSpec = serde_json::from_value(serde_json::json!({
            "service": {"type": "LoadBalancer"},
            "autoscaling": {"maxReplicas": 10},
            "redis": {"storage": {}}
        }))
        .unwrap();
        assert_eq!(parsed.service.type_, ServiceType::LoadBalancer);
        assert_eq!(parsed.service.port, 80);
        let autoscaling = parsed.autoscaling.unwrap();
        assert_eq!(autoscaling.min_replicas, 2);
        assert_eq!(autoscaling.target_cpu_utilization_percentage, 70);
        assert_eq!(parsed.redis.storage.unwrap().size, "1Gi");
    }

    #[test]
    fn kafka_fills_its_defaults_and_names_its_topic_after_the_cluster() {
        let parsed: MessagingClusterSpec = serde_json::from_value(serde_json::json!({
            "delivery": "kafka",
            "kafka": {"bootstrapServers": ["kafka-0.infra:9092"]}
        }))
        .unwrap();
        assert_eq!(parsed.delivery, Delivery::Kafka);
        assert_eq!(parsed.delivery.server_mode(), "pubsub");
        let kafka = parsed.kafka.unwrap();
        assert_eq!((kafka.partitions, kafka.timeout.as_str()), (12, "5s"));
        assert_eq!(kafka.topic_of("chat"), "chorus-chat");
        let named = KafkaSpec {
            topic: Some("rooms".into()),
            ..kafka
        };
        assert_eq!(named.topic_of("chat"), "rooms");
    }
}

/// Client publishes copied for backends: to Redis streams, or with
/// `delivery: kafka` to a Kafka topic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// Room names or `prefix:*` patterns (`*`: every room).
    #[schemars(length(min = 1, max = 64))]
    pub rooms: Vec<String>,
    /// Entries kept per room's stream (approximately; Redis only).
    #[serde(default = "default_upstream_max_len")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_len: i64,
    /// With `delivery: kafka`: the topic the publishes are written to
    /// (keyed by room, acknowledged before the publisher's `ok`); absent:
    /// `chorus-<metadata.name>-upstream`. Created by the servers when
    /// missing. Not used with Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), pattern(r"^[A-Za-z0-9._-]+$"))]
    pub topic: Option<String>,
}

impl UpstreamSpec {
    /// The Kafka topic of the feed, given the MessagingCluster's name.
    pub fn topic_of(&self, cluster: &str) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("chorus-{cluster}-upstream"))
    }
}

fn default_upstream_max_len() -> i64 {
    100_000
}

/// Backend Kafka topics published into rooms (`--kafka-ingest`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestSpec {
    /// `host:port` of the Kafka brokers to read from; absent: those of
    /// `spec.kafka` (required unless `delivery: kafka`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), inner(pattern(r"^[^\s,/@]+:[0-9]{1,5}$")))]
    pub bootstrap_servers: Option<Vec<String>>,
    /// Topics to read. Each record goes to the room in its `chorus-room`
    /// header, else its key.
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 249), pattern(r"^[A-Za-z0-9._-]+$"))
    )]
    pub topics: Vec<String>,
    /// Consumer group of the server pods; absent: `chorus-<metadata.name>-ingest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249))]
    pub group: Option<String>,
    /// Failed publishes of one record (timeouts, an overloaded broker)
    /// before it goes to the dead-letter topic.
    #[serde(default = "default_ingest_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub attempts: i32,
    /// Dead-letter topic of every ingested topic; absent:
    /// `<topic>.dead-letter` for each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), pattern(r"^[A-Za-z0-9._-]+$"))]
    pub dead_letter_topic: Option<String>,
}

impl IngestSpec {
    /// The consumer group, given the MessagingCluster's name.
    pub fn group_of(&self, cluster: &str) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("chorus-{cluster}-ingest"))
    }

    /// The brokers to read from: the ingest's own, else `spec.kafka`'s.
    pub fn servers<'a>(&'a self, kafka: Option<&'a KafkaSpec>) -> Option<&'a [String]> {
        self.bootstrap_servers
            .as_deref()
            .or(kafka.map(|k| k.bootstrap_servers.as_slice()))
    }
}

fn default_ingest_attempts() -> i32 {
    5
}

/// The transactional outbox the servers relay (`--outbox`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxSpec {
    /// Secret key holding the PostgreSQL connection string
    /// (`postgres://user:password@host:5432/db`), mounted as a file.
    pub dsn_secret_ref: SecretKeyRef,
    /// The outbox table, `name` or `schema.name`.
    #[serde(default = "default_outbox_table")]
    #[schemars(pattern(r"^([a-z_][a-z0-9_]{0,47}\.)?[a-z_][a-z0-9_]{0,47}$"))]
    pub table: String,
    /// Create the table, its sequence and commit trigger when missing
    /// (needs `CREATE` on the schema).
    #[serde(default)]
    pub init: bool,
}

fn default_outbox_table() -> String {
    "chorus_outbox".to_owned()
}

/// The servers' logs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoggingSpec {
    /// `RUST_LOG` filter of the servers, e.g. `info` or `debug,hyper=info`.
    #[serde(default = "default_log_level")]
    #[schemars(length(min = 1, max = 512))]
    pub level: String,
    /// `json` or `text`.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LoggingSpec {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::default(),
        }
    }
}

fn default_log_level() -> String {
    "info".to_owned()
}

/// Log line format.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }
}
