"""Metrics proven against a real Prometheus (Debian's binary, installed by scripts/setup.sh).

One Prometheus scrapes (a) a real training run - the trainer's own entry point in a subprocess, training a tiny
BERT built here - and (b) the real operator reconciling against the API emulation (e2e fixtures), and the
tests read the values back through Prometheus' HTTP API, comparing them with what the trainer wrote in
result.json and logged, and with what the operator wrote into the FineTuneJob's status.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The e2e fixtures: API emulation (or FTJ_E2E_KUBECONFIG's cluster), namespaces, pod runner; imported, not copied.
from e2e.conftest import api, kube, namespace, pod_runner, wait_for  # noqa: F401
from e2e.operator_helpers import condition, create, ftj, kube_client, status
from trainer.tiny_models import build_tiny_bert, write_tiny_data

from finetune_operator.api import validate_manifest

from .prometheus_server import Prometheus, free_port

pytest_plugins = ["e2e.operator_fixture"]  # the real operator process (`operator`) and its stand-in trainer pods
pytestmark = pytest.mark.prometheus

SCRAPE_INTERVAL = "500ms"

# The trainer exits when training ends, and a pod's last values are only in Prometheus if a scrape
# happened in between. This wrapper runs the real entry point (`finetune-trainer` is
# finetune_trainer.__main__:main) and then keeps the process - and so rank 0's metrics server thread -
# alive until the test has read the final values, or 120 s.
TRAINER_WRAPPER = """
import os, sys, time
from finetune_trainer.__main__ import main
code = main()
deadline = time.monotonic() + 120
while not os.path.exists(os.environ["TEST_EXIT_GATE"]) and time.monotonic() < deadline:
    time.sleep(0.1)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), interval=SCRAPE_INTERVAL, discovered=("trainer", "operator"))
    prom.start()
    try:
        yield prom
    finally:
        prom.stop()


def raw_samples(prom: Prometheus, selector: str, window: str = "10m") -> list[float]:
    """Every sample Prometheus stored for one series, oldest first (a range-vector query returns them unaltered)."""
    result = prom.query(f"{selector}[{window}]")
    assert len(result) == 1, f"{selector}: expected one series, got {result}"
    return [float(v) for _, v in result[0]["values"]]


def value(prom: Prometheus, promql: str) -> float:
    result = prom.query(promql)
    assert len(result) == 1, f"{promql}: expected one series, got {result}"
    return float(result[0]["value"][1])


# ----------------------------------------------------------------------------------------------------------
# (a) the trainer

