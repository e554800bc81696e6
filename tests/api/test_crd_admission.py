"""The emulation's CRD admission (tests/e2e/crd_admission.py) says what a real kube-apiserver says.

Pinned real behaviour (issue 10): a v1.36.2 API server refused the CRD kept in
fixtures/finetunejobs-refused-by-v1.36.2.yaml with four errors; the same four come back here. Every
other rule gets one CRD that breaks only it, and the shipped CRDs (ours and kopf's peering CRDs, in
crds/ and in the chart) must be accepted.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from e2e import crd_admission as adm

from finetune_operator.api import crd as gen

ROOT = Path(__file__).resolve().parents[2]
REFUSED = Path(__file__).parent / "fixtures" / "finetunejobs-refused-by-v1.36.2.yaml"
SHIPPED = sorted((ROOT / "crds").glob("*.yaml")) + sorted((ROOT / "charts" / "finetune-operator" / "crds").glob("*.yaml"))
BASE = "spec.validation.openAPIV3Schema"

# What the v1.36.2 server printed (issue 10), the earlyStopping message written out in full.
SERVER_SAID = [
    f'{BASE}.properties[spec].properties[lora].default: Invalid value: "object": no such key: enabled evaluating rule: '
    "rank must be > 0 when LoRA is enabled (typical: 8 or 16)",
    f'{BASE}.properties[spec].properties[earlyStopping].default: Invalid value: "object": no such key: mode evaluating '
    "rule: mode contradicts the metric: use max for accuracy/f1/recall, min for losses and perplexity, or auto",
    f'{BASE}.x-kubernetes-validations[0].fieldPath: Invalid value: ".metadata.name": must be a valid path',
    f'{BASE}.x-kubernetes-validations[1].fieldPath: Invalid value: ".metadata.name": must be a valid path',
]


def _parts(error: str) -> tuple[str, str, str]:
    field, kind_value, detail = re.match(r"(.*?): (Invalid value: \S+|[A-Z][a-z]+(?: value)?): (.*)", error).groups()
    return field, kind_value, detail


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def crd_with(schema: dict[str, Any], *, status: bool = False) -> dict[str, Any]:
    """A minimal valid CRD around `schema` (the `spec` property of widgets.example.dev)."""
    version: dict[str, Any] = {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
        "type": "object", "properties": {"spec": schema}}}}
    if status:
        version["subresources"] = {"status": {}}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.dev"},
            "spec": {"group": "example.dev", "scope": "Namespaced",
                     "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
                     "versions": [version]}}


SPEC = f"{BASE}.properties[spec]"


def obj(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, **extra}


# --- the pinned real case ---------------------------------------------------------------------------------


def test_the_crd_a_real_server_refused_is_refused_with_its_four_messages():
    errors = adm.admit(docs(REFUSED)[0])
    assert len(errors) == 4, errors
    assert errors[:2] == SERVER_SAID[:2]
    for got, said in zip(errors[2:], SERVER_SAID[2:], strict=True):
        # apiextensions validation.go says "fieldPath must be a valid path"; the issue quotes its tail.
        g, s = _parts(got), _parts(said)
        assert g[:2] == s[:2] and g[2].endswith(s[2]), (got, said)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_crd_is_admitted(path):
    for crd in docs(path):
        assert adm.admit(crd) == [], crd["metadata"]["name"]


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_crd_is_a_valid_object_for_kubernetes(path, version):
    for crd in docs(path):
        kubernetes_validate.validate(crd, version, strict=True)


def test_the_generated_crd_is_what_is_shipped_and_the_peering_copy_has_not_drifted():
    assert (ROOT / "crds" / f"{gen.c.CRD_NAME}.yaml").read_text() == gen.render()
    assert gen.PEERING_COPY.read_text() == gen.PEERING_SOURCE.read_text(), (
        "crds/kopf-peering.yaml drifted from the chart's: run `python -m finetune_operator.api.crd --write`")


def test_object_defaults_are_written_with_their_nested_defaults():
    # The generator's fix: a default that would only pass its rules after nested defaulting is materialised.
    spec = docs(ROOT / "crds" / f"{gen.c.CRD_NAME}.yaml")[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    lora = spec["properties"]["spec"]["properties"]["lora"]
    assert lora["default"]["enabled"] is False and lora["default"]["rank"] == lora["properties"]["rank"]["default"]
    early = spec["properties"]["spec"]["properties"]["earlyStopping"]
    assert {"mode", "metric"} <= set(early["default"])


# --- defaults -------------------------------------------------------------------------------------------


def test_default_violating_its_schema_is_refused():
    errors = adm.admit(crd_with(obj({"size": {"type": "integer", "minimum": 1, "default": 0}})))
    assert errors == [f"{SPEC}.properties[size].default: Invalid value: 0: {SPEC}.properties[size].default in body "
                      "should be greater than or equal to 1"]


def test_object_default_missing_a_required_field_is_refused_without_nested_defaulting():
    schema = obj({"inner": obj({"mode": {"type": "string", "default": "a"}}, required=["mode"], default={})})
    assert adm.admit(crd_with(schema)) == [f"{SPEC}.properties[inner].default.mode: Required value"]


def test_default_violating_its_cel_rule_is_refused_and_fieldpath_is_appended():
    rule = {"rule": "self.mode == 'a'", "message": "mode must be a", "fieldPath": ".mode"}
    schema = obj({"inner": obj({"mode": {"type": "string"}}, default={"mode": "b"}, **{"x-kubernetes-validations": [rule]})})
    assert adm.admit(crd_with(schema)) == [f'{SPEC}.properties[inner].default.mode: Invalid value: "object": mode must be a']


def test_empty_default_under_a_rule_reading_a_defaulted_field_is_refused():
    rule = {"rule": "self.mode == 'a'", "message": "mode must be a"}
    inner = obj({"mode": {"type": "string", "default": "a"}}, default={}, **{"x-kubernetes-validations": [rule]})
    assert adm.admit(crd_with(obj({"inner": inner}))) == [
        f'{SPEC}.properties[inner].default: Invalid value: "object": no such key: mode evaluating rule: mode must be a']
    inner["default"] = {"mode": "a"}  # the generator's fix: nested defaults written out
    assert adm.admit(crd_with(obj({"inner": inner}))) == []


def test_nested_rules_see_the_default_too():
    rule = {"rule": "self.n > 1", "message": "n must be > 1"}
    inner = obj({"leaf": obj({"n": {"type": "integer"}}, **{"x-kubernetes-validations": [rule]})}, default={"leaf": {"n": 1}})
    assert adm.admit(crd_with(obj({"inner": inner}))) == [
        f'{SPEC}.properties[inner].default.leaf: Invalid value: "object": n must be > 1']


def test_default_with_unknown_fields_is_refused():
    schema = obj({"inner": obj({"a": {"type": "string"}}, default={"a": "x", "b": "y"})})
    errors = adm.admit(crd_with(schema))
    assert errors == [f'{SPEC}.properties[inner].default: Invalid value: {{"a":"x","b":"y"}}: must not have unknown fields']


def test_default_in_top_level_metadata_is_forbidden():
    crd = crd_with(obj({}))
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"] = {
        "type": "object", "properties": {"name": {"type": "string", "default": "x"}}}
    assert f"{BASE}.properties[metadata].properties[name].default: Forbidden: must not be set in top-level metadata" \
        in adm.admit(crd)


# --- fieldPath ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field_path", [".nope", ".a.b", ".items[0]", "a", ".metadata.name"])
def test_field_path_must_name_a_declared_property(field_path):
    rule = {"rule": "true", "message": "m", "fieldPath": field_path}
    schema = obj({"a": {"type": "string"}, "items": {"type": "array", "maxItems": 2, "items": {"type": "string"}}},
                 **{"x-kubernetes-validations": [rule]})
    assert adm.admit(crd_with(schema)) == [
        f"{SPEC}.x-kubernetes-validations[0].fieldPath: Invalid value: {adm._go(field_path)}: fieldPath must be a valid path"]


@pytest.mark.parametrize("field_path", [".a", "['a']", ".labels.anykey", ".labels['a.b']"])
def test_field_and_map_accessors_are_valid_paths(field_path):
    rule = {"rule": "true", "message": "m", "fieldPath": field_path}
    schema = obj({"a": {"type": "string"},
                  "labels": {"type": "object", "maxProperties": 4, "additionalProperties": {"type": "string", "maxLength": 8}}},
                 **{"x-kubernetes-validations": [rule]})
    assert adm.admit(crd_with(schema)) == []


# --- CEL: compile and cost --------------------------------------------------------------------------------


@pytest.mark.parametrize(("rule", "why"), [
    ("self.a ||| true", "Syntax error"),
    ("self.nope == 'x'", "undefined field 'nope'"),
    ("isFancy(self.a)", "undeclared reference to 'isFancy'"),
    ("self.a.frobnicate()", "undeclared reference to 'frobnicate'"),
    ("other.a == 'x'", "undeclared reference to 'other'"),
])
def test_cel_that_does_not_compile_is_refused(rule, why):
    schema = obj({"a": {"type": "string", "maxLength": 8}}, **{"x-kubernetes-validations": [{"rule": rule, "message": "m"}]})
    errors = adm.admit(crd_with(schema))
    assert len(errors) == 1 and errors[0].startswith(f"{SPEC}.x-kubernetes-validations[0].rule: Invalid value: "
                                                      "apiextensions.ValidationRule{"), errors
    assert "compilation failed: " in errors[0] and why in errors[0], errors


def test_cel_over_the_per_rule_cost_budget_is_refused():
    # An unbounded list of unbounded strings, each matched against a regex: the server's classic refusal.
    names = {"type": "array", "items": {"type": "string"}}
    rule = {"rule": "self.names.all(n, n.matches('^[a-z]+$'))", "message": "lowercase names"}
    errors = adm.admit(crd_with(obj({"names": names}, **{"x-kubernetes-validations": [rule]})))
    assert errors[0].startswith(f"{SPEC}.x-kubernetes-validations[0].rule: Forbidden: estimated rule cost exceeds budget "
                                "by factor of more than 100x (try simplifying the rule"), errors
    # So expensive that it alone also breaks the budget of the whole schema, which the server reports too.
    assert errors[1:] == [
        f"{SPEC}.x-kubernetes-validations[0].rule: Forbidden: contributed to estimated rule cost total exceeding cost "
        "limit for entire OpenAPIv3 schema",
        f"{BASE}: Forbidden: x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema exceeds "
        "budget by factor of more than 100x (try simplifying the rule, or adding maxItems, maxProperties, and "
        "maxLength where arrays, maps, and strings are declared)"]
    names.update(maxItems=16)
    names["items"]["maxLength"] = 63
    assert adm.admit(crd_with(obj({"names": names}, **{"x-kubernetes-validations": [rule]}))) == []


def test_rule_cost_is_multiplied_by_the_cardinality_of_the_lists_above_it():
    rule = {"rule": "self.name.matches('^[a-z]+$')", "message": "m"}
    item = obj({"name": {"type": "string", "maxLength": 100_000}}, **{"x-kubernetes-validations": [rule]})
    assert adm.admit(crd_with(obj({"xs": {"type": "array", "maxItems": 1, "items": item}}))) == []
    errors = adm.admit(crd_with(obj({"xs": {"type": "array", "maxItems": 10_000, "items": item}})))
    assert errors and "estimated rule cost exceeds budget" in errors[0], errors


def test_all_rules_together_over_the_crd_cost_budget_are_refused():
    rule = {"rule": "self.s.matches('^[a-z]+$')", "message": "m"}  # ~ 0.1 * 3 MiB * 2 = 629,146 per object
    item = obj({"s": {"type": "string", "maxLength": 3_000_000}}, **{"x-kubernetes-validations": [rule]})
    lists = {f"l{i}": {"type": "array", "maxItems": 15, "items": item} for i in range(12)}  # 12 x 9.4M > 100M
    errors = adm.admit(crd_with(obj(lists)))
    assert errors[-1].startswith(f"{BASE}: Forbidden: x-kubernetes-validations estimated rule cost total for entire "
                                 "OpenAPIv3 schema exceeds budget"), errors


def test_the_shipped_rules_are_far_below_the_cost_budget():
    crd = docs(ROOT / "crds" / f"{gen.c.CRD_NAME}.yaml")[0]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    costs: list[tuple[str, int]] = []
    adm._openapi_walk(schema, BASE, root=True, top_meta=False, cel_on=True, cardinality=1, costs=costs)
    rules = sum(len(r.get("x-kubernetes-validations", [])) for r in _nodes(schema))
    assert len(costs) == rules > 0 and max(c for _, c in costs) < adm.STATIC_ESTIMATED_COST_LIMIT / 2


def _nodes(node):
    """Every schema node, depth first (to count the rules the walk must have costed)."""
    if isinstance(node, dict):
        if "x-kubernetes-validations" in node:
            yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)


# --- list types -------------------------------------------------------------------------------------------


def test_list_map_keys_must_be_required_or_defaulted():
    items = obj({"type": {"type": "string"}, "v": {"type": "string"}})
    conditions = {"type": "array", "maxItems": 4, "items": items,
                  "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    assert adm.admit(crd_with(obj({"conditions": conditions}))) == [
        f"{SPEC}.properties[conditions].items.properties[type].default: Required value: this property is in "
        "x-kubernetes-list-map-keys, so it must have a default or be a required property"]
    items["required"] = ["type"]
    assert adm.admit(crd_with(obj({"conditions": conditions}))) == []


@pytest.mark.parametrize(("array", "expected"), [
    ({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["k"],
      "items": obj({"k": obj({})}, required=["k"])},
     "items.properties[k].type: Invalid value: \"object\": must be a scalar type if parent array's x-kubernetes-list-type is map"),
    ({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["nope"], "items": obj({"k": {"type": "string"}})},
     'x-kubernetes-list-map-keys: Invalid value: ["nope"]: entries must all be names of item properties'),
    ({"x-kubernetes-list-type": "map", "items": obj({"k": {"type": "string"}})},
     "x-kubernetes-list-map-keys: Required value: must not be empty if x-kubernetes-list-type is map"),
    ({"x-kubernetes-list-map-keys": ["k"], "items": obj({"k": {"type": "string"}}, required=["k"])},
     "x-kubernetes-list-type: Required value: must be map if x-kubernetes-list-map-keys is non-empty"),
    ({"x-kubernetes-list-type": "set", "items": obj({"k": {"type": "string"}})},
     "items.x-kubernetes-map-type: Invalid value: null: must be atomic as item of a list with x-kubernetes-list-type=set"),
    ({"x-kubernetes-list-type": "bag", "items": {"type": "string"}},
     'x-kubernetes-list-type: Unsupported value: "bag": supported values: "atomic", "set", "map"'),
])
def test_list_type_consistency(array, expected):
    schema = obj({"xs": {"type": "array", "maxItems": 4, **array}})
    assert f"{SPEC}.properties[xs].{expected}" in adm.admit(crd_with(schema))


def test_list_type_on_a_non_array_is_refused():
    schema = obj({"xs": {"type": "string", "x-kubernetes-list-type": "set"}})
    assert adm.admit(crd_with(schema)) == [
        f'{SPEC}.properties[xs].type: Invalid value: "string": must be array if x-kubernetes-list-type is specified']


# --- structural schema and the rest of the OpenAPI walk ---------------------------------------------------


@pytest.mark.parametrize(("spec", "expected"), [
    (obj({"a": {"description": "no type"}}),
     "properties[a].type: Required value: must not be empty for specified object fields"),
    (obj({"xs": {"type": "array"}}), "properties[xs].items: Required value: must be specified"),
    (obj({"a": {"type": "string", "anyOf": [{"type": "string"}]}}),
     "properties[a].anyOf[0].type: Forbidden: must be empty to be structural"),
    (obj({"a": {"type": "object", "anyOf": [{"properties": {"b": {}}}]}}),
     "properties[a].properties[b]: Required value: because it is defined in "
     f"{SPEC}.properties[a].anyOf[0].properties[b]"),
    (obj({"q": {"type": "string", "x-kubernetes-int-or-string": True}}),
     'properties[q].type: Invalid value: "string": must be empty if x-kubernetes-int-or-string is true'),
])
def test_non_structural_schemas_are_refused(spec, expected):
    assert f"{SPEC}.{expected}" in adm.admit(crd_with(spec))


def test_metadata_may_restrict_name_and_generate_name_only():
    crd = crd_with(obj({}))
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    root["properties"]["metadata"] = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 50}}}
    assert adm.admit(crd) == []
    root["properties"]["metadata"]["properties"]["labels"] = {"type": "object"}
    assert adm.admit(crd) == [f"{BASE}.properties[metadata]: Forbidden: must not specify anything other than name and "
                              "generateName, but metadata is implicitly specified"]


def test_int_or_string_union_is_structural():
    schema = obj({"q": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}})
    assert adm.admit(crd_with(schema)) == []


@pytest.mark.parametrize(("spec", "expected"), [
    (obj({"xs": {"type": "array", "maxItems": 2, "uniqueItems": True, "items": {"type": "string"}}}),
     "properties[xs].uniqueItems: Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic"),
    (obj({"m": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}}}),
     "properties[m].additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive"),
    (obj({"m": {"type": "object", "x-kubernetes-preserve-unknown-fields": False}}),
     "properties[m].x-kubernetes-preserve-unknown-fields: Invalid value: false: must be true or undefined"),
    (obj({}, **{"x-kubernetes-validations": [{"rule": "true", "message": "two\nlines"}]}),
     'x-kubernetes-validations[0].message: Invalid value: "two\\nlines": message must not contain line breaks'),
    (obj({}, **{"x-kubernetes-validations": [{"rule": " ", "message": "m"}]}),
     "x-kubernetes-validations[0].rule: Required value: rule is not specified"),
])
def test_openapi_walk_refusals(spec, expected):
    assert f"{SPEC}.{expected}" in adm.admit(crd_with(spec))


def test_status_subresource_limits_the_root_keywords():
    crd = crd_with(obj({}), status=True)
    assert adm.admit(crd) == []
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["additionalProperties"] = {"type": "string"}
    errors = adm.admit(crd)
    assert any(e.startswith(f"{BASE}: Invalid value: ") and "fields are allowed at the root of the schema if the "
               "status subresource is enabled" in e for e in errors), errors


def test_crd_object_checks():
    crd = crd_with(obj({}))
    crd["metadata"]["name"] = "widgets.other.dev"
    crd["spec"]["versions"].append(copy.deepcopy(crd["spec"]["versions"][0]))
    errors = adm.admit(crd)
    assert 'metadata.name: Invalid value: "widgets.other.dev": must be spec.names.plural+"."+spec.group' in errors
    assert any("must have exactly one version marked as storage version" in e for e in errors)
    assert 'spec.versions[1].name: Duplicate value: "v1"' in errors


def test_differing_version_schemas_are_reported_per_version():
    crd = crd_with(obj({}))
    second = copy.deepcopy(crd["spec"]["versions"][0])
    second.update(name="v2", storage=False)
    second["schema"]["openAPIV3Schema"]["properties"]["spec"] = obj({"a": {}})
    crd["spec"]["versions"].append(second)
    assert adm.admit(crd) == ["spec.versions[1].schema.openAPIV3Schema.properties[spec].properties[a].type: "
                              "Required value: must not be empty for specified object fields"]


def test_causes_carry_reason_field_and_message():
    errors = adm.admit(docs(REFUSED)[0])
    causes = adm.causes(errors)
    assert [c["reason"] for c in causes] == ["FieldValueInvalid"] * 4
    assert causes[2]["field"] == f"{BASE}.x-kubernetes-validations[0].fieldPath"
    assert causes[0]["message"].startswith('Invalid value: "object": no such key: enabled')
