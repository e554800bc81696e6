"""Real fine-tunes through the operator: examples/ manifests run by the real trainer in pod-runner pods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .operator_helpers import condition, create, events_for, kube_client, status

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
    assert st["reason"] in [e["reason"] for e in events_for(c, namespace, name)]
    c.close()


def test_overfitting_job_is_early_stopped_by_the_operator(kube, operator, pod_runner, namespace, wait_for):
    c = kube_client(kube.kubeconfig)
    path = EXAMPLES / "early-stopping.yaml"
    if not path.exists():
        pytest.skip("examples/early-stopping.yaml not present")
    manifest = yaml.safe_load(path.read_text())
    name = manifest["metadata"]["name"]
    configured = manifest["spec"]["hyperparameters"]["epochs"]
    create(c, namespace, manifest)
    st = wait_for(lambda: (s := status(c, namespace, name)).get("phase") in ("Succeeded", "Failed") and s,
                  timeout=580, what="a finished job", interval=1)
    assert (st["phase"], st["reason"]) == ("Succeeded", "EarlyStopped"), st.get("message")
    assert condition(st, "EarlyStopRequested")["reason"] == "PatienceExhausted"
    assert st["epoch"] < configured and st["epochsSaved"] == configured - st["epoch"]
    print(json.dumps({k: st.get(k) for k in ("epoch", "bestEpoch", "bestMetric", "epochsSaved", "message")}))
    c.close()