@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with a word-level tokenizer (root/model) and a 3-topic dataset, built offline."""
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_bert(root)
    # Enough rows that an epoch spans several scrapes even on a fast, idle machine (1200 was not: a CI run
    # finished all three epochs before the first scrape), so Prometheus sees the epoch gauge advance.
    write_tiny_data(root / "train.jsonl", n=6000, seed=1)
    return root


def test_trainer_metrics_read_back_from_prometheus(prometheus, tiny_job, tmp_path):
    name = "prom-tiny"
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name, "namespace": "obs"},
        "spec": {
            "model": {"name": str(tiny_job / "model")},
            "dataset": {"source": str(tiny_job / "train.jsonl"), "maxLength": 32, "validationFraction": 0.25},
            "preset": "fast",
            "hyperparameters": {"epochs": 6, "batchSize": 8, "learningRate": 1e-3, "mixedPrecision": "no"},
            # No later epoch can improve val_loss by 100: patience 2 stops the run after epoch 3, deterministically.
            "earlyStopping": {"metric": "val_loss", "patience": 2, "minDelta": 100},
        },
    }
    config = tmp_path / "config.json"
    config.write_text(json.dumps(validate_manifest(manifest).trainer_config()))
    port, gate, out = free_port(), tmp_path / "exit-gate", tmp_path / "output"
    env = {
        **os.environ, "FINETUNE_CONFIG": str(config), "FINETUNE_OUTPUT_DIR": str(out), "FINETUNE_JOB_NAME": name,
        "FINETUNE_JOB_NAMESPACE": "obs", "FINETUNE_NNODES": "1", "FINETUNE_NPROC_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),  # set by the operator in a pod
        "FINETUNE_METRICS_PORT": str(port), "FINETUNE_STATUS": "off",  # no API here: the trainer decides early stops itself
        "TEST_EXIT_GATE": str(gate), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
    }
    prometheus.set_targets("trainer", [f"127.0.0.1:{port}"])
    log_path = tmp_path / "trainer.log"
    started = time.time()
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", TRAINER_WRAPPER], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        sel = f'{{finetune_job="{name}",namespace="obs"}}'
        deadline = time.monotonic() + 240
        while not (out / "result.json").exists():
            assert proc.poll() is None, f"trainer exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"training did not finish:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        result = json.loads((out / "result.json").read_text())
        assert result["outcome"] == "early_stopped" and result["epochsRun"] == 3
        history = result["history"]
        last = history[-1]

        # The run's final values, once Prometheus has scraped them (the trainer lingers for that).
        prometheus.wait_for(f"finetune_trainer_early_stops_total{sel} == 1", timeout=30)
        assert value(prometheus, f"finetune_trainer_epoch{sel}") == 3
        assert value(prometheus, f"finetune_trainer_step{sel}") == result["globalStep"]
        assert value(prometheus, f"finetune_batch_size{sel}") == result["batchSize"]
        assert value(prometheus, f"finetune_gradient_accumulation_steps{sel}") == result["gradientAccumulationSteps"]
        # Exact float equality: prometheus-client writes repr(float) and Prometheus returns the shortest
        # decimal that round-trips, so nothing is lost on the way.
        assert value(prometheus, f"finetune_train_loss{sel}") == last["trainLoss"]
        assert value(prometheus, f"finetune_validation_loss{sel}") == last["valLoss"]
        assert value(prometheus, f'finetune_validation_metric{{finetune_job="{name}",metric="val_accuracy"}}') == last["val_accuracy"]
        assert value(prometheus, f"finetune_learning_rate{sel}") == last["learningRate"]
        assert value(prometheus, f"finetune_best_metric{sel}") == result["bestMetric"] == history[0]["valLoss"]

        # Epoch advanced while Prometheus watched: every stored sample, in order, never goes back, and more
        # than one epoch value was seen (each epoch spans several scrapes).
        epochs = raw_samples(prometheus, f"finetune_trainer_epoch{sel}")
        assert epochs == sorted(epochs) and epochs[-1] == 3 and len(set(epochs)) >= 2, epochs
        # Each validation loss Prometheus stored is one the trainer wrote for an epoch (0 before the first).
        val_losses = set(raw_samples(prometheus, f"finetune_validation_loss{sel}"))
        assert val_losses - {0.0} <= {h["valLoss"] for h in history} and last["valLoss"] in val_losses
        # The training loss gauge moves every few steps (issue 11: liveness by progress), so its samples are
        # running means within an epoch: finite and non-negative, ending at the last epoch's value (above).
        train_losses = set(raw_samples(prometheus, f"finetune_train_loss{sel}"))
        assert train_losses and all(math.isfinite(v) and v >= 0 for v in train_losses), train_losses

        # ... and equal, to the 4 decimals logged, what the trainer's one-line-per-epoch log says.
        logged = [tuple(map(float, m)) for m in re.findall(r"epoch \d+/6: train_loss ([\d.]+) val_loss ([\d.]+)", log_path.read_text())]
        assert logged == [(round(h["trainLoss"], 4), round(h["valLoss"], 4)) for h in history]
    finally:
        gate.touch()
        code = proc.wait(60)
    assert code == 0, log_path.read_text()[-3000:]

    # After the trainer is gone: the target is down, and last_over_time still answers with the final losses.
    prometheus.wait_for(f'up{{job="trainer",instance="127.0.0.1:{port}"}} == 0', timeout=30)
    window = f"{int(time.time() - started) + 60}s"
    assert value(prometheus, f"last_over_time(finetune_validation_loss{sel}[{window}])") == last["valLoss"]
    assert value(prometheus, f"max_over_time(finetune_trainer_epoch{sel}[{window}])") == result["epochsRun"]


# ----------------------------------------------------------------------------------------------------------
# (b) the operator


@pytest.mark.e2e
def test_operator_metrics_read_back_from_prometheus(prometheus, kube, operator, pod_runner, namespace,  # noqa: F811
                                                     fake_trainer_env, wait_for):  # noqa: F811
    """An FTJ whose validation loss rises for `patience` epochs: the operator requests the stop, the (stand-in)
    trainer obeys, and Prometheus sees the reconcile and early-stop counters move."""
    inst = f'job="operator",instance="127.0.0.1:{operator.metrics_port}"'
    prometheus.set_targets("operator", [f"127.0.0.1:{operator.metrics_port}"])
    prometheus.wait_for(f"up{{{inst}}} == 1", timeout=30)
    # Prometheus has scraped this operator: nothing stopped yet (the counter has no series until its first
    # increment); the phase gauges exist from the start (baselines, so a real cluster's other jobs do not matter).
    assert prometheus.query(f"finetune_operator_early_stops_total{{{inst}}}") == []
    succeeded_before = value(prometheus, f'finetune_operator_jobs{{{inst},phase="Succeeded"}}')
    before = prometheus.query(f"sum(finetune_operator_reconciles_total{{{inst}}})")
    reconciles_before = float(before[0]["value"][1]) if before else 0.0

    c = kube_client(kube.kubeconfig)
    try:
        create(c, namespace, ftj("overfit", env=fake_trainer_env("obey", "0.5,0.4,0.45,0.47,0.5,0.6,0.7,0.8", 0.5),
                                 hyperparameters={"epochs": 8, "batchSize": 8}, earlyStopping={"patience": 2}))
        st = wait_for(lambda: (s := status(c, namespace, "overfit")).get("phase") == "Succeeded" and s, timeout=90,
                      what="phase Succeeded")
    finally:
        c.close()
    assert st["reason"] == "EarlyStopped"
    reason = condition(st, "EarlyStopRequested")["reason"]
    assert reason == "PatienceExhausted"

    # The early-stop counter went from absent to 1, labelled with the condition's reason.
    prometheus.wait_for(f'finetune_operator_early_stops_total{{{inst},reason="{reason}"}} == 1', timeout=30)
    assert raw_samples(prometheus, f'finetune_operator_early_stops_total{{{inst},reason="{reason}"}}')[0] == 1
    assert f'finetune_operator_early_stops_total{{reason="{reason}"}} 1.0' in operator.metrics()
    # Reconciles: more than before, with status-changing passes among them (create, running, stop, done),
    # and the duration histogram counted them.
    prometheus.wait_for(f'finetune_operator_jobs{{{inst},phase="Succeeded"}} == {succeeded_before + 1}', timeout=30)
    reconciles = value(prometheus, f"sum(finetune_operator_reconciles_total{{{inst}}})")
    assert reconciles > reconciles_before
    assert value(prometheus, f'finetune_operator_reconciles_total{{{inst},result="changed"}}') >= 3
    assert prometheus.query(f'finetune_operator_reconciles_total{{{inst},result="error"}} > 0') == []
    assert value(prometheus, f"finetune_operator_reconcile_duration_seconds_count{{{inst}}}") >= 3
