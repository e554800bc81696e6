"""Focused proofs that hyperparameters change training (tiny BERT, one process, in-process runs)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import load_weights
from local_train import run

# A deterministic baseline: no dropout, constant learning rate, so only the parameter under test differs.
PLAIN = {"dropout": 0.0, "scheduler": {"name": "constant", "warmupSteps": 0}, "epochs": 1}


def train(manifest, tmp_path, name: str, **hp) -> tuple[dict, str]:
    out = str(tmp_path / name)
    result = run(manifest(hyperparameters={**PLAIN, **hp}), output_dir=out, progress=False)
    return result, out


def _close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_gradient_accumulation_equals_the_large_batch(manifest, tmp_path):
    big, big_dir = train(manifest, tmp_path, "big", batchSize=8, gradientAccumulationSteps=1)
    acc, acc_dir = train(manifest, tmp_path, "acc", batchSize=4, gradientAccumulationSteps=2)
    small, small_dir = train(manifest, tmp_path, "small", batchSize=4, gradientAccumulationSteps=1)
    assert acc["globalStep"] == big["globalStep"] == small["globalStep"] // 2
    assert _close(load_weights(big_dir), load_weights(acc_dir))
    assert not _close(load_weights(big_dir), load_weights(small_dir))  # the comparison can fail


def _base_change(tiny_model_dir: str, out: str) -> float:
    from safetensors.torch import load_file

    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = {k.removeprefix("bert."): v for k, v in load_weights(out).items()}
    return float(torch.sqrt(sum(((after[k] - v) ** 2).sum() for k, v in before.items() if k in after)))


def test_max_grad_norm_bounds_each_update(manifest, tmp_path, tiny_model_dir):
    sgd = {"optimizer": {"name": "sgd", "momentum": 0.0}, "learningRate": 1.0, "weightDecay": 0.0, "headLearningRateMultiplier": 1.0}
    clipped, clipped_dir = train(manifest, tmp_path, "clipped", maxGradNorm=0.01, **sgd)
    free, free_dir = train(manifest, tmp_path, "free", maxGradNorm=0.0, **sgd)
    bound = clipped["globalStep"] * 1.0 * 0.01  # plain SGD: each step moves the weights by lr * ||g|| <= lr * clip
    assert _base_change(tiny_model_dir, clipped_dir) <= bound * 1.001
    assert _base_change(tiny_model_dir, free_dir) > 2 * bound


def test_dropout_override_reaches_the_model(manifest, tmp_path):
    off, off_dir = train(manifest, tmp_path, "off", dropout=0.0)
    high, high_dir = train(manifest, tmp_path, "high", dropout=0.5)
    with open(os.path.join(high_dir, "best", "config.json")) as f:
        config = json.load(f)
    assert config["hidden_dropout_prob"] == 0.5 and config["attention_probs_dropout_prob"] == 0.5
    assert off["history"][0]["trainLoss"] != pytest.approx(high["history"][0]["trainLoss"], rel=1e-6)


def test_bf16_on_a_cpu_without_native_bf16_trains_in_full_precision(tmp_path):
    from finetune_trainer import worker

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert not worker.cpu_has_native_bf16(str(cpuinfo))
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert worker.cpu_has_native_bf16(str(cpuinfo))
    assert worker.resolve_mixed_precision("bf16", on_gpu=False, native_bf16=False) == "no"
    assert worker.resolve_mixed_precision("bf16", on_gpu=False, native_bf16=True) == "bf16"
    assert worker.resolve_mixed_precision("bf16", on_gpu=True, native_bf16=False) == "bf16"


def test_mixed_precision_bf16_runs_and_fp16_falls_back_on_cpu(manifest, tmp_path, monkeypatch):
    from finetune_trainer import worker

    monkeypatch.setattr(worker, "cpu_has_native_bf16", lambda: True)  # bf16 autocast itself, on any CPU
    full, _ = train(manifest, tmp_path, "full", mixedPrecision="no")
    bf16, _ = train(manifest, tmp_path, "bf16", mixedPrecision="bf16")
    fp16, _ = train(manifest, tmp_path, "fp16", mixedPrecision="fp16")
    assert bf16["mixedPrecision"] == "bf16" and fp16["mixedPrecision"] == "no"
    # bf16 autocast changes the arithmetic (close, not equal); the fp16 fallback is exactly full precision.
    assert bf16["history"][0]["trainLoss"] == pytest.approx(full["history"][0]["trainLoss"], rel=0.05)
    assert bf16["history"][0]["trainLoss"] != full["history"][0]["trainLoss"]
    assert fp16["history"][0]["trainLoss"] == full["history"][0]["trainLoss"]


def test_seed_gives_identical_losses(manifest, tmp_path):
    a, _ = train(manifest, tmp_path, "a", seed=7, dropout=0.1)
    b, _ = train(manifest, tmp_path, "b", seed=7, dropout=0.1)
    c, _ = train(manifest, tmp_path, "c", seed=8, dropout=0.1)
    losses = [[(h["trainLoss"], h["valLoss"]) for h in r["history"]] for r in (a, b, c)]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_automatic_batch_size_on_cpu_is_the_documented_default_without_a_search(manifest, tmp_path, capsys):
    """Issue 11: on CPU nothing can run out of memory catchably, so no search runs and the log says so."""
    from finetune_trainer.batching import CPU_DEFAULT_BATCH

    m = manifest(hyperparameters={**PLAIN})
    m["spec"]["hyperparameters"].pop("batchSize")
    result = run(m, output_dir=str(tmp_path / "auto"), progress=False)
    plan = result["batchPlan"]
    assert plan["automatic"] and plan["source"] == "cpu-default" and plan["probes"] == 0 and plan["tried"] == []
    assert result["batchSize"] == CPU_DEFAULT_BATCH == 16 and result["globalStep"] == 5  # ceil(72 / 16)
    assert "no batch-size search on CPU" in capsys.readouterr().err  # the trainer's log goes to stderr


def test_automatic_batch_size_is_searched_on_the_prepared_model_with_the_knob(manifest, tmp_path, monkeypatch):
    """With a simulated memory limit the search runs after accelerator.prepare, counts the optimizer state and
    keeps the headroom: 20 examples of memory, 4 taken by AdamW's state -> 16 fit -> 10% headroom -> 14."""
    monkeypatch.setenv("FINETUNE_FAULT_OOM_ABOVE", "20")
    monkeypatch.setenv("FINETUNE_FAULT_OPTIMIZER_MEMORY", "4")
    m = manifest(hyperparameters={**PLAIN})
    m["spec"]["hyperparameters"].pop("batchSize")
    result = run(m, output_dir=str(tmp_path / "auto"), progress=False)
    plan = result["batchPlan"]
    assert plan["automatic"] and plan["source"] == "searched" and plan["probes"] == len(plan["tried"]) >= 2
    assert plan["largestFit"] == 16 and result["batchSize"] == 14 and result["globalStep"] == 6  # ceil(72 / 14)


