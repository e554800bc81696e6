"""The generators read the spec from its schema; what the schema cannot say is classified by hand
(schema.KUBERNETES_STRINGS). These tests fail when the spec grows in a way the suite would miss."""

from __future__ import annotations

import copy
import json

from finetune_operator.api import InvalidFineTuneJob
from finetune_operator.plan.children import desired_children

from . import pipeline as p
from . import schema as sch


def test_every_schema_node_is_understood():
    kinds = {n.kind for n in sch.walk(sch.spec_node())}
    assert kinds <= {"object", "map", "array", "string", "integer", "number", "boolean", "enum", "quantity"}
    assert len(list(sch.walk(sch.spec_node()))) > 80  # the whole spec, nested objects included


def test_classified_paths_exist():
    paths = {n.path for n in sch.walk(sch.spec_node())}
    assert set(sch.KUBERNETES_STRINGS) <= paths
    assert {k for k in sch.KUBERNETES_KEYS} <= paths


def test_every_kubernetes_string_is_classified():
    """A string field whose value the operator copies into a child other than the ConfigMap is read by
    Kubernetes (a name, a quantity, a path, a label): the generators must know its kind."""
    for node in sch.walk(sch.spec_node()):
        if node.kind != "string" or node.path in sch.KUBERNETES_STRINGS or "[]" in node.path or ".*" in node.path:
            continue
        marker = "zqmarker"
        manifest = copy.deepcopy(p.REFERENCE)
        cur = manifest["spec"]
        parts = node.path.split(".")[1:]
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = marker
        if parts[:1] == ["dataset"] and parts[-1] == "textPairField":
            manifest["spec"]["task"] = "embedding"
        if parts[:1] == ["sft"]:
            manifest["spec"]["task"] = "causal-lm"  # sft applies only to causal-lm (a rule)
        try:
            job = p.validate_manifest(manifest)
        except InvalidFineTuneJob as err:
            raise AssertionError(f"{node.path}: a plain string is refused ({err}); teach this test the field") from None
        outside = [c["kind"] for c in desired_children(job, p.SETTINGS)
                   if c["kind"] != "ConfigMap" and marker in json.dumps(c)]
        assert not outside, f"{node.path} reaches {outside}: classify it in schema.KUBERNETES_STRINGS"
