"""Issue 15: a 2-node x 1-process job (gloo) survives the loss of a pod through a group restart.

The operator renders the Indexed Job with its podFailurePolicy and the elastic launcher; the pod runner plays the Job
controller (podFailurePolicy included) and the kubelet. Once training is under way and a mid-epoch checkpoint exists,
pod 1 is killed (SIGKILL of every process in it: a lost node or an OOM kill). Pod 0's worker fails in its collective
at once (gloo: connection reset), its agent restarts it into the next rendezvous round, the replacement pod 1 joins,
and both ranks resume from the last complete checkpoint. The job succeeds with status.restarts == 1 naming the rank,
and its per-epoch losses equal an uninterrupted run's within 1e-4 (the resume test's tolerance). The same loss with
the pod's DisruptionTarget condition (preemption) is not charged to backoffLimit: the Job's status.failed stays 0.

A tiny BERT (2 layers, 32 wide), 96 rows, 2 epochs; each step is slowed by 0.1 s so the kill lands mid-epoch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from trainer.local_train import run as local_run
from trainer.tiny_models import build_tiny_bert, make_manifest, write_tiny_data

from .operator_helpers import create, events_with, kube_client, status

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.local_pods("reads the tiny model and data from local directories and kills local pods")]

CLAIM = "group-output"
TOLERANCE = 1e-4


def _manifest(name: str, model: str, data: str) -> dict:
    m = make_manifest(
        model, data, name=name,
        hyperparameters={"epochs": 2, "batchSize": 2, "learningRate": 1e-3, "seed": 7, "mixedPrecision": "no"},
        distributed={"nodes": 2, "processesPerNode": 1, "processGroupTimeoutSeconds": 60},
        checkpointing={"intervalMinutes": 0.01},  # a checkpoint every 0.6 s: the restart resumes mid-epoch
        earlyStopping={"enabled": False},
        output={"pvc": CLAIM, "keepCheckpoints": 3},
        env={"OMP_NUM_THREADS": "1", "FINETUNE_FAULT_SLOW_STEP_SECONDS": "0.1", "FINETUNE_STOP_POLL_SECONDS": "0.5"},
    )
    return m


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("group-restart")
    model, data = build_tiny_bert(root), write_tiny_data(root / "train.jsonl", n=96)
    # The uninterrupted reference: the same job and world size (2 ranks on gloo), in one torchrun.
    reference = local_run(_manifest("reference", model, data), output_dir=str(root / "reference"), processes=2,
                          progress=False, env={"FINETUNE_FAULT_SLOW_STEP_SECONDS": "0"})
    return {"model": model, "data": data, "reference": reference}


def _losses(result_or_history: list[dict]) -> list[tuple[int, float, float]]:
    return [(h["epoch"], h["trainLoss"], h["valLoss"]) for h in result_or_history]


def _lose_pod_one(kube, pod_runner, namespace, wait_for, inputs, name: str, *, disruption: bool) -> tuple[dict, dict]:
    c = kube_client(kube.kubeconfig)
    create(c, namespace, _manifest(name, inputs["model"], inputs["data"]))
    out = pod_runner.workdir / "pvc" / namespace / CLAIM
    batch = f"{name}-train"
    # Training is under way on both pods and a mid-epoch checkpoint exists.
    # (Complete: renamed from its temporary directory, with its trainer_state.json.)
    wait_for(lambda: (out / "checkpoints").is_dir() and any(
        p.name.startswith("epoch-") and "-batch-" in p.name and (p / "trainer_state.json").exists()
        for p in (out / "checkpoints").iterdir()), timeout=240, what="a complete mid-epoch checkpoint", interval=0.1)
    pod1 = next(n for n in pod_runner.pod_names(batch) if n.startswith(f"{batch}-1-"))
    if disruption:
        pod_runner.disrupt(pod1, reason="PreemptionByScheduler")
    else:
        pod_runner.kill(pod1)
    killed = time.monotonic()
    st = wait_for(lambda: (s := status(c, namespace, name)).get("phase") in ("Succeeded", "Failed") and s,
                  timeout=300, what="a finished job", interval=0.5)
    job = c.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{batch}")
    result = json.loads((out / "result.json").read_text())
    events = events_with(c, namespace, name, wait_for, "GroupRestarted")
    c.close()
    print(json.dumps({"killedToFinishSeconds": round(time.monotonic() - killed, 1), "restarts": st.get("restarts"),
                      "lastRestart": st.get("lastRestart"), "jobFailed": (job.get("status") or {}).get("failed"),
                      "resumedFrom": result.get("resumedFrom")}))
    assert st["phase"] == "Succeeded", st.get("message")
    assert st["restarts"] == 1, st
    last = st["lastRestart"]
    assert last["pod"] == pod1 and last["nodeRank"] == 1, last
    assert "GroupRestarted" in [e["reason"] for e in events]
    # Every rank resumed from the last complete checkpoint (a mid-epoch one), and trained to the end.
    assert result["resumedFrom"] and "-batch-" in Path(result["resumedFrom"]).name, result["resumedFrom"]
    assert result["outcome"] == "completed" and result["rankSteps"] == [result["totalSteps"]] * 2
    reference = _losses(inputs["reference"]["history"])
    got = _losses(result["history"])
    assert [e for e, _, _ in got] == [e for e, _, _ in reference]
    worst = max(max(abs(a[1] - b[1]), abs(a[2] - b[2])) for a, b in zip(reference, got, strict=True))
    assert worst <= TOLERANCE, (reference, got)
    return last, job


def test_killed_pod_restarts_the_group_and_training_ends_as_if_uninterrupted(
    kube, operator, pod_runner, namespace, wait_for, inputs,
):
    last, job = _lose_pod_one(kube, pod_runner, namespace, wait_for, inputs, "lost-pod", disruption=False)
    assert (last["reason"], last["exitCode"], last["charged"]) == ("Error", 137, True), last
    assert job["status"].get("failed") == 1  # the job's own failure: charged to backoffLimit


def test_disrupted_pod_restarts_the_group_without_using_the_backoff_limit(
    kube, operator, pod_runner, namespace, wait_for, inputs,
):
    last, job = _lose_pod_one(kube, pod_runner, namespace, wait_for, inputs, "preempted-pod", disruption=True)
    assert (last["reason"], last["charged"]) == ("Disrupted", False), last
    assert "PreemptionByScheduler" in last["message"]
    assert not job["status"].get("failed")  # podFailurePolicy Ignore: backoffLimit untouched
