"""The Argo CD health check in docs/argocd-health.lua, run with a real Lua interpreter (lupa) on
example FineTuneJob statuses. Argo CD embeds gopher-lua (Lua 5.1), so it runs under Lua 5.1 and 5.4."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from ship_helpers import ROOT

from finetune_operator.api import FineTuneJobStatus

lupa = pytest.importorskip("lupa")
SCRIPT = (ROOT / "docs" / "argocd-health.lua").read_text()
RUNTIMES = ["lua51", "lua54"]


def _to_lua(lua, value: Any):
    """JSON-like Python -> Lua tables (lists become 1-based arrays), as Argo CD converts the object."""
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # JSON numbers reach Lua as float64 in Argo CD
    return value


def health(obj: dict, runtime: str = "lua51") -> dict[str, str]:
    module = __import__(f"lupa.{runtime}", fromlist=["LuaRuntime"])
    lua = module.LuaRuntime(unpack_returned_tuples=True)
    fn = lua.eval(f"function(obj) {SCRIPT} end")
    result = fn(_to_lua(lua, obj))
    return {"status": result["status"], "message": result["message"]}


BASE = yaml.safe_load((ROOT / "examples" / "classification.yaml").read_text())
BASE["metadata"]["generation"] = 1


def job(status: dict | None) -> dict:
    obj = copy.deepcopy(BASE)
    if status is not None:
        FineTuneJobStatus.model_validate(status)  # the examples are statuses the API can hold
        obj["status"] = status
    return obj


def cond(ctype: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": "2026-11-23T10:00:00Z"}


CASES = [
    ("new", None, "Progressing", "Waiting for the operator"),
    ("pending", {"observedGeneration": 1, "phase": "Pending", "reason": "PodsPending", "message": "0/1 pods scheduled"},
     "Progressing", "PodsPending: 0/1 pods scheduled"),
    ("running", {"observedGeneration": 1, "phase": "Running", "epoch": 1, "totalEpochs": 2, "valMetric": 0.925,
                 "valMetricName": "val_accuracy"}, "Progressing", "epoch 1/2, val_accuracy 0.925"),
    ("stopping", {"observedGeneration": 1, "phase": "Running", "epoch": 4, "totalEpochs": 10,
                  "conditions": [cond("EarlyStopRequested", "True", "PatienceExhausted", "no gain for 2 epochs")]},
     "Progressing", "stopping early: no gain for 2 epochs"),
    ("succeeded", {"observedGeneration": 1, "phase": "Succeeded", "reason": "EarlyStopped", "message": "stopped after epoch 6",
                   "bestMetric": 0.985, "bestEpoch": 4}, "Healthy", "EarlyStopped: stopped after epoch 6 (best 0.985 at epoch 4)"),
    ("failed-oom", {"observedGeneration": 1, "phase": "Failed", "reason": "OOMKilled", "message": "pod bbc-news-0 ran out of memory"},
     "Degraded", "OOMKilled: pod bbc-news-0 ran out of memory"),
    ("suspended", {"observedGeneration": 1, "phase": "Suspended", "reason": "JobSuspended"}, "Suspended", "JobSuspended"),
    ("invalid", {"observedGeneration": 1, "phase": "Failed",
                 "conditions": [cond("Valid", "False", "InvalidSpec", "spec.hyperparameters.epochs: must be >= 1")]},
     "Degraded", "Invalid spec: spec.hyperparameters.epochs"),
    ("refused", {"observedGeneration": 1, "phase": "Running",
                 "conditions": [cond("SpecChangeRefused", "True", "ImmutableFieldChanged", "spec.model cannot change")]},
     "Degraded", "Spec change refused: spec.model cannot change"),
    ("stale-generation", {"observedGeneration": 0, "phase": "Succeeded"}, "Progressing", "observe generation 1"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("name", "status", "expected", "message"), CASES, ids=[c[0] for c in CASES])
def test_health(name: str, status: dict | None, expected: str, message: str, runtime: str):
    result = health(job(status), runtime)
    assert result["status"] == expected
    assert message in result["message"]


def test_every_phase_has_a_health():
    for phase in ("Pending", "Running", "Suspended", "Succeeded", "Failed"):
        assert health(job({"observedGeneration": 1, "phase": phase}))["status"] != "Unknown"


def test_script_avoids_lua_5_2_plus_syntax():
    """gopher-lua is Lua 5.1: no goto, integer division or bitwise operators."""
    code = re.sub(r"--[^\n]*", "", SCRIPT)
    assert not re.search(r"\bgoto\b|//|<<|>>|~(?!=)|&|\|", code)


def test_gitops_doc_embeds_the_same_script():
    doc = (ROOT / "docs" / "gitops.md").read_text()
    assert "resource.customizations.health.finetune.dev_FineTuneJob" in doc
    body = [line for line in SCRIPT.splitlines() if line.strip() and not line.strip().startswith("--")]
    assert all(line in doc for line in body), "docs/gitops.md's snippet differs from docs/argocd-health.lua"
