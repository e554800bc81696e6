"""The harness memoises CEL verdicts on the fields each rule reads; memoised and direct must agree."""

from __future__ import annotations

from api import crd_harness as h
from hypothesis import given, settings

from . import strategies as s
from .pipeline import CRD, examples


def test_rule_chains_are_read_from_the_rule_text():
    assert h._chains("self.metadata.name.size() <= 50") == ((False, ("metadata", "name")),)
    assert h._chains("!has(self.a.b) || self.c == 'self.d'") == ((False, ("c",)), (True, ("a", "b")))
    # `self` used whole (a method on it, an index): no projection, the memo keys on the whole value.
    assert h._chains("self.size() > 1") is None
    assert h._chains("self['a'] == 1") is None


def test_presence_and_value_projections_differ():
    chains = h._chains("!has(self.a.b) || self.c > 1")
    assert h._projection({"c": 2}, chains) != h._projection({"a": {}, "c": 2}, chains)
    assert h._projection({"a": {}, "c": 2}, chains) != h._projection({"a": {"b": 1}, "c": 2}, chains)
    assert h._projection({"a": {"b": 1}, "c": 2}, chains) == h._projection({"a": {"b": 9}, "c": 2}, chains)


@settings(max_examples=examples(150))
@given(s.valid_manifests().flatmap(lambda m: s.rule_mutation(m) | s.name_mutation(m) | s.schema_mutation(m)))
def test_memoised_and_direct_cel_verdicts_agree(case):
    manifest, _ = case
    memo = h.validate(manifest, CRD)
    direct = h.validate(manifest, CRD, memo=False)
    assert memo.violations == direct.violations
