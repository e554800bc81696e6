"""Liveness by progress (issue 11): the real trainer's heartbeats, read by the operator's real watchdog.

The trainer runs in this process with a fake CustomObjectsApi that records its status patches; a watcher
thread plays the operator: it merges the patches into the stored status and calls the pure `observe` (the
whole phase machine, the stall watchdog included) against the current time, as the operator's resync
timer does. A long epoch (each step slowed by a fault knob, so the epoch lasts several stall timeouts) is
never failed; a step that hangs (FINETUNE_FAULT_HANG_AT_STEP) is failed as Stalled with the step counter
at the hung step; the watcher then sends SIGTERM, as Kubernetes does when the operator suspends the Job.
Assertions are on reasons and step counts; the time bound is the pure rule's, pinned in
tests/operator/test_operator_status.py.
"""

from __future__ import annotations

import copy
import os
import signal
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from local_train import run

from finetune_operator.plan.conditions import rfc3339
from finetune_operator.plan.status import job_input, observe
from finetune_trainer import reporting

STALL_TIMEOUT = 2
HEARTBEAT = 0.2
SLOW_STEP = 0.2


class RecordingApi:
    """CustomObjectsApi stand-in: status merge patches land in `status`; reads return the object."""

    def __init__(self, manifest: dict[str, Any]):
        self.obj = copy.deepcopy(manifest)
        self.obj["metadata"].update(namespace="default", uid="u1", generation=1)
        self.status: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.steps_reported: list[int] = []

    def patch_namespaced_custom_object_status(self, group, version, ns, plural, name, body, **kwargs):
        with self.lock:
            self.status.update(copy.deepcopy(body["status"]))
            if "step" in body["status"]:
                self.steps_reported.append(body["status"]["step"])

    def get_namespaced_custom_object(self, group, version, ns, plural, name, **kwargs):
        with self.lock:
            return {**self.obj, "status": copy.deepcopy(self.status)}


class Operator(threading.Thread):
    """The watchdog's side: observe() every few milliseconds over the status the trainer wrote."""

    def __init__(self, api: RecordingApi):
        super().__init__(daemon=True)
        self.api = api
        self.operator_status: dict[str, Any] = {}
        self.failed: dict[str, Any] | None = None
        self.done = threading.Event()
        self.passes = 0

    def run(self) -> None:
        pods = [{"metadata": {"name": "tiny-train-0"}, "status": {"phase": "Running", "containerStatuses": []}}]
        job_obj = None
        while not self.done.wait(0.05):
            with self.api.lock:
                status = {**copy.deepcopy(self.api.status), **self.operator_status}
            if job_obj is None:
                if "trainerPhase" not in status:
                    continue  # the pod "starts" when the trainer has loaded (a real timeout covers loading too)
                job_obj = {"metadata": {"name": "tiny-train"}, "spec": {"suspend": False},
                           "status": {"active": 1, "startTime": rfc3339(datetime.now(UTC)), "conditions": []}}
            obj = {**self.api.obj, "status": status}
            new, _ = observe(job_input(obj), status, job_obj, pods, datetime.now(UTC))
            self.operator_status = {k: v for k, v in new.items() if v is not None}
            self.passes += 1
            if new.get("phase") == "Failed" and self.failed is None:
                self.failed = {**status, **self.operator_status}
                with self.api.lock:
                    self.steps_at_failure = list(self.api.steps_reported)
                os.kill(os.getpid(), signal.SIGTERM)  # the suspended Job's pod gets SIGTERM


def _train(manifest, tmp_path, monkeypatch, **env: str) -> tuple[dict[str, Any] | None, Operator, RecordingApi]:
    for key, value in env.items():  # fault knobs are read from the process environment
        monkeypatch.setenv(key, value)
    api = RecordingApi(manifest)
    monkeypatch.setattr(reporting, "_load_api", lambda kubeconfig=None: api)
    watcher = Operator(api)
    watcher.start()
    try:
        result = run(manifest, output_dir=str(tmp_path / "out"), progress=False,
                     env={"FINETUNE_STATUS": "on", "FINETUNE_STOP_POLL_SECONDS": "0.1"})
    except RuntimeError as err:
        assert "interrupted" in str(err)  # SIGTERM: checkpointed and left
        result = None
    finally:
        watcher.done.set()
        watcher.join()
    return result, watcher, api


