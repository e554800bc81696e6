"""Automatic batch-size search: exact limit, fewer probes than accelerate's finder, rank agreement, accumulation."""

from __future__ import annotations

import pytest
import torch

from finetune_trainer.batch_size import (
    BatchSearch,
    accelerate_finder_probes,
    find_batch_size,
    is_out_of_memory,
    plan_accumulation,
)


@pytest.fixture(autouse=True)
def releases(monkeypatch) -> list[int]:
    """Counts our between-probe memory releases. The real one runs gc.collect (~0.1 s with torch and
    transformers loaded on a busy machine), which only slows these simulated probes down."""
    calls: list[int] = []
    monkeypatch.setattr("finetune_trainer.batch_size.release_memory", lambda *objects: calls.append(1) or [])
    return calls


@pytest.fixture
def fast_accelerate(monkeypatch) -> None:
    """accelerate's finder also gc-collects before and after every failure; skip that, keep its logic."""
    monkeypatch.setattr("accelerate.utils.memory.clear_device_cache", lambda garbage_collection=False: None)


def simulated(limit: int, seen: list[int] | None = None):
    """A probe that fits up to `limit` examples and raises torch's real OOM error type and text above it."""

    def probe(batch: int) -> None:
        if seen is not None:
            seen.append(batch)
        if batch > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch * 2} MiB.")

    return probe


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 24, 100, 250, 1000, 4095])
def test_finds_the_exact_largest_fitting_batch(limit):
    seen: list[int] = []
    result = find_batch_size(simulated(limit, seen), limit=4096)
    assert result.batch_size == limit
    assert result.tried == seen
    assert result.probes == len(seen)
    assert result.ooms == sum(b > limit for b in seen)
    assert result.probes <= 2 * 12 + 1  # doubling then bisection: O(log limit)


def test_limit_caps_the_search_without_ooms():
    result = find_batch_size(simulated(10_000), limit=48)
    assert result.batch_size == 48
    assert result.ooms == 0
    assert result.tried == [1, 2, 4, 8, 16, 32, 48]


@pytest.mark.parametrize(("limit", "start"), [(7, 128), (24, 128), (7, 512), (100, 512)])
def test_fewer_probes_than_accelerates_finder_and_exact(limit, start, fast_accelerate):
    ours = find_batch_size(simulated(limit))
    theirs = accelerate_finder_probes(limit, start)
    assert ours.probes < theirs.probes
    assert ours.batch_size == limit
    assert theirs.batch_size <= limit  # accelerate stops at the first fit below the limit, often short of it


def test_accelerate_finder_shrinks_by_ten_percent():
    """The comparison runs accelerate's real finder: 512 -> 100 takes 17 tries and lands on 91 (FACTS.md)."""
    theirs = accelerate_finder_probes(100, 512)
    assert theirs.tried[:3] == [512, 460, 414]
    assert (theirs.batch_size, theirs.probes) == (91, 17)


def test_memory_is_released_after_every_probe(releases):
    result = find_batch_size(simulated(24))
    assert len(releases) == result.probes


def test_agree_is_applied_after_the_search():
    calls: list[int] = []

    def agree(local: int) -> int:
        calls.append(local)
        return min(local, 5)  # another rank found only 5

    result = find_batch_size(simulated(24), agree=agree)
    assert calls == [24]
    assert result.batch_size == 5


def test_oom_at_batch_one_raises_and_still_joins_the_agreement():
    calls: list[int] = []
    with pytest.raises(RuntimeError, match="batch size 1"):
        find_batch_size(simulated(0), agree=lambda b: calls.append(b) or b)
    assert calls == [0]


def test_other_errors_propagate():
    def probe(batch: int) -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        find_batch_size(probe)


def test_recognises_torchs_cpu_allocator_error():
    """A real failed CPU allocation (far beyond this machine) is recognised as out-of-memory."""
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as error:
        assert is_out_of_memory(error)
    else:  # pragma: no cover - a 4 EiB allocation cannot succeed
        pytest.fail("allocation unexpectedly succeeded")
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_torchs_oom_type_counts_whatever_its_text():
    """accelerate matches message texts only; torch's OutOfMemoryError type is recognised even without them."""
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA error: out of memory"))
    # a hand-written RuntimeError without torch's wording is not an OOM (accelerate re-raises it too)
    assert not is_out_of_memory(RuntimeError("CUDA out of memory"))


def test_real_allocation_probe_finds_the_cap():
    """A probe that really allocates and fails above a soft cap through torch's allocator."""
    cap = 37 * 1024  # bytes

    def probe(batch: int) -> None:
        need = batch * 1024
        # beyond the cap, ask for an impossible allocation so the allocator itself raises
        torch.empty(need if need <= cap else 2**62, dtype=torch.uint8)

    assert find_batch_size(probe).batch_size == 37


