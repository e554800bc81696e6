"""Issue 5's closed loop with the real trainer, decided where the metric is computed (issue 11).

After each evaluation the trainer applies the shared early-stopping policy (finetune_contract) to its own
history; when patience is exhausted it stops at that epoch boundary (no partial epoch after it), reports
the decision (`trainerStop*`) with that epoch's results in one status patch, and exits 0. The operator
records the one decision (`EarlyStopRequested`, `stopRequestedTime`, `stopDecidedBy: trainer`) and finishes
the job `Succeeded/EarlyStopped`; the trainer's result says `early_stopped` with the policy's reason.
The output lives on a PVC (the pod runner keeps it in a local directory), so the test can check that the
final model (`best/`) is the best epoch's: byte-identical weights to that epoch's checkpoint, and the
validation loss recomputed from it equals the one reported for that epoch.

The model is a 2-layer, 32-wide BERT built here (no downloads); the data is a bag of topic words with
30% of the training labels flipped and only 160 training rows, so with a constant learning rate the
model first learns the topics (validation loss falls for a few epochs) and then memorises the noise
(training loss keeps falling, validation loss climbs). Epochs take a fraction of a second, so the job
asks for far more epochs than it can run before the operator stops it.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
from trainer.tiny_models import COMMON, SPECIAL, TOPICS

from .operator_helpers import condition, create, events_with, kube_client, status

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              # The model and data are in this machine's temp dir and the output is read from the runner's PVC dir.
              pytest.mark.local_pods("reads the tiny model, data and PVC output from local directories")]

CONFIGURED_EPOCHS = 200
PATIENCE = 2
CLAIM = "tiny-output"
VAL_BATCH = 32  # the trainer's validation batch: max(batch size, 32); 96 rows = 3 equal batches


def _rows(n: int, seed: int, *, signal: float, label_noise: float) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % len(TOPICS)]
        words = [rng.choice(TOPICS[label]) if rng.random() < signal else rng.choice(COMMON) for _ in range(rng.randint(6, 14))]
        if rng.random() < label_noise:
            label = rng.choice(list(TOPICS))
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def overfit_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny BERT + word-level tokenizer and the train/validation jsonl files, in a temp dir."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("overfit")
    vocab = SPECIAL + COMMON + [w for ws in TOPICS.values() for w in ws]
    # `BertTokenizer(vocab=dict)`: transformers 5 ignores `vocab_file=` on the fast tokenizer and leaves a
    # 5-token vocabulary, which turns every word into [UNK] (nothing could be learned).
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert "[UNK]" not in tokenizer.tokenize("goal bank chip")
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model_dir = root / "model"
    BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    files = {}
    for name, rows in (("train", _rows(160, 1, signal=0.5, label_noise=0.3)), ("val", _rows(96, 2, signal=0.5, label_noise=0.0))):
        files[name] = str(root / f"{name}.jsonl")
        Path(files[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model_dir), **files}


def _manifest(name: str, inputs: dict[str, str]) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "model": {"name": inputs["model"]},
            "dataset": {"source": inputs["train"], "validationSource": inputs["val"], "maxLength": 32},
            "preset": "fast",
            "hyperparameters": {"epochs": CONFIGURED_EPOCHS, "batchSize": 8, "learningRate": 1e-3, "mixedPrecision": "no",
                                # No warm-up, no decay: nothing delays the learning or hides the overfitting.
                                "scheduler": {"name": "constant", "warmupRatio": 0.0}},
            # The grace period is long: the trainer must stop by itself, the operator must not enforce.
            "earlyStopping": {"metric": "val_loss", "patience": PATIENCE, "stopGracePeriodSeconds": 300},
            # Every epoch checkpoint is kept, so best/ can be compared with the best epoch's.
            "output": {"pvc": CLAIM, "keepCheckpoints": 100},
            "env": {
                "FINETUNE_STOP_POLL_SECONDS": "0.2",  # default 5 s: a tiny epoch is far shorter
                # One thread: a 32-wide model gains nothing from two, and spinning OpenMP threads on a
                # shared 2-core machine made each epoch several times slower.
                "OMP_NUM_THREADS": "1",
            },
        },
    }


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _validation_loss(model_dir: Path, val_file: str) -> float:
    """The trainer's validation loss (mean of per-batch cross-entropy means), recomputed from a saved model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for line in Path(val_file).read_text().splitlines()]
    label_ids = {v: int(k) for k, v in model.config.id2label.items()}
    losses = []
    with torch.no_grad():
        for start in range(0, len(rows), VAL_BATCH):
            batch = rows[start:start + VAL_BATCH]
            enc = tokenizer([r["text"] for r in batch], padding=True, truncation=True, max_length=32, return_tensors="pt")
            labels = torch.tensor([label_ids[r["label"]] for r in batch])
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            losses.append(float(torch.nn.functional.cross_entropy(logits.float(), labels)))
    return sum(losses) / len(losses)


