"""Choose the per-device batch size and accumulation before training (automatic when batchSize is unset)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .batch_size import find_batch_size, plan_accumulation
from .steps import forward

log = logging.getLogger("finetune_trainer")

# On CPU, running out of memory ends in the kernel's OOM killer, not an exception a search could catch
# (see FACTS), and throughput stops improving long before memory runs out: no search runs there (unless
# the fault-injection knob simulates a memory limit), and an unset batch size trains this default.
CPU_DEFAULT_BATCH = 16
# The cap of a search on CPU under fault injection, and on GPU.
CPU_AUTO_BATCH_LIMIT = int(os.environ.get("FINETUNE_AUTO_BATCH_LIMIT", "64"))
GPU_AUTO_BATCH_LIMIT = 4096
# Fault injection (tests, chaos checks): a simulated memory limit in examples. A step whose batch exceeds it
# raises torch's real OutOfMemoryError, so the paths that only a GPU reaches (the search, keeping the
# effective batch, ranks agreeing on the minimum, stepping down mid-training) run on CPU too.
# "N" applies to every rank; "N0,N1,..." gives rank i its own limit.
FAULT_OOM_ENV = "FINETUNE_FAULT_OOM_ABOVE"
# What the optimizer state takes once an optimizer step has run, in the same units: a limit that only the
# optimizer step exceeds (AdamW's two moments are twice the trainable weights on a GPU).
FAULT_OPTIMIZER_MEMORY_ENV = "FINETUNE_FAULT_OPTIMIZER_MEMORY"
# From this optimizer step on, the batch that was running no longer fits (a longer batch came, memory
# fragmented): the first training-time out-of-memory error, at a known step.
FAULT_OOM_AT_STEP_ENV = "FINETUNE_FAULT_OOM_AT_STEP"


def fault_oom_limit(raw: str | None, rank: int = 0) -> int | None:
    """This rank's simulated memory limit in examples from the knob's value, or None when no fault is injected."""
    if not raw or not raw.strip():
        return None
    limits = [int(v) for v in raw.split(",")]
    return limits[min(rank, len(limits) - 1)]


def simulated_oom(batch_size: int, used: int, limit: int, what: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate {used} MiB for {what} at batch size {batch_size} "
        f"({FAULT_OOM_ENV}={limit}, fault injection)"
    )


@dataclass
class SimulatedMemory:
    """Fault injection: memory in examples; activations take the batch size, the optimizer state a constant
    from its first step on (the state is allocated by the step, while gradients are still held)."""

    limit: int
    optimizer_state: int = 0

    def check(self, batch_size: int, *, optimizer_step: bool) -> None:
        used = batch_size + (self.optimizer_state if optimizer_step else 0)
        if used > self.limit:
            raise simulated_oom(batch_size, used, self.limit, "the optimizer state" if optimizer_step else "activations")

    @classmethod
    def from_env(cls, env: dict[str, str], rank: int) -> SimulatedMemory | None:
        limit = fault_oom_limit(env.get(FAULT_OOM_ENV), rank)
        if limit is None:
            return None
        return cls(limit, int(env.get(FAULT_OPTIMIZER_MEMORY_ENV) or 0))


def keep_headroom(fit: int, fraction: float) -> int:
    """`batchSearch.headroomFraction` applied to the largest fitting batch (at least one fewer, at least 1)."""
    if fraction <= 0:
        return fit
    return max(1, min(fit - 1, math.floor(fit * (1.0 - fraction))))


@dataclass
class BatchPlan:
    per_device: int
    accumulation: int
    automatic: bool
    changed: bool = False  # the requested batch did not fit: accumulation raised to keep the effective batch
    probes: int = 0
    tried: list[int] = field(default_factory=list)
    local_fit: int | None = None  # the largest size that fitted on this rank, before the ranks agreed
    # searched (probes on the prepared model), requested (trained as given), cpu-default (no search on CPU),
    # checkpoint (the plan the resumed checkpoint was made with), stepped-down (after an out-of-memory error)
    source: str = "requested"
    largest_fit: int | None = None  # the agreed largest fitting batch, before the headroom

    def as_dict(self) -> dict[str, Any]:
        return {"batchSize": self.per_device, "gradientAccumulationSteps": self.accumulation, "automatic": self.automatic,
                "accumulationRaised": self.changed, "probes": self.probes, "tried": self.tried, "localFit": self.local_fit,
                "source": self.source, "largestFit": self.largest_fit}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> BatchPlan | None:
        """The plan a checkpoint was made with (None: an older checkpoint that did not record it)."""
        per_device, accumulation = state.get("batchSize"), state.get("gradientAccumulationSteps")
        if not isinstance(per_device, int) or not isinstance(accumulation, int):
            return None
        return cls(per_device, accumulation, bool(state.get("batchAutomatic", False)), source="checkpoint")


def step_down(plan: BatchPlan) -> BatchPlan | None:
    """After an out-of-memory error in training: the largest per-device batch at most half the current one
    that divides the effective batch, with accumulation making up the rest (None: already at 1)."""
    if plan.per_device <= 1:
        return None
    effective = plan.per_device * plan.accumulation
    per_device = max(d for d in range(1, plan.per_device // 2 + 1) if effective % d == 0)
    return BatchPlan(per_device, effective // per_device, plan.automatic, True, source="stepped-down",
                     largest_fit=plan.per_device - 1)


def _agree_min(value: int) -> int:
    """Every rank trains with one batch size: the smallest that fits everywhere."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.long, device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())
    return value


