"""`finetune sweep status/plot` against the API (the e2e emulation): a sweep whose status the planner wrote
for a finished run (tests/unit's simulated trials), read through the FineTuneSweep CRD, and the one-line
error for a sweep that does not exist."""

from __future__ import annotations

import math
import secrets
from datetime import UTC, datetime

import pytest

# The e2e fixtures (API emulation or real cluster, official clients); imported, not re-implemented.
from e2e.conftest import _start_emulator, api, apply_crds, kube  # noqa: F401

from finetune_operator.api import constants as c
from finetune_operator.api import sweep as s
from finetune_operator.cli import main
from finetune_operator.plan import sweep as ps

pytestmark = pytest.mark.e2e

TEMPLATE = {"model": {"name": "/models/m"}, "dataset": {"source": "/data/train.jsonl"}, "hyperparameters": {"epochs": 4}}
RATES = [1e-3, 3e-3, 1e-6, 1e-5, 1e-1, 3e-4]


def _finished_sweep() -> dict:
    """Drive the planner to the end with made-up trials (loss lowest near lr 1e-3)."""
    obj = {"apiVersion": c.API_VERSION, "kind": s.SWEEP_KIND, "metadata": {"name": "lr", "namespace": "x", "uid": "u"},
           "spec": {"template": {"spec": TEMPLATE}, "algorithm": {"name": "grid", "seed": 0},
                    "searchSpace": [{"path": "hyperparameters.learningRate", "type": "choice", "values": RATES}],
                    "pruning": {"algorithm": "median", "startupTrials": 2}, "budget": {"maxTrials": 6}}}
    jobs: dict[str, dict] = {}
    now = datetime(2026, 12, 2, tzinfo=UTC)
    for _ in range(100):
        plan = ps.plan_sweep(obj, dict(jobs), now)
        obj["status"] = plan.status
        for m in plan.create:
            jobs[m["metadata"]["name"]] = {**m, "status": {"phase": "Running", "epoch": 0, "history": []}}
        for name, _ in plan.stop:
            jobs[name]["status"].update(phase="Succeeded", reason=s.PRUNED, epochsSaved=4 - jobs[name]["status"]["epoch"])
        if plan.status["phase"] == "Succeeded":
            return obj
        for m in jobs.values():
            st = m["status"]
            if st["phase"] == "Running":
                lr = m["spec"]["hyperparameters"]["learningRate"]
                st["epoch"] += 1
                st["history"].append({"epoch": st["epoch"], "valLoss": abs(math.log10(lr) + 3) + 1 / st["epoch"]})
                if st["epoch"] == 4:
                    st["phase"] = "Succeeded"
    raise AssertionError("did not finish")


@pytest.fixture(scope="module")
def sweep_ns(api) -> str:  # noqa: F811
    ns = f"cli-sweep-{secrets.token_hex(3)}"
    api.core.create_namespace({"metadata": {"name": ns}})
    obj = _finished_sweep()
    status = obj.pop("status")
    obj["metadata"] = {"name": "lr", "namespace": ns}
    api.custom.create_namespaced_custom_object(c.GROUP, c.VERSION, ns, s.SWEEP_PLURAL, obj)
    api.custom.patch_namespaced_custom_object_status(c.GROUP, c.VERSION, ns, s.SWEEP_PLURAL, "lr", {"status": status})
    return ns


def test_sweep_status_shows_the_trials_table_and_the_best(kube, sweep_ns, capsys):  # noqa: F811
    assert main(["sweep", "status", "lr", "--kubeconfig", str(kube.kubeconfig), "-n", sweep_ns]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"FineTuneSweep {sweep_ns}/lr: Succeeded (BudgetSpent)"
    assert "best so far: lr-" in out and "learningRate=0.001" in out.split("best so far:")[1].splitlines()[0]
    table = out.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["TRIAL", "STATE", "EPOCHS", "VAL_LOSS", "PARAMETERS"] and len(table) == 7
    assert any(" Pruned " in row for row in table) and sum(row.split()[1] == "*" for row in table[1:]) == 1


def test_sweep_plot_writes_a_png(kube, sweep_ns, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sweep.png"
    assert main(["sweep", "plot", "lr", "-o", str(out), "--kubeconfig", str(kube.kubeconfig), "-n", sweep_ns]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert capsys.readouterr().out.strip() == f"wrote {out}"


def test_missing_sweep_is_one_error_line(kube, sweep_ns, capsys):  # noqa: F811
    assert main(["sweep", "status", "nope", "--kubeconfig", str(kube.kubeconfig), "-n", sweep_ns]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: no FineTuneSweep nope in namespace {sweep_ns}" and captured.out == ""
