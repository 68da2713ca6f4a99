//! Every manifest under `examples/` is one the API server accepts and the
//! operator acts on: it passes the CRD's structural schema (known fields,
//! types, enums, ranges, lengths, required fields), its CEL rules, and
//! `chorus_crds::validate`, the check the operator runs before it applies
//! anything. Each example also says what it promises (streams delivery,
//! external Redis, …).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use chorus_crds::{Delivery, MessagingCluster, RedisMode, ServiceType, validate};
use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::{Map, Value, json};

/// Every example, so a new file without a test here fails.
const EXAMPLES: [&str; 7] = [
    "autoscaling.yaml",
    "basic.yaml",
    "durable.yaml",
    "external-redis.yaml",
    "ingress.yaml",
    "kafka.yaml",
    "redis-cluster.yaml",
];

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn schema() -> Value {
    let crd = MessagingCluster::crd();
    let version = &crd.spec.versions[0];
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

/// What the API server's structural schema would refuse in `value`, as
/// `path: problem` (pattern and format checks aside: the operator's
/// `validate` parses those fields itself).
fn schema_violations(path: &str, value: &Value, schema: &Value, out: &mut Vec<String>) {
    let int_or_string = schema["x-kubernetes-int-or-string"] == json!(true);
    let type_ok = match (schema["type"].as_str(), value) {
        _ if int_or_string => value.is_string() || value.is_i64() || value.is_u64(),
        (None, _) => true,
        (Some("object"), Value::Object(_)) | (Some("array"), Value::Array(_)) => true,
        (Some("string"), Value::String(_)) | (Some("boolean"), Value::Bool(_)) => true,
        (Some("integer"), v) => v.is_i64() || v.is_u64(),
        (Some("number"), v) => v.is_number(),
        _ => false,
    };
    if !type_ok {
        out.push(format!("{path}: {value} is not of type {}", schema["type"]));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        out.push(format!("{path}: {value} is not one of {allowed:?}"));
    }
    if let Some(n) = value.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|min| n < min) {
            out.push(format!("{path}: {n} is below {}", schema["minimum"]));
        }
        if schema["maximum"].as_f64().is_some_and(|max| n > max) {
            out.push(format!("{path}: {n} is above {}", schema["maximum"]));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|min| len < min) {
            out.push(format!(
                "{path}: {s:?} is shorter than {}",
                schema["minLength"]
            ));
        }
        if schema["maxLength"].as_u64().is_some_and(|max| len > max) {
            out.push(format!(
                "{path}: {s:?} is longer than {}",
                schema["maxLength"]
            ));
        }
    }
    match value {
        Value::Object(fields) => object_violations(path, fields, schema, out),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                schema_violations(&format!("{path}[{i}]"), item, &schema["items"], out);
            }
        }
        _ => {}
    }
}

fn object_violations(
    path: &str,
    fields: &Map<String, Value>,
    schema: &Value,
    out: &mut Vec<String>,
) {
    for required in schema["required"].as_array().into_iter().flatten() {
        let required = required.as_str().unwrap();
        if !fields.contains_key(required) {
            out.push(format!("{path}.{required}: is required"));
        }
    }
    if schema["x-kubernetes-preserve-unknown-fields"] == json!(true) {
        return;
    }
    for (key, value) in fields {
        let sub = format!("{path}.{key}");
        if let Some(field_schema) = schema["properties"].get(key) {
            schema_violations(&sub, value, field_schema, out);
        } else if schema["additionalProperties"].is_object() {
            schema_violations(&sub, value, &schema["additionalProperties"], out);
        } else {
            out.push(format!(
                "{sub}: unknown field (the API server would drop it)"
            ));
        }
    }
}

struct Example {
    raw: Value,
    mc: MessagingCluster,
}

/// Loads an example and checks it the way the API server, then the
/// operator, would.
fn accepted(name: &str) -> Example {
    let path = examples_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let raw: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(raw["apiVersion"], chorus_crds::API_VERSION, "{name}");
    assert_eq!(raw["kind"], chorus_crds::KIND, "{name}");

    let schema = schema();
    let mut problems = Vec::new();
    schema_violations(
        "spec",
        &raw["spec"],
        &schema["properties"]["spec"],
        &mut problems,
    );
    assert_eq!(
        problems,
        Vec::<String>::new(),
        "{name}: refused by the schema"
    );

    let cel = Validator::new()
        .validate(&schema, &raw, None)
        .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>());
    assert_eq!(cel, Ok(()), "{name}: refused by a CEL rule");

    let mc: MessagingCluster = serde_json::from_value(raw.clone())
        .unwrap_or_else(|e| panic!("{name} is not a MessagingCluster: {e}"));
    assert_eq!(validate(&mc), Ok(()), "{name}: refused by the operator");
    Example { raw, mc }
}

#[test]
fn every_example_is_listed_here() {
    let mut found: Vec<String> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    found.sort();
    assert_eq!(found, EXAMPLES);
}

#[test]
fn every_example_is_accepted_and_has_a_distinct_name() {
    let mut names: Vec<String> = EXAMPLES
        .iter()
        .map(|e| accepted(e).mc.metadata.name.unwrap())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), EXAMPLES.len(), "{names:?}");
}

#[test]
fn basic_is_three_pubsub_pods_on_a_managed_sentinel_group() {
    let Example { mc, .. } = accepted("basic.yaml");
    assert_eq!(mc.metadata.name.as_deref(), Some("chat"));
    assert_eq!(mc.spec.replicas, 3);
    assert_eq!(mc.spec.delivery, Delivery::Pubsub);
    assert_eq!(mc.spec.redis.mode, RedisMode::Managed);
    assert_eq!((mc.spec.redis.replicas, mc.spec.redis.sentinels), (3, 3));
    assert_eq!(mc.spec.service.type_, ServiceType::ClusterIP);
    assert!(mc.spec.network_policy.enabled, "Redis fenced in");
}

