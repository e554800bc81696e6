"""Generate the FineTuneJob CustomResourceDefinition from the API types.

`python -m finetune_operator.api.crd --write` rewrites crds/ and the chart's copy (and copies the chart's
kopf peering CRDs into crds/); a test fails when the committed files differ from what the types generate.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from . import constants as c
from .rules import ROOT_RULES
from .spec import FineTuneJobSpec
from .status import FineTuneJobStatus

# The API server keeps only these keywords of a structural schema.
_KEEP = {
    "type", "description", "default", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "minItems", "maxItems", "pattern", "items", "properties", "required",
    "additionalProperties", "nullable", "format", "x-kubernetes-validations", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "minProperties",
    "maxProperties", "anyOf",
}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return _inline({**target, **extra}, defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if node.get("x-kubernetes-int-or-string") or {o.get("type") for o in options} == {"integer", "string"}:
            node["x-kubernetes-int-or-string"] = True
        elif len(options) == 1:
            merged = {**options[0], **node}
            if node.get("default", "unset") is None:
                merged.pop("default")
            node = merged
        else:
            raise ValueError(f"cannot express union in a structural schema: {options}")
    if node.get("default", "unset") is None:
        node.pop("default")
    # OpenAPI v3.0 (what Kubernetes speaks) writes exclusive bounds as booleans.
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[plain] = node.pop(bound)
            node[bound] = True
    if node.get("type") == "object" or "properties" in node:
        node["type"] = "object"
        node["properties"] = {k: _structural(v) for k, v in node.get("properties", {}).items()}
        if not node["properties"]:
            node.pop("properties")
        if isinstance(node.get("additionalProperties"), dict):
            node["additionalProperties"] = _structural(node["additionalProperties"])
        elif node.get("additionalProperties") is False:
            node.pop("additionalProperties")
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        node["items"] = _structural(node["items"])
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
    return {k: v for k, v in node.items() if k in _KEEP}


def _defaulted(value: Any, node: dict[str, Any]) -> Any:
    """`value` with the nested defaults of `node` applied, top-down, as the API server defaults objects."""
    if isinstance(value, dict):
        value = dict(value)
        for key, sub in (node.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _defaulted(value[key], sub)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value = [_defaulted(item, node["items"]) for item in value]
    return value


def _materialise_defaults(node: dict[str, Any]) -> dict[str, Any]:
    """Write every object default with its nested defaults already in it (bottom-up).

    The API server validates each `default` against its node's schema AND its CEL rules as written,
    without nested defaulting (apiextensions-apiserver schema/defaulting/validation.go): `default: {}`
    on an object whose rule reads `self.enabled` is refused with `no such key: enabled evaluating rule`.
    Objects are defaulted the same way at request time, so the materialised default stores exactly
    what `{}` plus nested defaults would, and passes its own rules.
    """
    node = dict(node)
    if isinstance(node.get("properties"), dict):
        node["properties"] = {k: _materialise_defaults(v) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        node["items"] = _materialise_defaults(node["items"])
    if isinstance(node.get("default"), dict | list):
        node["default"] = _defaulted(node["default"], node)
    return node


def _schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _materialise_defaults(_structural(_inline(raw, defs)))


def _root_schema(description: str, spec: type, status: type, root_rules: list[dict[str, Any]]) -> dict[str, Any]:
    """The openAPIV3Schema of one kind: its spec and status types, with the root rules."""
    status_schema = _schema(status)
    status_schema["properties"]["conditions"].update(
        {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    return {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # A rule's fieldPath must name a property the schema declares (the server refuses
            # `fieldPath: .metadata.name` while metadata declares none); at the root, metadata may
            # declare name and generateName only. `type: string` adds no constraint of its own.
            "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
            "spec": _schema(spec),
            "status": status_schema,
        },
        "x-kubernetes-validations": root_rules,
    }


def _crd(name: str, kind: str, plural: str, singular: str, short_names: list[str],
         printer_columns: list[dict[str, Any]], schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name, "labels": {c.Label.PART_OF: "finetune-operator"}},
        "spec": {
            "group": c.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": short_names,
                "categories": c.CATEGORIES,
            },
            "versions": [
                {
                    "name": c.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def openapi_schema() -> dict[str, Any]:
    return _root_schema(
        "FineTuneJob fine-tunes a model on a dataset with distributed training, presets and early stopping.",
        FineTuneJobSpec, FineTuneJobStatus, ROOT_RULES,
    )


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    {"name": "Epoch", "type": "integer", "jsonPath": ".status.epoch"},
    {"name": "Train-Loss", "type": "number", "jsonPath": ".status.trainLoss"},
    {"name": "Val-Loss", "type": "number", "jsonPath": ".status.valLoss"},
    {"name": "Best", "type": "number", "jsonPath": ".status.bestMetric"},
    {"name": "Best-Epoch", "type": "integer", "jsonPath": ".status.bestEpoch", "priority": 1},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return _crd(c.CRD_NAME, c.KIND, c.PLURAL, c.SINGULAR, c.SHORT_NAMES, PRINTER_COLUMNS, openapi_schema())


HEADER = "# GENERATED by `python -m finetune_operator.api.crd --write` from the API types. Do not edit.\n"
ROOT = Path(__file__).resolve().parents[3]
CRD_PATHS = [ROOT / "crds" / f"{c.CRD_NAME}.yaml", ROOT / "charts" / "finetune-operator" / "crds" / f"{c.CRD_NAME}.yaml"]
# kopf's peering CRDs are hand-written in the chart; `kubectl apply -f crds/` users get the same file.
PEERING_SOURCE = ROOT / "charts" / "finetune-operator" / "crds" / "kopf-peering.yaml"
PEERING_COPY = ROOT / "crds" / "kopf-peering.yaml"


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120)


# -- FineTuneSweep (issue 14): the same generator over the sweep's types ---------------------------------

def sweep_openapi_schema() -> dict[str, Any]:
    from .sweep import SWEEP_ROOT_RULES, FineTuneSweepSpec, FineTuneSweepStatus

    return _root_schema(
        "FineTuneSweep searches hyperparameters: it runs trial FineTuneJobs made from a template, "
        "chooses their values with optuna (grid, random, tpe) and prunes unpromising ones.",
        FineTuneSweepSpec, FineTuneSweepStatus, SWEEP_ROOT_RULES,
    )


SWEEP_PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Trials", "type": "integer", "jsonPath": ".status.trialsCreated"},
    {"name": "Running", "type": "integer", "jsonPath": ".status.trialsRunning"},
    {"name": "Pruned", "type": "integer", "jsonPath": ".status.trialsPruned"},
    {"name": "Best", "type": "number", "jsonPath": ".status.bestValue"},
    {"name": "Best-Trial", "type": "string", "jsonPath": ".status.bestTrial"},
    {"name": "Epochs", "type": "integer", "jsonPath": ".status.epochsSpent", "priority": 1},
    {"name": "Saved", "type": "integer", "jsonPath": ".status.epochsSavedByPruning", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def sweep_crd() -> dict[str, Any]:
    from . import sweep as s

    return _crd(s.SWEEP_CRD_NAME, s.SWEEP_KIND, s.SWEEP_PLURAL, s.SWEEP_SINGULAR, s.SWEEP_SHORT_NAMES,
                SWEEP_PRINTER_COLUMNS, sweep_openapi_schema())


SWEEP_CRD_PATHS = [ROOT / "crds" / "finetunesweeps.finetune.dev.yaml",
                   ROOT / "charts" / "finetune-operator" / "crds" / "finetunesweeps.finetune.dev.yaml"]


def render_sweep() -> str:
    return HEADER + yaml.safe_dump(sweep_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="write crds/ and the chart's copy, and copy the peering CRDs to crds/")
    args = parser.parse_args(argv)
    text = render()
    if not args.write:
        sys.stdout.write(text)
        return 0
    for path in CRD_PATHS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    for path in SWEEP_CRD_PATHS:
        path.write_text(render_sweep())
        print(f"wrote {path.relative_to(ROOT)}")
    PEERING_COPY.write_text(PEERING_SOURCE.read_text())
    print(f"wrote {PEERING_COPY.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
