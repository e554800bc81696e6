"""The FineTuneJob spec's shape, read from the pydantic model's JSON schema, for the generators.

Nothing here lists the spec's fields: a field added to spec.py is generated, mutated and checked
without a change to this suite. Only what a JSON schema cannot say about a field (that a string
is a Kubernetes quantity, a DNS name or an environment variable name) comes from a small table,
and a test fails when a new field of such a kind appears without an entry there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from finetune_operator.api.crd import _inline
from finetune_operator.api.spec import FineTuneJobSpec


@dataclass(frozen=True)
class Node:
    """One schema node, with `anyOf [X, null]` folded into X and $refs inlined."""

    path: str  # `spec.hyperparameters.optimizer.betas`, `spec.env.*` for map values, `...[]` for items
    kind: str  # object, map, array, string, integer, number, boolean, enum, quantity
    schema: dict[str, Any] = field(repr=False, hash=False, compare=False)
    properties: tuple[tuple[str, Node], ...] = ()
    required: frozenset[str] = frozenset()
    item: Node | None = None  # array items and map values
    nullable: bool = False  # the model accepts an explicit null (Optional[...])

    def prop(self, key: str) -> Node:
        return dict(self.properties)[key]


def _fold(schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    if "anyOf" in schema and not schema.get("x-kubernetes-int-or-string"):
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(schema["anyOf"])
        if len(options) != 1:
            raise ValueError(f"a union the generators do not know: {schema['anyOf']}")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return {**options[0], **rest}, nullable
    return schema, False


def _node(schema: dict[str, Any], path: str) -> Node:
    schema, nullable = _fold(schema)
    if schema.get("x-kubernetes-int-or-string"):
        return Node(path, "quantity", schema, nullable=nullable)
    if "enum" in schema:
        return Node(path, "enum", schema, nullable=nullable)
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        props = tuple((k, _node(v, f"{path}.{k}")) for k, v in schema["properties"].items())
        return Node(path, "object", schema, props, frozenset(schema.get("required", ())), nullable=nullable)
    if kind == "object":
        return Node(path, "map", schema, item=_node(schema.get("additionalProperties") or {}, f"{path}.*"), nullable=nullable)
    if kind == "array":
        return Node(path, "array", schema, item=_node(schema["items"], f"{path}[]"), nullable=nullable)
    if kind in ("string", "integer", "number", "boolean"):
        return Node(path, kind, schema, nullable=nullable)
    raise ValueError(f"{path}: a schema the generators do not know: {schema}")


@lru_cache(maxsize=1)
def spec_node() -> Node:
    raw = FineTuneJobSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _node(_inline(copy.deepcopy(raw), defs), "spec")


def walk(node: Node):
    """Every node below `node` (itself included), top-down."""
    yield node
    for _, sub in node.properties:
        yield from walk(sub)
    if node.item is not None:
        yield from walk(node.item)


# --- what a JSON schema cannot say ----------------------------------------------------------
# The values of these strings are read by Kubernetes, not by us: a random string there is accepted by
# the CRD and by the operator but refused by the API server when the child is created. The generators
# produce values Kubernetes accepts for them (and hostile ones where Kubernetes takes any string).
# Keys are schema paths; `test_every_kubernetes_string_is_classified` fails when a field of one of these
# kinds is added to the spec without an entry.
DNS_SUBDOMAIN = "dns-subdomain"
QUANTITY = "quantity"
RESOURCE_NAME = "resource-name"
ENV_NAME = "env-name"
LABEL_KEY = "label-key"
LABEL_VALUE = "label-value"
ABSOLUTE_PATH = "absolute-path"
IMAGE = "image"
TOLERATION_OPERATOR = "toleration-operator"
TAINT_EFFECT = "taint-effect"
OBJECT_STORE_URI = "object-store-uri"
STORAGE_SIZE = "storage-size"  # a claim size: a binary or decimal multiple, no milli or exponent
SECRET_KEY = "secret-key"  # a key of a Secret's data: [-._a-zA-Z0-9]+

KUBERNETES_STRINGS: dict[str, str] = {
    "spec.model.pvc": DNS_SUBDOMAIN,
    "spec.dataset.pvc": DNS_SUBDOMAIN,
    "spec.output.pvc": DNS_SUBDOMAIN,
    "spec.output.path": ABSOLUTE_PATH,
    "spec.output.size": STORAGE_SIZE,
    "spec.output.storageClassName": DNS_SUBDOMAIN,
    "spec.output.credentialsSecret": DNS_SUBDOMAIN,
    "spec.dataset.credentialsSecret": DNS_SUBDOMAIN,
    "spec.output.uri": OBJECT_STORE_URI,
    "spec.model.tokenSecret.name": DNS_SUBDOMAIN,
    "spec.model.tokenSecret.key": SECRET_KEY,
    "spec.model.cachePvc": DNS_SUBDOMAIN,
    "spec.secretEnv.*.name": DNS_SUBDOMAIN,
    "spec.secretEnv.*.key": SECRET_KEY,
    "spec.envFrom[].secretRef.name": DNS_SUBDOMAIN,
    "spec.priorityClassName": DNS_SUBDOMAIN,
    "spec.serviceAccountName": DNS_SUBDOMAIN,
    "spec.image": IMAGE,
    "spec.resources.gpuResourceName": RESOURCE_NAME,
    "spec.resources.shmSize": QUANTITY,
    "spec.resources.requests.*": QUANTITY,
    "spec.resources.limits.*": QUANTITY,
    "spec.env.*": "env-value",  # any string: Kubernetes passes it through (after $(VAR) expansion)
    "spec.nodeSelector.*": LABEL_VALUE,
    "spec.tolerations[].key": LABEL_KEY,
    "spec.tolerations[].operator": TOLERATION_OPERATOR,
    "spec.tolerations[].value": LABEL_VALUE,
    "spec.tolerations[].effect": TAINT_EFFECT,
}
# Map keys Kubernetes reads (the generator's key strategy for each map).
KUBERNETES_KEYS: dict[str, str] = {
    "spec.env": ENV_NAME,
    "spec.secretEnv": ENV_NAME,
    "spec.nodeSelector": LABEL_KEY,
    "spec.resources.requests": RESOURCE_NAME,
    "spec.resources.limits": RESOURCE_NAME,
}