def test_overfitting_job_is_stopped_by_the_operator_and_keeps_the_best_model(
    kube, operator, pod_runner, namespace, wait_for, overfit_inputs,
):
    c = kube_client(kube.kubeconfig)
    name = "overfit-tiny"
    create(c, namespace, _manifest(name, overfit_inputs))
    st = wait_for(lambda: (s := status(c, namespace, name)).get("phase") in ("Succeeded", "Failed") and s,
                  timeout=240, what="a finished job", interval=0.5)

    # One decision, taken by the trainer after its evaluation, recorded by the operator; how the job ended.
    assert (st["phase"], st["reason"]) == ("Succeeded", "EarlyStopped"), st.get("message")
    assert not st.get("stopEnforced"), "the trainer should have stopped by itself"
    requested = condition(st, "EarlyStopRequested")
    assert requested["status"] == "True" and requested["reason"] == "PatienceExhausted", requested
    assert "val_loss" in requested["message"] and "decided by the trainer" in requested["message"]
    assert st["stopDecidedBy"] == "trainer" and st["stopRequestedTime"] == st["trainerStopTime"]
    assert st["stopReason"] == st["trainerStopMessage"] and st["trainerStopReason"] == "PatienceExhausted"
    decided_at = int(re.search(r"\(at epoch (\d+)\)", requested["message"]).group(1))
    assert decided_at == st["trainerStopEpoch"]
    events_with(c, namespace, name, wait_for, "PatienceExhausted")

    # What the trainer reported: it learned, then overfitted, and ran fewer epochs than configured.
    history = st["history"]
    epochs_run, best_epoch = st["epoch"], st["bestEpoch"]
    assert [h["epoch"] for h in history] == list(range(1, epochs_run + 1))
    val = {h["epoch"]: h["valLoss"] for h in history}
    train = {h["epoch"]: h["trainLoss"] for h in history}
    assert best_epoch == min(val, key=val.get) and st["bestMetric"] == pytest.approx(val[best_epoch])
    assert best_epoch > 1 and val[best_epoch] < val[1], "validation loss should fall before it rises"
    # The policy's epoch: exactly `patience` epochs without improvement after the best, and not one epoch more.
    assert decided_at == best_epoch + PATIENCE == epochs_run and epochs_run < CONFIGURED_EPOCHS
    assert min(train[e] for e in range(best_epoch + 1, epochs_run + 1)) < train[best_epoch], "training loss keeps falling"
    assert st["epochsSaved"] == CONFIGURED_EPOCHS - epochs_run

    # The trainer stopped at the policy's epoch boundary by its own decision, with no partial epoch after it.
    out = pod_runner.workdir / "pvc" / namespace / CLAIM
    result = json.loads((out / "result.json").read_text())
    assert result["outcome"] == "early_stopped" and result["stopReason"] == st["trainerStopMessage"], result["stopReason"]
    assert (result["epochsRun"], result["bestEpoch"]) == (epochs_run, best_epoch)
    steps_per_epoch = result["totalSteps"] // CONFIGURED_EPOCHS
    assert result["globalStep"] == epochs_run * steps_per_epoch  # not one step of epoch epochs_run + 1
    assert not [n for n in os.listdir(out / "checkpoints") if "-batch-" in n]  # no mid-epoch checkpoint either
    pods = [p for p in pod_runner.pods.values() if p.job == f"{name}-train"]
    assert [(p.phase, p.exit_code) for p in pods] == [("Succeeded", 0)]

    # The final model is the best epoch's: the same weights as that epoch's checkpoint, not the last one's,
    # and its validation loss recomputed from best/ is the one reported for the best epoch.
    best = _weights(out / "best")
    at_best = _weights(out / "checkpoints" / f"epoch-{best_epoch}")
    last = _weights(out / "checkpoints" / f"epoch-{epochs_run}")
    assert best.keys() == at_best.keys()
    assert all(best[k].equal(at_best[k]) for k in best)
    assert not all(best[k].equal(last[k]) for k in best)
    assert _validation_loss(out / "best", overfit_inputs["val"]) == pytest.approx(val[best_epoch], rel=1e-4)
    print(json.dumps({"epochsRun": epochs_run, "configured": CONFIGURED_EPOCHS, "bestEpoch": best_epoch,
                      "decidedAtEpoch": decided_at, "bestValLoss": val[best_epoch], "lastValLoss": val[epochs_run]}))
    c.close()
