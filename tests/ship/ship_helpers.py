"""Shared by the tests of the shipped artifacts: render the Helm chart with given values."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"
HELM = ROOT / ".tools" / "helm"

# Every optional feature on, more than one replica (peering) and the default cluster-wide RBAC.
ALL_FEATURES: dict[str, Any] = {
    "replicaCount": 2,
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "podMonitor": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}, {"name": "FTO_WORKERS", "value": "8"}],
    "podAnnotations": {"example.com/team": "ml"},
    "imagePullSecrets": [{"name": "regcred"}],
}
# The same with namespaced RBAC (a Role per watched namespace, KopfPeering objects).
ALL_FEATURES_NAMESPACED: dict[str, Any] = {**ALL_FEATURES, "watchNamespaces": ["team-a", "team-b"]}


def need_helm() -> None:
    if not HELM.exists():
        pytest.fail("helm binary missing: run scripts/setup.sh (it installs .tools/helm)")


def helm(*args: str, values: dict[str, Any] | None = None) -> subprocess.CompletedProcess:
    need_helm()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        json.dump(values or {}, f)
        f.flush()
        return subprocess.run(
            [str(HELM), *args, "--values", f.name], capture_output=True, text=True, timeout=120, check=False
        )


def render(values: dict[str, Any] | None = None, include_crds: bool = False) -> list[dict[str, Any]]:
    """`helm template` the chart; the rendered documents (empty ones dropped)."""
    args = ["template", "ft", str(CHART), "--namespace", "finetune-system"]
    if include_crds:
        args.append("--include-crds")
    proc = helm(*args, values=values)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]
