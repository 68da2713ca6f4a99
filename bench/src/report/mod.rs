//! Output: a human table on stdout, then one JSON line per scenario run.
//!
//! - [`Report`]: the figures of one run, as the table and the JSON line
//! - [`figures`]: what the scenarios measure, put into a report
//! - [`compare`]: a fleet against one memory-broker node

mod compare;
mod figures;

pub use compare::compare;
pub use figures::{report_delivery, report_memory};

use serde_json::{Map, Value};

pub struct Report {
    pub scenario: String,
    pub fleet: String,
    rows: Vec<(String, String)>,
    json: Map<String, Value>,
}

impl Report {
    pub fn new(scenario: &str, fleet: &str) -> Self {
        let mut json = Map::new();
        json.insert("scenario".into(), scenario.into());
        json.insert("fleet".into(), fleet.into());
        Self {
            scenario: scenario.into(),
            fleet: fleet.into(),
            rows: Vec::new(),
            json,
        }
    }

    /// Adds a figure: `key` in the JSON line, `label` and `shown` in the table.
    pub fn put(
        &mut self,
        key: &str,
        label: &str,
        value: impl Into<Value>,
        shown: impl Into<String>,
    ) {
        self.json.insert(key.into(), value.into());
        self.rows.push((label.into(), shown.into()));
    }

    /// Adds a JSON-only value.
    pub fn put_json(&mut self, key: &str, value: impl Into<Value>) {
        self.json.insert(key.into(), value.into());
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key)
    }

    pub fn json(&self) -> Value {
        Value::Object(self.json.clone())
    }

    pub fn table(&self) -> String {
        let width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let mut out = format!("== {} — {} ==\n", self.scenario, self.fleet);
        for (label, shown) in &self.rows {
            out.push_str(&format!("  {label:<width$}  {shown}\n"));
        }
        out
    }
}

/// Optional float for JSON (null when unknown), rounded to 4 decimals.
pub fn num(v: Option<f64>) -> Value {
    match v {
        Some(x) if x.is_finite() => Value::from((x * 1e4).round() / 1e4),
        _ => Value::Null,
    }
}

pub fn show(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(x) if x.is_finite() => {
            if x.abs() >= 100.0 {
                format!("{x:.0}{unit}")
            } else if x.abs() >= 10.0 {
                format!("{x:.1}{unit}")
            } else {
                format!("{x:.3}{unit}")
            }
        }
        _ => "n/a".into(),
    }
}

pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}
