"""kube/diff.py's canonical_json is the json module's sorted, compact encoding byte for byte (the digests it feeds are
stored in annotations, so a faster encoder must not change one of them), and the trainer's config.json is its sorted,
indented encoding (its hash is in the ConfigMap and the pod template): both through jsonbytes.py."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from finetune_operator.jsonbytes import indented_sorted
from finetune_operator.kube.diff import canonical_json, digest


def reference(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                         max_leaves=40)


@settings(max_examples=2000, deadline=None)
@given(documents)
def test_generated_documents_encode_exactly_as_the_json_module_does(doc):
    assert canonical_json(doc) == reference(doc)
    assert indented_sorted(doc) == json.dumps(doc, sort_keys=True, indent=2)


def test_the_cases_where_the_encoders_differ_take_the_exact_path():
    cases = [
        {"small": 1e-05}, {"small": 2.5e-07}, [0.00012, 1e-4, 1e16, 1e22, -0.0, 5e-324],
        {"ünïcode": "välue"}, {"ctrl": "\x00\x01\x1f\x7f\b\f\n\r\t\"\\/"}, {"emoji": "\U0001f600"},
        {1: "int key"}, {"big": 2**70, "neg": -(2**70)}, {"a:1e-5": "a string that looks like a float", "b": [1, 2.0]},
        (1, 2, ("nested", "tuple")), {"b": 1, "a": {"d": 2, "c": [3, {"f": 4, "e": 5}]}},
    ]
    for doc in [*cases, {}, [], {"empty": {}, "list": [], "nested": [[], [{}]]}, "top", 1.5, None]:
        assert canonical_json(doc) == reference(doc), doc
        assert indented_sorted(doc) == json.dumps(doc, sort_keys=True, indent=2), doc
    assert digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})


def test_without_orjson_the_json_module_writes_the_same_bytes(monkeypatch):
    """The API types need only pydantic and PyYAML (the CLI may be installed without the operator's extras)."""
    from finetune_operator import jsonbytes

    doc = {"b": [1, 2.5, None, "ü"], "a": {"small": 1e-05, "n": 3}}
    expected = (canonical_json(doc), indented_sorted(doc))
    same_key = jsonbytes.equality_key({"x": 1, "y": [1]}) == jsonbytes.equality_key({"y": [1], "x": 1})
    monkeypatch.setattr(jsonbytes, "orjson", None)
    assert (canonical_json(doc), indented_sorted(doc)) == expected
    assert same_key and jsonbytes.equality_key({"x": 1, "y": [1]}) == jsonbytes.equality_key({"y": [1], "x": 1})
    assert jsonbytes.equality_key({"v": 1}) != jsonbytes.equality_key({"v": 1.0})
