"""Every alert of the chart's PrometheusRule, evaluated by Prometheus's own
rule engine (`promtool test rules`): it fires on the series a real fault
leaves (with the labels and summary a person reads) and stays quiet on a
healthy fleet and on blips shorter than its `for`.

promtool comes with Debian's prometheus package, which scripts/test.sh
unpacks into ~/.cache/chorus/prometheus. (tests/tests/monitoring.rs loads
the same rules into a real Prometheus scraping a real node whose Redis it
kills.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import one, render

RULES_ON = {"monitoring": {"prometheusRule": {"enabled": True}}}
# One pod of MessagingCluster "chat" in namespace "chat", as the PodMonitor
# labels its series.
POD = 'namespace="chat", cluster="chat", pod="chat-0"'
POD_LABELS = {"namespace": "chat", "cluster": "chat", "pod": "chat-0"}
# The operator's Redis group series of that cluster.
GROUP = 'namespace="chat", cluster="chat"'
GROUP_LABELS = {"namespace": "chat", "cluster": "chat"}


def promtool() -> str:
    cached = Path.home() / ".cache/chorus/prometheus/usr/bin/promtool"
    found = shutil.which("promtool") or (str(cached) if cached.is_file() else None)
    if found is None:
        pytest.fail(
            f"promtool not found on PATH nor at {cached}: scripts/test.sh unpacks "
            "Debian's prometheus package (which has it) there"
        )
    return found


def fires(name, series, at, labels, summary, *, quiet_at=()):
    """A fault: `series` make the alert fire at `at` (minutes) with `labels`
    (besides severity) and `summary`; before that, at `quiet_at`, it does not."""
    return {"name": name, "series": series, "checks": [(t, None) for t in quiet_at] + [(at, (labels, summary))]}


def quiet(name, series, at):
    """No fault: the alert does not fire at any of `at` (minutes)."""
    return {"name": name, "series": series, "checks": [(t, None) for t in at]}


def up_gauge_down(what, metric, labels, summary, blip, *, healthy_pod=None):
    """A 1/0 gauge (`metric` with `labels`) at 0 from 2 m on fires its
    1-minute alert by 4 m; one 30 s at 0 (`blip`) does not."""
    selector = metric + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    down = {selector: "1x3 0x12"}
    if healthy_pod:
        down[healthy_pod] = "1x15"
    return [
        fires(f"{what} down", down, 4, labels, summary, quiet_at=[2.5]),
        quiet(blip, {selector: "1x3 0 1x10"}, [2.5, 3, 5]),
    ]


# Series are sampled every 30 s ("a+bxN": a, a+b, ... N+1 samples).
CASES = {
    "ChorusBrokerDown": up_gauge_down(
        "a pod's Redis link",
        "chorus_broker_up",
        POD_LABELS,
        "Chorus pod chat/chat-0 cannot reach Redis",
        "a 30 s reconnect",
        healthy_pod='chorus_broker_up{namespace="chat", cluster="chat", pod="chat-1"}',
    ),
    "ChorusRedisNoMaster": up_gauge_down(
        "the master",
        "chorus_operator_redis_master_up",
        GROUP_LABELS,
        "MessagingCluster chat/chat has no Redis master",
        "a failover that promotes a replica within 30 s",
    ),
    "ChorusCanaryFailing": [
        fires(
            "canaries stop coming back while the link looks fine",
            {
                f"chorus_redis_canary_round_trips_total{{{POD}}}": "0+30x10 300x10",
                f"chorus_redis_canary_rtt_seconds{{{POD}}}": "0.002x20",
                f"chorus_broker_up{{{POD}}}": "1x20",
            },
            9,
            POD_LABELS,
            "Chorus pod chat/chat-0: no canary came back through Redis for 2 minutes",
            quiet_at=[5, 7],
        ),
        quiet(
            "canaries come back",
            {f"chorus_redis_canary_round_trips_total{{{POD}}}": "0+30x20", f"chorus_redis_canary_rtt_seconds{{{POD}}}": "0.002x20"},
            [3, 6, 10],
        ),
        quiet(
            "a node without Redis (in-memory broker): no canary ever",
            {f"chorus_redis_canary_round_trips_total{{{POD}}}": "0x20", f"chorus_redis_canary_rtt_seconds{{{POD}}}": "0x20"},
            [3, 6, 10],
        ),
    ],
    "ChorusCanarySlow": [
        fires(
            "round trips of 800 ms",
            {f"chorus_redis_canary_rtt_seconds{{{POD}}}": "0.002x3 0.8x20"},
            8,
            POD_LABELS,
            "Chorus pod chat/chat-0: canary round trip 800ms",
            quiet_at=[5],
        ),
        quiet("a slow minute and a half", {f"chorus_redis_canary_rtt_seconds{{{POD}}}": "0.002x3 0.8x3 0.002x20"}, [3, 5, 8, 10]),
    ],
    "ChorusSlowConsumerDrops": [
        fires(
            "two drops a second",
            {f"chorus_slow_consumers_dropped_total{{{POD}}}": "0+60x40"},
            15,
            POD_LABELS,
            "Chorus pod chat/chat-0 drops 2 slow consumers per second",
            quiet_at=[8],
        ),
        quiet("a drop a minute", {f"chorus_slow_consumers_dropped_total{{{POD}}}": "0+0.5x40"}, [8, 15, 20]),
        quiet("one burst of 60", {f"chorus_slow_consumers_dropped_total{{{POD}}}": "0x4 60x40"}, [4, 8, 15, 20]),
    ],
    "ChorusConnectionLimitNear": [
        fires(
            "95 % of --max-connections",
            {f"chorus_connections{{{POD}}}": "950x20", f"chorus_max_connections{{{POD}}}": "1000x20"},
            6,
            POD_LABELS,
            "Chorus pod chat/chat-0 holds 95% of its connection limit",
            quiet_at=[3],
        ),
        quiet("80 % of --max-connections", {f"chorus_connections{{{POD}}}": "800x20", f"chorus_max_connections{{{POD}}}": "1000x20"}, [3, 6, 10]),
    ],
    "ChorusDeliveryLatencyHigh": [
        fires(
            "deliveries between 1 s and 2 s",
            {
                f'chorus_delivery_latency_seconds_bucket{{{POD}, le="0.001"}}': "0x40",
                f'chorus_delivery_latency_seconds_bucket{{{POD}, le="1"}}': "0x40",
                f'chorus_delivery_latency_seconds_bucket{{{POD}, le="2"}}': "0+100x40",
                f'chorus_delivery_latency_seconds_bucket{{{POD}, le="+Inf"}}': "0+100x40",
            },
            15,
            GROUP_LABELS,
            "Chorus cluster chat/chat: publish-to-delivery p99 is 1.99s",
            quiet_at=[8],
        ),
        quiet(
            "deliveries within a millisecond",
            {
                f'chorus_delivery_latency_seconds_bucket{{{POD}, le="0.001"}}': "0+99x40",
                f'chorus_delivery_latency_seconds_bucket{{{POD}, le="1"}}': "0+100x40",
                f'chorus_delivery_latency_seconds_bucket{{{POD}, le="2"}}': "0+100x40",
                f'chorus_delivery_latency_seconds_bucket{{{POD}, le="+Inf"}}': "0+100x40",
            },
            [8, 15, 20],
        ),
    ],
    "ChorusKafkaIngestDown": [
        fires(
            "the ingest's cluster unreachable",
            {f"chorus_kafka_ingest_up{{{POD}}}": "1x3 0x12", f"chorus_kafka_ingest_topics{{{POD}}}": "2x15"},
            5,
            POD_LABELS,
            "Chorus pod chat/chat-0: the Kafka ingest cannot reach its cluster",
            quiet_at=[3],
        ),
        quiet("a pod without an ingest", {f"chorus_kafka_ingest_up{{{POD}}}": "0x15", f"chorus_kafka_ingest_topics{{{POD}}}": "0x15"}, [3, 5, 7]),
        quiet(
            "a 30 s reconnect",
            {f"chorus_kafka_ingest_up{{{POD}}}": "1x3 0 1x10", f"chorus_kafka_ingest_topics{{{POD}}}": "2x15"},
            [2.5, 3, 5],
        ),
    ],
    "ChorusKafkaIngestDeadLetters": [
        fires(
            "a poison record",
            {f"chorus_kafka_ingest_dead_lettered_total{{{POD}}}": "0x4 1x20"},
            3.5,
            POD_LABELS,
            "Chorus pod chat/chat-0 dead-lettered 1 ingested records in 10 minutes",
            quiet_at=[1.5],
        ),
        quiet("records all published", {f"chorus_kafka_ingest_dead_lettered_total{{{POD}}}": "0x20"}, [3, 6, 9]),
    ],
    "ChorusRedisReplicationBroken": [
        fires(
            "one of two replicas unlinked",
            {f"chorus_operator_redis_replicas_linked{{{GROUP}}}": "2x3 1x20", f"chorus_operator_redis_replicas_desired{{{GROUP}}}": "2x23"},
            8,
            GROUP_LABELS,
            "MessagingCluster chat/chat: only 1 Redis replicas replicate from the master",
            quiet_at=[5],
        ),
        quiet(
            "a replica restarting for two minutes",
            {f"chorus_operator_redis_replicas_linked{{{GROUP}}}": "2x3 1x4 2x20", f"chorus_operator_redis_replicas_desired{{{GROUP}}}": "2x27"},
            [3, 5, 8, 12],
        ),
    ],
    "ChorusReconcileErrors": [
        fires(
            "the apply step failing at every reconcile",
            {'chorus_operator_reconcile_errors_total{error="apply"}': "0+1x60", 'chorus_operator_reconcile_errors_total{error="status"}': "0x60"},
            20,
            {"error": "apply"},
            "The Chorus operator keeps failing at its apply step",
            quiet_at=[10],
        ),
        quiet("one failed reconcile", {'chorus_operator_reconcile_errors_total{error="apply"}': "0x4 1x56"}, [5, 12, 16, 25]),
    ],
}


def minutes(m: float) -> str:
    return f"{int(m * 60)}s"


def rule_test(alert: dict, cases: list[dict]) -> dict:
    """The promtool test file of `alert` (as the chart renders it)."""
    tests = []
    for case in cases:
        checks = []
        for at, expected in case["checks"]:
            exp_alerts = []
            if expected is not None:
                labels, summary = expected
                exp_alerts.append(
                    {
                        "exp_labels": {**labels, **alert["labels"]},
                        "exp_annotations": {"summary": summary, "description": alert["annotations"]["description"]},
                    }
                )
            checks.append({"eval_time": minutes(at), "alertname": alert["alert"], "exp_alerts": exp_alerts})
        tests.append(
            {
                "name": f'{alert["alert"]}: {case["name"]}',
                "interval": "30s",
                "input_series": [{"series": s, "values": v} for s, v in case["series"].items()],
                "alert_rule_test": checks,
            }
        )
    return {"rule_files": ["rules.yml"], "evaluation_interval": "30s", "tests": tests}


@pytest.fixture(scope="module")
def rule(chart) -> dict:
    return one(render(chart, RULES_ON), "PrometheusRule")


def alerts(rule: dict) -> dict[str, dict]:
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def test_every_alert_has_a_case_that_fires_and_one_that_stays_quiet(rule):
    assert set(CASES) == set(alerts(rule))
    for name, cases in CASES.items():
        expected = [e for case in cases for _, e in case["checks"]]
        assert any(e is not None for e in expected), name
        assert any(all(e is None for _, e in case["checks"]) for case in cases), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_alert_fires_on_its_fault_and_only_then(rule, name, tmp_path):
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rule["spec"]))
    test_file = tmp_path / "test.yml"
    test_file.write_text(yaml.safe_dump(rule_test(alerts(rule)[name], CASES[name]), sort_keys=False))
    run = subprocess.run([promtool(), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
