//! The chart's monitoring objects against the real thing: every alert
//! expression and dashboard query names only metrics a real node's
//! `/metrics` or the operator's registry exports, every dashboard query
//! evaluates in a real Prometheus, and the broker-down
//! alert, loaded into a real Prometheus with the rest of the chart's rules,
//! fires while a node's Redis is dead and clears once it is back.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use chorus_testkit::prometheus::now;
use chorus_testkit::{Prometheus, PrometheusOptions, RedisServer, Target};
use chorus_tests::chart::{alert_exprs, one, render};
use chorus_tests::{TestNode, wait_until};
use serde_json::{Value, json};

fn monitoring_on() -> Value {
    json!({"monitoring": {
        "podMonitor": {"enabled": true},
        "serviceMonitor": {"enabled": true},
        "prometheusRule": {"enabled": true},
        "dashboard": {"enabled": true},
    }})
}

/// Every sample name an exposition can hold: the samples it has, and for a
/// family without any yet (a labelled gauge before its first value) the
/// names its `# TYPE` line promises.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(family) = line.strip_prefix("# TYPE ") {
            let (name, kind) = family.split_once(' ').unwrap();
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The metric names an expression names, grepped: every word with the
/// prefix of the servers' (`chorus_`, `process_`) or the operator's metrics.
/// A label value or a word that only looks like a name would show up as
/// unknown, never pass unseen; that each expression parses and evaluates is
/// checked by a real Prometheus (the second test).
fn selected(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("chorus_") || word.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// A dashboard query as Prometheus gets it from Grafana: the variables
/// filled in.
fn as_sent(query: &str) -> String {
    query
        .replace("$__rate_interval", "1m")
        .replace("$namespace", ".*")
        .replace("$cluster", ".*")
}

/// Every panel query of the chart's dashboard (panel title, expr).
fn dashboard_queries(objects: &[Value]) -> Vec<(String, String)> {
    let json = one(objects, "ConfigMap")["data"]["chorus.json"]
        .as_str()
        .unwrap();
    let board: Value = serde_json::from_str(json).unwrap();
    let mut queries = Vec::new();
    for panel in board["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap().to_owned();
            queries.push((title, as_sent(target["expr"].as_str().unwrap())));
        }
    }
    for variable in board["templating"]["list"].as_array().unwrap() {
        if let Some(q) = variable["query"]["query"].as_str()
            && let Some(inner) = q
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
        {
            queries.push((variable["name"].to_string(), as_sent(inner.0)));
        }
    }
    queries
}

/// The operator's registry once it has seen a Redis group (its labelled
/// gauges have no series before).
fn operator_metrics() -> String {
    use chorus_operator::topology::{NodeAddr, Observed, ReplicaStatus, TopologyReport};
    let mc = serde_json::from_value(json!({
        "apiVersion": "chorus.dev/v1alpha1",
        "kind": "MessagingCluster",
        "metadata": {"name": "chat", "namespace": "chat-ns", "uid": "0000", "generation": 1},
        "spec": {},
    }))
    .unwrap();
    let cluster = chorus_operator::cluster::validate(&mc, "chorus-system").unwrap();
    let master = NodeAddr::new("chat-redis-0.chat-redis.chat-ns.svc", 6379);
    let report = TopologyReport {
        master: Some(master.clone()),
        basis: None,
        master_reachable: true,
        replicas: vec![ReplicaStatus {
            addr: master,
            link_up: true,
        }],
        sentinels_agreeing: 3,
        unreachable: Vec::new(),
        waiting: None,
        actions: Vec::new(),
        observed: Observed::default(),
    };
    let metrics = chorus_operator::metrics::Metrics::default();
    metrics.redis_group(&cluster, Some(&report));
    metrics.encode().unwrap()
}

