"""The generated CRD: committed copies match the types, and an API server would accept it."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from finetune_operator.api import constants as c
from finetune_operator.api import crd as gen

from . import crd_harness as h

CRD = gen.crd()
SCHEMA = h.storage_schema(CRD)

# What a structural schema may contain (apiextensions-apiserver: ValidateStructural and the
# keywords the OpenAPI v3 subset of CRDs knows). $ref, anyOf leftovers, titles and the like are not in it.
ALLOWED_KEYWORDS = {
    "type", "description", "default", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "pattern", "format",
    "items", "properties", "required", "additionalProperties", "nullable", "x-kubernetes-validations",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-embedded-resource",
}
# The root's apiVersion/kind/metadata are the server's own (validated by it, never by our rules).
SERVER_OWNED = {"apiVersion", "kind", "metadata"}


def nodes(schema: dict[str, Any], path: str = ""):
    """Every schema node with its path, root first."""
    yield path or "(root)", schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from nodes(sub, f"{path}.{key}" if path else key)
    if isinstance(schema.get("items"), dict):
        yield from nodes(schema["items"], path + "[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], path + "[*]")


def own_nodes():
    return [(p, n) for p, n in nodes(SCHEMA) if p.split(".")[0].split("[")[0] not in SERVER_OWNED]


@pytest.mark.parametrize("path", gen.CRD_PATHS, ids=lambda p: str(p.relative_to(gen.ROOT)))
def test_committed_crd_matches_the_types(path):
    assert path.exists(), f"{path} missing: run `python -m finetune_operator.api.crd --write`"
    assert path.read_text() == gen.render(), (
        f"{path.relative_to(gen.ROOT)} drifted from the API types: run `python -m finetune_operator.api.crd --write`"
    )


@pytest.mark.parametrize("version", ["1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2])])
def test_crd_is_a_valid_kubernetes_object(version):
    # Raises ValidationError (first problem only) on an unknown or mistyped CRD field.
    kubernetes_validate.validate(yaml.safe_load(gen.render()), version, strict=True)


def test_crd_names():
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        c.KIND, c.PLURAL, ["ftj"], ["finetune"]
    )
    assert CRD["metadata"]["name"] == f"{c.PLURAL}.{c.GROUP}"
    (version,) = CRD["spec"]["versions"]
    assert version["subresources"] == {"status": {}}


def test_schema_is_structural():
    problems = []
    for path, node in nodes(SCHEMA):
        unknown = set(node) - ALLOWED_KEYWORDS
        if unknown:
            problems.append(f"{path}: unsupported keywords {sorted(unknown)}")
        if "type" not in node and not node.get("x-kubernetes-int-or-string") and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            problems.append(f"{path}: no type")
        if node.get("x-kubernetes-int-or-string") and "type" in node:
            problems.append(f"{path}: int-or-string must not also set type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties are exclusive")
        if ("properties" in node or "additionalProperties" in node) and node.get("type") != "object":
            problems.append(f"{path}: properties on a non-object")
        if node.get("type") == "array" and not isinstance(node.get("items"), dict):
            problems.append(f"{path}: array without items")
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            if bound in node and not isinstance(node[bound], bool):
                problems.append(f"{path}: {bound} must be a boolean in OpenAPI v3.0")
        if "default" in node and node["default"] is None:
            problems.append(f"{path}: null default")
    assert not problems, "\n".join(problems)


def test_defaults_satisfy_their_own_schema():
    # The API server rejects a CRD whose defaults do not validate (after pruning) against their node.
    problems = []
    for path, node in nodes(SCHEMA):
        if "default" in node:
            sub = {k: v for k, v in node.items() if k not in ("default", "x-kubernetes-validations")}
            for err in jsonschema.Draft4Validator(sub).iter_errors(node["default"]):
                problems.append(f"{path}: default {node['default']!r}: {err.message}")
    assert not problems, "\n".join(problems)


def test_every_string_list_and_map_is_bounded():
    # CEL cost estimation multiplies by these bounds; an unbounded string or list under a rule makes
    # a real API server refuse the CRD ("estimated rule cost exceeds budget").
    problems = []
    for path, node in own_nodes():
        kind = node.get("type")
        if kind == "string" and "maxLength" not in node and "enum" not in node:
            problems.append(f"{path}: string without maxLength")
        if kind == "array" and "maxItems" not in node:
            problems.append(f"{path}: array without maxItems")
        if kind == "object" and isinstance(node.get("additionalProperties"), dict) and "maxProperties" not in node:
            problems.append(f"{path}: map without maxProperties")
    assert not problems, "\n".join(problems)


def test_every_spec_field_is_described():
    # `kubectl explain finetunejob.spec...` shows these; an empty line there is a documentation bug.
    missing = [p for p, n in own_nodes() if p.startswith("spec") and not p.endswith(("[]", "[*]")) and not n.get("description")]
    assert not missing, "fields without description: " + ", ".join(missing)


def test_every_cel_rule_compiles_and_has_a_message():
    rules = h.all_rules(SCHEMA)
    assert len(rules) >= 18, "the cross-field rules went missing from the schema"
    for path, rule in rules:
        h.compile_rule(rule["rule"])  # raises on a syntax error
        assert rule.get("message"), f"{path}: rule {rule['rule']!r} has no message"


def test_every_rule_field_path_names_a_real_field():
    def resolve(node: dict[str, Any], field_path: str) -> bool:
        for part in field_path.strip(".").split("."):
            node = (node.get("properties") or {}).get(part)
            if node is None:
                return False
        return True

    problems = []
    for path, node in nodes(SCHEMA):
        for rule in node.get("x-kubernetes-validations") or []:
            fp = rule.get("fieldPath", "")
            if fp.startswith(".metadata."):
                continue  # metadata's fields are the server's, not in our schema
            if fp and not resolve(node, fp):
                problems.append(f"{path}: fieldPath {fp!r} does not exist")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("column", CRD["spec"]["versions"][0]["additionalPrinterColumns"], ids=lambda col: col["name"])
def test_printer_columns_point_at_real_fields(column):
    parts = column["jsonPath"].lstrip(".").split(".")
    if parts == ["metadata", "creationTimestamp"]:
        assert column["type"] == "date"
        return
    node = SCHEMA
    for part in parts:
        assert part in (node.get("properties") or {}), f"{column['jsonPath']}: no field {part!r}"
        node = node["properties"][part]
    assert node.get("type") == column["type"], f"{column['jsonPath']} is {node.get('type')}, column says {column['type']}"


def test_printer_columns_cover_the_issue():
    names = [col["name"] for col in CRD["spec"]["versions"][0]["additionalPrinterColumns"]]
    for wanted in ("Phase", "Epoch", "Train-Loss", "Val-Loss", "Best", "Age"):
        assert wanted in names


# docs/contracts.md, "Status: who writes what". A field missing from the schema would be pruned by the
# API server without an error, so a trainer's or operator's report would silently vanish.
TRAINER_STATUS = {
    "epoch": 2, "totalEpochs": 3, "step": 40, "trainLoss": 0.41, "valLoss": 0.38, "valMetric": 0.93,
    "valMetricName": "val_accuracy", "learningRate": 4.5e-5, "samplesPerSecond": 31.5, "batchSize": 16,
    "gradientAccumulationSteps": 1, "bestEpoch": 2, "bestMetric": 0.93,
    "history": [
        {"epoch": e, "trainLoss": 1.0 / e, "valLoss": 1.1 / e, "valMetric": 0.9, "learningRate": 5e-5, "time": "2026-11-23T16:00:00Z"}
        for e in range(1, 201)
    ],
    "lastHeartbeatTime": "2026-11-23T16:00:00Z", "trainerPhase": "Training",
}
OPERATOR_STATUS = {
    "observedGeneration": 3, "phase": "Succeeded", "reason": "EarlyStopped", "message": "patience exhausted",
    "conditions": [
        {"type": "Succeeded", "status": "True", "reason": "EarlyStopped", "message": "", "lastTransitionTime": "2026-11-23T16:00:00Z",
         "observedGeneration": 3}
    ],
    "jobName": "bbc-news-trainer", "startTime": "2026-11-23T15:00:00Z", "completionTime": "2026-11-23T16:00:00Z",
    "stopRequestedTime": "2026-11-23T15:59:00Z", "stopReason": "val_loss did not improve for 2 epochs",
    "stopEnforced": False, "epochsSaved": 7, "specHash": "0123456789abcdef",
}


def test_status_schema_keeps_every_contract_field():
    obj = {
        "apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "bbc-news"},
        "spec": {"model": {"name": "m"}, "dataset": {"source": "d"}},
        "status": {**TRAINER_STATUS, **OPERATOR_STATUS},
    }
    result = h.validate(obj)
    assert result.violations == [], [str(v) for v in result.violations]
    assert result.obj["status"] == {**TRAINER_STATUS, **OPERATOR_STATUS}


def test_status_history_is_capped_at_200():
    history = TRAINER_STATUS["history"] + [{"epoch": 201}]
    obj = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "a"},
           "spec": {"model": {"name": "m"}, "dataset": {"source": "d"}}, "status": {"history": history}}
    assert "status.history" in h.validate(obj).paths