@pytest.mark.parametrize(
    ("requested", "fitted", "accumulation", "expected"),
    [
        (16, 32, 1, (16, 1, False)),  # fits: unchanged
        (16, 16, 2, (16, 2, False)),
        (32, 8, 1, (8, 4, True)),
        (12, 8, 2, (8, 3, True)),  # 24 = 8 x 3: a divisor of the effective batch, not only of 12
        (10, 4, 1, (2, 5, True)),  # 10 has no divisor 3 or 4
        (7, 3, 1, (1, 7, True)),  # prime: one example at a time
    ],
)
def test_plan_accumulation_keeps_the_effective_batch(requested, fitted, accumulation, expected):
    per_device, accum, changed = plan_accumulation(requested, fitted, accumulation)
    assert (per_device, accum, changed) == expected
    assert per_device * accum == requested * accumulation
    assert per_device <= max(fitted, requested if not changed else 0)


def test_batch_search_is_a_plain_record():
    assert BatchSearch(4, 3, 1, [1, 2, 4]).tried == [1, 2, 4]


# --- plan_batch: the decision the trainer takes before training (fake probes, no model) ---------------------


class HP:
    """The two hyperparameters plan_batch reads."""

    def __init__(self, batch_size: int | None, gradient_accumulation_steps: int | None = None):
        self.batch_size = batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps


def test_plan_batch_keeps_the_effective_batch_when_the_request_does_not_fit(caplog, monkeypatch):
    import logging

    from finetune_trainer.batching import plan_batch

    monkeypatch.setattr(logging.getLogger("finetune_trainer"), "propagate", True)
    seen: list[int] = []
    with caplog.at_level("WARNING", logger="finetune_trainer"):
        plan = plan_batch(HP(16, 2), probe=simulated(6, seen), examples_per_rank=1000, on_gpu=True, job="j1")
    # 6 fits but does not divide 32; 4 does: 4 x 8 keeps 16 x 2.
    assert (plan.per_device, plan.accumulation, plan.changed, plan.automatic) == (4, 8, True, False)
    assert plan.local_fit == 6 and plan.tried == seen and max(seen) <= 16  # the request caps the search
    assert "job j1: batch size 16 does not fit" in caplog.text and "effective batch of 32" in caplog.text


def test_plan_batch_leaves_a_fitting_request_alone():
    from finetune_trainer.batching import plan_batch

    plan = plan_batch(HP(16, 3), probe=simulated(100), examples_per_rank=1000, on_gpu=True)
    assert (plan.per_device, plan.accumulation, plan.changed) == (16, 3, False)


def test_plan_batch_on_cpu_trains_the_request_without_probing():
    from finetune_trainer.batching import plan_batch

    seen: list[int] = []
    plan = plan_batch(HP(16), probe=simulated(2, seen), examples_per_rank=1000, on_gpu=False)
    assert (plan.per_device, plan.accumulation, seen) == (16, 1, [])


def test_plan_batch_automatic_uses_the_agreed_minimum_and_the_data_cap():
    from finetune_trainer.batching import plan_batch

    plan = plan_batch(HP(None, 2), probe=simulated(40), examples_per_rank=1000, on_gpu=True, agree=lambda b: min(b, 24))
    assert (plan.per_device, plan.accumulation, plan.automatic, plan.local_fit) == (24, 2, True, 40)
    small = plan_batch(HP(None), probe=simulated(40), examples_per_rank=10, on_gpu=True)
    assert small.per_device == 10 and small.tried[-1] == 10  # never more than one rank's share of the data


def test_fault_injection_probe_raises_torchs_oom_type_above_the_limit():
    from finetune_trainer.batching import fault_oom_limit

    assert fault_oom_limit(None) is None and fault_oom_limit(" ") is None
    assert fault_oom_limit("8") == fault_oom_limit("8", rank=3) == 8
    assert [fault_oom_limit("16,4", rank) for rank in (0, 1, 2)] == [16, 4, 4]


@pytest.fixture
def prepared(tiny_model_dir):
    """The tiny embedding model prepared by accelerate with AdamW, as the trainer probes it, plus its dataset."""
    from accelerate import Accelerator
    from transformers import AutoModel, AutoTokenizer

    from finetune_trainer.data import Collator, TokenizedDataset
    from finetune_trainer.engine import AccelerateEngine
    from finetune_trainer.models import EmbeddingModel
    from finetune_trainer.worker import reset_accelerate_state

    reset_accelerate_state()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = EmbeddingModel(AutoModel.from_pretrained(tiny_model_dir))
    rows = [{"input_ids": tokenizer("the goal of the match " * (1 + i % 3))["input_ids"],
             "pair_input_ids": tokenizer("a team")["input_ids"], "labels": i % 2} for i in range(64)]
    engine = AccelerateEngine(Accelerator(cpu=True), model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1),
                              None, 1.0)

    class Hp:
        loss = None

    yield engine, TokenizedDataset(rows), Collator(0, "embedding"), Hp()
    reset_accelerate_state()


