//! The Helm chart (`charts/chorus`) as the real Helm engine renders it:
//! helm-python-sdk, as the chart tests in `charts/chorus/tests` use it
//! (`scripts/test.sh` installs it with PyYAML).

use serde_json::Value;

use crate::cluster::repo;

/// Renders the chart into the objects of every manifest, as `helm template`
/// would for release `chorus` in `chorus-system` with `values`.
pub fn render(values: &Value) -> Vec<Value> {
    const SCRIPT: &str = r#"
import json, sys
import helm_python, yaml
with helm_python.Chart.load(sys.argv[1]) as chart:
    files = chart.render(values=json.loads(sys.argv[2]), name="chorus", namespace="chorus-system", is_install=True)
objects = [o for path, text in files.items() if not path.endswith("NOTES.txt") for o in yaml.safe_load_all(text) if o]
print(json.dumps(objects))
"#;
    let chart = repo().join("charts/chorus");
    let out = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(&chart)
        .arg(values.to_string())
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        out.status.success(),
        "rendering {} (needs helm-python-sdk and pyyaml: scripts/test.sh installs them): {}",
        chart.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("rendered objects: {e}"))
}

/// The one object of `kind` among `objects`.
pub fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected among {objects:?}");
    found[0]
}

/// Every alert's expression (name, expr) in the rendered PrometheusRule.
pub fn alert_exprs(objects: &[Value]) -> Vec<(String, String)> {
    one(objects, "PrometheusRule")["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .map(|r| {
            let name = r["alert"].as_str().unwrap().to_owned();
            (name, r["expr"].as_str().unwrap().to_owned())
        })
        .collect()
}
