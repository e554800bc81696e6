"""docs/metrics.md is generated from the prometheus-client definitions and must not drift; what the
two components expose passes `promtool check metrics` (Prometheus' own linter)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("metrics_docs", ROOT / "scripts" / "metrics_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["metrics_docs"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_metrics_doc_is_current():
    gen = _generator()
    assert gen.OUTPUT.exists(), "docs/metrics.md missing: run `python scripts/metrics_docs.py --write`"
    assert gen.OUTPUT.read_text() == gen.render(), (
        "docs/metrics.md drifted from the metrics modules: run `python scripts/metrics_docs.py --write`"
    )


def test_every_metric_is_documented_with_type_unit_and_help():
    gen = _generator()
    metrics = gen.collect()
    text = gen.OUTPUT.read_text()
    names = {m.family for m in metrics}
    # the families docs/contracts.md promises exist in code (plus any the code added)
    for promised in ("finetune_operator_reconciles", "finetune_operator_reconcile_duration_seconds", "finetune_operator_jobs",
                     "finetune_operator_early_stops", "finetune_operator_stalled_jobs", "finetune_trainer_epoch",
                     "finetune_trainer_step", "finetune_train_loss", "finetune_validation_loss", "finetune_validation_metric",
                     "finetune_learning_rate", "finetune_samples_per_second", "finetune_batch_size", "finetune_best_metric",
                     "finetune_trainer_early_stops"):
        assert promised in names
    for m in metrics:
        assert m.family.startswith("finetune_") and m.help and m.unit
        assert "job" not in m.labels, f"{m.family}: a `job` label becomes exported_job in Prometheus"
        for series in m.series:
            assert f"`{series}`" in text
    assert set(gen.UNITS) == names, "UNITS in scripts/metrics_docs.py lists a metric that no longer exists"


@pytest.mark.prometheus
def test_exposition_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not installed (Debian package prometheus; scripts/setup.sh installs it)"
    from prometheus_client import CollectorRegistry, generate_latest

    from finetune_operator import metrics as op
    from finetune_trainer.metrics import TrainerMetrics

    registry = CollectorRegistry()
    trainer = TrainerMetrics("lint", "default", registry=registry)
    trainer.val_metric("val_accuracy", 0.5)
    trainer.early_stops.inc()
    for name, text in (("operator", generate_latest(op.REGISTRY)), ("trainer", generate_latest(registry))):
        proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert proc.returncode == 0, f"{name}: {proc.stdout.decode()}{proc.stderr.decode()}"