#[tokio::test]
async fn alerts_and_dashboard_name_only_metrics_the_servers_and_the_operator_export() {
    let node = TestNode::start(&[]).await;
    let scraped = reqwest::get(node.http("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let operator = operator_metrics();
    let mut known = exported(&scraped);
    known.extend(exported(&operator));
    // Sanity: both sources were read, and the derivation saw labelled families.
    for name in [
        "chorus_broker_up",
        "chorus_errors_total",
        "process_resident_memory_bytes",
        "chorus_operator_reconcile_errors_total",
        "chorus_operator_redis_master_up",
    ] {
        assert!(known.contains(name), "{name} not in {known:?}");
    }

    let objects = render(&monitoring_on());
    let mut queries = alert_exprs(&objects);
    queries.extend(dashboard_queries(&objects));
    assert!(queries.len() > 30, "{queries:?}");
    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for (what, expr) in &queries {
        let names = selected(expr);
        assert!(!names.is_empty(), "{what}: {expr} selects no metric");
        for name in names {
            if !known.contains(&name) {
                unknown.push(format!("{what}: {name}"));
            }
            used.insert(name);
        }
    }
    assert!(
        unknown.is_empty(),
        "not exported by a node or the operator: {unknown:#?}"
    );
    // What the issue asks the alerts to watch is there.
    for name in [
        "chorus_broker_up",
        "chorus_redis_canary_round_trips_total",
        "chorus_slow_consumers_dropped_total",
        "chorus_max_connections",
        "chorus_operator_redis_replicas_linked",
        "chorus_operator_redis_master_up",
        "chorus_operator_reconcile_errors_total",
        "chorus_operator_autoscaler_scales_total",
        "chorus_operator_server_pod_restarts_total",
        "chorus_operator_connections_shed_total",
    ] {
        assert!(used.contains(name), "no alert or panel uses {name}");
    }
}

const ALERT: &str = "ChorusBrokerDown";

#[tokio::test]
async fn the_broker_down_alert_fires_while_redis_is_dead_and_clears_once_it_is_back() {
    let mut redis = RedisServer::start().await;
    let node = TestNode::start(&["--broker", &redis.url(), "--node-id", "chat-0"]).await;
    wait_until("the node to reach Redis", || async {
        node.node.broker_up()
    })
    .await;

    // Every rule of the chart, as the Prometheus Operator would load the
    // PrometheusRule; only the broker-down alert's `for` is shortened, so
    // that it goes on to fire within the test.
    let objects = render(&monitoring_on());
    let mut rules = one(&objects, "PrometheusRule")["spec"].clone();
    for group in rules["groups"].as_array_mut().unwrap() {
        for rule in group["rules"].as_array_mut().unwrap() {
            if rule["alert"] == ALERT {
                rule["for"] = json!("2s");
            }
        }
    }
    let labels = [
        ("namespace", "chat-ns"),
        ("pod", "chat-0"),
        ("cluster", "chat"),
    ];
    let prometheus = Prometheus::start(PrometheusOptions {
        targets: vec![Target {
            addr: node.addr.to_string(),
            labels: labels.map(|(k, v)| (k.to_owned(), v.to_owned())).into(),
        }],
        rules: Some(rules),
    })
    .await;
    let expr = alert_exprs(&objects)
        .into_iter()
        .find(|(name, _)| name == ALERT)
        .unwrap()
        .1;

    // Healthy: scraped, every rule evaluated without error, nothing fires.
    wait_until("every rule to be evaluated by Prometheus", || async {
        let rules = prometheus.rules().await;
        !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok")
    })
    .await;
    wait_until("Prometheus to scrape the node", || async {
        prometheus.query("chorus_broker_up == 1").await.len() == 1
    })
    .await;
    assert!(prometheus.query(&expr).await.is_empty());
    assert!(prometheus.alerts(ALERT).await.is_empty());
    // Every dashboard query parses and evaluates in Prometheus itself.
    for (panel, query) in dashboard_queries(&objects) {
        if let Err(e) = prometheus.api("query", &[("query", &query)]).await {
            panic!("panel {panel}: {e}");
        }
    }
    assert!(node.metric("chorus_redis_canary_round_trips_total").await > 0.0);

    let killed_at = now();
    redis.kill();
    wait_until("the broker-down alert to fire", || async {
        prometheus
            .alerts(ALERT)
            .await
            .iter()
            .any(|a| a["state"] == "firing")
    })
    .await;
    let alerts = prometheus.alerts(ALERT).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let alert = &alerts[0];
    assert_eq!(alert["labels"]["pod"], "chat-0");
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(
        alert["annotations"]["summary"],
        "Chorus pod chat-ns/chat-0 cannot reach Redis"
    );
    let fired = prometheus.query(&expr).await;
    assert_eq!(fired.len(), 1, "{fired:?}");

    redis.restart().await;
    wait_until("the node to reach Redis again", || async {
        node.node.broker_up()
    })
    .await;
    wait_until("the broker-down alert to clear", || async {
        prometheus.alerts(ALERT).await.is_empty()
    })
    .await;
    assert!(prometheus.query(&expr).await.is_empty());
    // Looking back, as the end-to-end suite does after a failover: the
    // expression held for the pod while Redis was dead.
    let held = prometheus.query_range(&expr, killed_at, now()).await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["metric"]["pod"], "chat-0");
}
