"""The chart's RBAC grants exactly what the operator's code uses — every
permission it needs, in the right scope, and nothing more. The needed set is
derived from operator/src (see operator_api.py), not kept by hand."""

from __future__ import annotations

import pytest
import yaml
from conftest import CUSTOM_VALUES, NAMESPACE, objects, one, render
from operator_api import CLUSTER, CRD_PATH, LEASE, WORKLOAD, Permission, required_permissions

CRD_NAME = yaml.safe_load(CRD_PATH.read_text())["metadata"]["name"]

# Grant scope "*": everywhere (ClusterRoleBinding).
EVERYWHERE = "*"


def grants(rendered) -> set[tuple]:
    """(namespace or "*", group, resource, verb, object name or None) granted to
    the operator's ServiceAccount by the rendered roles and bindings."""
    objs = objects(rendered)
    deployment = one(rendered, "Deployment")
    sa = (deployment["spec"]["template"]["spec"]["serviceAccountName"], deployment["metadata"]["namespace"])
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs if o["kind"] in ("Role", "ClusterRole")}
    granted = set()
    for binding in (o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if not any(s["kind"] == "ServiceAccount" and (s["name"], s["namespace"]) == sa for s in binding["subjects"]):
            continue
        ns = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else EVERYWHERE
        ref = binding["roleRef"]
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], f"wildcard in {rule}"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [None]:
                            granted.add((ns, group, resource, verb, name))
    return granted


def lease_name(rendered) -> str | None:
    c = one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return next((a.split("=", 1)[1] for a in c["args"] if a.startswith("--lease-name=")), None)


def needed(rendered, values) -> dict[Permission, str]:
    """Each permission the operator needs with the namespace it needs it in."""
    c = one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    watch = values.get("watchNamespace") or EVERYWHERE
    lease = lease_name(rendered)
    out = {}
    for p in required_permissions(CRD_NAME, lease or "<no lease>"):
        if p.scope == CLUSTER:
            if "--no-install-crd" in c["args"] and p.resource == "customresourcedefinitions":
                continue
            out[p] = EVERYWHERE
        elif p.scope == LEASE:
            if lease is None:
                continue
            out[p] = NAMESPACE
        else:
            out[p] = watch
    return out


SCENARIOS = [
    {},
    CUSTOM_VALUES,
    {"replicas": 3},
    {"watchNamespace": "team-b"},
    {"installCRD": False},
]


def test_the_derivation_finds_what_the_operator_is_known_to_do():
    # A sanity floor for the parser, not the list the chart is checked
    # against: if these are missing the derivation is broken.
    perms = required_permissions(CRD_NAME, "lease")
    for expected in [
        Permission(WORKLOAD, "chorus.dev", "messagingclusters", "watch"),
        Permission(WORKLOAD, "chorus.dev", "messagingclusters/status", "patch"),
        Permission(WORKLOAD, "apps", "deployments", "patch"),
        Permission(WORKLOAD, "apps", "statefulsets", "delete"),
        # Read before a delete, to check the owner; and after a refused apply.
        Permission(WORKLOAD, "autoscaling", "horizontalpodautoscalers", "get"),
        Permission(WORKLOAD, "apps", "statefulsets", "get"),
        Permission(WORKLOAD, "", "secrets", "create"),
        Permission(LEASE, "coordination.k8s.io", "leases", "update", "lease"),
        Permission(CLUSTER, "apiextensions.k8s.io", "customresourcedefinitions", "patch", CRD_NAME),
    ]:
        assert expected in perms, expected
    kinds = {p.resource for p in perms}
    assert {"configmaps", "services", "poddisruptionbudgets", "horizontalpodautoscalers", "ingresses", "networkpolicies"} <= kinds


@pytest.mark.parametrize("values", SCENARIOS, ids=["default", "custom", "ha", "one-namespace", "no-crd-install"])
def test_rbac_covers_every_call_the_operator_makes(chart, values):
    rendered = render(chart, values)
    granted = grants(rendered)
    missing = []
    for p, ns in needed(rendered, values).items():
        ok = any(
            g[1:4] == (p.group, p.resource, p.verb) and g[0] in (ns, EVERYWHERE) and g[4] in (None, p.object_name)
            for g in granted
        )
        if not ok:
            missing.append(f"{p.verb} {p.group or 'core'}/{p.resource} {p.object_name or ''} in {ns}")
    assert not missing, "RBAC lacks:\n" + "\n".join(missing)


@pytest.mark.parametrize("values", SCENARIOS, ids=["default", "custom", "ha", "one-namespace", "no-crd-install"])
def test_rbac_grants_nothing_the_operator_does_not_use(chart, values):
    rendered = render(chart, values)
    need = needed(rendered, values)
    extra = []
    for ns, group, resource, verb, name in grants(rendered):
        # Cluster-wide only where needed everywhere, in a namespace only
        # where needed there; unrestricted only for calls not limited to
        # one object by name.
        used = any(
            (p.group, p.resource, p.verb, p.object_name, where) == (group, resource, verb, name, ns)
            for p, where in need.items()
        )
        if not used:
            extra.append(f"{verb} {group or 'core'}/{resource} {name or ''} in {ns}")
    assert not extra, "RBAC grants more than the operator uses:\n" + "\n".join(extra)


def test_watching_one_namespace_grants_nothing_cluster_wide_but_the_crd(chart):
    rendered = render(chart, {"watchNamespace": "team-b"})
    cluster_wide = {g[1:3] for g in grants(rendered) if g[0] == EVERYWHERE}
    assert cluster_wide == {("apiextensions.k8s.io", "customresourcedefinitions")}
    role = one(rendered, "Role", "chorus")
    assert role["metadata"]["namespace"] == "team-b"
    assert one(rendered, "RoleBinding", "chorus")["metadata"]["namespace"] == "team-b"
    assert not [o for o in objects(render(chart, CUSTOM_VALUES)) if o["kind"].startswith("Cluster")]


def test_without_rbac_create_no_roles_are_rendered(chart):
    kinds = {o["kind"] for o in objects(render(chart, {"rbac": {"create": False}}))}
    assert kinds == {"Deployment", "Service", "ServiceAccount"}


def test_releases_in_two_namespaces_share_no_cluster_scoped_object(chart):
    def cluster_scoped(namespace):
        rendered = render(chart, {"watchNamespace": namespace}, namespace=namespace)
        return {(o["kind"], o["metadata"]["name"]) for o in objects(rendered) if o["kind"].startswith("Cluster")}

    a, b = cluster_scoped("team-a"), cluster_scoped("team-b")
    assert a and b
    assert a.isdisjoint(b)
