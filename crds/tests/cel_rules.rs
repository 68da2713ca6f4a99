//! The CRD's CEL rules (`x-kubernetes-validations`), compiled and evaluated
//! client-side with kube-cel the way the API server does (defaults first,
//! then the rules), so a rule that does not compile, or lets a bad
//! manifest through, fails here instead of in a cluster.

#![allow(clippy::unwrap_used)]

use chorus_crds::MessagingCluster;
use kube::CustomResourceExt;
use kube::core::cel::{CompiledSchema, Validator, compile_schema};
use serde_json::{Value, json};

fn schema() -> Value {
    let crd = MessagingCluster::crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn manifest(spec: Value) -> Value {
    json!({"apiVersion": "chorus.dev/v1alpha1", "kind": "MessagingCluster", "metadata": {"name": "chat"}, "spec": spec})
}

/// Messages of the rules `spec` breaks, as `path: message`.
fn violations(spec: Value) -> Vec<String> {
    match Validator::new().validate(&schema(), &manifest(spec), None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// Messages of the rules an update from `old` to `new` breaks, transition
/// rules (`oldSelf`) included.
fn update_violations(old: Value, new: Value) -> Vec<String> {
    match Validator::new().validate(&schema(), &manifest(new), Some(&manifest(old))) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn count_rules_and_errors(node: &CompiledSchema, rules: &mut usize, errors: &mut Vec<String>) {
    *rules += node.validations.len();
    errors.extend(node.compilation_errors().iter().map(ToString::to_string));
    for child in node
        .properties
        .values()
        .chain(node.items.as_deref())
        .chain(node.additional_properties.as_deref())
    {
        count_rules_and_errors(child, rules, errors);
    }
}

#[test]
fn every_rule_compiles() {
    let (mut rules, mut errors) = (0, Vec::new());
    count_rules_and_errors(&compile_schema(&schema()), &mut rules, &mut errors);
    assert_eq!(errors, Vec::<String>::new());
    assert_eq!(rules, 15);
}

#[test]
fn defaults_and_the_basic_example_pass() {
    assert_eq!(violations(json!({})), Vec::<String>::new());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/basic.yaml");
    let example: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(
        Validator::new()
            .validate(&schema(), &example, None)
            .map_err(|e| e.to_string()),
        Ok(())
    );
}

#[test]
fn external_mode_needs_external_and_managed_mode_refuses_it() {
    let v = violations(json!({"redis": {"mode": "external"}}));
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].contains(
            "spec.redis.external (with its url) is required when spec.redis.mode is external"
        ),
        "{v:?}"
    );
    assert_eq!(
        violations(json!({"redis": {"mode": "external", "external": {"url": "redis://r:6379"}}})),
        Vec::<String>::new()
    );
    let v = violations(json!({"redis": {"external": {"url": "redis://r:6379"}}}));
    assert!(
        v[0].contains("spec.redis.external must not be set when spec.redis.mode is managed"),
        "{v:?}"
    );
}

#[test]
fn kafka_delivery_and_the_kafka_block_go_together_without_redis_features() {
    let kafka = json!({"bootstrapServers": ["kafka.infra:9092"]});
    assert_eq!(
        violations(json!({"delivery": "kafka", "kafka": kafka})),
        Vec::<String>::new()
    );
    let v = violations(json!({"delivery": "kafka"}));
    assert!(
        v.len() == 1
            && v[0].contains(
                "spec.kafka (with its bootstrapServers) is required when spec.delivery is kafka"
            ),
        "{v:?}"
    );
    for delivery in [json!("pubsub"), json!("streams"), Value::Null] {
        let mut spec = json!({"kafka": kafka});
        if !delivery.is_null() {
            spec["delivery"] = delivery.clone();
        }
        let v = violations(spec);
        assert!(
            v.len() == 1 && v[0].contains("spec.kafka is only used with spec.delivery: kafka"),
            "{delivery}: {v:?}"
        );
    }
    // The feed for backends: a topic on Kafka, streams on Redis.
    for upstream in [
        json!({"rooms": ["orders:*"]}),
        json!({"rooms": ["orders:*"], "topic": "orders.feed"}),
    ] {
        assert_eq!(
            violations(json!({"delivery": "kafka", "kafka": kafka, "upstream": upstream})),
            Vec::<String>::new()
        );
    }
    assert_eq!(
        violations(json!({"upstream": {"rooms": ["orders:*"]}})),
        Vec::<String>::new()
    );
    // The ingest: brokers of its own, or those of delivery: kafka.
    assert_eq!(
        violations(
            json!({"delivery": "kafka", "kafka": kafka, "ingest": {"topics": ["orders.events"]}})
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        violations(
            json!({"ingest": {"bootstrapServers": ["k:9092"], "topics": ["orders.events"]}})
        ),
        Vec::<String>::new()
    );
    let v = violations(json!({"ingest": {"topics": ["orders.events"]}}));
    assert!(
        v.len() == 1
            && v[0].contains("spec.ingest.bootstrapServers is required unless delivery is kafka"),
        "{v:?}"
    );
    let v = violations(json!({"upstream": {"rooms": ["*"], "topic": "orders.feed"}}));
    assert!(
        v.len() == 1 && v[0].contains("spec.upstream.topic is only used with delivery: kafka"),
        "{v:?}"
    );
    let v = violations(json!({"delivery": "kafka", "kafka": kafka,
        "redis": {"mode": "external", "external": {"url": "redis://r:6379"}}}));
    assert!(
        v.len() == 1 && v[0].contains("spec.redis.mode must be left managed"),
        "{v:?}"
    );
    // The upstream on Redis is untouched.
    assert_eq!(
        violations(json!({"upstream": {"rooms": ["orders:*"]}})),
        Vec::<String>::new()
    );
}

#[test]
fn cluster_mode_defaults_pass_and_its_shards_may_grow_but_never_shrink() {
    assert_eq!(
        violations(json!({"redis": {"mode": "cluster"}})),
        Vec::<String>::new()
    );
    let v = violations(json!({"redis": {"cluster": {"shards": 4}}}));
    assert!(
        v.len() == 1 && v[0].contains("spec.redis.cluster is only read when"),
        "{v:?}"
    );
    let v = violations(
        json!({"redis": {"mode": "cluster", "external": {"url": "redis+cluster://r:6379"}}}),
    );
    assert!(v.len() == 1 && v[0].contains("must not be set"), "{v:?}");
    let three = json!({"redis": {"mode": "cluster"}});
    let four = json!({"redis": {"mode": "cluster", "cluster": {"shards": 4}}});
    assert_eq!(
        update_violations(three.clone(), four.clone()),
        Vec::<String>::new()
    );
    let v = update_violations(four.clone(), three);
    assert!(
        v.len() == 1 && v[0].contains("spec.redis.cluster.shards cannot shrink"),
        "{v:?}"
    );
    let v = update_violations(
        four,
        json!({"redis": {"mode": "cluster", "cluster": {"shards": 4, "replicasPerShard": 0}}}),
    );
    assert!(
        v.len() == 1 && v[0].contains("replicasPerShard cannot shrink"),
        "{v:?}"
    );
    // A new mode is a new StatefulSet: its storage may differ.
    assert_eq!(
        update_violations(
            json!({"redis": {"storage": {"size": "1Gi"}}}),
            json!({"redis": {"mode": "cluster", "storage": {"size": "5Gi"}}})
        ),
        Vec::<String>::new()
    );
    let v = update_violations(
        json!({"redis": {"mode": "cluster", "storage": {"size": "1Gi"}}}),
        json!({"redis": {"mode": "cluster", "storage": {"size": "5Gi"}}}),
    );
    assert!(
        v.len() == 1 && v[0].contains("storage cannot change"),
        "{v:?}"
    );
}

#[test]
fn even_sentinel_counts_are_refused() {
    let v = violations(json!({"redis": {"sentinels": 2}}));
    assert!(
        v.len() == 1 && v[0].contains("spec.redis.sentinels must be odd"),
        "{v:?}"
    );
    assert_eq!(
        violations(json!({"redis": {"sentinels": 5}})),
        Vec::<String>::new()
    );
}

#[test]
fn autoscaling_min_above_max_is_refused() {
    let cpu = json!({"requests": {"cpu": "250m"}});
    let v =
        violations(json!({"resources": cpu, "autoscaling": {"minReplicas": 5, "maxReplicas": 3}}));
    assert!(
        v.len() == 1 && v[0].contains("minReplicas must not exceed"),
        "{v:?}"
    );
    assert_eq!(
        violations(json!({"resources": cpu, "autoscaling": {"maxReplicas": 3}})),
        Vec::<String>::new(),
        "min defaults to 2"
    );
}

#[test]
fn autoscaling_without_a_cpu_request_is_refused() {
    let v = violations(json!({"autoscaling": {"maxReplicas": 3}}));
    assert!(
        v.len() == 1 && v[0].contains("spec.resources.requests.cpu is required"),
        "{v:?}"
    );
    let v = violations(
        json!({"resources": {"requests": {"memory": "1Gi"}}, "autoscaling": {"maxReplicas": 3}}),
    );
    assert_eq!(v.len(), 1, "{v:?}");
}

#[test]
fn deliveries_per_pod_needs_the_connection_autoscaler() {
    let v = violations(json!({"resources": {"requests": {"cpu": "1"}},
        "autoscaling": {"maxReplicas": 3, "deliveriesPerSecondPerPod": 5000}}));
    assert!(
        v.len() == 1
            && v[0].contains("deliveriesPerSecondPerPod needs spec.autoscaling.connectionsPerPod"),
        "{v:?}"
    );
    let v = violations(
        json!({"autoscaling": {"maxReplicas": 3, "connectionsPerPod": 100,
        "deliveriesPerSecondPerPod": 5000}}),
    );
    assert_eq!(v, Vec::<String>::new());
}

#[test]
fn redis_storage_cannot_change_once_the_group_exists() {
    const REFUSED: &str = "spec.redis.storage cannot change while the managed Redis group exists";
    let one_gi = json!({"redis": {"storage": {"size": "1Gi"}}});
    let cases = [
        ("resized", json!({"redis": {"storage": {"size": "5Gi"}}})),
        (
            "new class",
            json!({"redis": {"storage": {"size": "1Gi", "storageClassName": "fast"}}}),
        ),
        ("removed", json!({})),
    ];
    for (what, new) in cases {
        let v = update_violations(one_gi.clone(), new);
        assert!(v.len() == 1 && v[0].contains(REFUSED), "{what}: {v:?}");
        assert!(
            v[0].contains("Create a new MessagingCluster"),
            "says what to do: {v:?}"
        );
    }
    let v = update_violations(json!({}), one_gi.clone());
    assert!(v.len() == 1 && v[0].contains(REFUSED), "added: {v:?}");

    // Unchanged storage (written out, or filled in by the defaults), other
    // Redis fields changing, and a new cluster are all fine.
    let same = json!({"redis": {"storage": {}, "replicas": 5}});
    assert_eq!(
        update_violations(one_gi.clone(), same),
        Vec::<String>::new()
    );
    assert_eq!(
        update_violations(json!({"replicas": 2}), json!({"replicas": 4})),
        Vec::<String>::new()
    );
    assert_eq!(violations(one_gi.clone()), Vec::<String>::new());

    // No StatefulSet exists before or after external mode: storage is free.
    let external = json!({"redis": {"mode": "external", "external": {"url": "redis://r:6379"}}});
    assert_eq!(
        update_violations(external.clone(), one_gi.clone()),
        Vec::<String>::new()
    );
    assert_eq!(update_violations(one_gi, external), Vec::<String>::new());
}
