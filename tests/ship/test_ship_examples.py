"""Every shipped example is a FineTuneJob a user can apply as it is."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from finetune_operator.api import validate_manifest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
EXPECTED = {
    "classification.yaml", "lora-causal-lm.yaml", "deepspeed-2x4.yaml",
    "early-stopping.yaml", "kueue-suspended.yaml", "embedding.yaml",
}


def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one FineTuneJob per file"
    return docs[0]


def test_all_expected_examples_exist():
    assert {p.name for p in EXAMPLES} >= EXPECTED


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path):
    job = validate_manifest(_load(path))
    assert job.name == _load(path)["metadata"]["name"]


def test_classification_is_the_small_offline_demo():
    job = validate_manifest(_load(ROOT / "examples" / "classification.yaml")).spec
    assert job.model.name.startswith("package:") and job.dataset.source.startswith("package:")
    assert job.dataset.format == "text-folders"
    assert job.dataset.max_length <= 64 and job.dataset.max_train_samples <= 512
    assert job.hyperparameters.epochs <= 2
    assert (job.distributed.nodes, job.distributed.processes_per_node) == (1, 1)
    assert not job.resources.gpu


def test_deepspeed_example_is_two_nodes_of_four_gpus_zero2():
    spec = validate_manifest(_load(ROOT / "examples" / "deepspeed-2x4.yaml")).spec
    d = spec.distributed
    assert (d.nodes, d.processes_per_node, d.strategy, d.zero_stage) == (2, 4, "deepspeed", 2)
    assert spec.resources.gpu


def test_lora_example_enables_lora_on_gpu():
    spec = validate_manifest(_load(ROOT / "examples" / "lora-causal-lm.yaml")).spec
    assert spec.task == "causal-lm" and spec.lora.enabled and spec.lora.rank > 0 and spec.resources.gpu


def test_early_stopping_example_sets_patience_and_min_delta():
    raw = _load(ROOT / "examples" / "early-stopping.yaml")["spec"]["earlyStopping"]
    assert raw["enabled"] and raw["metric"] == "val_accuracy" and raw["patience"] >= 1 and raw["minDelta"] > 0


def test_kueue_example_is_suspended_with_a_queue():
    raw = _load(ROOT / "examples" / "kueue-suspended.yaml")
    assert raw["spec"]["suspend"] is True
    assert raw["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]


def test_embedding_example_uses_triplet_semi_hard():
    loss = validate_manifest(_load(ROOT / "examples" / "embedding.yaml")).spec.hyperparameters.loss
    assert (loss.name, loss.miner) == ("triplet", "semi-hard")


def test_embedded_demo_is_identical_to_the_example():
    embedded = resources.files("finetune_operator") / "examples_embedded" / "classification.yaml"
    assert embedded.read_text() == (ROOT / "examples" / "classification.yaml").read_text()
