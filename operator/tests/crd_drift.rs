//! The CRD committed under charts/ is the one the code generates.

use std::path::Path;

#[test]
fn committed_crd_matches_the_generated_one() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(chorus_operator::crd::CHART_CRD_PATH);
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let generated = chorus_operator::crd::crd_yaml().expect("CRD serialises");
    assert!(
        committed == generated,
        "{} is out of date; regenerate it with\n  cargo run -p chorus-operator -- crd > {}",
        path.display(),
        chorus_operator::crd::CHART_CRD_PATH
    );
}

#[test]
fn crd_has_scale_and_status_subresources_for_kubectl_scale_and_hpa() {
    let crd = chorus_operator::crd::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("messagingclusters.chorus.dev")
    );
    assert_eq!(crd.spec.names.short_names, Some(vec!["mc".to_owned()]));
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    let scale = version
        .subresources
        .as_ref()
        .and_then(|s| s.scale.clone())
        .expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Replicas",
            "Pods",
            "Ready",
            "Connections",
            "Delivery",
            "Master",
            "Age"
        ]
    );
}

#[test]
fn crd_uses_no_feature_newer_than_kubernetes_1_28() {
    let crd = chorus_operator::crd::crd();
    assert!(
        crd.spec
            .versions
            .iter()
            .all(|v| v.selectable_fields.is_none()),
        "selectableFields needs 1.30"
    );
    // CEL rules may carry `rule`, `message` and `messageExpression` on 1.28;
    // `reason`, `fieldPath` and `optionalOldSelf` came later or behind gates.
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
    let mut rules = Vec::new();
    collect_rules(&schema, &mut rules);
    assert!(rules.len() >= 4, "CEL rules found: {rules:?}");
    for rule in &rules {
        let keys: Vec<_> = rule
            .as_object()
            .expect("rule object")
            .keys()
            .map(String::as_str)
            .collect();
        assert!(
            keys.iter()
                .all(|k| ["rule", "message", "messageExpression"].contains(k)),
            "{rule}"
        );
    }
}

fn collect_rules(v: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if k == "x-kubernetes-validations" {
                    out.extend(v.as_array().into_iter().flatten().cloned());
                } else {
                    collect_rules(v, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_rules(v, out)),
        _ => {}
    }
}

/// The API server only accepts structural schemas: every node typed (or
/// int-or-string), no `$ref`, no `properties` beside `additionalProperties`.
#[test]
fn crd_schema_is_structural() {
    let crd = chorus_operator::crd::crd();
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
    let root = &schema["openAPIV3Schema"];
    let mut problems = Vec::new();
    check_structural("", root, &mut problems);
    assert_eq!(problems, Vec::<String>::new());
}

fn check_structural(path: &str, node: &serde_json::Value, problems: &mut Vec<String>) {
    let Some(map) = node.as_object() else { return };
    let typed = map.contains_key("type")
        || map.get("x-kubernetes-int-or-string") == Some(&serde_json::Value::Bool(true))
        || map.get("x-kubernetes-preserve-unknown-fields") == Some(&serde_json::Value::Bool(true));
    if !typed {
        problems.push(format!("{path}: no type"));
    }
    for forbidden in [
        "$ref",
        "$schema",
        "definitions",
        "$defs",
        "oneOf",
        "anyOf",
        "allOf",
        "not",
    ] {
        if map.contains_key(forbidden) {
            problems.push(format!("{path}: {forbidden}"));
        }
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        problems.push(format!("{path}: properties and additionalProperties"));
    }
    if let Some(props) = map.get("properties").and_then(|p| p.as_object()) {
        for (name, child) in props {
            check_structural(&format!("{path}.{name}"), child, problems);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = map.get(key).filter(|c| c.is_object()) {
            check_structural(&format!("{path}[{key}]"), child, problems);
        }
    }
}

/// `status.conditions` is a list-map keyed by `type`: the API server keeps
/// one condition per type and server-side apply merges them by type. A
/// map key must be required in the item schema, or the API server refuses
/// the CRD.
#[test]
fn conditions_are_a_list_map_keyed_by_type() {
    let crd = chorus_operator::crd::crd();
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
    let conditions = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    let required = conditions["items"]["required"]
        .as_array()
        .expect("required fields of a condition");
    assert!(
        required.contains(&serde_json::json!("type")),
        "{required:?}"
    );
}

#[test]
fn the_api_server_refuses_a_session_affinity_it_does_not_know() {
    let crd = chorus_operator::crd::crd();
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
    let affinity = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["service"]["properties"]
        ["sessionAffinity"]["properties"]["type"];
    assert_eq!(affinity["enum"], serde_json::json!(["ClientIP", "None"]));
    assert_eq!(
        affinity["default"], "ClientIP",
        "sticky unless asked otherwise"
    );
}
