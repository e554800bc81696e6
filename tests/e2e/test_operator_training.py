"""Real fine-tunes through the operator: examples/ manifests run as they are by the real trainer, in
pod-runner pods (emulation) or the cluster's own pods (FTJ_E2E_KUBECONFIG; see README.md).

The operator-driven early stop with the real trainer is test_early_stopping_e2e.py (a tiny model: the
MiniLM example with up to 10 epochs would take many minutes on a CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .operator_helpers import condition, create, events_with, kube_client, status

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_classification_example_succeeds(kube, operator, pod_runner, namespace, wait_for):
    c = kube_client(kube.kubeconfig)
    manifest = yaml.safe_load((EXAMPLES / "classification.yaml").read_text())
    name = manifest["metadata"]["name"]
    create(c, namespace, manifest)
    st = wait_for(lambda: (s := status(c, namespace, name)).get("phase") in ("Succeeded", "Failed") and s,
                  timeout=540, what="a finished job", interval=1)
    assert (st["phase"], st["reason"]) in {("Succeeded", "TrainingCompleted"), ("Succeeded", "EarlyStopped")}, st.get("message")
    assert st["epoch"] >= 1 and st["history"] and st["bestMetric"] is not None
    assert condition(st, "Succeeded")["status"] == "True"
    # Issue 13: the held-out test of the best checkpoint and the stage timings reach the status (the operator's
    # podStartSeconds merged into the object whose other keys the trainer wrote).
    assert 0.0 <= st["testMetrics"]["test_accuracy"] <= 1.0 and st["testExamples"] == 200, st.get("testMetrics")
    assert st["timings"]["podStartSeconds"] >= 0 and st["timings"]["firstStepTime"] and st["timings"]["dataSeconds"] >= 0
    events_with(c, namespace, name, wait_for, st["reason"])
    c.close()
