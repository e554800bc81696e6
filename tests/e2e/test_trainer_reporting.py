"""The trainer's status reports and stop polling against a real HTTP Kubernetes API (the emulation, or a
cluster with FTJ_E2E_KUBECONFIG): short real trainings of the tiny model with KUBECONFIG pointing at it."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from trainer.local_train import run
from trainer.tiny_models import build_tiny_bert, load_weights, make_manifest, write_tiny_data

from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_trainer import worker

from .kubeconfig import write_kubeconfig

pytestmark = pytest.mark.e2e

# docs/contracts.md: what the trainer's rank 0 writes; everything else in status belongs to the operator.
TRAINER_FIELDS = {
    "epoch", "totalEpochs", "step", "trainLoss", "valLoss", "valMetric", "valMetricName", "learningRate",
    "samplesPerSecond", "batchSize", "gradientAccumulationSteps", "bestEpoch", "bestMetric", "history",
    "lastHeartbeatTime", "trainerPhase", "trainerStopTime", "trainerStopReason", "trainerStopMessage", "trainerStopEpoch",
    "timings", "resumedFrom", "checkpointWarning", "testMetrics", "testExamples", "testEpoch",
}
HISTORY_POINT = {"epoch", "trainLoss", "valLoss", "valMetric", "learningRate", "time"}
OPERATOR_STATUS = {
    "observedGeneration": 1, "phase": "Running", "reason": "TrainingStarted", "message": "set by the operator",
    "jobName": "reported-train", "startTime": "2026-01-01T00:00:00Z",
    "conditions": [{"type": "Running", "status": "True", "reason": "TrainingStarted", "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}],
}
HP = {"dropout": 0.0, "epochs": 3, "batchSize": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("trainer-reporting")
    return build_tiny_bert(root), write_tiny_data(root / "train.jsonl")


def _manifest(tiny: tuple[str, str], namespace: str, name: str, **overrides: Any) -> dict[str, Any]:
    m = make_manifest(*tiny, name=name, **{"hyperparameters": HP, **overrides})
    m["metadata"]["namespace"] = namespace
    return m


def _create(api, manifest: dict[str, Any], status: dict[str, Any] | None = None) -> None:
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    api.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, manifest)
    if status:
        api.custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, name, {"status": status},
                                                         _content_type="application/merge-patch+json")


def _get(api, namespace: str, name: str) -> dict[str, Any]:
    return api.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _train(manifest: dict[str, Any], out: Path, kubeconfig: Path, **env: str) -> dict[str, Any]:
    return run(manifest, output_dir=str(out), progress=False,
               env={"FINETUNE_STATUS": "on", "KUBECONFIG": str(kubeconfig), "FINETUNE_STOP_POLL_SECONDS": "0.05", **env})


def test_trainer_status_lands_on_the_status_subresource_and_keeps_operator_fields(kube, api, namespace, tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(worker, "HISTORY_LIMIT", 2)  # 3 epochs against a cap of 2 (the real cap is 200)
    m = _manifest(tiny, namespace, "reported")
    _create(api, m, OPERATOR_STATUS)
    before = _get(api, namespace, "reported")
    # Only 4 examples fit (fault injection); with the default 10% headroom the trainer keeps 2 x 4: the status
    # must show the accumulation that keeps the batch of 8.
    result = _train(m, tmp_path, kube.kubeconfig, FINETUNE_FAULT_OOM_ABOVE="4")
    assert result["outcome"] == "completed" and result["epochsRun"] == 3

    obj = _get(api, namespace, "reported")
    st = obj["status"]
    for key, value in OPERATOR_STATUS.items():  # merge patches: operator-owned fields survive untouched
        assert st[key] == value, key
    assert set(st) - set(OPERATOR_STATUS) <= TRAINER_FIELDS
    # Status subresource only: spec and metadata.generation are unchanged (the emulation, like the API server,
    # drops status from main-resource writes, so these fields prove the /status path was used).
    assert obj["spec"] == before["spec"] and obj["metadata"].get("generation") == before["metadata"].get("generation")
    assert (st["epoch"], st["totalEpochs"], st["step"]) == (3, 3, result["globalStep"])
    assert (st["batchSize"], st["gradientAccumulationSteps"]) == (2, 4)
    assert st["trainerPhase"] == "Finished" and st["lastHeartbeatTime"].endswith("Z")
    assert st["valMetricName"] == "val_accuracy" and st["valMetric"] == result["history"][-1]["val_accuracy"]
    assert st["trainLoss"] == pytest.approx(result["history"][-1]["trainLoss"]) and st["samplesPerSecond"] > 0
    assert (st["bestEpoch"], st["bestMetric"]) == (result["bestEpoch"], result["bestMetric"])
    assert [h["epoch"] for h in st["history"]] == [2, 3]  # capped: the newest points
    assert all(set(h) == HISTORY_POINT for h in st["history"])


STOPS = {
    "spec.stop": ({"spec": {"stop": True}}, "spec.stop is true"),
    "status.stopRequestedTime": ({"status": {**OPERATOR_STATUS, "stopRequestedTime": "2026-01-01T00:00:01Z"}},
                                 "status.stopRequestedTime is set"),
    "annotation": ({"metadata": {"annotations": {"finetune.dev/stop": "true"}}}, "annotation finetune.dev/stop is true"),
}


@pytest.mark.parametrize("source", list(STOPS))
def test_a_stop_request_on_the_finetunejob_stops_training(source, kube, api, namespace, tiny, tmp_path):
    extra, reason = STOPS[source]
    m = _manifest(tiny, namespace, "stopped", hyperparameters={**HP, "batchSize": 4})
    m["metadata"].update(extra.get("metadata", {}))
    m["spec"].update(extra.get("spec", {}))
    _create(api, m, extra.get("status"))
    result = _train(m, tmp_path, kube.kubeconfig)
    assert result["outcome"] == "stopped" and result["stopReason"] == reason
    assert result["globalStep"] < result["totalSteps"]
    assert load_weights(str(tmp_path))  # the model is kept
    assert _get(api, namespace, "stopped")["status"]["trainerPhase"] == "Finished"


def test_an_unreachable_api_never_blocks_training(tiny, tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on once this closes: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig.yaml", f"http://127.0.0.1:{port}")
    result = _train(_manifest(tiny, "default", "unreachable"), tmp_path / "out", kubeconfig)
    assert result["outcome"] == "completed" and result["globalStep"] == result["totalSteps"] and result["epochsRun"] == 3
    err = capsys.readouterr().err
    assert err.count("status patch failed") == 1  # said once, then retried quietly with backoff
