//! The chart's alert expressions against the server pods' real metrics: a
//! Prometheus on this machine (the test kit's) scrapes every server pod by
//! its IP each second, labelled as the chart's PodMonitor labels it, with
//! the chart's PrometheusRule loaded. The failover step asks it whether an
//! alert's expression had a result while Redis was gone, and whether it
//! has none once the fleet delivers again.

use chorus_testkit::prometheus::now;
use chorus_testkit::{Prometheus, PrometheusOptions, Target};
use chorus_tests::chart;

use super::*;

pub struct Alerts {
    prometheus: Prometheus,
    /// (alert, expr) of the chart's rule.
    exprs: Vec<(String, String)>,
}

impl Alerts {
    /// Starts scraping the cluster's server pods; returns once Prometheus
    /// has a sample of each.
    pub async fn watch_servers(run: &Run) -> Self {
        let objects = chart::render(&json!({"monitoring": {"prometheusRule": {"enabled": true}}}));
        let rules = chart::one(&objects, "PrometheusRule")["spec"].clone();
        let exprs = chart::alert_exprs(&objects);
        let servers = run.servers().await;
        let targets: Vec<Target> = servers
            .iter()
            .map(|p| Target {
                addr: format!("{}:8080", pod_ip(p).unwrap()),
                labels: vec![
                    ("namespace".to_owned(), run.ns.clone()),
                    ("pod".to_owned(), name(p)),
                    ("cluster".to_owned(), MC.to_owned()),
                ],
            })
            .collect();
        let prometheus = Prometheus::start(PrometheusOptions {
            targets,
            rules: Some(rules),
        })
        .await;
        let alerts = Self { prometheus, exprs };
        let want = servers.len();
        eventually(
            "Prometheus to scrape every server pod",
            POD_WAIT,
            || async {
                (alerts.prometheus.query("chorus_broker_up").await.len() == want).then_some(())
            },
        )
        .await;
        alerts
    }

    fn expr(&self, alert: &str) -> &str {
        let found = self.exprs.iter().find(|(name, _)| name == alert);
        &found.unwrap_or_else(|| panic!("no alert {alert}")).1
    }

    /// The pods (by label) for which `alert`'s expression had a result at
    /// some second since `since`.
    pub async fn held_for_since(&self, alert: &str, since: f64) -> BTreeSet<String> {
        let series = self
            .prometheus
            .query_range(self.expr(alert), since, now())
            .await;
        series
            .iter()
            .map(|s| s["metric"]["pod"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    /// Waits until `alert`'s expression has no result.
    pub async fn wait_clear(&self, alert: &str) {
        let expr = self.expr(alert);
        eventually(
            &format!("{alert}'s expression to clear"),
            POD_WAIT,
            || async { self.prometheus.query(expr).await.is_empty().then_some(()) },
        )
        .await;
    }
}
