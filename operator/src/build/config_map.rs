//! `ConfigMap <name>-server`: the server's settings as `CHORUS_*` variables
//! (every server flag `--x-y` reads `CHORUS_X_Y`), loaded with `envFrom`.

use std::collections::BTreeMap;

use chorus_crds::{MessagingClusterSpec, RedisMode, SecretKeyRef};
use k8s_openapi::api::core::v1::ConfigMap;

use super::meta::{Component, Names, SENTINEL_MASTER_NAME, SERVER_PORT, object_meta};
use crate::cluster::ValidCluster;

/// Where the Redis password Secret is mounted in server pods.
pub const REDIS_PASSWORD_FILE: &str = "/var/run/chorus/redis/password";
/// Where the JWT secret is mounted in server pods.
pub const JWT_SECRET_FILE: &str = "/var/run/chorus/jwt/secret";
/// Where the API key is mounted in server pods.
pub const API_KEY_FILE: &str = "/var/run/chorus/api-key/key";
/// Where the JWT public key (PEM) is mounted in server pods.
pub const JWT_PUBLIC_KEY_FILE: &str = "/var/run/chorus/jwt-public-key/key.pem";
/// Where the outbox's PostgreSQL connection string is mounted in server pods.
pub const OUTBOX_DSN_FILE: &str = "/var/run/chorus/outbox/dsn";
/// Key of the generated password in `Secret <name>-redis-auth`.
pub const GENERATED_PASSWORD_KEY: &str = "password";

/// The Secret key holding the Redis password the servers (and the managed
/// Redis) use, if any: the user's `passwordSecretRef`, else the generated
/// Secret in managed mode, else none (external Redis without a password).
pub fn redis_password_ref(spec: &MessagingClusterSpec, names: &Names) -> Option<SecretKeyRef> {
    // On Kafka the servers use no Redis.
    if crate::cluster::on_kafka(spec).is_some() {
        return None;
    }
    match (&spec.redis.password_secret_ref, spec.redis.mode) {
        (Some(r), _) => Some(r.clone()),
        (None, RedisMode::Managed | RedisMode::Cluster) => Some(SecretKeyRef {
            name: names.redis_auth_secret.clone(),
            key: GENERATED_PASSWORD_KEY.to_owned(),
        }),
        (None, RedisMode::External) => None,
    }
}

/// The Secret key holding the outbox's connection string, if the outbox is on.
pub fn outbox_dsn_ref(spec: &MessagingClusterSpec) -> Option<SecretKeyRef> {
    spec.outbox.as_ref().map(|o| o.dsn_secret_ref.clone())
}

/// `kafka://<servers>/<topics>` as the servers' Kafka flags take it.
fn kafka_url(servers: &[String], topics: &str) -> String {
    format!("kafka://{}/{topics}", servers.join(","))
}

/// The broker URL the servers connect to (never carries the password).
pub fn broker_url(spec: &MessagingClusterSpec, names: &Names) -> String {
    if let Some(kafka) = crate::cluster::on_kafka(spec) {
        return kafka_url(&kafka.bootstrap_servers, &kafka.topic_of(&names.instance));
    }
    match (&spec.redis.external, spec.redis.mode) {
        (Some(external), RedisMode::External) => external.url.clone(),
        (_, RedisMode::Cluster) => super::redis_cluster::broker_url(names),
        _ => {
            // Every sentinel by its own name: a client that finds one
            // silent asks the next.
            let sentinels: Vec<String> = (0..spec.redis.sentinels)
                .map(|i| super::redis_group::sentinel_member(names, i))
                .collect();
            format!(
                "redis+sentinel://{}/{SENTINEL_MASTER_NAME}",
                sentinels.join(",")
            )
        }
    }
}

