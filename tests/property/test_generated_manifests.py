"""Generated FineTuneJob manifests, valid and invalid, through the CLI, the CRD and the operator.

See pipeline.check for the properties. The example counts add up to the issue's 5,000 per run
(tests/property/report.py prints the figures docs/reliability.md quotes).
"""

from __future__ import annotations

from hypothesis import given, settings

from . import strategies as s
from .pipeline import check, examples

VALID_EXAMPLES = 1500
INVALID_EXAMPLES = 3000


@settings(max_examples=examples(VALID_EXAMPLES))
@given(s.valid_manifests())
def test_valid_manifests_pass_every_layer(manifest):
    verdict = check(manifest)
    assert not verdict.python, f"a manifest generated valid was rejected: {verdict.python}"


@settings(max_examples=examples(INVALID_EXAMPLES))
@given(s.invalid_manifests())
def test_invalid_manifests_are_rejected_at_the_earliest_layer(case):
    manifest, expectation = case
    check(manifest, expectation)
