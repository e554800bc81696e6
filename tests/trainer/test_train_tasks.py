"""End-to-end runs of every task path on tiny models (one process, in-process): causal LM with perplexity,
LoRA through peft for all three tasks, triplet loss with each miner, and mixup for classification."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import load_weights, make_manifest
from local_train import run
from safetensors.torch import load_file

PLAIN = {"dropout": 0.0, "scheduler": {"name": "constant", "warmupSteps": 0}, "epochs": 1}


@pytest.fixture(scope="module")
def causal_lm_run(tiny_gpt2_dir, tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("causal"))
    m = make_manifest(tiny_gpt2_dir, tiny_data, task="causal-lm", hyperparameters={**PLAIN, "epochs": 2, "learningRate": 1e-2})
    return run(m, output_dir=out, progress=False), out


def test_causal_lm_trains_and_reports_validation_perplexity(causal_lm_run, tiny_gpt2_dir):
    from transformers import AutoConfig

    result, out = causal_lm_run
    vocab = AutoConfig.from_pretrained(tiny_gpt2_dir).vocab_size
    first, last = result["history"]
    assert result["outcome"] == "completed" and result["mainMetric"] == "val_perplexity"
    # Perplexity is exp(token-weighted validation loss): an untrained model sits near the vocabulary size.
    for point in (first, last):
        assert point["val_perplexity"] == pytest.approx(math.exp(point["valLoss"]), rel=0.05)
        assert point["valMetric"] == point["val_perplexity"]
    # The tiny texts are random draws of words, so the model can only learn word frequencies (and topics):
    # the floor is ~34 of 43; it gets there within the first epoch.
    assert last["val_perplexity"] <= first["val_perplexity"] * 1.001 and last["val_perplexity"] < 0.85 * vocab
    assert os.path.exists(os.path.join(out, "best", "model.safetensors"))


def test_causal_lm_best_model_loads_back_with_transformers(causal_lm_run, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, out = causal_lm_run
    best = os.path.join(out, "best")
    model = AutoModelForCausalLM.from_pretrained(best).eval()
    tokenizer = AutoTokenizer.from_pretrained(best)
    ids = tokenizer("the team and the goal of the match", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
        untrained = float(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)(input_ids=ids, labels=ids).loss)
    assert loss < untrained  # the saved weights are the trained ones


# --- LoRA through peft -----------------------------------------------------------------------------------

LORA_TASKS = {
    # task: (model fixture, transformers class for best/)
    "sequence-classification": ("tiny_model_dir", "AutoModelForSequenceClassification"),
    "causal-lm": ("tiny_gpt2_dir", "AutoModelForCausalLM"),
    "embedding": ("tiny_model_dir", "AutoModel"),
}


def _outputs(model, ids, mask, task):
    out = model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state if task == "embedding" else out.logits


@pytest.mark.parametrize("task", list(LORA_TASKS))
def test_lora_trains_adapters_only_and_best_loads_back(task, request, tiny_data, tmp_path):
    import transformers
    from peft import PeftModel

    fixture, cls_name = LORA_TASKS[task]
    model_dir = request.getfixturevalue(fixture)
    out = str(tmp_path / task)
    m = make_manifest(model_dir, tiny_data, task=task, hyperparameters={**PLAIN, "learningRate": 1e-2},
                      lora={"enabled": True, "rank": 4, "alpha": 8.0, "dropout": 0.0})
    result = run(m, output_dir=out, progress=False)
    assert result["outcome"] == "completed" and math.isfinite(result["history"][0]["trainLoss"])
    best = os.path.join(out, "best")

    # The adapter: trained (lora_B starts at zero) and nothing but adapters (+ the new head for classification).
    adapter = load_file(os.path.join(best, "adapter", "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert all("lora_" in k or (task == "sequence-classification" and "classifier" in k) for k in adapter)

    # Base weights frozen: every base weight the adapters do not touch is bit-identical to the original.
    original = load_file(os.path.join(model_dir, "model.safetensors"))
    merged = {k.removeprefix("bert."): v for k, v in load_weights(out).items()}  # the tiny BERT was saved headless
    targeted = {k.split(".lora_A")[0].removeprefix("base_model.model.").removeprefix("bert.") for k in adapter if "lora_A" in k}
    assert targeted
    untouched = [k for k in original if k in merged and k.rsplit(".", 1)[0] not in targeted]
    assert untouched and all(torch.equal(original[k], merged[k]) for k in untouched)
    changed = [k for k in merged if k.rsplit(".", 1)[0] in targeted and k.endswith(".weight")]
    assert changed and all(not torch.equal(original[k], merged[k]) for k in changed)

    # best/ is directly usable with transformers, and equals base + adapter loaded through peft.
    cls = getattr(transformers, cls_name)
    direct = cls.from_pretrained(best).eval()
    base = cls.from_pretrained(model_dir, **({"num_labels": direct.config.num_labels} if task == "sequence-classification" else {}))
    with_adapter = PeftModel.from_pretrained(base, os.path.join(best, "adapter")).eval()
    ids = torch.tensor([[2, 5, 25, 8, 30, 3], [2, 40, 41, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        assert torch.allclose(_outputs(direct, ids, mask, task), _outputs(with_adapter, ids, mask, task), atol=1e-5)


# --- embedding with the triplet loss ---------------------------------------------------------------------


@pytest.mark.parametrize("miner", ["all", "hard", "semi-hard"])
def test_triplet_loss_trains_an_embedding_with_each_miner(miner, tiny_model_dir, tiny_data, tmp_path, triplet_losses):
    m = make_manifest(tiny_model_dir, tiny_data, task="embedding",
                      hyperparameters={**PLAIN, "learningRate": 3e-3, "loss": {"name": "triplet", "miner": miner, "margin": 0.3}})
    result = run(m, output_dir=str(tmp_path), progress=False)
    point = result["history"][0]
    assert result["outcome"] == "completed" and result["mainMetric"] == "val_recall_at_1"
    assert math.isfinite(point["trainLoss"]) and point["trainLoss"] > 0 and 0.0 <= point["val_recall_at_1"] <= 1.0
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_weights(str(tmp_path))
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    triplet_losses[miner] = point["trainLoss"]
    if len(triplet_losses) == 3:
        # The miner reaches the loss: each picks different triplets, so the same run gives different losses.
        assert len({round(v, 6) for v in triplet_losses.values()}) == 3, triplet_losses


@pytest.fixture(scope="module")
def triplet_losses() -> dict[str, float]:
    return {}


# --- mixup for sequence-classification -------------------------------------------------------------------


def test_mixup_changes_classification_training_end_to_end(manifest, tmp_path):
    hp = {**PLAIN, "seed": 3}
    plain = run(manifest(hyperparameters=hp), output_dir=str(tmp_path / "plain"), progress=False)
    mixed = run(manifest(hyperparameters={**hp, "mixupAlpha": 0.4}), output_dir=str(tmp_path / "mixup"), progress=False)
    again = run(manifest(hyperparameters={**hp, "mixupAlpha": 0.4}), output_dir=str(tmp_path / "again"), progress=False)
    p, x = plain["history"][0], mixed["history"][0]
    assert mixed["outcome"] == "completed" and math.isfinite(x["trainLoss"]) and 0.0 <= x["val_accuracy"] <= 1.0
    # Without dropout, one seed gives bit-identical runs, so any difference is mixup's. (The tiny model's
    # predictions stay near uniform after one epoch, where every target gives about ln 3: the losses differ
    # only slightly.)
    assert x["trainLoss"] != p["trainLoss"]
    assert not torch.equal(load_weights(str(tmp_path / "plain"))["classifier.weight"], load_weights(str(tmp_path / "mixup"))["classifier.weight"])
    # Mixing draws from the job's seed: the same seed mixes the same pairs with the same weights.
    assert again["history"][0]["trainLoss"] == x["trainLoss"]