/// The server settings, keyed by environment variable.
pub fn server_env(spec: &MessagingClusterSpec, names: &Names) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        env.insert(k.to_owned(), v);
    };
    set("CHORUS_LISTEN", format!("0.0.0.0:{SERVER_PORT}"));
    set("CHORUS_BROKER", broker_url(spec, names));
    set("CHORUS_DELIVERY", spec.delivery.server_mode().to_owned());
    if let Some(kafka) = crate::cluster::on_kafka(spec) {
        set("CHORUS_KAFKA_PARTITIONS", kafka.partitions.to_string());
        set("CHORUS_KAFKA_TIMEOUT", kafka.timeout.clone());
    }
    set("CHORUS_HISTORY_SIZE", spec.history.size.to_string());
    set("CHORUS_HISTORY_TTL", spec.history.ttl.clone());
    set(
        "CHORUS_MAX_FRAME_BYTES",
        spec.limits.max_frame_bytes.to_string(),
    );
    set("CHORUS_SEND_QUEUE", spec.limits.send_queue.to_string());
    set(
        "CHORUS_MAX_CONNECTIONS",
        crate::cluster::max_connections(spec).to_string(),
    );
    set("CHORUS_DRAIN_SECONDS", spec.drain_seconds.to_string());
    set("CHORUS_LOG_FORMAT", spec.logging.format.as_str().to_owned());
    set("RUST_LOG", spec.logging.level.clone());
    if spec.limits.max_publish_rate > 0 {
        set(
            "CHORUS_MAX_PUBLISH_RATE",
            spec.limits.max_publish_rate.to_string(),
        );
    }
    if let Some(upstream) = &spec.upstream {
        set("CHORUS_UPSTREAM_ROOMS", upstream.rooms.join(","));
        match crate::cluster::on_kafka(spec) {
            // The feed is a topic on the same Kafka cluster.
            Some(kafka) => set(
                "CHORUS_UPSTREAM_KAFKA",
                kafka_url(
                    &kafka.bootstrap_servers,
                    &upstream.topic_of(&names.instance),
                ),
            ),
            None => set("CHORUS_UPSTREAM_MAXLEN", upstream.max_len.to_string()),
        }
    }
    if let Some(ingest) = &spec.ingest
        && let Some(servers) = ingest.servers(crate::cluster::on_kafka(spec))
    {
        set(
            "CHORUS_KAFKA_INGEST",
            kafka_url(servers, &ingest.topics.join(",")),
        );
        set(
            "CHORUS_KAFKA_INGEST_GROUP",
            ingest.group_of(&names.instance),
        );
        set("CHORUS_KAFKA_INGEST_ATTEMPTS", ingest.attempts.to_string());
        if let Some(dead) = &ingest.dead_letter_topic {
            set("CHORUS_KAFKA_INGEST_DEAD_LETTER", dead.clone());
        }
    }
    if let Some(outbox) = &spec.outbox {
        set("CHORUS_OUTBOX_DSN_FILE", OUTBOX_DSN_FILE.to_owned());
        set("CHORUS_OUTBOX_TABLE", outbox.table.clone());
        if outbox.init {
            set("CHORUS_OUTBOX_INIT", "true".to_owned());
        }
    }
    if redis_password_ref(spec, names).is_some() {
        set("CHORUS_REDIS_PASSWORD_FILE", REDIS_PASSWORD_FILE.to_owned());
    }
    if spec.auth.jwt_secret_ref.is_some() {
        set("CHORUS_JWT_SECRET_FILE", JWT_SECRET_FILE.to_owned());
    }
    if spec.auth.api_key_secret_ref.is_some() {
        set("CHORUS_API_KEY_FILE", API_KEY_FILE.to_owned());
    }
    if spec.auth.jwt_public_key_secret_ref.is_some() {
        set("CHORUS_JWT_PUBLIC_KEY_FILE", JWT_PUBLIC_KEY_FILE.to_owned());
    }
    env
}

pub fn build(c: &ValidCluster) -> ConfigMap {
    let names = &c.names;
    ConfigMap {
        metadata: object_meta(c, &names.server, Component::Server),
        data: Some(server_env(&c.spec, names)),
        ..Default::default()
    }
}