def _manifest(manifest):
    return manifest(
        hyperparameters={"epochs": 1, "batchSize": 2, "dropout": 0.0},
        watchdog={"stallTimeoutSeconds": STALL_TIMEOUT, "heartbeatSeconds": HEARTBEAT},
        earlyStopping={"enabled": False},
    )


def test_an_epoch_longer_than_the_stall_timeout_is_not_failed(manifest, tmp_path, monkeypatch):
    result, watcher, api = _train(_manifest(manifest), tmp_path, monkeypatch, FINETUNE_FAULT_SLOW_STEP_SECONDS=str(SLOW_STEP))
    assert result is not None and result["outcome"] == "completed"
    steps = result["globalStep"]
    # The scenario holds: the steps' injected delay alone makes the one epoch several stall timeouts long.
    assert steps * SLOW_STEP >= 3 * STALL_TIMEOUT
    assert watcher.failed is None and watcher.passes > 0
    assert watcher.operator_status.get("phase") == "Running"
    # Heartbeats carried the step counter while the epoch ran (not only its end).
    mid_epoch = [s for s in api.steps_reported if 0 < s < steps]
    assert len(set(mid_epoch)) >= 3, api.steps_reported


@pytest.mark.parametrize("hang_at", [5])
def test_a_hung_step_is_failed_as_stalled_at_that_step(manifest, tmp_path, monkeypatch, hang_at):
    result, watcher, api = _train(_manifest(manifest), tmp_path, monkeypatch, FINETUNE_FAULT_HANG_AT_STEP=str(hang_at))
    assert result is None  # it only ended because the watchdog failed the job and the pod got SIGTERM
    failed = watcher.failed
    assert failed is not None and (failed["phase"], failed["reason"]) == ("Failed", "Stalled")
    assert failed["step"] == hang_at and f"step counter stuck at {hang_at}" in failed["message"]
    assert max(watcher.steps_at_failure) == hang_at  # it had reported steps up to the hang, none after
    # SIGTERM ends the hang: the step in flight finishes, is checkpointed, and the trainer leaves.
    assert max(api.steps_reported) == hang_at + 1
    stalled = [c for c in failed["conditions"] if c["type"] == "Stalled"]
    assert stalled and stalled[0]["status"] == "True"
    # SIGTERM ended the hang: a checkpoint at the hung step, so nothing is lost.
    state_dir = tmp_path / "out" / "checkpoints"
    assert any(name.startswith("epoch-1-batch-") for name in os.listdir(state_dir))


def test_the_stall_timeout_gauge_follows_the_job_as_the_watchdog_does(manifest):
    """The FineTuneJobStalled alert compares the heartbeat's age with finetune_trainer_stall_timeout_seconds: the
    job's spec.watchdog.stallTimeoutSeconds at start, then as each poll of the FineTuneJob finds it (it may be
    edited after start, and the operator's watchdog reads it on every pass)."""
    from finetune_trainer.metrics import TrainerMetrics
    from finetune_trainer.reporting import StatusReporter, stall_timeout_in
    from finetune_trainer.worker import Trainer

    m = _manifest(manifest)
    api = RecordingApi(m)
    trainer = Trainer.__new__(Trainer)  # only what _follow_job reads
    trainer.metrics = TrainerMetrics("tiny", "default")
    trainer.spec = type("Spec", (), {"watchdog": type("W", (), {"stall_timeout_seconds": 900})()})()
    reporter = StatusReporter("tiny", "default", api=api, on_job=trainer._follow_job)
    gauge = trainer.metrics.registry.get_sample_value
    labels = {"finetune_job": "tiny", "namespace": "default"}
    assert reporter._poll_stop()
    assert gauge("finetune_trainer_stall_timeout_seconds", labels) == STALL_TIMEOUT
    api.obj["spec"]["watchdog"]["stallTimeoutSeconds"] = 0  # the watchdog switched off: the alert follows
    reporter._poll_stop()
    assert gauge("finetune_trainer_stall_timeout_seconds", labels) == 0
    del api.obj["spec"]["watchdog"]  # not in the object (an older CRD without defaults): the config's value
    reporter._poll_stop()
    assert gauge("finetune_trainer_stall_timeout_seconds", labels) == 900
    assert stall_timeout_in({"spec": {"watchdog": {"stallTimeoutSeconds": True}}}, 7) == 7
