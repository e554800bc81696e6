"""The chart grants the operator exactly what its code calls: every (apiGroup, resource, verb) in
finetune_operator.kube.permissions.OPERATOR_PERMISSIONS, plus what the per-job trainer Role grants
(a Role can only grant what its creator holds), plus kopf's peering objects when peering is on;
nothing more. Cluster-wide and namespaced installs are both checked."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import yaml
from ship_helpers import ALL_FEATURES, ALL_FEATURES_NAMESPACED, ROOT, of_kind, render

from finetune_operator import settings
from finetune_operator.api import validate_manifest
from finetune_operator.kube import permissions
from finetune_operator.plan import children

Grant = tuple[str, str, str]  # (apiGroup, resource, verb); "" is the core group

CLUSTER_SCOPED = {"namespaces", "customresourcedefinitions", "clusterkopfpeerings", "nodes", "priorityclasses"}


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def normalize(entries: Iterable[Any]) -> set[Grant]:
    """Accepts tuples (group, resource, verb|verbs) and dicts in RBAC-rule or singular form."""
    grants: set[Grant] = set()
    for entry in entries:
        if isinstance(entry, dict):
            groups = _as_list(next(entry[k] for k in ("apiGroups", "apiGroup", "group") if k in entry))
            resources = _as_list(next(entry[k] for k in ("resources", "resource") if k in entry))
            verbs = _as_list(next(entry[k] for k in ("verbs", "verb") if k in entry))
        else:
            group, resource, verb = entry
            groups, resources, verbs = [group], _as_list(resource), _as_list(verb)
        grants |= {(g, r, v) for g in groups for r in resources for v in verbs}
    assert not any("*" in part for grant in grants for part in grant), "wildcards are never needed"
    return grants


def _code_grants() -> set[Grant]:
    # The trainer's Role (get/watch its FineTuneJob, patch its status) is granted by the operator.
    return normalize(permissions.OPERATOR_PERMISSIONS) | normalize(permissions.TRAINER_PERMISSIONS)


def _rules_of(objs: list[dict]) -> set[Grant]:
    return normalize(rule for obj in objs for rule in obj.get("rules", []))


def _bound_to_operator(docs: list[dict], role_kind: str, binding_kind: str) -> list[dict]:
    sa = of_kind(docs, "ServiceAccount")[0]["metadata"]
    bound = {
        (b["roleRef"]["name"], b["metadata"].get("namespace"))
        for b in of_kind(docs, binding_kind)
        if any(s["name"] == sa["name"] and s["namespace"] == sa["namespace"] for s in b["subjects"])
    }
    return [r for r in of_kind(docs, role_kind) if (r["metadata"]["name"], r["metadata"].get("namespace")) in bound]


def _peering(resource: str) -> set[Grant]:
    """kopf's peering grants for one scope: clusterkopfpeerings cluster-wide, kopfpeerings per namespace."""
    return {g for g in normalize(permissions.PEERING_PERMISSIONS) if g[1] == resource}


def _without_peering(grants: set[Grant]) -> set[Grant]:
    return {g for g in grants if g[0] != "kopf.dev"}


def test_permissions_list_is_not_empty():
    assert normalize(permissions.OPERATOR_PERMISSIONS)


@pytest.mark.parametrize("values", [None, {"replicaCount": 1, "prometheusRule": {"enabled": True}}], ids=["defaults", "monitoring"])
def test_cluster_wide_grants_exactly_what_the_code_calls(values):
    docs = render(values)
    granted = _rules_of(_bound_to_operator(docs, "ClusterRole", "ClusterRoleBinding"))
    assert not of_kind(docs, "Role")
    expected = _without_peering(_code_grants())
    assert granted == expected, f"missing: {sorted(expected - granted)}; extra: {sorted(granted - expected)}"


def test_namespaced_install_grants_the_same_split_by_scope():
    docs = render(ALL_FEATURES_NAMESPACED)
    cluster = _rules_of(_bound_to_operator(docs, "ClusterRole", "ClusterRoleBinding"))
    roles = _bound_to_operator(docs, "Role", "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert {g[1] for g in cluster} <= CLUSTER_SCOPED, "namespaced resources must not be granted cluster-wide"
    expected = _without_peering(_code_grants())
    for role in roles:
        granted = _without_peering(_rules_of([role]) | cluster)
        assert granted == expected, f"missing: {sorted(expected - granted)}; extra: {sorted(granted - expected)}"
    peering = {g for g in _rules_of(roles) if g[0] == "kopf.dev"}
    assert peering == _peering("kopfpeerings")


def test_peering_grants_only_with_more_than_one_replica():
    one = _rules_of(_bound_to_operator(render(), "ClusterRole", "ClusterRoleBinding"))
    assert not {g for g in one if g[0] == "kopf.dev"}
    many = _rules_of(_bound_to_operator(render(ALL_FEATURES), "ClusterRole", "ClusterRoleBinding"))
    assert {g for g in many if g[0] == "kopf.dev"} == _peering("clusterkopfpeerings")


def test_normalize_reads_every_supported_shape():
    assert normalize([("", "pods", ["get", "list"]), {"apiGroup": "batch", "resource": "jobs", "verbs": ["create"]},
                      {"apiGroups": ["a"], "resources": ["x", "y"], "verbs": ["patch"]}]) == {
        ("", "pods", "get"), ("", "pods", "list"), ("batch", "jobs", "create"), ("a", "x", "patch"), ("a", "y", "patch")}


def test_chart_holds_everything_the_trainer_role_grants():
    """The Role the plan really creates for a trainer (not only the declared list) is within the chart's grants."""
    job = validate_manifest(yaml.safe_load((ROOT / "examples" / "classification.yaml").read_text()))
    role = next(o for o in children.rbac(job) if o["kind"] == "Role")
    granted = _rules_of(_bound_to_operator(render(), "ClusterRole", "ClusterRoleBinding"))
    assert _rules_of([role]) <= granted


def test_chart_passes_the_contract_settings_the_operator_reads():
    """Every FTO_* variable the chart sets is one settings.from_env understands, with the same meaning."""
    dep = of_kind(render(ALL_FEATURES_NAMESPACED), "Deployment")[0]
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"].startswith("FTO_")}
    s = settings.from_env(env)
    assert s.trainer_image == env["FTO_TRAINER_IMAGE"] and s.peering == "finetune-operator"
    assert list(s.namespaces) == ["team-a", "team-b"]
    assert (s.metrics_port, s.health_port) == (8080, 8081)
    assert (s.log_format, s.log_level, s.image_pull_policy) == ("json", "INFO", "IfNotPresent")
    assert not s.extra, f"the chart sets variables the operator does not read: {s.extra}"
