"""The API-server harness itself, on a small hand-written CRD, so its verdicts can be trusted."""

from __future__ import annotations

from . import crd_harness as h

CRD = {
    "spec": {
        "group": "example.dev",
        "names": {"kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "x-kubernetes-validations": [
                                    {"rule": "self.ratio == 0.0 || self.size > 1", "message": "ratio needs size > 1",
                                     "fieldPath": ".ratio"}
                                ],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "ratio": {"type": "number", "default": 0, "minimum": 0, "exclusiveMinimum": False},
                                    "share": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                                    "quantity": {"x-kubernetes-int-or-string": True},
                                    "inner": {
                                        "type": "object",
                                        "default": {},
                                        "properties": {"mode": {"type": "string", "enum": ["a", "b"], "default": "a"}},
                                        "x-kubernetes-validations": [{"rule": "self.mode == 'a'", "message": "mode must be a"}],
                                    },
                                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                },
                            },
                        },
                    }
                },
            }
        ],
    }
}


def widget(**spec) -> dict:
    return {"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": spec}


def test_defaults_apply_top_down():
    result = h.validate(widget(size=2), CRD)
    assert result.violations == []
    assert result.obj["spec"] == {"size": 2, "ratio": 0, "inner": {"mode": "a"}}


def test_unknown_fields_are_reported_with_their_path():
    result = h.validate(widget(size=2, colour="red", inner={"mood": "x"}), CRD)
    assert result.paths == {"spec.colour", "spec.inner.mood"}
    assert "colour" not in result.obj["spec"]


def test_map_values_are_not_unknown_fields():
    assert h.validate(widget(size=2, labels={"team": "ml"}), CRD).violations == []


def test_null_is_dropped_and_defaulted():
    assert h.validate(widget(size=2, ratio=None), CRD).obj["spec"]["ratio"] == 0


def test_boolean_exclusive_minimum_is_understood():
    assert h.validate(widget(size=2, share=0), CRD).paths == {"spec.share"}
    assert h.validate(widget(size=2, share=0.5), CRD).violations == []


def test_required_names_the_missing_field():
    assert h.validate(widget(), CRD).paths == {"spec.size"}


def test_number_fields_are_doubles_in_cel_even_when_json_says_int():
    # cel-python would raise "no such overload" comparing int 0 with 0.0 without the schema's typing.
    assert h.validate(widget(size=1, ratio=0), CRD).violations == []
    assert h.validate(widget(size=1, ratio=1), CRD).paths == {"spec.ratio"}


def test_cel_rule_on_a_defaulted_object_runs():
    assert h.validate(widget(size=2, inner={"mode": "b"}), CRD).paths == {"spec.inner"}


def test_type_errors_block_cel_but_range_errors_do_not():
    assert h.validate(widget(size="big", ratio=1), CRD).paths == {"spec.size"}
    assert h.validate(widget(size=0, ratio=1), CRD).paths == {"spec.size", "spec.ratio"}


def test_int_or_string():
    assert h.validate(widget(size=2, quantity="4Gi"), CRD).violations == []
    assert h.validate(widget(size=2, quantity=3), CRD).violations == []
    assert h.validate(widget(size=2, quantity=1.5), CRD).paths == {"spec.quantity"}


def test_routing_and_name():
    assert h.validate({**widget(size=2), "apiVersion": "example.dev/v2"}, CRD).paths == {"apiVersion"}
    assert h.validate({**widget(size=2), "kind": "Gadget"}, CRD).paths == {"kind"}
    assert h.validate({**widget(size=2), "metadata": {"name": "Not_OK"}}, CRD).paths == {"metadata.name"}
