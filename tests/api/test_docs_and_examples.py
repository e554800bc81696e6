"""Generated docs match the types, and every shipped example passes the CRD (schema + CEL) as well
as the Python validation, with identical stored defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_operator.api import docs as api_docs
from finetune_operator.api import validate_manifest
from finetune_operator.api.crd import ROOT, openapi_schema

from . import crd_harness as h

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", list(api_docs.OUTPUTS), ids=lambda p: p.name)
def test_generated_doc_is_current(path: Path):
    assert path.exists(), f"{path} missing: run `python -m finetune_operator.api.docs --write`"
    assert path.read_text() == api_docs.OUTPUTS[path](), (
        f"docs/{path.name} drifted from the API types: run `python -m finetune_operator.api.docs --write`"
    )


def test_api_reference_lists_every_spec_field():
    text = api_docs.API_REFERENCE.read_text()

    def paths(node, prefix):
        for key, sub in (node.get("properties") or {}).items():
            yield f"{prefix}.{key}"
            yield from paths(sub, f"{prefix}.{key}")
        if isinstance(node.get("items"), dict):
            yield from paths(node["items"], prefix + "[]")

    missing = [p for p in paths(openapi_schema()["properties"]["spec"], "spec") if f"| `{p}` |" not in text]
    assert not missing, f"fields missing from docs/api-reference.md: {missing}"


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"classification.yaml", "lora-causal-lm.yaml", "deepspeed-2x4.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_python_and_the_crd(path: Path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        validate_manifest(doc)
        result = h.validate(doc)
        assert result.violations == [], [str(v) for v in result.violations]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_crd_defaults_equal_python_defaults(path: Path):
    # What the API server stores (its structural defaults) must be what Python fills before presets,
    # otherwise the operator would see a different spec from the one `finetune run` resolves.
    from finetune_operator.api import parse_spec

    doc = next(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    stored = h.validate(doc).obj["spec"]
    python = parse_spec(doc["spec"]).model_dump(by_alias=True, mode="json", exclude_none=True)
    assert _drop_empty(stored) == _drop_empty(python)


def _drop_empty(node):
    # An empty map or list means the same as an absent one on both sides (Python dumps `env: {}`,
    # the server stores `hyperparameters: {}` from its default).
    if isinstance(node, dict):
        return {k: _drop_empty(v) for k, v in node.items() if v not in ({}, [])}
    return node