def _lengths(dataset: Any) -> list[int]:
    """Token count per example: one Arrow compute over a `datasets.Dataset`'s column (reading each row of a large
    memory-mapped split through Python would take minutes), else row by row."""
    if hasattr(dataset, "with_format"):
        import pyarrow.compute as pc

        return pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_pylist()
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def make_probe(engine: Any, dataset: Any, collate: Any, task: str, hp: Any, *, memory: SimulatedMemory | None = None):
    """One full training step on the longest examples at a given batch size, on the model as it trains.

    `engine` is the prepared engine (accelerate's DDP wrapper, or DeepSpeed's ZeRO engine; its optimizer and
    precision), so what the step allocates is what training allocates: activations at the training precision,
    gradients, DDP buckets or ZeRO partitions and, through a real optimizer step, the optimizer state.
    `engine.probe_step` leaves no trace (weights, gradients, optimizer state and step counters as before).
    memory: fault injection, a simulated limit checked before the forward and before the optimizer step, raising
    torch's own OutOfMemoryError type and text, exactly what a GPU raises; the engine runs both checks as phases
    of its step, so under DeepSpeed the ranks agree on them like on a real step's phases.
    """
    lengths = _lengths(dataset)
    longest = sorted(range(len(dataset)), key=lambda i: -lengths[i])
    device = engine.accelerator.device

    def probe(batch_size: int) -> None:
        def loss_fn(model: Any) -> Any:
            rows = [dataset[longest[i % len(longest)]] for i in range(batch_size)]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            return forward(model, batch, task, hp, train=True)[0]

        before_forward = before_step = None
        if memory is not None:
            before_forward = lambda: memory.check(batch_size, optimizer_step=False)  # noqa: E731
            before_step = lambda: memory.check(batch_size, optimizer_step=True)  # noqa: E731
        engine.probe_step(loss_fn, before_step=before_step, before_forward=before_forward)

    return probe


def plan_batch(hp: Any, *, probe: Any, examples_per_rank: int, on_gpu: bool, agree: Any = _agree_min,
               job: str = "", headroom: float = 0.0) -> BatchPlan:
    """The per-device batch and accumulation to train with.

    on_gpu: whether probing can fail with a catchable out-of-memory error (a GPU, or the fault-injection
    knob on CPU). Without it nothing is probed: a requested batch size is trained as given, an unset one
    trains CPU_DEFAULT_BATCH. headroom: `batchSearch.headroomFraction`, applied when memory (not the data
    or the request) limited the search.
    """
    requested_acc = hp.gradient_accumulation_steps or 1
    if not on_gpu:
        if hp.batch_size is None:
            per_device = max(1, min(CPU_DEFAULT_BATCH, examples_per_rank))
            log.info("job %s: no batch-size search on CPU (running out of memory there is the OOM killer, not an error "
                     "to catch); training the CPU default batch of %d (set hyperparameters.batchSize to choose)", job, per_device)
            return BatchPlan(per_device, requested_acc, True, source="cpu-default")
        return BatchPlan(hp.batch_size, requested_acc, False)
    if hp.batch_size is None:
        limit = max(1, min(examples_per_rank, GPU_AUTO_BATCH_LIMIT if torch.cuda.is_available() else CPU_AUTO_BATCH_LIMIT))
        search = find_batch_size(probe, limit=limit, agree=agree)
        chosen = keep_headroom(search.batch_size, headroom) if search.batch_size < limit else search.batch_size
        log.info("job %s: automatic batch size %d (largest fitting %d, headroom %.0f%%) after %d probes (%d out of memory, "
                 "%d fitted on this rank): tried %s", job, chosen, search.batch_size, headroom * 100, search.probes,
                 search.ooms, search.local_batch_size, search.tried)
        return BatchPlan(chosen, requested_acc, True, False, search.probes, search.tried, search.local_batch_size,
                         source="searched", largest_fit=search.batch_size)
    search = find_batch_size(probe, limit=hp.batch_size, agree=agree)
    fitted = keep_headroom(search.batch_size, headroom) if search.batch_size < hp.batch_size else search.batch_size
    per_device, accumulation, changed = plan_accumulation(hp.batch_size, fitted, requested_acc)
    if changed:
        log.warning(
            "job %s: batch size %d does not fit (largest %d): training %d x %d accumulation steps to keep the effective batch of %d",
            job, hp.batch_size, search.batch_size, per_device, accumulation, hp.batch_size * requested_acc,
        )
    return BatchPlan(per_device, accumulation, False, changed, search.probes, search.tried, search.local_batch_size,
                     source="searched", largest_fit=search.batch_size)
