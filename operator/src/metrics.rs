//! Operator metrics (prometheus-client, one explicit registry): reconcile
//! count by result, reconcile duration, failures by error kind, and what
//! the topology step saw of each managed Redis group.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::cluster::ValidCluster;
use crate::topology::TopologyReport;

/// A Redis group's series go once the topology step has not seen it for
/// this long: its MessagingCluster was deleted or switched to external
/// Redis (a live one is seen at every reconcile, at least every minute).
pub const GROUP_SERIES_TTL: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// The MessagingCluster's namespace.
    pub namespace: String,
    /// The MessagingCluster's name.
    pub cluster: String,
}

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
    redis_master_up: Family<ClusterLabels, Gauge>,
    redis_replicas_linked: Family<ClusterLabels, Gauge>,
    redis_replicas_desired: Family<ClusterLabels, Gauge>,
    /// When the topology step last saw each group. Std mutex: touched
    /// once per reconcile and per scrape, never across an await.
    groups_seen: Mutex<HashMap<ClusterLabels, Instant>>,
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
        let redis_master_up = Family::<ClusterLabels, Gauge>::default();
        registry.register(
            "redis_master_up",
            "1 while the managed Redis group has a master that answers as one, by MessagingCluster",
            redis_master_up.clone(),
        );
        let redis_replicas_linked = Family::<ClusterLabels, Gauge>::default();
        registry.register(
            "redis_replicas_linked",
            "Redis replicas with a live replication link to the master, by MessagingCluster",
            redis_replicas_linked.clone(),
        );
        let redis_replicas_desired = Family::<ClusterLabels, Gauge>::default();
        registry.register(
            "redis_replicas_desired",
            "Redis replicas the spec asks for (spec.redis.replicas - 1), by MessagingCluster",
            redis_replicas_desired.clone(),
        );
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
            redis_master_up,
            redis_replicas_linked,
            redis_replicas_desired,
            groups_seen: Mutex::default(),
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

    /// What the topology step saw of `c`'s managed Redis group; `None`
    /// (external Redis, or no pods yet) records nothing.
    pub fn redis_group(&self, c: &ValidCluster, report: Option<&TopologyReport>) {
        let Some(report) = report else {
            return;
        };
        let labels = ClusterLabels {
            namespace: c.names.namespace.clone(),
            cluster: c.names.instance.clone(),
        };
        let master_up = report.master.is_some() && report.master_reachable;
        let linked = i64::try_from(report.ready_replicas()).unwrap_or(i64::MAX);
        let desired = i64::from(c.spec.redis.replicas.saturating_sub(1).max(0));
        self.redis_master_up
            .get_or_create(&labels)
            .set(i64::from(master_up));
        self.redis_replicas_linked
            .get_or_create(&labels)
            .set(linked);
        self.redis_replicas_desired
            .get_or_create(&labels)
            .set(desired);
        self.seen().insert(labels, Instant::now());
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<ClusterLabels, Instant>> {
        // A poisoned lock only means a panic mid-insert; the map is usable.
        self.groups_seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the series of groups not seen for [`GROUP_SERIES_TTL`], so a
    /// deleted cluster does not alert forever.
    fn forget_unseen(&self, now: Instant) {
        self.seen().retain(|labels, seen| {
            let keep = now.duration_since(*seen) < GROUP_SERIES_TTL;
            if !keep {
                self.redis_master_up.remove(labels);
                self.redis_replicas_linked.remove(labels);
                self.redis_replicas_desired.remove(labels);
            }
            keep
        });
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        self.forget_unseen(Instant::now());
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_series_is_exported_at_zero_from_the_start() {
        let text = Metrics::default().encode().expect("encodes");
        for error in ERROR_STEPS {
            assert!(
                text.contains(&format!(
                    "chorus_operator_reconcile_errors_total{{error=\"{error}\"}} 0"
                )),
                "{error}: {text}"
            );
        }
        // The autopilot's counters too, so that increase() counts their first.
        for series in [
            "chorus_operator_reconciles_total{result=\"error\"} 0",
            "chorus_operator_server_pod_restarts_total 0",
            "chorus_operator_connections_shed_total 0",
            "chorus_operator_autoscaler_scales_total{direction=\"out\"} 0",
            "chorus_operator_autoscaler_scales_total{direction=\"in\"} 0",
        ] {
            assert!(text.contains(series), "{series}: {text}");
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

    fn group(master_reachable: bool, links: &[bool]) -> TopologyReport {
        use crate::topology::{NodeAddr, Observed, ReplicaStatus};
        TopologyReport {
            master: Some(NodeAddr::new("chat-redis-0.chat-redis.default.svc", 6379)),
            basis: None,
            master_reachable,
            replicas: links
                .iter()
                .map(|&link_up| ReplicaStatus {
                    addr: NodeAddr::new("chat-redis-1.chat-redis.default.svc", 6379),
                    link_up,
                })
                .collect(),
            sentinels_agreeing: 3,
            unreachable: Vec::new(),
            waiting: None,
            actions: Vec::new(),
            observed: Observed::default(),
        }
    }

    #[test]
    fn the_redis_group_as_the_topology_step_saw_it_by_cluster() {
        use crate::build::fixtures::{TestCluster, valid};
        use chorus_crds::MessagingCluster;
        let m = Metrics::default();
        let c = valid(&MessagingCluster::test());
        // External Redis, or no pods yet: nothing to say.
        m.redis_group(&c, None);
        assert!(!m.encode().expect("encodes").contains("redis_master_up{"));

        m.redis_group(&c, Some(&group(true, &[true, false])));
        let text = m.encode().expect("encodes");
        let labels = r#"{namespace="default",cluster="chat"}"#;
        for line in [
            format!("chorus_operator_redis_master_up{labels} 1"),
            format!("chorus_operator_redis_replicas_linked{labels} 1"),
            format!("chorus_operator_redis_replicas_desired{labels} 2"),
        ] {
            assert!(text.contains(&line), "{line}\n{text}");
        }
        m.redis_group(&c, Some(&group(false, &[])));
        let text = m.encode().expect("encodes");
        assert!(text.contains(&format!("chorus_operator_redis_master_up{labels} 0")));
        assert!(text.contains(&format!("chorus_operator_redis_replicas_linked{labels} 0")));

        // A cluster no longer seen (deleted) stops being reported.
        m.forget_unseen(Instant::now() + GROUP_SERIES_TTL);
        assert!(!m.encode().expect("encodes").contains("redis_master_up{"));
    }
}