def test_requested_batch_that_does_not_fit_keeps_the_effective_batch(manifest, tmp_path, capsys):
    """batchSize 16 where only 8 fits (fault injection raises torch's OutOfMemoryError above 8, as a GPU
    would): the trainer runs 8 x 2 accumulation, says so, and records it in result.json and the metrics."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"FINETUNE_FAULT_OOM_ABOVE": "8", "FINETUNE_METRICS_PORT": str(port)}
    # No headroom (default 10%, tested in test_batch_size.py): this test is about keeping the effective batch.
    result = run(manifest(hyperparameters={**PLAIN, "batchSize": 16}, batchSearch={"headroomFraction": 0.0}),
                 output_dir=str(tmp_path / "oom"), progress=False, env=env)
    plan = result["batchPlan"]
    assert (result["batchSize"], result["gradientAccumulationSteps"]) == (8, 2)
    assert plan["accumulationRaised"] and not plan["automatic"] and plan["localFit"] == 8 and 16 in plan["tried"]
    assert "batch size 16 does not fit (largest 8): training 8 x 2 accumulation steps to keep the effective batch of 16" in capsys.readouterr().err
    with open(tmp_path / "oom" / "result.json") as f:
        assert json.load(f)["gradientAccumulationSteps"] == 2
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'finetune_batch_size{finetune_job="tiny",namespace="default"} 8.0' in metrics
    assert 'finetune_gradient_accumulation_steps{finetune_job="tiny",namespace="default"} 2.0' in metrics
    # The same training as asking for 8 x 2 directly: the optimizer saw 16 examples per step.
    explicit, explicit_dir = train(manifest, tmp_path, "explicit", batchSize=8, gradientAccumulationSteps=2)
    assert result["globalStep"] == explicit["globalStep"] == 5  # 72 examples: 9 batches of 8, a step every 2
    assert _close(load_weights(str(tmp_path / "oom")), load_weights(explicit_dir))
