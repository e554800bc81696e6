"""Two real processes on CPU (torchrun + gloo), tiny model: synchronised gradients, DeepSpeed ZeRO-2,
resume after losing the processes, and an external stop that halts both ranks at the same step."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import load_weights
from local_train import run

pytestmark = pytest.mark.slow
HP = {"dropout": 0.0, "epochs": 2, "batchSize": 4}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_data, tmp_path_factory):
    from conftest import make_manifest

    out = str(tmp_path_factory.mktemp("ddp-ref"))
    m = make_manifest(tiny_model_dir, tiny_data, hyperparameters=HP)
    return m, out, run(m, output_dir=out, processes=2, progress=False)


def test_two_ranks_see_identical_gradients_and_weights(reference):
    _, _, result = reference
    assert result["worldSize"] == 2 and result["outcome"] == "completed"
    first, second = result["rankFirstGradNorms"]
    assert first > 0 and first == pytest.approx(second, rel=1e-6)  # all-reduced before the first step
    assert result["rankParamChecksums"][0] == result["rankParamChecksums"][1]
    assert result["rankSteps"] == [result["globalStep"]] * 2


def test_killed_after_epoch_one_resumes_at_epoch_two_with_the_same_state(reference, tmp_path):
    m, ref_dir, ref = reference
    out = str(tmp_path / "crash")
    with pytest.raises(RuntimeError, match="exited"):
        run(m, output_dir=out, processes=2, progress=False, env={"FINETUNE_FAULT_EXIT_AFTER_EPOCH": "1"})
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["epoch-1"]
    resumed = run(m, output_dir=out, processes=2, progress=False)
    assert resumed["resumedFrom"].endswith("epoch-1") and [h["epoch"] for h in resumed["history"]] == [1, 2]
    a, b = load_weights(ref_dir), load_weights(out)
    # Same weights as the uninterrupted run: optimizer moments, scheduler and data order were all restored.
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_external_stop_halts_both_ranks_at_the_same_step(reference, tmp_path):
    m, _, _ = reference
    stop = tmp_path / "STOP"
    stop.write_text("")
    result = run(m, output_dir=str(tmp_path / "stop"), processes=2, progress=False,
                 env={"FINETUNE_STOP_FILE": str(stop), "FINETUNE_STOP_POLL_SECONDS": "0.05"})
    assert result["outcome"] == "stopped"
    assert result["rankSteps"][0] == result["rankSteps"][1] < result["totalSteps"]
    assert os.path.exists(tmp_path / "stop" / "best" / "model.safetensors")


@pytest.fixture(scope="module")
def torch_extensions_dir() -> str:
    """The shm comm op DeepSpeed compiles on its first run (~46 s) is cached here: the directory
    scripts/test.sh exports (and the trainer defaults to), so tests never compile it again."""
    path = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    os.environ["TORCH_EXTENSIONS_DIR"] = path  # torchrun workers inherit it
    return path


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_stage_trains_on_two_cpu_processes_with_an_agreed_batch(stage, manifest, tmp_path, torch_extensions_dir):
    """ZeRO 1-3 through deepspeed.initialize on gloo; batchSize unset, and the probe runs on the DeepSpeed engine with
    a real optimizer step. Fault injection: rank 0 has memory for 16 examples, rank 1 for 8, and the optimizer state
    takes 4 once a step has run, so forward and backward of 8 fit on rank 1 but its optimizer step does not: a probe
    without the step (the bare model) would find 8; with it, 4 (12 on rank 0 alone). Both ranks must train with the
    minimum (less the headroom), or the collectives would hang."""
    m = manifest(hyperparameters={**HP, "epochs": 1}, distributed={"strategy": "deepspeed", "zeroStage": stage})
    m["spec"]["hyperparameters"].pop("batchSize")
    result = run(m, output_dir=str(tmp_path / "probed"), processes=2, progress=False,
                 env={"FINETUNE_FAULT_OOM_ABOVE": "16,8", "FINETUNE_FAULT_OPTIMIZER_MEMORY": "4"})
    assert result["strategy"] == "deepspeed" and result["worldSize"] == 2 and result["outcome"] == "completed"
    assert result["zeroStage"] == stage
    plan = result["batchPlan"]
    # The ranks probe in lockstep (every phase of the step agreed), so each rank's fit is the agreed one: 4, the
    # limit only rank 1's optimizer step exceeds; then the default 10% headroom (at least one fewer): 3.
    assert plan["automatic"] and plan["source"] == "searched" and plan["localFit"] == plan["largestFit"] == 4
    assert result["batchSize"] == 3 and 5 in plan["tried"] and 8 in plan["tried"]
    assert result["globalStep"] == result["totalSteps"] == math.ceil(72 / 2 / 3)
    assert result["rankSteps"] == [result["globalStep"]] * 2
    # Parameters identical across ranks (under ZeRO-3 each rank gathers the shards before summing).
    assert result["rankParamChecksums"][0] == result["rankParamChecksums"][1] != 0.0
    assert math.isfinite(result["history"][0]["trainLoss"])
    assert os.path.isdir(tmp_path / "probed" / "checkpoints" / "epoch-1" / "deepspeed")
    # best/ is the whole model even when ZeRO-3 partitioned it: every weight is there, with its full shape.
    from safetensors.torch import load_file

    original = load_file(os.path.join(m["spec"]["model"]["name"], "model.safetensors"))
    best = {k.removeprefix("bert."): v for k, v in load_weights(str(tmp_path / "probed")).items()}
    assert all(best[k].shape == v.shape for k, v in original.items() if k in best) and "encoder.layer.1.output.dense.weight" in best
    if stage == 3:
        # The probe left no trace: the same batch requested without the knob (no probe at all) trains the same
        # weights, although the probes ran optimizer steps and three of them failed between backward and step.
        m["spec"]["hyperparameters"]["batchSize"] = 3
        plain = run(m, output_dir=str(tmp_path / "plain"), processes=2, progress=False)
        assert plain["batchPlan"]["probes"] == 0 and plain["globalStep"] == result["globalStep"]
        assert plain["history"][0]["trainLoss"] == result["history"][0]["trainLoss"]
        a, b = load_weights(str(tmp_path / "plain")), load_weights(str(tmp_path / "probed"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.exists(os.path.join(torch_extensions_dir, "deepspeed_shm_comm", "deepspeed_shm_comm.so"))


def test_fsdp_shards_the_model_resumes_and_trains_like_ddp(reference, tmp_path):
    """strategy fsdp: accelerate's FSDP plugin (FSDP2), switched on for CPU since accelerate itself would run DDP
    there. Each rank holds about half of every parameter, a run killed after epoch 1 resumes from its sharded
    checkpoint, and with the same data, seed and averaged gradients the model is DDP's model."""
    import copy

    m, ref_dir, ref = reference
    m = copy.deepcopy(m)
    m["spec"]["distributed"] = {"strategy": "fsdp"}
    out = str(tmp_path / "fsdp")
    # Killed after epoch 1, then resumed from the FSDP checkpoint (accelerate's sharded save_state/load_state).
    with pytest.raises(RuntimeError, match="exited"):
        run(m, output_dir=out, processes=2, progress=False, env={"FINETUNE_FAULT_EXIT_AFTER_EPOCH": "1"})
    result = run(m, output_dir=out, processes=2, progress=False)
    assert result["resumedFrom"].endswith("epoch-1") and [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["strategy"] == "fsdp" and result["worldSize"] == 2 and result["outcome"] == "completed"
    assert ref["rankSharding"] is None  # DDP: every rank holds the whole model
    total = result["rankSharding"][0]["total"]
    assert all(0.4 * total < r["local"] < 0.6 * total for r in result["rankSharding"])
    assert sum(r["local"] for r in result["rankSharding"]) >= total
    assert result["rankParamChecksums"][0] == result["rankParamChecksums"][1]
    first, second = result["rankFirstGradNorms"]  # the resumed run's first step: the norm of the whole gradient
    assert first > 0 and first == pytest.approx(second, rel=1e-6)
    a, b = load_weights(ref_dir), load_weights(out)  # best/ written from the gathered full state dict
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a), max(
        float((a[k] - b[k]).abs().max()) for k in a)
