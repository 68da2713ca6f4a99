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
    assert_eq!(columns, ["Replicas", "Ready", "Delivery", "Master", "Age"]);
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
