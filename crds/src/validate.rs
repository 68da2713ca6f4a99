//! Rules the CRD schema cannot express.
//!
//! The API server already enforces ranges, enums, patterns and the CEL rules
//! of the schema. What is left needs real parsing (URLs, host names) or
//! knowledge of the names the operator derives from `metadata.name`. The
//! operator runs [`validate`] first; a failure sets `Degraded` and nothing
//! is applied.
//!
//! The cross-field CEL rules are checked here once more, because the CRD in
//! the cluster may be older than the operator (installed by Helm, which
//! never upgrades CRDs, with `--no-install-crd`).

use crate::spec::{Delivery, MessagingCluster, MessagingClusterSpec, RedisMode};

/// Longest `metadata.name` the operator accepts: `<name>-redis` must stay a
/// valid StatefulSet name whose pods' `controller-revision-hash` label
/// (`<name>-redis-<10 chars>`) fits in 63 characters, and `<name>-redis-auth`
/// and `<name>-sentinel` must be valid Service/Secret names.
pub const MAX_NAME_LEN: usize = 46;
/// Longest `metadata.name` in `redis.mode: cluster`: the StatefulSet is
/// `<name>-redis-cluster`, and its pods' `controller-revision-hash` label
/// (`<name>-redis-cluster-<10 chars>`) must fit in 63 characters.
pub const MAX_CLUSTER_NAME_LEN: usize = 38;
/// Fewest shards of a managed Redis Cluster (Redis Cluster needs three
/// masters to agree on a failover).
pub const MIN_SHARDS: i32 = 3;

