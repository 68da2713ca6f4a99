"""Shared helpers: render the chart with the real Helm engine (helm-python-sdk
embeds Helm v4; no helm binary or cluster is needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python
import pytest
import yaml

CHART = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

RELEASE = "chorus"
NAMESPACE = "chorus-system"

# A non-default set touching every switch.
CUSTOM_VALUES = {
    "image": {"repository": "registry.example.com/chorus/operator", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "replicas": 2,
    "watchNamespace": "team-a",
    "installCRD": False,
    "logging": {"level": "debug", "format": "text"},
    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
    "serviceAccount": {"create": True, "name": "chorus-op", "annotations": {"example.com/role": "operator"}},
    "metrics": {"port": 9100, "service": {"enabled": True, "annotations": {"prometheus.io/scrape": "true"}}},
    "podAnnotations": {"example.com/team": "platform"},
    "podLabels": {"team": "platform"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "platform", "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
}


@pytest.fixture(scope="session")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values=None, namespace=NAMESPACE):
    """Rendered manifests as {template path: [objects]}, NOTES.txt as text."""
    files = chart.render(values=values or {}, name=RELEASE, namespace=namespace, is_install=True)
    out = {}
    for path, text in files.items():
        if path.endswith("NOTES.txt"):
            out[path] = text
        else:
            out[path] = [d for d in yaml.safe_load_all(text) if d]
    return out


def objects(rendered) -> list[dict]:
    return [o for path, docs in rendered.items() if not path.endswith("NOTES.txt") for o in docs]


def one(rendered, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects(rendered) if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def notes(rendered) -> str:
    return next(v for k, v in rendered.items() if k.endswith("NOTES.txt"))
