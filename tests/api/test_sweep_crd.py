"""The FineTuneSweep CRD (issue 14): generated from the types (drift), routed like the FineTuneJob's, and
its rules enforced twice with one meaning: CEL in the CRD (the API tests' harness evaluates it as the API
server does) and Python (`parse_sweep`, what the operator applies), each naming the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from finetune_operator.api import crd as gen
from finetune_operator.api import sweep as s

from . import crd_harness as h

CRD = gen.sweep_crd()
EXAMPLE = Path(gen.ROOT) / "examples" / "sweeps" / "learning-rate.yaml"


@pytest.mark.parametrize("path", gen.SWEEP_CRD_PATHS, ids=lambda p: str(p.relative_to(gen.ROOT)))
def test_committed_sweep_crd_matches_the_types(path):
    assert path.read_text() == gen.render_sweep(), (
        f"{path.relative_to(gen.ROOT)} drifted from the API types: run `python -m finetune_operator.api.crd --write`")


def test_sweep_crd_names_and_printer_columns():
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("FineTuneSweep", "finetunesweeps", ["fts"])
    (version,) = CRD["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = {col["name"]: col["jsonPath"] for col in version["additionalPrinterColumns"]}
    assert columns["Best"] == ".status.bestValue" and columns["Pruned"] == ".status.trialsPruned"


def _example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_passes_the_crd_and_python():
    doc = _example()
    assert h.validate(doc, CRD).violations == []
    spec, template = s.parse_sweep(doc["spec"])
    assert spec.budget.max_trials == 6 and template["hyperparameters"]["epochs"] == 3


def test_template_is_validated_as_a_finetunejob_spec():
    doc = _example()
    doc["spec"]["template"]["spec"]["hyperparameters"]["batchSize"] = 0
    assert "spec.template.spec.hyperparameters.batchSize" in h.validate(doc, CRD).paths


def _with(change) -> dict:
    doc = _example()
    change(doc["spec"])
    return doc


BAD = {
    "bounds": (lambda sp: sp["searchSpace"][0].update(low=1e-3, high=1e-4), "spec.searchSpace[0].high"),
    "log-low": (lambda sp: sp["searchSpace"][0].update(low=0.0), "spec.searchSpace[0].low"),
    "choice-no-values": (lambda sp: sp["searchSpace"][0].update(type="choice", low=None, high=None), "spec.searchSpace[0].values"),
    "grid-over-uniform": (lambda sp: sp["algorithm"].update(name="grid"), "spec.searchSpace"),
    "step-not-int": (lambda sp: sp["searchSpace"][0].update(step=2), "spec.searchSpace[0].step"),
    "parallel-above-max": (lambda sp: sp["budget"].update(parallelTrials=7), "spec.budget.parallelTrials"),
    "same-path-twice": (lambda sp: sp["searchSpace"].append(copy.deepcopy(sp["searchSpace"][0])), "spec.searchSpace"),
}


def _clean(doc: dict) -> dict:
    for p in doc["spec"]["searchSpace"]:
        for k in [k for k, v in p.items() if v is None]:
            del p[k]
    return doc


@pytest.mark.parametrize("case", list(BAD), ids=str)
def test_rules_refuse_the_same_manifests_in_cel_and_python_naming_the_field(case):
    change, path = BAD[case]
    doc = _clean(_with(change))
    cel = h.validate(doc, CRD)
    assert path in cel.paths, [str(v) for v in cel.violations]
    with pytest.raises(s.InvalidSweep) as err:
        s.parse_sweep(doc["spec"])
    assert path in [p.path for p in err.value.problems], err.value


def test_path_must_name_a_finetunejob_field():
    doc = _with(lambda sp: sp["searchSpace"][0].update(path="hyperparameters.learningRat"))
    assert "spec.searchSpace[0].path" in h.validate(doc, CRD).paths  # the enum of the spec's fields
    with pytest.raises(s.InvalidSweep, match=r"spec.searchSpace\[0\].path"):
        s.parse_sweep(doc["spec"])
    assert {"hyperparameters.learningRate", "lora.rank", "dataset.maxLength"} <= set(s.SEARCHABLE_PATHS)
    assert "stop" not in s.SEARCHABLE_PATHS and "suspend" not in s.SEARCHABLE_PATHS


def test_sweep_name_leaves_room_for_the_trial_suffix():
    doc = _example()
    doc["metadata"]["name"] = "x" * (s.MAX_SWEEP_NAME_LENGTH + 1)
    assert "metadata.name" in h.validate(doc, CRD).paths
