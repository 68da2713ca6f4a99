//! The MessagingCluster field reference in `docs/kubernetes.md` matches the
//! CRD: every field path of `spec` is documented (and nothing else), with
//! the schema's type and default.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use chorus_crds::MessagingCluster;
use kube::CustomResourceExt;
use serde_json::Value;

/// Fields whose schema is a Kubernetes type, documented upstream: the
/// reference stops at them instead of listing their inner fields.
const KUBERNETES_TYPES: [&str; 2] = ["spec.resources", "spec.redis.resources"];

/// Kubernetes types inside every `spec.pods.<component>`.
const POD_KUBERNETES_TYPES: [&str; 5] = [
    "tolerations",
    "affinity",
    "topologySpreadConstraints",
    "imagePullSecrets",
    "securityContext",
];

fn is_kubernetes_type(path: &str) -> bool {
    KUBERNETES_TYPES.contains(&path)
        || path.strip_prefix("spec.pods.").is_some_and(|rest| {
            rest.split_once('.')
                .is_some_and(|(_, field)| POD_KUBERNETES_TYPES.contains(&field))
        })
}

/// What the reference says about one field.
#[derive(Debug, PartialEq)]
struct Row {
    type_: String,
    /// `—` when the schema has no scalar default.
    default: String,
}

fn spec_schema() -> Value {
    let crd = MessagingCluster::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    serde_json::to_value(schema).unwrap()["properties"]["spec"].clone()
}

/// Every field path below `spec`, with what the reference must say about it.
fn schema_rows(path: &str, schema: &Value, out: &mut BTreeMap<String, Row>) {
    let Some(properties) = schema["properties"].as_object() else {
        return;
    };
    for (name, field) in properties {
        let sub = format!("{path}.{name}");
        let default = match &field["default"] {
            Value::String(s) => format!("`{s}`"),
            v @ (Value::Number(_) | Value::Bool(_)) => format!("`{v}`"),
            _ => "—".to_owned(),
        };
        let row = Row {
            type_: field["type"].as_str().unwrap_or("").to_owned(),
            default,
        };
        out.insert(sub.clone(), row);
        if !is_kubernetes_type(&sub) {
            schema_rows(&sub, field, out);
        }
    }
}

/// Rows of the table under `## MessagingCluster reference`, keyed by path.
fn documented_rows(markdown: &str) -> BTreeMap<String, Row> {
    let section = markdown
        .split("\n## MessagingCluster reference")
        .nth(1)
        .expect("docs/kubernetes.md has a `## MessagingCluster reference` section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // ["", "`spec.x`", "type", "default", "meaning", ""]
        let Some(path) = cells
            .get(1)
            .and_then(|c| c.strip_prefix("`spec."))
            .and_then(|c| c.strip_suffix('`'))
        else {
            continue;
        };
        assert!(cells.len() >= 5, "malformed row: {line}");
        let previous = rows.insert(
            format!("spec.{path}"),
            Row {
                type_: cells[2].to_owned(),
                default: cells[3].to_owned(),
            },
        );
        assert!(previous.is_none(), "spec.{path} is documented twice");
    }
    rows
}

fn reference() -> BTreeMap<String, Row> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/kubernetes.md");
    documented_rows(&std::fs::read_to_string(path).unwrap())
}

#[test]
fn every_spec_field_is_documented_and_every_documented_field_exists() {
    let mut schema = BTreeMap::new();
    schema_rows("spec", &spec_schema(), &mut schema);
    let documented = reference();
    let missing: Vec<&String> = schema
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    let unknown: Vec<&String> = documented
        .keys()
        .filter(|k| !schema.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "in the CRD but not in docs/kubernetes.md: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "in docs/kubernetes.md but not in the CRD: {unknown:?}"
    );
}

#[test]
fn documented_types_and_defaults_are_the_schemas() {
    let mut schema = BTreeMap::new();
    schema_rows("spec", &spec_schema(), &mut schema);
    let documented = reference();
    let wrong: Vec<String> = schema
        .iter()
        .filter_map(|(path, row)| {
            let doc = documented.get(path)?;
            (doc != row).then(|| format!("{path}: documented {doc:?}, schema says {row:?}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_reference_check_reads_rows_and_notices_drift() {
    let markdown = "intro\n## MessagingCluster reference\n\n| Field | Type | Default | Meaning |\n\
                    | --- | --- | --- | --- |\n| `spec.replicas` | integer | `3` | pods |\n\
                    | `spec.nope` | string | — | gone |\n## Operations\n| `spec.later` | x | y | z |\n";
    let rows = documented_rows(markdown);
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        ["spec.nope", "spec.replicas"]
    );
    assert_eq!(
        rows["spec.replicas"],
        Row {
            type_: "integer".into(),
            default: "`3`".into()
        }
    );
    let mut schema = BTreeMap::new();
    schema_rows("spec", &spec_schema(), &mut schema);
    assert!(!schema.contains_key("spec.nope"));
    assert_eq!(schema["spec.replicas"], rows["spec.replicas"]);
    assert!(schema.contains_key("spec.redis.external.url"));
    assert!(!schema.keys().any(|k| k.starts_with("spec.resources.")));
}

#[test]
fn the_status_section_names_the_printer_columns_as_they_are() {
    let crd = MessagingCluster::crd();
    let columns: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.json_path.trim_start_matches('.').to_owned())
        .filter(|p| !p.starts_with("metadata."))
        .collect();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/kubernetes.md");
    let docs = std::fs::read_to_string(path).unwrap();
    let start = docs
        .find("`kubectl get mc` shows")
        .expect("docs/kubernetes.md says what `kubectl get mc` shows");
    let paragraph = &docs[start..start + docs[start..].find("\n\n").unwrap()];
    let named: Vec<&str> = paragraph
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("spec.") || s.starts_with("status."))
        .collect();
    for column in &columns {
        assert!(
            named.contains(&column.as_str()),
            "{column} not named in: {paragraph}"
        );
    }
    for name in &named {
        assert!(
            columns.iter().any(|c| c == name),
            "`{name}` is not a printer column ({columns:?}): {paragraph}"
        );
    }
}
