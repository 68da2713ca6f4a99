//! `--compare single`: the fleet's figures against one memory-broker node's,
//! as a JSON object and a table.

use serde_json::{Value, json};

use crate::report::{Report, num};

/// Figures compared between the fleet and the single node.
const COMPARED: &[&str] = &[
    "cpu_s_per_m_deliveries",
    "cpu_s_per_m_deliveries_servers",
    "deliveries_per_sec",
    "messages_per_sec",
    "kib_per_connection",
];

fn latency(r: &Report, q: &str) -> Option<f64> {
    r.get("latency_ms")?.get(q)?.as_f64()
}

pub fn compare(multi: &Report, single: &Report) -> (Value, String) {
    let mut out = serde_json::Map::new();
    let mut shown = format!(
        "== {}: {} vs {} ==\n",
        multi.scenario, multi.fleet, single.fleet
    );
    for key in COMPARED {
        let (Some(m), Some(s)) = (
            multi.get(key).and_then(Value::as_f64),
            single.get(key).and_then(Value::as_f64),
        ) else {
            continue;
        };
        let ratio = m / s;
        out.insert(
            (*key).into(),
            json!({"fleet": m, "single": s, "ratio": num(Some(ratio))}),
        );
        shown.push_str(&format!(
            "  {key:<32} fleet {m:>10.3}  single {s:>10.3}  ratio {ratio:.2}\n"
        ));
    }
    for q in ["p50", "p99"] {
        if let (Some(m), Some(s)) = (latency(multi, q), latency(single, q)) {
            out.insert(format!("latency_{q}_ms"), json!({"fleet": m, "single": s}));
            shown.push_str(&format!(
                "  latency {q:<24} fleet {m:>8.2} ms  single {s:>8.2} ms\n"
            ));
        }
    }
    (Value::Object(out), shown)
}
