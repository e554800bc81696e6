"""Status reporting and stop polling against a fake CustomObjectsApi; metric names and labels."""

from __future__ import annotations

import threading
import time

from prometheus_client import generate_latest

from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.reporting import StatusReporter, stop_requested_in


class FakeApi:
    def __init__(self, obj: dict, fail_first: int = 0):
        self.obj = obj
        self.patches: list[dict] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def patch_namespaced_custom_object_status(self, group, version, ns, plural, name, body, **kwargs):
        assert kwargs["_content_type"] == "application/merge-patch+json" and kwargs["_request_timeout"]
        with self.lock:
            if self.fail_first:
                self.fail_first -= 1
                raise ConnectionError("API server unreachable")
            self.patches.append(body["status"])

    def get_namespaced_custom_object(self, group, version, ns, plural, name, **kwargs):
        return self.obj


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.02)
    return predicate()


def test_stop_request_sources():
    assert stop_requested_in({"spec": {"stop": True}})
    assert stop_requested_in({"status": {"stopRequestedTime": "2026-01-01T00:00:00Z"}})
    assert stop_requested_in({"metadata": {"annotations": {"finetune.dev/stop": "true"}}})
    assert stop_requested_in({"spec": {"stop": False}, "metadata": {"annotations": {"finetune.dev/stop": "false"}}}) is None


def test_reporter_sends_patches_and_sees_a_stop():
    api = FakeApi({"spec": {"stop": False}})
    reporter = StatusReporter("job", "ns", api=api, poll_seconds=0.05).start()
    reporter.report({"epoch": 1, "trainLoss": 0.5})
    assert _wait(lambda: api.patches) and api.patches[0]["epoch"] == 1
    assert not reporter.stop_requested and reporter.connected
    api.obj = {"spec": {"stop": True}}
    assert _wait(lambda: reporter.stop_requested) and reporter.stop_reason == "spec.stop is true"
    reporter.close()


def test_failed_patches_are_kept_and_coalesced_without_blocking():
    api = FakeApi({}, fail_first=1)
    reporter = StatusReporter("job", "ns", api=api, poll_seconds=0.05).start()
    reporter.report({"epoch": 1, "trainLoss": 0.9})
    reporter.report({"epoch": 2})
    # After the failure (backoff >= 1 s) the newest state arrives, with fields of both patches merged.
    assert _wait(lambda: api.patches, timeout=15)
    merged = {}
    for p in api.patches:
        merged.update(p)
    assert merged["epoch"] == 2 and merged["trainLoss"] == 0.9
    reporter.close()


def test_metrics_use_finetune_job_label_never_job():
    m = TrainerMetrics("my-job", "team-a")
    m.epoch.set(3)
    m.val_metric("val_accuracy", 0.9)
    text = generate_latest(m.registry).decode()
    assert 'finetune_trainer_epoch{finetune_job="my-job",namespace="team-a"} 3.0' in text
    assert 'finetune_validation_metric{finetune_job="my-job",metric="val_accuracy",namespace="team-a"} 0.9' in text
    assert "job=" not in text.replace("finetune_job=", "")
