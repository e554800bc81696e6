"""The held-out test split end to end on the tiny model (issue 13): the best checkpoint is evaluated once on
examples it never trained on, and the figures go into result.json, the status patch, Prometheus and the CLI's
words; the stage timings come with them."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_manifest
from local_train import run, trainer_config

from finetune_trainer.config import TrainerConfig
from finetune_trainer.data import load_splits

STAGES = ("setupSeconds", "dataSeconds", "modelLoadSeconds", "firstStepSeconds")


@pytest.fixture(scope="module")
def tested_run(tiny_model_dir, tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tested"))
    manifest = make_manifest(tiny_model_dir, tiny_data, name="tested", hyperparameters={"epochs": 2},
                             dataset={"testFraction": 0.2})
    return manifest, run(manifest, output_dir=out, progress=False), out


def test_the_best_checkpoint_is_scored_on_the_test_split(tested_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    manifest, result, out = tested_run
    test = result["test"]
    assert test["examples"] == round(96 * 0.2) and test["epoch"] == result["bestEpoch"]
    assert set(test["metrics"]) == {"test_loss", "test_accuracy", "test_f1"}
    # The same figure from best/ read back with plain transformers, on the test rows as the trainer split them.
    spec = TrainerConfig.from_dict(trainer_config(manifest)).spec
    rows = load_splits(spec, cache_dir=os.path.join(out, "cache", "datasets")).test
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "best")).eval()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "best"))
    with torch.no_grad():
        logits = model(**tokenizer(list(rows["text"]), padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    names = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    accuracy = sum(a == b for a, b in zip(names, list(rows["label"]), strict=True)) / len(names)
    assert test["metrics"]["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_stage_timings_are_in_the_result(tested_run):
    _, result, _ = tested_run
    timings = result["timings"]
    assert all(isinstance(timings[k], float) and timings[k] >= 0 for k in STAGES), timings
    assert timings["firstStepTime"].endswith("Z") and timings["dataCached"] is False


def test_a_restarted_run_reads_the_tokenised_cache(tested_run):
    """The finished run again into the same output (a replaced pod): the data stage reads the cache instead of
    tokenising, and the test figure of the same best checkpoint is the same."""
    manifest, first, out = tested_run
    again = run(manifest, output_dir=out, progress=False)
    assert again["timings"]["dataCached"] is True
    assert again["test"]["metrics"]["test_accuracy"] == pytest.approx(first["test"]["metrics"]["test_accuracy"], abs=1e-6)


def test_stage_and_test_gauges_carry_the_contracts_names():
    from prometheus_client import generate_latest

    from finetune_contract.config import Metric
    from finetune_trainer.metrics import TrainerMetrics

    m = TrainerMetrics("bbc", "ml")
    m.stage("data", 1.5)
    m.test_metric("test_accuracy", 0.93)
    text = generate_latest(m.registry).decode()
    assert f'{Metric.STAGE_SECONDS}{{finetune_job="bbc",namespace="ml",stage="data"}} 1.5' in text
    assert f'{Metric.TEST_METRIC}{{finetune_job="bbc",metric="test_accuracy",namespace="ml"}} 0.93' in text