/// A spec the operator refuses, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// Path of the offending field, e.g. `spec.redis.external.url`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ValidationError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Checks what the schema cannot; returns every problem found.
pub fn validate(mc: &MessagingCluster) -> Result<(), Vec<ValidationError>> {
    let mut errors = Vec::new();
    match mc.metadata.name.as_deref() {
        Some(name) => {
            if let Err(e) = check_name(name) {
                errors.push(e);
            } else if mc.spec.redis.mode == RedisMode::Cluster && name.len() > MAX_CLUSTER_NAME_LEN
            {
                errors.push(ValidationError::new(
                    "metadata.name",
                    format!(
                        "{name:?} is {} characters; with spec.redis.mode cluster at most \
                         {MAX_CLUSTER_NAME_LEN} are allowed because its pods are named \
                         {name}-redis-cluster-<n> and labelled with that name and a hash",
                        name.len()
                    ),
                ));
            }
        }
        None => errors.push(ValidationError::new("metadata.name", "is required")),
    }
    check_spec(&mc.spec, mc.metadata.name.as_deref(), &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn check_name(name: &str) -> Result<(), ValidationError> {
    let field = "metadata.name";
    if name.len() > MAX_NAME_LEN {
        return Err(ValidationError::new(
            field,
            format!(
                "{name:?} is {} characters; at most {MAX_NAME_LEN} are allowed because the \
                 operator derives names such as {name}-redis-auth from it",
                name.len()
            ),
        ));
    }
    if !is_dns_label(name) || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(ValidationError::new(
            field,
            format!(
                "{name:?} must start with a lowercase letter and contain only lowercase \
                 letters, digits and '-' (it names Services, which are DNS-1035 labels)"
            ),
        ));
    }
    Ok(())
}

fn check_spec(spec: &MessagingClusterSpec, name: Option<&str>, errors: &mut Vec<ValidationError>) {
    if spec.redis.mode == RedisMode::External {
        match &spec.redis.external {
            Some(external) => {
                if let Err(message) = check_redis_url(&external.url) {
                    errors.push(ValidationError::new("spec.redis.external.url", message));
                }
            }
            None => errors.push(ValidationError::new(
                "spec.redis.external",
                "is required when spec.redis.mode is external",
            )),
        }
    }
    check_cluster(spec, errors);
    if let Some(storage) = &spec.redis.storage {
        if !is_positive_quantity(&storage.size) {
            errors.push(ValidationError::new(
                "spec.redis.storage.size",
                format!("{:?} must be a positive quantity such as 1Gi", storage.size),
            ));
        }
        if let Some(class) = &storage.storage_class_name
            && !is_dns_subdomain(class)
        {
            errors.push(ValidationError::new(
                "spec.redis.storage.storageClassName",
                format!("{class:?} is not a valid StorageClass name"),
            ));
        }
    }
    if let Some(ingress) = &spec.ingress
        && (!is_dns_subdomain(&ingress.host) || !ingress.host.contains('.'))
    {
        errors.push(ValidationError::new(
            "spec.ingress.host",
            format!(
                "{:?} must be a fully qualified host name such as chat.example.com",
                ingress.host
            ),
        ));
    }
    let cpu_requested = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .is_some_and(|r| r.contains_key("cpu"));
    let on_cpu = spec
        .autoscaling
        .as_ref()
        .is_some_and(|a| a.connections_per_pod.is_none());
    if on_cpu && !cpu_requested {
        errors.push(ValidationError::new(
            "spec.resources.requests.cpu",
            "is required when spec.autoscaling scales on CPU (no connectionsPerPod): the autoscaler measures CPU use against it",
        ));
    }
    if let Some(autoscaling) = &spec.autoscaling
        && autoscaling.deliveries_per_second_per_pod.is_some()
        && autoscaling.connections_per_pod.is_none()
    {
        errors.push(ValidationError::new(
            "spec.autoscaling.deliveriesPerSecondPerPod",
            "needs spec.autoscaling.connectionsPerPod: the operator's autoscaler reads both from the pods (the CPU autoscaler cannot)",
        ));
    }
    if let Some(autoscaling) = &spec.autoscaling
        && autoscaling.min_replicas > autoscaling.max_replicas
    {
        errors.push(ValidationError::new(
            "spec.autoscaling.minReplicas",
            "must not exceed spec.autoscaling.maxReplicas",
        ));
    }
    check_kafka(spec, name, errors);
    check_ingest(spec, name, errors);
}

/// `delivery: kafka` and `spec.kafka` go together; the servers parse the
/// bootstrap servers and topic into `--broker kafka://…/<topic>`.
fn check_kafka(spec: &MessagingClusterSpec, name: Option<&str>, errors: &mut Vec<ValidationError>) {
    let on_kafka = spec.delivery == Delivery::Kafka;
    if let Some(topic) = spec.upstream.as_ref().and_then(|u| u.topic.as_ref()) {
        if !on_kafka {
            errors.push(ValidationError::new(
                "spec.upstream.topic",
                "is only used with delivery: kafka (with Redis the feed is the streams chorus:upstream:<room>); remove it",
            ));
        } else {
            check_topic("spec.upstream.topic", topic, errors);
        }
    }
    match &spec.kafka {
        None if on_kafka => errors.push(ValidationError::new(
            "spec.kafka",
            "is required when spec.delivery is kafka (with its bootstrapServers)",
        )),
        None => {}
        Some(_) if !on_kafka => errors.push(ValidationError::new(
            "spec.kafka",
            format!(
                "is only used with spec.delivery: kafka (it is {}); set delivery: kafka or remove spec.kafka",
                spec.delivery.as_str()
            ),
        )),
        Some(kafka) => {
            check_servers("spec.kafka.bootstrapServers", &kafka.bootstrap_servers, errors);
            if let Some(topic) = &kafka.topic {
                check_topic("spec.kafka.topic", topic, errors);
            }
        }
    }
    if !on_kafka {
        return;
    }
    if spec.redis.mode != RedisMode::Managed {
        errors.push(ValidationError::new(
            "spec.redis.mode",
            "must be left managed (the default) with delivery: kafka: the servers use Kafka only and the operator runs no Redis; remove spec.redis",
        ));
    }
    if let (Some(upstream), Some(kafka), Some(name)) = (&spec.upstream, &spec.kafka, name) {
        let feed = upstream.topic_of(name);
        if feed == kafka.topic_of(name) {
            errors.push(ValidationError::new(
                "spec.upstream.topic",
                format!("{feed:?} is the topic that carries the rooms (spec.kafka.topic); the feed for backends needs a topic of its own"),
            ));
        }
    }
}

/// `host:port` of Kafka brokers, at least one.
fn check_servers(field: &str, servers: &[String], errors: &mut Vec<ValidationError>) {
    if servers.is_empty() {
        errors.push(ValidationError::new(field, "needs at least one host:port"));
    }
    for (i, server) in servers.iter().enumerate() {
        let bad_char = server.contains(|c: char| c.is_whitespace() || ",/@".contains(c));
        let problem = if bad_char {
            Err(format!("{server:?} must be one host:port"))
        } else {
            check_host_port(server)
        };
        if let Err(message) = problem {
            errors.push(ValidationError::new(&format!("{field}[{i}]"), message));
        }
    }
}

fn check_topic(field: &str, topic: &str, errors: &mut Vec<ValidationError>) {
    if !is_kafka_topic(topic) {
        errors.push(ValidationError::new(
            field,
            format!(
                "{topic:?} is not a Kafka topic name (1 to 249 of A-Z, a-z, 0-9, '.', '_', '-')"
            ),
        ));
    }
}

/// `spec.ingest`: where it reads, and nothing it would read back in a loop
/// (the rooms' topic, the feed for backends) or dead-letter into itself.
fn check_ingest(
    spec: &MessagingClusterSpec,
    name: Option<&str>,
    errors: &mut Vec<ValidationError>,
) {
    let Some(ingest) = &spec.ingest else {
        return;
    };
    let kafka = spec.on_kafka();
    match &ingest.bootstrap_servers {
        Some(servers) => check_servers("spec.ingest.bootstrapServers", servers, errors),
        None if kafka.is_none() => errors.push(ValidationError::new(
            "spec.ingest.bootstrapServers",
            "is required unless delivery is kafka (whose spec.kafka.bootstrapServers it then uses)",
        )),
        None => {}
    }
    // Only a topic on the same brokers can be the same topic.
    let same_brokers = kafka.is_some_and(|k| {
        ingest
            .bootstrap_servers
            .as_ref()
            .is_none_or(|s| *s == k.bootstrap_servers)
    });
    let mut own = Vec::new();
    if let (Some(kafka), Some(name), true) = (kafka, name, same_brokers) {
        own.push((
            kafka.topic_of(name),
            "the topic that carries the rooms (spec.kafka.topic)",
        ));
        if let Some(upstream) = &spec.upstream {
            own.push((
                upstream.topic_of(name),
                "the feed for backends (spec.upstream.topic)",
            ));
        }
    }
    if ingest.group.as_deref().is_some_and(str::is_empty) {
        errors.push(ValidationError::new(
            "spec.ingest.group",
            "must not be empty",
        ));
    }
    for (i, topic) in ingest.topics.iter().enumerate() {
        let field = format!("spec.ingest.topics[{i}]");
        check_topic(&field, topic, errors);
        if ingest.topics[..i].contains(topic) {
            errors.push(ValidationError::new(
                &field,
                format!("{topic:?} is listed twice"),
            ));
        }
        if let Some((_, what)) = own.iter().find(|(t, _)| t == topic) {
            errors.push(ValidationError::new(
                &field,
                format!("{topic:?} is {what}: the pods would publish what they read back into it"),
            ));
        }
    }
    if let Some(dead) = &ingest.dead_letter_topic {
        check_topic("spec.ingest.deadLetterTopic", dead, errors);
        if ingest.topics.contains(dead) {
            errors.push(ValidationError::new(
                "spec.ingest.deadLetterTopic",
                format!("{dead:?} is also read (spec.ingest.topics): dead letters would come back"),
            ));
        }
    }
    if ingest.topics.is_empty() {
        errors.push(ValidationError::new(
            "spec.ingest.topics",
            "needs at least one topic",
        ));
    }
}

/// What Kafka accepts as a topic name.
fn is_kafka_topic(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && topic != "."
        && topic != ".."
}

/// `redis.mode: cluster` and its shape; `redis.cluster` only in that mode.
fn check_cluster(spec: &MessagingClusterSpec, errors: &mut Vec<ValidationError>) {
    let redis = &spec.redis;
    if redis.mode == RedisMode::Cluster && redis.external.is_some() {
        errors.push(ValidationError::new(
            "spec.redis.external",
            "must not be set when spec.redis.mode is cluster (the operator runs the cluster)",
        ));
    }
    let Some(cluster) = &redis.cluster else {
        return;
    };
    if redis.mode != RedisMode::Cluster {
        errors.push(ValidationError::new(
            "spec.redis.cluster",
            "is only read when spec.redis.mode is cluster: remove it, or set the mode",
        ));
    }
    if cluster.shards < MIN_SHARDS {
        errors.push(ValidationError::new(
            "spec.redis.cluster.shards",
            format!(
                "{} is too few: a Redis Cluster needs at least {MIN_SHARDS} masters to agree on a failover",
                cluster.shards
            ),
        ));
    }
    if cluster.replicas_per_shard < 0 {
        errors.push(ValidationError::new(
            "spec.redis.cluster.replicasPerShard",
            "must not be negative",
        ));
    }
}

/// `redis://host:port[/db]` or `redis+sentinel://host:port[,host:port...]/<master>`.
fn check_redis_url(url: &str) -> Result<(), String> {
    let (rest, kind) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        (rest, UrlKind::Sentinel)
    } else if let Some(rest) = url.strip_prefix("redis+cluster://") {
        (rest, UrlKind::Cluster)
    } else if let Some(rest) = url.strip_prefix("redis://") {
        (rest, UrlKind::Direct)
    } else {
        return Err(format!(
            "{url:?} must start with redis://, redis+sentinel:// or redis+cluster://"
        ));
    };
    if rest.contains('@') {
        return Err(
            "must not carry a password; put it in a Secret and set spec.redis.passwordSecretRef"
                .into(),
        );
    }
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let hosts: Vec<&str> = hosts.split(',').collect();
    if kind == UrlKind::Direct && hosts.len() != 1 {
        return Err(format!("{url:?}: redis:// takes exactly one host:port"));
    }
    for host in &hosts {
        check_host_port(host).map_err(|m| format!("{url:?}: {m}"))?;
    }
    match kind {
        UrlKind::Sentinel if path.is_empty() || path.contains('/') => Err(format!(
            "{url:?} must end with /<master-name>, e.g. /mymaster"
        )),
        UrlKind::Cluster if !path.is_empty() => Err(format!(
            "{url:?}: a Redis Cluster has database 0 only, so no path"
        )),
        UrlKind::Direct if !path.is_empty() && path.parse::<u8>().is_err() => {
            Err(format!("{url:?}: the path must be a database number"))
        }
        _ => Ok(()),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum UrlKind {
    Direct,
    Sentinel,
    Cluster,
}

fn check_host_port(host_port: &str) -> Result<(), String> {
    let (host, port) = host_port
        .rsplit_once(':')
        .ok_or_else(|| format!("{host_port:?} must be host:port"))?;
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c))
    {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{port:?} is not a port number")),
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_positive_quantity(s: &str) -> bool {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let valid_suffix = [
        "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E",
    ]
    .contains(&suffix);
    valid_suffix && number.parse::<f64>().is_ok_and(|n| n > 0.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::spec::{ExternalRedisSpec, IngressSpec, StorageSpec};

    fn cluster(name: &str, spec: MessagingClusterSpec) -> MessagingCluster {
        MessagingCluster::new(name, spec)
    }

    fn fields(result: Result<(), Vec<ValidationError>>) -> Vec<String> {
        result.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn default_spec_is_valid() {
        assert_eq!(
            validate(&cluster("chat", MessagingClusterSpec::default())),
            Ok(())
        );
    }

    #[test]
    fn names_that_cannot_name_services_are_refused() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            fields(validate(&cluster(&long, Default::default()))),
            ["metadata.name"]
        );
        assert_eq!(
            fields(validate(&cluster("1chat", Default::default()))),
            ["metadata.name"]
        );
        assert_eq!(
            fields(validate(&cluster("chat.eu", Default::default()))),
            ["metadata.name"]
        );
        assert_eq!(
            validate(&cluster(&"a".repeat(MAX_NAME_LEN), Default::default())),
            Ok(())
        );
    }

    #[test]
    fn external_urls_are_parsed() {
        let with_url = |url: &str| {
            let mut spec = MessagingClusterSpec::default();
            spec.redis.mode = RedisMode::External;
            spec.redis.external = Some(ExternalRedisSpec { url: url.into() });
            validate(&cluster("chat", spec))
        };
        assert_eq!(with_url("redis://redis.infra:6379"), Ok(()));
        assert_eq!(with_url("redis://redis.infra:6379/2"), Ok(()));
        assert_eq!(
            with_url("redis+sentinel://s1:26379,s2:26379/mymaster"),
            Ok(())
        );
        assert_eq!(
            with_url("redis+cluster://c0.infra:6379,c1.infra:6379"),
            Ok(())
        );
        for bad in [
            "redis+cluster://c0.infra:6379/1",
            "redis+cluster://:secret@c0.infra:6379",
            "redis+sentinel://s1:26379",
            "redis://a:1,b:2",
            "redis://host",
            "redis://host:99999",
            "redis://:secret@host:6379",
            "http://host:6379",
        ] {
            assert_eq!(fields(with_url(bad)), ["spec.redis.external.url"], "{bad}");
        }
    }

    #[test]
    fn cluster_mode_checks_its_shape_and_the_name_length() {
        use crate::spec::RedisClusterSpec;
        let mut spec = MessagingClusterSpec::default();
        spec.redis.mode = RedisMode::Cluster;
        assert_eq!(validate(&cluster("chat", spec.clone())), Ok(()), "defaults");
        let long = "a".repeat(MAX_CLUSTER_NAME_LEN + 1);
        let errors = validate(&cluster(&long, spec.clone())).unwrap_err();
        assert_eq!(errors[0].field, "metadata.name");
        assert!(errors[0].message.contains("redis-cluster"), "{errors:?}");
        assert_eq!(
            validate(&cluster(&"a".repeat(MAX_CLUSTER_NAME_LEN), spec.clone())),
            Ok(())
        );
        spec.redis.cluster = Some(RedisClusterSpec {
            shards: 2,
            replicas_per_shard: 1,
        });
        let errors = validate(&cluster("chat", spec.clone())).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "spec.redis.cluster.shards: 2 is too few: a Redis Cluster needs at least 3 masters to agree on a failover"
        );
        spec.redis.mode = RedisMode::Managed;
        spec.redis.cluster = Some(RedisClusterSpec::default());
        assert_eq!(
            fields(validate(&cluster("chat", spec.clone()))),
            ["spec.redis.cluster"]
        );
        spec.redis.cluster = None;
        spec.redis.mode = RedisMode::Cluster;
        spec.redis.external = Some(ExternalRedisSpec {
            url: "redis+cluster://r:6379".into(),
        });
        assert_eq!(
            fields(validate(&cluster("chat", spec))),
            ["spec.redis.external"]
        );
    }

    #[test]
    fn external_mode_without_url_is_refused() {
        let mut spec = MessagingClusterSpec::default();
        spec.redis.mode = RedisMode::External;
        let errors = validate(&cluster("chat", spec)).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "spec.redis.external: is required when spec.redis.mode is external"
        );
    }

    #[test]
    fn autoscaling_needs_a_cpu_request() {
        let mut spec = MessagingClusterSpec::default();
        spec.autoscaling = Some(crate::spec::AutoscalingSpec {
            min_replicas: 2,
            max_replicas: 5,
            target_cpu_utilization_percentage: 70,
            connections_per_pod: None,
            deliveries_per_second_per_pod: None,
        });
        assert_eq!(
            fields(validate(&cluster("chat", spec.clone()))),
            ["spec.resources.requests.cpu"]
        );
        // Scaling on connections measures no CPU.
        let mut on_connections = spec.clone();
        if let Some(a) = on_connections.autoscaling.as_mut() {
            a.connections_per_pod = Some(100);
        }
        assert_eq!(validate(&cluster("chat", on_connections.clone())), Ok(()));
        // Deliveries are read by the same autoscaler, not the CPU one.
        if let Some(a) = spec.autoscaling.as_mut() {
            a.deliveries_per_second_per_pod = Some(5000);
        }
        let mut fields_of = fields(validate(&cluster("chat", spec.clone())));
        fields_of.sort();
        assert_eq!(
            fields_of,
            [
                "spec.autoscaling.deliveriesPerSecondPerPod",
                "spec.resources.requests.cpu"
            ]
        );
        if let Some(a) = on_connections.autoscaling.as_mut() {
            a.deliveries_per_second_per_pod = Some(5000);
        }
        assert_eq!(validate(&cluster("chat", on_connections)), Ok(()));
        if let Some(a) = spec.autoscaling.as_mut() {
            a.deliveries_per_second_per_pod = None;
        }
        spec.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(
                [(
                    "cpu".to_owned(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("250m".into()),
                )]
                .into(),
            ),
            ..Default::default()
        });
        assert_eq!(validate(&cluster("chat", spec)), Ok(()));
    }

    fn kafka_spec(servers: &[&str]) -> crate::spec::KafkaSpec {
        crate::spec::KafkaSpec {
            bootstrap_servers: servers.iter().map(|s| (*s).to_owned()).collect(),
            topic: None,
            partitions: 12,
            timeout: "5s".into(),
        }
    }

    fn on_kafka(servers: &[&str]) -> MessagingClusterSpec {
        MessagingClusterSpec {
            delivery: Delivery::Kafka,
            kafka: Some(kafka_spec(servers)),
            ..Default::default()
        }
    }

    #[test]
    fn kafka_delivery_needs_its_kafka_block_and_parsable_servers() {
        assert_eq!(
            validate(&cluster(
                "chat",
                on_kafka(&["kafka-0.infra:9092", "10.0.0.7:9092", "[fd00::7]:9092"])
            )),
            Ok(())
        );
        let missing = MessagingClusterSpec {
            delivery: Delivery::Kafka,
            ..Default::default()
        };
        let errors = validate(&cluster("chat", missing)).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "spec.kafka: is required when spec.delivery is kafka (with its bootstrapServers)"
        );
        let unused = MessagingClusterSpec {
            kafka: Some(kafka_spec(&["k:9092"])),
            ..Default::default()
        };
        let errors = validate(&cluster("chat", unused)).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "spec.kafka: is only used with spec.delivery: kafka (it is pubsub); set delivery: kafka or remove spec.kafka"
        );
        assert_eq!(
            fields(validate(&cluster("chat", on_kafka(&[])))),
            ["spec.kafka.bootstrapServers"]
        );
        for bad in [
            "kafka",
            "kafka:0",
            "kafka:99999",
            ":9092",
            "a:1,b:2",
            "k:9092/t",
            "u@k:9092",
        ] {
            assert_eq!(
                fields(validate(&cluster("chat", on_kafka(&["ok:9092", bad])))),
                ["spec.kafka.bootstrapServers[1]"],
                "{bad}"
            );
        }
        let mut topic = on_kafka(&["k:9092"]);
        for (name, ok) in [
            ("chorus.rooms_1-a", true),
            ("..", false),
            ("a/b", false),
            ("", false),
        ] {
            if let Some(k) = topic.kafka.as_mut() {
                k.topic = Some(name.into());
            }
            let result = validate(&cluster("chat", topic.clone()));
            assert_eq!(result.is_ok(), ok, "{name:?}: {result:?}");
        }
    }

    #[test]
    fn kafka_delivery_refuses_what_needs_redis() {
        let mut spec = on_kafka(&["k:9092"]);
        spec.redis.mode = RedisMode::External;
        spec.redis.external = Some(ExternalRedisSpec {
            url: "redis://r:6379".into(),
        });
        assert_eq!(
            fields(validate(&cluster("chat", spec))),
            ["spec.redis.mode"]
        );
    }

    #[test]
    fn the_ingest_reads_named_topics_and_never_its_own() {
        let ingest = |servers: Option<&[&str]>, topics: &[&str]| {
            Some(crate::spec::IngestSpec {
                bootstrap_servers: servers.map(|s| s.iter().map(|s| s.to_string()).collect()),
                topics: topics.iter().map(|t| t.to_string()).collect(),
                group: None,
                attempts: 5,
                dead_letter_topic: None,
            })
        };
        // With Redis the brokers are needed; on Kafka they default to spec.kafka's.
        let mut redis = MessagingClusterSpec {
            ingest: ingest(None, &["orders.events"]),
            ..Default::default()
        };
        assert_eq!(
            fields(validate(&cluster("chat", redis.clone()))),
            ["spec.ingest.bootstrapServers"]
        );
        redis.ingest = ingest(Some(&["k:9092"]), &["orders.events", "billing.events"]);
        assert!(validate(&cluster("chat", redis.clone())).is_ok());
        redis.ingest = ingest(Some(&["k"]), &["bad topic", "a", "a"]);
        assert_eq!(
            fields(validate(&cluster("chat", redis.clone()))),
            [
                "spec.ingest.bootstrapServers[0]",
                "spec.ingest.topics[0]",
                "spec.ingest.topics[2]"
            ]
        );
        let mut spec = on_kafka(&["k:9092"]);
        spec.ingest = ingest(None, &["orders.events"]);
        assert!(validate(&cluster("chat", spec.clone())).is_ok());
        // Not the rooms' topic nor the feed's on the same brokers: a loop.
        spec.upstream = Some(crate::spec::UpstreamSpec {
            rooms: vec!["*".into()],
            max_len: 10,
            topic: None,
        });
        spec.ingest = ingest(None, &["chorus-chat", "chorus-chat-upstream", "ok"]);
        assert_eq!(
            fields(validate(&cluster("chat", spec.clone()))),
            ["spec.ingest.topics[0]", "spec.ingest.topics[1]"]
        );
        // On other brokers the same names are other topics.
        spec.ingest = ingest(Some(&["other:9092"]), &["chorus-chat"]);
        assert!(validate(&cluster("chat", spec.clone())).is_ok());
        // Dead letters never go into a topic it reads.
        let mut with_dead = ingest(None, &["orders.events"]).unwrap();
        with_dead.dead_letter_topic = Some("orders.events".into());
        spec.ingest = Some(with_dead);
        assert_eq!(
            fields(validate(&cluster("chat", spec))),
            ["spec.ingest.deadLetterTopic"]
        );
    }

    #[test]
    fn the_feed_for_backends_goes_to_a_kafka_topic_of_its_own() {
        let feed = |topic: Option<&str>| {
            Some(crate::spec::UpstreamSpec {
                rooms: vec!["*".into()],
                max_len: 10,
                topic: topic.map(Into::into),
            })
        };
        // On Kafka: the default topic, or a named one, is accepted.
        let mut spec = on_kafka(&["k:9092"]);
        spec.upstream = feed(None);
        assert!(validate(&cluster("chat", spec.clone())).is_ok());
        spec.upstream = feed(Some("orders.feed"));
        assert!(validate(&cluster("chat", spec.clone())).is_ok());
        // Not the rooms' own topic, by default or by name.
        spec.upstream = feed(Some("chorus-chat"));
        assert_eq!(
            fields(validate(&cluster("chat", spec.clone()))),
            ["spec.upstream.topic"]
        );
        spec.kafka.as_mut().unwrap().topic = Some("chorus-chat-upstream".into());
        spec.upstream = feed(None);
        assert_eq!(
            fields(validate(&cluster("chat", spec.clone()))),
            ["spec.upstream.topic"]
        );
        spec.kafka.as_mut().unwrap().topic = None;
        spec.upstream = feed(Some("bad topic"));
        assert_eq!(
            fields(validate(&cluster("chat", spec))),
            ["spec.upstream.topic"]
        );
        // With Redis a topic means nothing: refused.
        let mut spec = MessagingClusterSpec {
            upstream: feed(Some("orders.feed")),
            ..Default::default()
        };
        assert_eq!(
            fields(validate(&cluster("chat", spec.clone()))),
            ["spec.upstream.topic"]
        );
        spec.upstream = feed(None);
        assert!(validate(&cluster("chat", spec)).is_ok());
    }

    #[test]
    fn storage_and_ingress_are_checked() {
        let mut spec = MessagingClusterSpec::default();
        spec.redis.storage = Some(StorageSpec {
            size: "0Gi".into(),
            storage_class_name: Some("Fast_SSD".into()),
        });
        spec.ingress = Some(IngressSpec {
            host: "chat".into(),
            class_name: None,
            tls_secret_name: None,
        });
        assert_eq!(
            fields(validate(&cluster("chat", spec))),
            [
                "spec.redis.storage.size",
                "spec.redis.storage.storageClassName",
                "spec.ingress.host"
            ]
        );
    }
}
