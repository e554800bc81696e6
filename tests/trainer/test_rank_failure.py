"""A rank that fails inside a multi-process pod ends the pod promptly, named, with the worker's own exit code.

The container's entry point (`python -m finetune_trainer`, as the pod runs it) on one "pod" of two gloo
processes: torch elastic stops the surviving rank at once (no collective left waiting for the dead one: the
process group timeout here is 10 minutes, the run must end long before), the pod's exit code is the failed
rank's, and the termination message (what the kubelet copies into the pod's status and the operator into the
FineTuneJob's) names the rank and its error. A full disk on one rank's save exits 4, so the Job's
podFailurePolicy (FailJob on 2-5) fails the job at once instead of retrying through backoffLimit.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import trainer_env

from finetune_contract.config import EXIT_DISK_FULL, FailureReason

pytestmark = pytest.mark.slow
ENDS_WITHIN = 300  # seconds: far below the 600 s process group timeout a hung collective would wait for


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pod_env(manifest: dict, out: Path, job: str, port: int, *, nodes: int, procs: int, index: int, pod_dir: Path,
             **fault: str) -> dict[str, str]:
    """The environment of pod `index` of a job of `nodes` pods on loopback (its rendezvous at `port`)."""
    return trainer_env(manifest, out, job, FINETUNE_NNODES=str(nodes), FINETUNE_NPROC_PER_NODE=str(procs),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FINETUNE_RDZV_ID=f"{job}-{port}",
                       JOB_COMPLETION_INDEX=str(index),
                       FINETUNE_TERMINATION_MESSAGE_PATH=str(pod_dir / "termination-log"), **fault)


def _pod(manifest: dict, out: Path, **fault: str) -> tuple[int, str, str]:
    env = _pod_env(manifest, out, "rank-failure", _port(), nodes=1, procs=2, index=0, pod_dir=out, **fault)
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer"], env=env, capture_output=True, text=True,
                          timeout=ENDS_WITHIN)
    message = (out / "termination-log").read_text() if (out / "termination-log").exists() else ""
    return proc.returncode, message, proc.stderr


def _manifest(manifest) -> dict:
    return manifest(distributed={"processesPerNode": 2, "processGroupTimeoutSeconds": 600},
                    hyperparameters={"epochs": 2, "batchSize": 4, "learningRate": 1e-3, "seed": 3, "mixedPrecision": "no"},
                    earlyStopping={"enabled": False})


def test_a_failing_rank_ends_the_pod_with_its_rank_and_error_named(manifest, tmp_path):
    code, message, stderr = _pod(_manifest(manifest), tmp_path, FINETUNE_FAULT_RANK_FAILS_AT_STEP="1:2")
    assert code == 1, stderr[-3000:]
    assert message.startswith("rank 1 (local rank 1, pid "), message
    assert "RuntimeError: fault injection (FINETUNE_FAULT_RANK_FAILS_AT_STEP): rank 1 fails at step 2" in message
    assert "every other rank of the pod was stopped" in message
    assert len(message) <= 300  # the operator shows the last 300 characters of a pod's message
    assert '"rank": 1' in stderr  # and one structured log line says the same


def test_a_full_disk_on_a_rank_fails_the_pod_with_exit_code_4(manifest, tmp_path):
    code, message, stderr = _pod(_manifest(manifest), tmp_path, FINETUNE_FAULT_DISK_FULL="1")
    assert code == EXIT_DISK_FULL, stderr[-3000:]
    parsed = json.loads(message)  # the worker's own message (reason and fix) is kept
    assert parsed["reason"] == FailureReason.DISK_FULL and "checkpoint" in parsed["message"]


def test_a_full_disk_on_a_multi_node_job_spends_no_group_restart(manifest, tmp_path):
    """torch elastic restarts a failed group in place up to maxRestarts times whatever the exit code; a full disk
    cannot be fixed by a restart, so node 0's agent must not spend one: its pod exits 4 after the first failure
    (the podFailurePolicy then fails the Job, which stops pod 1; here the test stops it)."""
    spec = _manifest(manifest)
    spec["spec"]["distributed"] = {"nodes": 2, "processesPerNode": 1, "processGroupTimeoutSeconds": 60, "maxRestarts": 3}
    port = _port()
    pods = []
    for index in (0, 1):
        out = tmp_path / f"pod-{index}"
        env = _pod_env(spec, tmp_path / "shared", "disk-full-multinode", port, nodes=2, procs=1, index=index,
                       pod_dir=out, FINETUNE_FAULT_DISK_FULL="1")
        out.mkdir()
        pods.append(subprocess.Popen([sys.executable, "-m", "finetune_trainer"], env=env, stdout=subprocess.DEVNULL,
                                     stderr=(out / "stderr").open("w"), text=True))
    try:
        code = pods[0].wait(ENDS_WITHIN)
    finally:
        for pod in pods:
            pod.kill()
            pod.wait()
    stderr = (tmp_path / "pod-0" / "stderr").read_text()
    assert code == EXIT_DISK_FULL, stderr[-3000:]
    assert stderr.count("optimizer adamw") == 1, stderr[-3000:]  # the worker started once: no restart in place
    assert "the agent's 3 remaining restarts are not used" in stderr
    parsed = json.loads((tmp_path / "pod-0" / "termination-log").read_text())
    assert parsed["reason"] == FailureReason.DISK_FULL