def test_the_probe_counts_the_optimizer_state_and_leaves_no_trace(prepared):
    from finetune_trainer.batching import SimulatedMemory, make_probe, plan_batch

    engine, dataset, collate, hp = prepared
    before = {k: v.clone() for k, v in engine.unwrapped().state_dict().items()}
    # 12 examples of memory; the optimizer state takes 4 once a step has run: only the optimizer step exceeds it.
    probe = make_probe(engine, dataset, collate, "embedding", hp, memory=SimulatedMemory(12, optimizer_state=4))
    probe(8)
    with pytest.raises(torch.OutOfMemoryError, match="optimizer state") as info:
        probe(9)  # forward and backward fit (9 <= 12); the optimizer step does not (9 + 4 > 12)
    assert is_out_of_memory(info.value)
    # No trace: weights bit-identical (the step ran at learning rate 0), no gradients, no optimizer state, lr back.
    after = engine.unwrapped().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in engine.model.parameters())
    assert not engine.optimizer.optimizer.state and engine.optimizer.param_groups[0]["lr"] == 1e-3

    class Auto:
        batch_size = None
        gradient_accumulation_steps = None

    plan = plan_batch(Auto(), probe=probe, examples_per_rank=64, on_gpu=True, headroom=0.1)
    assert plan.largest_fit == 8  # a probe without the optimizer step would have found 12
    assert plan.per_device == 7 and plan.source == "searched"  # one below: 10% of 8, rounded down, at least one fewer
    without_state = plan_batch(Auto(), probe=make_probe(engine, dataset, collate, "embedding", hp,
                                                         memory=SimulatedMemory(12)), examples_per_rank=64, on_gpu=True)
    assert without_state.largest_fit == 12


def test_headroom_and_step_down():
    from finetune_trainer.batching import BatchPlan, keep_headroom, step_down

    assert [keep_headroom(f, 0.1) for f in (1, 2, 8, 10, 64)] == [1, 1, 7, 9, 57]
    assert keep_headroom(64, 0.0) == 64
    plan = BatchPlan(16, 2, True)
    down = step_down(plan)
    assert (down.per_device, down.accumulation, down.source) == (8, 4, "stepped-down")
    assert step_down(BatchPlan(6, 1, False)).per_device == 3 and step_down(BatchPlan(1, 4, False)) is None


def test_plan_batch_on_cpu_without_the_knob_says_no_search_runs(caplog, monkeypatch):
    import logging

    from finetune_trainer.batching import CPU_DEFAULT_BATCH, plan_batch

    # A trainer run earlier in the session turned propagation off (it logs through its own handler).
    monkeypatch.setattr(logging.getLogger("finetune_trainer"), "propagate", True)
    seen: list[int] = []
    with caplog.at_level("INFO", logger="finetune_trainer"):
        plan = plan_batch(HP(None, 2), probe=simulated(2, seen), examples_per_rank=1000, on_gpu=False, job="j")
    assert (plan.per_device, plan.accumulation, plan.source, seen) == (CPU_DEFAULT_BATCH, 2, "cpu-default", [])
    assert "no batch-size search on CPU" in caplog.text


def test_an_out_of_memory_error_in_training_steps_the_batch_down_and_finishes(manifest, tmp_path, monkeypatch):
    from local_train import run

    m = manifest(hyperparameters={"epochs": 2, "batchSize": 8, "gradientAccumulationSteps": 1, "dropout": 0.0})
    reference = run(m, output_dir=str(tmp_path / "ref"), progress=False)
    # From step 12 (epoch 2: 9 steps per epoch) the batch of 8 no longer fits.
    monkeypatch.setenv("FINETUNE_FAULT_OOM_AT_STEP", "12")
    result = run(m, output_dir=str(tmp_path / "oom"), progress=False)
    assert result["outcome"] == "completed" and result["oomRecoveries"] == 1
    assert (result["batchSize"], result["gradientAccumulationSteps"]) == (4, 2)  # the effective batch of 8 kept
    assert result["batchPlan"]["source"] == "stepped-down"
    assert result["globalStep"] == reference["globalStep"] == 18  # continued from the epoch-1 checkpoint
    assert result["epochsRun"] == 2
    # The same effective batch over the same examples: epoch 2's loss matches the uninterrupted run's closely.
    assert result["history"][1]["trainLoss"] == pytest.approx(reference["history"][1]["trainLoss"], rel=1e-3)
