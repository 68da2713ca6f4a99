//! The manifests under examples/ deserialise into MessagingClusters with no
//! unknown (silently ignored) fields and pass the operator's validation.

use std::path::Path;

use chorus_crds::{Delivery, MessagingCluster, RedisMode, validate};
use serde_json::Value;

fn load(name: &str) -> (Value, MessagingCluster) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let raw: Value = serde_saphyr::from_str(&text).expect("valid YAML");
    let mc: MessagingCluster = serde_json::from_value(raw.clone()).expect("a MessagingCluster");
    (raw, mc)
}

/// Every key of `original` is kept when the typed object is serialised
/// again, i.e. no field of the example is unknown to the CRD types.
fn assert_no_unknown_fields(path: &str, original: &Value, typed: &Value) {
    if let (Value::Object(o), Value::Object(t)) = (original, typed) {
        for (key, value) in o {
            let sub = format!("{path}.{key}");
            let Some(typed_value) = t.get(key) else {
                panic!("unknown field {sub}")
            };
            assert_no_unknown_fields(&sub, value, typed_value);
        }
    }
}

#[test]
fn basic_example_is_a_valid_three_pod_pubsub_cluster_named_chat() {
    let (raw, mc) = load("basic.yaml");
    assert_no_unknown_fields("", &raw, &serde_json::to_value(&mc).expect("serialises"));
    assert_eq!(mc.metadata.name.as_deref(), Some("chat"));
    assert_eq!(mc.spec.replicas, 3);
    assert_eq!(mc.spec.delivery, Delivery::Pubsub);
    assert_eq!(mc.spec.redis.mode, RedisMode::Managed);
    assert_eq!(validate(&mc), Ok(()));
}

#[test]
fn unknown_field_check_catches_typos() {
    let raw: Value = serde_json::json!({"spec": {"replica": 3}});
    let mc: MessagingCluster = serde_json::from_value(serde_json::json!({
        "apiVersion": "chorus.dev/v1alpha1", "kind": "MessagingCluster",
        "metadata": {"name": "chat"}, "spec": {"replica": 3}
    }))
    .expect("serde ignores the typo");
    let typed = serde_json::to_value(&mc).expect("serialises");
    let caught = std::panic::catch_unwind(|| assert_no_unknown_fields("", &raw, &typed));
    assert!(caught.is_err());
}
