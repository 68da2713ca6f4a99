//! Operator metrics (prometheus-client, one explicit registry): reconcile
//! count by result, reconcile duration, failures by error kind.

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok`, `invalid_spec` or `error`.
    pub result: &'static str,
}

/// Every value of the `error` label (`reconcile::Error::metric_label`).
pub const ERROR_STEPS: [&str; 6] = [
    "invalid_spec",
    "dereference",
    "apply",
    "redis_group",
    "roll",
    "status",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The failing step, from `reconcile::Error::metric_label`.
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `out` or `in`.
    pub direction: &'static str,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    restarts: Counter,
    scales: Family<DirectionLabels, Counter>,
    shed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("chorus_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        registry.register(
            "reconciles",
            "Reconciliations of MessagingClusters, by result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations, by failing step",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            duration.clone(),
        );
        let restarts = Counter::default();
        let scales = Family::<DirectionLabels, Counter>::default();
        let shed = Counter::default();
        registry.register(
            "server_pod_restarts",
            "Server pods restarted because their backplane stayed down while it worked for the others",
            restarts.clone(),
        );
        registry.register(
            "autoscaler_scales",
            "Replica changes made by the connection autoscaler, by direction",
            scales.clone(),
        );
        registry.register(
            "connections_shed",
            "Connections the operator asked server pods to move elsewhere (rebalance after a scale-out)",
            shed.clone(),
        );
        for direction in ["out", "in"] {
            drop(scales.get_or_create(&DirectionLabels { direction }));
        }
        // Export every series from the start, so rates and alerts work
        // before the first failure.
        for result in ["ok", "invalid_spec", "error"] {
            drop(reconciles.get_or_create(&ResultLabels { result }));
        }
        for error in ERROR_STEPS {
            drop(failures.get_or_create(&ErrorLabels { error }));
        }
        Self {
            registry,
            reconciles,
            failures,
            duration,
            restarts,
            scales,
            shed,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, result: &'static str, took: Duration) {
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn failed(&self, error: &'static str) {
        debug_assert!(ERROR_STEPS.contains(&error), "unlisted error label {error}");
        self.failures.get_or_create(&ErrorLabels { error }).inc();
    }

    pub fn server_pod_restarted(&self) {
        self.restarts.inc();
    }

    pub fn autoscaled(&self, direction: &'static str) {
        self.scales
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub fn shed(&self, connections: u64) {
        self.shed.inc_by(connections);
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_series_is_exported_at_zero_from_the_start() {
        let text = Metrics::default().encode().expect("encodes");
        for error in ERROR_STEPS {
            assert!(
                text.contains(&format!(
                    "chorus_operator_reconcile_errors_total{{error=\"{error}\"}} 0"
                )),
                "{error}: {text}"
            );
        }
    }

    #[test]
    fn counts_and_durations_show_in_the_text_format() {
        let m = Metrics::default();
        m.reconciled("ok", Duration::from_millis(30));
        m.reconciled("ok", Duration::from_millis(30));
        m.failed("apply");
        let text = m.encode().expect("encodes");
        assert!(
            text.contains(r#"chorus_operator_reconciles_total{result="ok"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"chorus_operator_reconcile_errors_total{error="apply"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("chorus_operator_reconcile_duration_seconds_count 2"),
            "{text}"
        );
    }
}
