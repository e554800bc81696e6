"""The Helm chart lints, renders with default and with every optional feature, and the output is
valid Kubernetes (kubernetes-validate --strict for built-in kinds, structure for prometheus-operator
and kopf kinds, whose schemas kubernetes-validate does not ship)."""

from __future__ import annotations

import json

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ship_helpers import ALL_FEATURES, ALL_FEATURES_NAMESPACED, CHART, helm, of_kind, render

from finetune_operator.api import constants as c
from finetune_operator.plan import names

OLDEST, NEWEST = "1.30", kubernetes_validate.latest_version()
VALUE_SETS = {"defaults": None, "all-features": ALL_FEATURES, "all-features-namespaced": ALL_FEATURES_NAMESPACED}

# The fields of prometheus-operator's CRDs that this chart uses, with their upstream names and types;
# anything else (a typo, a field at the wrong level) fails.
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "regex": {"type": "string"},
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep", "hashmod"]},
        "targetLabel": {"type": "string"},
        "replacement": {"type": "string"},
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string", "minLength": 1},
        "path": {"type": "string", "pattern": "^/"},
        "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
        "relabelings": {"type": "array", "items": _RELABEL},
    },
}
_SPEC = {
    "ServiceMonitor": {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "endpoints"],
        "properties": {"selector": _LABEL_SELECTOR, "namespaceSelector": _NAMESPACE_SELECTOR,
                       "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}},
    },
    "PodMonitor": {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "podMetricsEndpoints"],
        "properties": {"selector": _LABEL_SELECTOR, "namespaceSelector": _NAMESPACE_SELECTOR,
                       "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}},
    },
    "PrometheusRule": {
        "type": "object",
        "additionalProperties": False,
        "required": ["groups"],
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "rules"],
            "properties": {"name": {"type": "string"}, "interval": {"type": "string"}, "rules": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["expr"],
                "properties": {"alert": {"type": "string"}, "record": {"type": "string"}, "expr": {"type": "string"},
                               "for": {"type": "string"}, "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                               "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
            }}},
        }}},
    },
}
_CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): True,
    ("monitoring.coreos.com/v1", "PodMonitor"): True,
    ("monitoring.coreos.com/v1", "PrometheusRule"): True,
    ("kopf.dev/v1", "ClusterKopfPeering"): False,
    ("kopf.dev/v1", "KopfPeering"): True,
}


def _validate_custom(doc: dict) -> None:
    """Structure of a custom object: known kind, DNS-1123 name, namespace iff namespaced, spec by schema."""
    key = (doc["apiVersion"], doc["kind"])
    assert key in _CUSTOM_KINDS, f"unexpected custom kind {key}"
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    meta = doc["metadata"]
    jsonschema.validate(meta["name"], {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253})
    assert ("namespace" in meta) == _CUSTOM_KINDS[key], f"{key}: namespace set iff the kind is namespaced"
    for labels in (meta.get("labels", {}), meta.get("annotations", {})):
        assert all(isinstance(v, str) for v in labels.values())
    if doc["kind"] in _SPEC:
        jsonschema.validate(doc["spec"], _SPEC[doc["kind"]])


def _validate(docs: list[dict], version: str) -> None:
    for doc in docs:
        if doc["apiVersion"].split("/")[0] in ("monitoring.coreos.com", "kopf.dev"):
            _validate_custom(doc)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {path}: {err.message}")


def test_lint_strict_defaults_and_all_features():
    for values in VALUE_SETS.values():
        proc = helm("lint", "--strict", str(CHART), values=values)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rendered_output_is_valid_kubernetes(name: str, version: str):
    docs = render(VALUE_SETS[name], include_crds=True)
    _validate(docs, version)
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "Service"} <= kinds
    if name != "defaults":
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} <= kinds


def test_structural_check_catches_a_misplaced_field():
    sm = of_kind(render(ALL_FEATURES), "ServiceMonitor")[0]
    sm["spec"]["endpoints"][0]["scrapeInterval"] = "30s"  # the real field is `interval`
    with pytest.raises(jsonschema.ValidationError):
        _validate_custom(sm)


