"""The chart lints, renders valid Kubernetes objects for the default and a
non-default set of values, runs the operator the way its command line
expects, and refuses wrong values at install time."""

from __future__ import annotations

import re

import helm_python
import pytest
import yaml
from conftest import CHART, CUSTOM_VALUES, NAMESPACE, RELEASE, notes, objects, one, render
from operator_api import OPERATOR_SRC, operator_sources, operator_version

DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def lint_errors(values=None):
    report = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v1.28.0")
    return [m for m in report["messages"] if m["severity"] >= 2 and "icon is recommended" not in m["error"]]


def test_lints_cleanly_with_default_values():
    assert lint_errors() == []


def test_lints_cleanly_with_custom_values():
    assert lint_errors(CUSTOM_VALUES) == []


@pytest.mark.parametrize("values", [{}, CUSTOM_VALUES], ids=["default", "custom"])
def test_every_rendered_manifest_is_a_kubernetes_object(chart, values):
    rendered = render(chart, values)
    found = objects(rendered)
    assert found
    for obj in found:
        assert re.fullmatch(r"([a-z0-9.-]+/)?v\d+((alpha|beta)\d+)?", obj.get("apiVersion", "")), obj
        assert re.fullmatch(r"[A-Z][A-Za-z]+", obj.get("kind", "")), obj
        name = obj["metadata"]["name"]
        assert DNS_1123_SUBDOMAIN.match(name) and len(name) <= 63, name
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    kinds = sorted(o["kind"] for o in found)
    expected = ["ClusterRole", "ClusterRoleBinding", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    if values:
        # One namespace, no CRD install, leader election (2 replicas).
        expected = ["Role", "RoleBinding", "Role", "RoleBinding", "Deployment", "Service", "ServiceAccount"]
    assert kinds == sorted(expected)


def operator_container(rendered):
    deployment = one(rendered, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def test_default_deployment_runs_one_operator_without_leader_election(chart):
    deployment, c = operator_container(render(chart))
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    version = operator_version()
    assert c["image"] == f"chorus-operator:{version}"
    assert c["args"] == ["run", "--metrics-listen=0.0.0.0:9090", "--log-format=json", "--no-leader-election"]
    assert {"name": "RUST_LOG", "value": "info,kube=warn"} in c["env"]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_custom_values_reach_the_deployment(chart):
    deployment, c = operator_container(render(chart, CUSTOM_VALUES))
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert c["image"] == "registry.example.com/chorus/operator:1.2.3"
    assert c["imagePullPolicy"] == "Always"
    assert c["args"] == [
        "run",
        "--metrics-listen=0.0.0.0:9100",
        "--log-format=text",
        "--namespace=team-a",
        "--no-install-crd",
        "--lease-name=chorus",
    ]
    assert {"name": "RUST_LOG", "value": "debug"} in c["env"]
    assert c["resources"] == CUSTOM_VALUES["resources"]
    assert pod["spec"]["serviceAccountName"] == "chorus-op"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["tolerations"] == CUSTOM_VALUES["tolerations"]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["metadata"]["annotations"] == {"example.com/team": "platform"}
    assert pod["metadata"]["labels"]["team"] == "platform"


def test_leader_election_follows_the_replica_count_unless_set(chart):
    def args(values):
        return operator_container(render(chart, values))[1]["args"]

    assert "--no-leader-election" in args({"replicas": 1})
    assert "--lease-name=chorus" in args({"replicas": 3})
    assert "--lease-name=chorus" in args({"replicas": 1, "leaderElection": {"enabled": True}})
    assert "--lease-name=my-lease" in args({"replicas": 2, "leaderElection": {"leaseName": "my-lease"}})
    with pytest.raises(helm_python.HelmRenderError, match="replicas > 1 needs leader election"):
        render(chart, {"replicas": 2, "leaderElection": {"enabled": False}})


def run_flags_and_env() -> tuple[set[str], set[str]]:
    """Long flags and env vars of `chorus-operator run`, from its clap struct."""
    main = (OPERATOR_SRC / "main.rs").read_text()
    body = re.search(r"struct RunArgs \{(.*?)\n\}", main, re.S).group(1)
    flags = {"--" + f.replace("_", "-") for f in re.findall(r"^\s*(?:pub\s+)?(\w+)\s*:", body, re.M)}
    env = set(re.findall(r'env = "(\w+)"', body))
    assert "run" in re.findall(r"^\s*(\w+)\(RunArgs\)", main, re.M)[0].lower()
    return flags, env


@pytest.mark.parametrize("values", [{}, CUSTOM_VALUES, {"replicas": 3}], ids=["default", "custom", "ha"])
def test_the_operator_understands_every_flag_and_env_var_the_chart_sets(chart, values):
    flags, env = run_flags_and_env()
    _, c = operator_container(render(chart, values))
    assert c["args"][0] == "run"
    for arg in c["args"][1:]:
        assert arg.split("=")[0] in flags, f"chorus-operator run has no {arg}"
    for var in c["env"]:
        if var["name"] != "RUST_LOG":
            assert var["name"] in env, f"chorus-operator run does not read {var['name']}"


def test_operator_pods_carry_the_label_the_redis_network_policy_admits(chart):
    meta = (OPERATOR_SRC / "build" / "meta.rs").read_text()
    managed_by = re.search(r'pub const MANAGED_BY: &str = "([^"]+)"', meta).group(1)
    network_policy = operator_sources()[OPERATOR_SRC / "build" / "network_policy.rs"]
    assert "MANAGED_BY" in network_policy, "the NetworkPolicy no longer admits the operator by MANAGED_BY"
    for values in ({}, CUSTOM_VALUES):
        deployment, _ = operator_container(render(chart, values))
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == managed_by
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert "app.kubernetes.io/version" not in selector, "selectors are immutable; no version in them"
        assert selector.items() <= labels.items()


@pytest.mark.parametrize("values", [{}, CUSTOM_VALUES], ids=["default", "custom"])
def test_operator_runs_unprivileged(chart, values):
    deployment, c = operator_container(render(chart, values))
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["limits"]["memory"]


def test_metrics_service_selects_the_operator_pods(chart):
    for values in ({}, CUSTOM_VALUES):
        rendered = render(chart, values)
        service = one(rendered, "Service")
        deployment, c = operator_container(rendered)
        assert service["metadata"]["name"] == "chorus-metrics"
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == "metrics"
        assert port["port"] == c["ports"][0]["containerPort"]
    assert not [o for o in objects(render(chart, {"metrics": {"service": {"enabled": False}}})) if o["kind"] == "Service"]


def test_notes_tell_the_user_what_to_apply_next(chart):
    text = notes(render(chart))
    assert "examples/basic.yaml" in text
    assert "https://" not in text, "NOTES point at files the user has, not at an unconfirmed web address"
    assert "kubectl get mc" in text
    assert "kubectl scale mc/chat --replicas=5" in text
    custom = notes(render(chart, CUSTOM_VALUES))
    assert "-n team-a" in custom
    assert "apply charts/chorus/crds/messagingclusters.yaml yourself" in custom


def test_chart_ships_the_generated_crd(chart):
    (crd,) = chart.crds
    assert crd["filename"].endswith("crds/messagingclusters.yaml")
    committed = yaml.safe_load((CHART / "crds" / "messagingclusters.yaml").read_text())
    assert committed["metadata"]["name"] == "messagingclusters.chorus.dev"
    assert committed["spec"]["names"]["shortNames"] == ["mc"]


def test_app_version_is_the_operator_version(chart):
    version = operator_version()
    assert chart.metadata["appVersion"] == version


# Blocks passed through to the pod verbatim: their fields are Kubernetes'.
PASS_THROUGH = ("resources", "podSecurityContext", "securityContext")


def test_every_value_is_commented():
    lines = (CHART / "values.yaml").read_text().splitlines()
    inside = None  # indentation of the pass-through block we are in
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w-]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        if inside is not None and indent > inside:
            continue
        inside = indent if m.group(2) in PASS_THROUGH else None
        commented = "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
        assert commented, f"values.yaml:{i + 1}: {line.strip()} has no comment"


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"replicas": "two"}, "/replicas': got string, want integer"),
        ({"installCRD": "yes"}, "/installCRD': got string, want boolean"),
        ({"watchNamespace": "Team_A"}, "/watchNamespace"),
        ({"logging": {"format": "xml"}}, "/logging/format"),
        ({"image": {"pullPolicy": "Sometimes", "repository": "x"}}, "/image/pullPolicy"),
        ({"metrics": {"port": 80}}, "/metrics/port"),
        ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
        ({"replica": 3}, "additional properties 'replica' not allowed"),
    ],
)
def test_a_wrong_value_is_refused_at_install(chart, values, complaint):
    with pytest.raises(helm_python.HelmValuesError) as refused:
        render(chart, values)
    assert complaint in str(refused.value)
