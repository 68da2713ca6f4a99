"""The monitoring objects: rendered only when asked, of the right kinds,
pointed at the pods and ports the operator really creates, and a dashboard
that parses. (Each alert firing on its fault and only then: test_alerts.py,
through promtool. That every alert expression and dashboard query names only
metrics the servers and the operator export, and that an alert fires on a
real fault, is checked by tests/tests/monitoring.rs against a real node.)"""

from __future__ import annotations

import json
import re

import helm_python
import pytest
from conftest import NAMESPACE, objects, one, render
from operator_api import OPERATOR_SRC
from test_chart import lint_errors

MONITORING_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule", "ConfigMap"}
ALL_ON = {
    "monitoring": {
        "podMonitor": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    }
}

# The alerts issue 17 asks for, by what they catch.
ALERTS = {
    "ChorusBrokerDown",  # broker down on a pod
    "ChorusRedisNoMaster",  # no master
    "ChorusCanaryFailing",  # canary failing on a pod
    "ChorusSlowConsumerDrops",  # slow-consumer drops rising
    "ChorusConnectionLimitNear",  # connection limit near
    "ChorusRedisReplicationBroken",  # replication broken
    "ChorusKafkaIngestDown",  # an ingest cannot reach its Kafka
    "ChorusKafkaIngestDeadLetters",  # ingested records dead-lettered
    "ChorusReconcileErrors",  # reconcile errors
}


def kinds(rendered) -> list[str]:
    return sorted(o["kind"] for o in objects(rendered) if o["kind"] in MONITORING_KINDS)


def rules(rendered) -> list[dict]:
    rule = one(rendered, "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def dashboard(rendered) -> dict:
    return json.loads(one(rendered, "ConfigMap")["data"]["chorus.json"])


def test_nothing_is_rendered_unless_asked(chart):
    assert kinds(render(chart)) == []


@pytest.mark.parametrize(
    "switch, kind",
    [
        ("podMonitor", "PodMonitor"),
        ("serviceMonitor", "ServiceMonitor"),
        ("prometheusRule", "PrometheusRule"),
        ("dashboard", "ConfigMap"),
    ],
)
def test_each_switch_renders_its_object_alone(chart, switch, kind):
    rendered = render(chart, {"monitoring": {switch: {"enabled": True}}})
    assert kinds(rendered) == [kind]
    obj = one(rendered, kind)
    expected_api = "v1" if kind == "ConfigMap" else "monitoring.coreos.com/v1"
    assert obj["apiVersion"] == expected_api
    assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "chorus"


def test_the_chart_lints_with_every_monitoring_object():
    assert lint_errors(ALL_ON) == []


def operator_constant(path: str, pattern: str) -> str:
    found = re.search(pattern, (OPERATOR_SRC / path).read_text())
    assert found, f"{pattern} not in operator/src/{path}: the builder changed shape"
    return found.group(1)


def test_the_pod_monitor_scrapes_the_server_pods_the_operator_builds(chart):
    monitor = one(render(chart, ALL_ON), "PodMonitor")
    app = operator_constant("build/meta.rs", r'pub const APP_NAME: &str = "([^"]+)"')
    component = operator_constant("build/meta.rs", r'Component::Server => "([^"]+)"')
    port = operator_constant("build/server_deployment.rs", r'name: Some\("([^"]+)"\.to_owned\(\)\),\s*container_port: SERVER_PORT')
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/component": component,
    }
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == (port, "/metrics")
    # Every namespace the operator manages.
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    scoped = one(render(chart, {**ALL_ON, "watchNamespace": "team-a"}), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    # Series carry the MessagingCluster's name as `cluster`, like the operator's.
    (relabel,) = endpoint["relabelings"]
    assert relabel == {
        "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
        "targetLabel": "cluster",
    }


def test_the_service_monitor_scrapes_the_operator_metrics_service(chart):
    rendered = render(chart, {**ALL_ON, "metrics": {"port": 9100}})
    monitor = one(rendered, "ServiceMonitor")
    service = one(rendered, "Service", "chorus-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True
    with pytest.raises(helm_python.HelmError, match="metrics.service.enabled"):
        render(chart, {**ALL_ON, "metrics": {"service": {"enabled": False}}})


def test_the_rule_has_an_alert_for_each_fault_with_a_severity_and_a_summary(chart):
    found = rules(render(chart, ALL_ON))
    names = {r["alert"] for r in found}
    assert ALERTS <= names, ALERTS - names
    for r in found:
        assert r["labels"]["severity"] in {"critical", "warning"}, r
        assert r["expr"].strip() and r["for"], r
        assert "{{ $labels." in r["annotations"]["summary"], r


def test_thresholds_and_alert_labels_come_from_values(chart):
    values = {
        "monitoring": {
            "prometheusRule": {
                "enabled": True,
                "labels": {"release": "kube-prometheus-stack"},
                "alertLabels": {"team": "platform"},
                "connectionLimitRatio": 0.75,
                "slowConsumerDropsPerSecond": 2,
                "deliveryLatencyP99Seconds": 0.25,
            }
        }
    }
    rendered = render(chart, values)
    assert one(rendered, "PrometheusRule")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    by_name = {r["alert"]: r for r in rules(rendered)}
    assert all(r["labels"]["team"] == "platform" for r in by_name.values())
    assert by_name["ChorusConnectionLimitNear"]["expr"].endswith("> 0.75")
    assert by_name["ChorusSlowConsumerDrops"]["expr"].endswith("> 2")
    assert by_name["ChorusDeliveryLatencyHigh"]["expr"].endswith("> 0.25")


def test_the_dashboard_is_labelled_for_the_grafana_sidecar_and_parses(chart):
    rendered = render(chart, ALL_ON)
    config_map = one(rendered, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == NAMESPACE
    board = dashboard(rendered)
    assert board["title"] == "Chorus" and board["uid"] == "chorus"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "namespace", "cluster"}
    graphs = [p for p in board["panels"] if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    elsewhere = render(chart, {"monitoring": {"dashboard": {"enabled": True, "namespace": "grafana", "annotations": {"grafana_folder": "Chorus"}}}})
    moved = one(elsewhere, "ConfigMap")
    assert moved["metadata"]["namespace"] == "grafana"
    assert moved["metadata"]["annotations"] == {"grafana_folder": "Chorus"}


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"monitoring": {"podMonitor": {"interval": "soon"}}}, "/monitoring/podMonitor/interval"),
        ({"monitoring": {"prometheusRule": {"connectionLimitRatio": 2}}}, "/monitoring/prometheusRule/connectionLimitRatio"),
        ({"monitoring": {"dashboard": {"enable": True}}}, "additional properties 'enable' not allowed"),
    ],
)
def test_a_wrong_monitoring_value_is_refused(chart, values, complaint):
    with pytest.raises(helm_python.HelmValuesError) as refused:
        render(chart, values)
    assert complaint in str(refused.value)