def test_strict_validation_catches_an_unknown_field():
    dep = of_kind(render(), "Deployment")[0]
    dep["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, OLDEST, strict=True)


def test_defaults_render_no_optional_objects():
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap", "ClusterKopfPeering", "KopfPeering"}


def test_chart_ships_the_generated_crd():
    generated = (CHART.parents[1] / "crds" / f"{c.CRD_NAME}.yaml").read_text()
    assert (CHART / "crds" / f"{c.CRD_NAME}.yaml").read_text() == generated


def test_operator_pod_is_locked_down():
    dep = of_kind(render(), "Deployment")[0]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    health = next(p for p in container["ports"] if p["name"] == "health")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["FTO_HEALTH_PORT"]) == health["containerPort"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_operator_env_follows_the_contract():
    env = {e["name"]: e.get("value") for e in of_kind(render(ALL_FEATURES_NAMESPACED), "Deployment")[0]
           ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"FTO_NAMESPACES", "FTO_TRAINER_IMAGE", "FTO_LOG_FORMAT", "FTO_METRICS_PORT", "FTO_HEALTH_PORT", "FTO_PEERING"} <= set(env)
    assert env["FTO_NAMESPACES"] == "team-a,team-b"
    assert env["FTO_LOG_FORMAT"] == "json" and env["FTO_METRICS_PORT"] == "8080" and env["FTO_HEALTH_PORT"] == "8081"
    assert env["FTO_PEERING"] == "finetune-operator"
    assert env["FTO_TRAINER_IMAGE"].endswith(":0.1.0")


def _operator_env(values: dict | None = None) -> dict[str, str]:
    dep = of_kind(render(values), "Deployment")[0]
    return {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_api_client_values_reach_the_operator_and_its_settings():
    from finetune_operator.settings import Settings, from_env

    env = _operator_env()
    defaults = from_env({k: v for k, v in env.items() if k.startswith("FTO_")})
    d = Settings()
    assert (defaults.api_qps, defaults.api_burst, defaults.api_retries, defaults.api_pool_size,
            defaults.apply_concurrency, defaults.retry_base_seconds, defaults.retry_max_seconds) == (
        d.api_qps, d.api_burst, d.api_retries, d.api_pool_size, d.apply_concurrency, d.retry_base_seconds,
        d.retry_max_seconds)  # the chart's defaults are the operator's
    env = _operator_env({"api": {"qps": 50.5, "burst": 3000000, "retries": 9, "poolSize": 4, "applyConcurrency": 2,
                                 "retryBaseSeconds": 0.25, "retryMaxSeconds": 60}})
    s = from_env({k: v for k, v in env.items() if k.startswith("FTO_")})
    assert (s.api_qps, s.api_burst, s.api_retries, s.api_pool_size, s.apply_concurrency, s.retry_base_seconds,
            s.retry_max_seconds) == (50.5, 3000000, 9, 4, 2, 0.25, 60.0)  # large integers not in exponent form
    assert not s.extra


def test_one_replica_is_standalone_and_never_overlaps():
    dep = of_kind(render(), "Deployment")[0]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FTO_PEERING"] == "" and dep["spec"]["strategy"]["type"] == "Recreate"


def test_peering_objects_match_the_scope():
    cluster = render(ALL_FEATURES)
    assert [d["metadata"]["name"] for d in of_kind(cluster, "ClusterKopfPeering")] == ["finetune-operator"]
    namespaced = render(ALL_FEATURES_NAMESPACED)
    assert sorted(d["metadata"]["namespace"] for d in of_kind(namespaced, "KopfPeering")) == ["team-a", "team-b"]
    crds = {d["metadata"]["name"] for d in of_kind(render(include_crds=True), "CustomResourceDefinition")}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev", c.CRD_NAME} <= crds


def test_monitors_select_the_right_pods():
    docs = render(ALL_FEATURES)
    svc = next(d for d in of_kind(docs, "Service") if d["metadata"]["name"].endswith("-metrics"))
    sm = of_kind(docs, "ServiceMonitor")[0]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pm = of_kind(docs, "PodMonitor")[0]
    assert pm["spec"]["selector"]["matchExpressions"] == [{"key": c.Label.JOB_NAME, "operator": "Exists"}]
    # It selects exactly what the operator's plan labels a training pod with, and not the operator itself.
    trainer = names.labels("bbc-news", "trainer")
    assert pm["spec"]["selector"]["matchLabels"].items() <= trainer.items()
    operator_pod = of_kind(docs, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert not pm["spec"]["selector"]["matchLabels"].items() <= operator_pod.items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_dashboard_configmap_holds_valid_json():
    cm = of_kind(render(ALL_FEATURES), "ConfigMap")[0]
    (text,) = cm["data"].values()
    dash = json.loads(text)
    assert dash["panels"] and cm["metadata"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.parametrize(
    "bad",
    [
        {"logFormat": "xml"},
        {"replicaCount": 0},
        {"metricsPort": 70000},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"serviceMonitor": {"enabled": "yes"}},
        {"prometheusRule": {"stallMinutes": 0}},
        {"replicas": 2},  # a typo of replicaCount
        {"extraEnv": [{"name": "FTO_LOG_FORMAT", "value": "text"}]},  # would shadow a chart-managed setting
        {"extraEnv": [{"name": "FTO_API_QPS", "value": "5"}]},  # set through api.qps
        {"api": {"qps": -1}},
        {"api": {"burst": 0}},
        {"api": {"retries": 1.5}},
        {"api": {"retryBaseSeconds": 0}},
        {"api": {"rateLimit": 5}},  # not a value of the chart
    ],
    ids=lambda v: yaml.safe_dump(v, default_flow_style=True).strip(),
)
def test_schema_rejects_a_wrong_value(bad: dict):
    for command in (("template", "ft", str(CHART)), ("lint", "--strict", str(CHART))):
        proc = helm(*command, values=bad)
        assert proc.returncode != 0, f"{command[0]} accepted {bad}"
        assert "schema" in (proc.stdout + proc.stderr).lower() or "values don't meet" in (proc.stdout + proc.stderr)