#[test]
fn durable_keeps_history_in_streams_on_persistent_redis() {
    let Example { mc, .. } = accepted("durable.yaml");
    assert_eq!(mc.spec.delivery, Delivery::Streams);
    assert_eq!(mc.spec.history.size, 5000);
    assert_eq!(mc.spec.history.ttl, "24h");
    assert_eq!(mc.spec.redis.storage.unwrap().size, "5Gi");
}

#[test]
fn external_redis_runs_no_redis_and_keeps_the_password_out_of_the_url() {
    let Example { mc, .. } = accepted("external-redis.yaml");
    assert_eq!(mc.spec.redis.mode, RedisMode::External);
    let url = mc.spec.redis.external.unwrap().url;
    assert!(
        url.starts_with("redis+sentinel://") && url.ends_with("/mymaster"),
        "{url}"
    );
    assert!(!url.contains('@'));
    let secret = mc.spec.redis.password_secret_ref.unwrap();
    assert_eq!(
        (secret.name.as_str(), secret.key.as_str()),
        ("chat-redis-password", "password")
    );
}

#[test]
fn kafka_fans_out_through_an_external_kafka_topic() {
    let Example { raw, mc } = accepted("kafka.yaml");
    assert_eq!(mc.spec.delivery, Delivery::Kafka);
    assert!(raw["spec"].get("redis").is_none(), "no Redis to set up");
    let kafka = mc.spec.kafka.unwrap();
    assert_eq!(
        kafka.bootstrap_servers,
        ["my-kafka-kafka-bootstrap.kafka.svc:9092"]
    );
    assert_eq!(kafka.topic_of("chat-kafka"), "chorus-chat");
    assert_eq!((kafka.partitions, kafka.timeout.as_str()), (12, "5s"));
}

#[test]
fn redis_cluster_runs_three_shards_with_a_replica_each_on_volumes() {
    let Example { mc, .. } = accepted("redis-cluster.yaml");
    assert_eq!(mc.spec.redis.mode, RedisMode::Cluster);
    let shape = mc.spec.redis.cluster_shape();
    assert_eq!((shape.shards, shape.replicas_per_shard), (3, 1));
    assert_eq!(mc.spec.delivery, Delivery::Streams);
    assert!(mc.spec.redis.storage.is_some());
    assert!(mc.metadata.name.unwrap().len() <= chorus_crds::validate::MAX_CLUSTER_NAME_LEN);
}

#[test]
fn autoscaling_leaves_replicas_to_the_autoscaler_and_requests_cpu() {
    let Example { raw, mc } = accepted("autoscaling.yaml");
    assert!(
        raw["spec"].get("replicas").is_none(),
        "a replicas line would undo the autoscaler on every kubectl apply"
    );
    let autoscaling = mc.spec.autoscaling.unwrap();
    assert_eq!(
        (autoscaling.min_replicas, autoscaling.max_replicas),
        (3, 20)
    );
    assert_eq!(autoscaling.target_cpu_utilization_percentage, 70);
    let requests = mc.spec.resources.unwrap().requests.unwrap();
    assert!(requests.contains_key("cpu"));
}

#[test]
fn ingress_exposes_tls_with_auth_and_fences_redis() {
    let Example { mc, .. } = accepted("ingress.yaml");
    let ingress = mc.spec.ingress.unwrap();
    assert_eq!(ingress.host, "chat.example.com");
    assert_eq!(ingress.tls_secret_name.as_deref(), Some("chat-tls"));
    assert!(mc.spec.auth.jwt_secret_ref.is_some());
    assert!(mc.spec.auth.api_key_secret_ref.is_some());
    assert!(mc.spec.network_policy.enabled);
}

#[test]
fn the_schema_check_catches_what_the_api_server_refuses() {
    let schema = schema();
    let spec_schema = &schema["properties"]["spec"];
    let check = |spec: Value| {
        let mut out = Vec::new();
        schema_violations("spec", &spec, spec_schema, &mut out);
        out
    };
    assert_eq!(check(json!({"replicas": 3})), Vec::<String>::new());
    assert_eq!(
        check(json!({"replica": 3})),
        ["spec.replica: unknown field (the API server would drop it)"]
    );
    assert_eq!(check(json!({"replicas": "3"})).len(), 1);
    assert_eq!(
        check(json!({"replicas": 5000})),
        ["spec.replicas: 5000 is above 1000.0"]
    );
    assert_eq!(check(json!({"delivery": "carrier-pigeon"})).len(), 1);
    assert_eq!(
        check(json!({"delivery": "kafka", "kafka": {}})),
        ["spec.kafka.bootstrapServers: is required"]
    );
    assert_eq!(
        check(json!({"redis": {"mode": "cluster", "cluster": {"shards": 2}}})),
        ["spec.redis.cluster.shards: 2 is below 3.0"]
    );
    assert_eq!(
        check(json!({"autoscaling": {"minReplicas": 2}})),
        ["spec.autoscaling.maxReplicas: is required"]
    );
    assert_eq!(
        check(json!({"resources": {"requests": {"cpu": "250m"}}})),
        Vec::<String>::new()
    );
    assert_eq!(
        check(json!({"resources": {"requests": {"cpu": 1}}})),
        Vec::<String>::new()
    );
}

#[test]
fn every_example_is_described_in_the_kubernetes_docs() {
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/kubernetes.md"),
    )
    .unwrap();
    for example in EXAMPLES {
        assert!(
            docs.contains(&format!("`examples/{example}`")),
            "docs/kubernetes.md does not mention examples/{example}"
        );
    }
}