/// Hash of everything in the server pods' configuration that does not show
/// in the pod template itself: the ConfigMap's data and which Secret keys
/// are mounted. Written as an annotation on the pod template so that a
/// change rolls the pods. FNV-1a, so the value is stable across Rust
/// releases (a changed hash after an operator upgrade would roll every fleet).
pub fn hash(config_map: &ConfigMap, spec: &MessagingClusterSpec) -> String {
    let entries = config_map
        .data
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}\n"));
    let refs = [
        ("redis", spec.redis.password_secret_ref.as_ref()),
        ("jwt", spec.auth.jwt_secret_ref.as_ref()),
        ("api-key", spec.auth.api_key_secret_ref.as_ref()),
        (
            "jwt-public-key",
            spec.auth.jwt_public_key_secret_ref.as_ref(),
        ),
        ("outbox", spec.outbox.as_ref().map(|o| &o.dsn_secret_ref)),
    ]
    .into_iter()
    .filter_map(|(what, r)| r.map(|r| format!("{what}:{}/{}\n", r.name, r.key)));
    let parts: Vec<String> = entries.chain(refs).collect();
    fnv1a(parts.iter().map(String::as_str))
}

/// FNV-1a of the concatenated parts, as 16 hex digits: stable across Rust
/// releases, unlike `std`'s hasher (a changed hash after an operator
/// upgrade would roll every fleet).
pub fn fnv1a<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Fnv1a::default();
    for part in parts {
        h.write(part.as_bytes());
    }
    format!("{:016x}", h.0)
}

struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{TestCluster, UID, valid};
    use super::*;
    use chorus_crds::MessagingCluster;
    use chorus_crds::{Delivery, OutboxSpec, RedisMode, SecretKeyRef};

    fn env_of(mc: &MessagingCluster) -> BTreeMap<String, String> {
        build(&valid(mc)).data.expect("data")
    }

    #[test]
    fn managed_cluster_env_points_at_its_sentinels() {
        let mc = MessagingCluster::test();
        let c = valid(&mc);
        let cm = build(&c);
        assert_eq!(cm.metadata.name.as_deref(), Some("chat-server"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(cm.metadata.owner_references.expect("owner")[0].uid, UID);
        let env = cm.data.expect("data");
        assert_eq!(env["CHORUS_LISTEN"], "0.0.0.0:8080");
        assert_eq!(
            env["CHORUS_BROKER"],
            "redis+sentinel://chat-sentinel-0.chat-sentinel.default.svc:26379,chat-sentinel-1.chat-sentinel.default.svc:26379,chat-sentinel-2.chat-sentinel.default.svc:26379/chorus"
        );
        assert_eq!(env["CHORUS_DELIVERY"], "pubsub");
        assert_eq!(env["CHORUS_REDIS_PASSWORD_FILE"], REDIS_PASSWORD_FILE);
        assert_eq!(env["CHORUS_LOG_FORMAT"], "json");
        assert_eq!(env["CHORUS_DRAIN_SECONDS"], "30");
        assert_eq!(env["CHORUS_MAX_CONNECTIONS"], "10000");
        assert!(!env.contains_key("CHORUS_JWT_SECRET_FILE"));
    }

    #[test]
    fn cluster_mode_points_at_the_first_three_pods_with_the_generated_password() {
        let mut mc = MessagingCluster::test();
        mc.spec.redis.mode = RedisMode::Cluster;
        let env = env_of(&mc);
        assert_eq!(
            env["CHORUS_BROKER"],
            "redis+cluster://chat-redis-cluster-0.chat-redis-cluster.default.svc:6379,chat-redis-cluster-1.chat-redis-cluster.default.svc:6379,chat-redis-cluster-2.chat-redis-cluster.default.svc:6379"
        );
        assert_eq!(env["CHORUS_REDIS_PASSWORD_FILE"], REDIS_PASSWORD_FILE);
        // Growing the cluster does not change the servers' configuration
        // (which would roll them): they learn new shards from CLUSTER SLOTS.
        let base = hash(&build(&valid(&mc)), &mc.spec);
        mc.spec.redis.cluster = Some(chorus_crds::RedisClusterSpec {
            shards: 5,
            replicas_per_shard: 2,
        });
        assert_eq!(base, hash(&build(&valid(&mc)), &mc.spec));
    }

    #[test]
    fn external_redis_without_password_sets_no_password_file() {
        let env = env_of(&MessagingCluster::test().with_external_redis("redis://r.infra:6379/1"));
        assert_eq!(env["CHORUS_BROKER"], "redis://r.infra:6379/1");
        assert!(!env.contains_key("CHORUS_REDIS_PASSWORD_FILE"));
    }

    #[test]
    fn kafka_delivery_points_the_servers_at_the_topic_and_at_no_redis() {
        let mut mc = MessagingCluster::test().with_kafka(&["k0.infra:9092", "k1.infra:9092"]);
        let env = env_of(&mc);
        assert_eq!(
            env["CHORUS_BROKER"],
            "kafka://k0.infra:9092,k1.infra:9092/chorus-chat"
        );
        assert_eq!(env["CHORUS_DELIVERY"], "pubsub", "Kafka keeps the history");
        assert_eq!(env["CHORUS_KAFKA_PARTITIONS"], "12");
        assert_eq!(env["CHORUS_KAFKA_TIMEOUT"], "5s");
        assert!(!env.contains_key("CHORUS_REDIS_PASSWORD_FILE"));
        if let Some(kafka) = mc.spec.kafka.as_mut() {
            kafka.topic = Some("rooms.v1".into());
            kafka.partitions = 48;
            kafka.timeout = "1500ms".into();
        }
        let env = env_of(&mc);
        assert_eq!(
            env["CHORUS_BROKER"],
            "kafka://k0.infra:9092,k1.infra:9092/rooms.v1"
        );
        assert_eq!(env["CHORUS_KAFKA_PARTITIONS"], "48");
        assert_eq!(env["CHORUS_KAFKA_TIMEOUT"], "1500ms");
        // The pubsub and streams paths set no Kafka flag.
        assert!(!env_of(&MessagingCluster::test()).contains_key("CHORUS_KAFKA_PARTITIONS"));
    }

    #[test]
    fn auth_secrets_are_read_from_files() {
        let mut mc = MessagingCluster::test();
        mc.spec.auth.jwt_secret_ref = Some(SecretKeyRef {
            name: "jwt".into(),
            key: "k".into(),
        });
        mc.spec.auth.api_key_secret_ref = Some(SecretKeyRef {
            name: "api".into(),
            key: "k".into(),
        });
        let env = env_of(&mc);
        assert_eq!(env["CHORUS_JWT_SECRET_FILE"], JWT_SECRET_FILE);
        assert_eq!(env["CHORUS_API_KEY_FILE"], API_KEY_FILE);
    }

    #[test]
    fn the_outbox_dsn_is_read_from_a_file() {
        let mut mc = MessagingCluster::test();
        assert!(!env_of(&mc).contains_key("CHORUS_OUTBOX_DSN_FILE"));
        mc.spec.outbox = Some(OutboxSpec {
            dsn_secret_ref: SecretKeyRef {
                name: "orders-db".into(),
                key: "dsn".into(),
            },
            table: "app.outbox".into(),
            init: true,
        });
        let env = env_of(&mc);
        assert_eq!(env["CHORUS_OUTBOX_DSN_FILE"], OUTBOX_DSN_FILE);
        assert_eq!(env["CHORUS_OUTBOX_TABLE"], "app.outbox");
        assert_eq!(env["CHORUS_OUTBOX_INIT"], "true");
        assert!(!env.values().any(|v| v.contains("orders-db")));
    }

    #[test]
    fn config_changes_change_the_hash_and_scaling_does_not() {
        let hash_of = |mc: &MessagingCluster| hash(&build(&valid(mc)), &mc.spec);
        let base = hash_of(&MessagingCluster::test());
        assert_eq!(base, hash_of(&MessagingCluster::test()), "deterministic");
        assert_eq!(base.len(), 16);
        assert_eq!(base, hash_of(&MessagingCluster::test().with_replicas(7)));
        let mut streams = MessagingCluster::test();
        streams.spec.delivery = Delivery::Streams;
        assert_ne!(base, hash_of(&streams));
        let mut queue = MessagingCluster::test();
        queue.spec.limits.send_queue = 512;
        assert_ne!(base, hash_of(&queue));
        assert_ne!(
            base,
            hash_of(&MessagingCluster::test().with_password_secret("mine", "pw"))
        );
    }
}
