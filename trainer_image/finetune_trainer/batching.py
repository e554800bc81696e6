"""Choose the per-device batch size and accumulation before training (automatic when batchSize is unset)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .batch_size import find_batch_size, plan_accumulation
from .steps import forward

log = logging.getLogger("finetune_trainer")

# On CPU, running out of memory ends in the kernel's OOM killer, not an exception the search could catch
# (see FACTS), and throughput stops improving long before memory runs out: cap the automatic search there.
CPU_AUTO_BATCH_LIMIT = int(os.environ.get("FINETUNE_AUTO_BATCH_LIMIT", "64"))
GPU_AUTO_BATCH_LIMIT = 4096
# Fault injection (tests, chaos checks): probes above this batch size raise torch's real OutOfMemoryError,
# so the paths that only a GPU reaches (keeping the effective batch, ranks agreeing on the minimum) run on
# CPU too. "N" applies to every rank; "N0,N1,..." gives rank i its own limit.
FAULT_OOM_ENV = "FINETUNE_FAULT_OOM_ABOVE"


def fault_oom_limit(raw: str | None, rank: int = 0) -> int | None:
    """This rank's simulated memory limit in examples from the knob's value, or None when no fault is injected."""
    if not raw or not raw.strip():
        return None
    limits = [int(v) for v in raw.split(",")]
    return limits[min(rank, len(limits) - 1)]


@dataclass
class BatchPlan:
    per_device: int
    accumulation: int
    automatic: bool
    changed: bool = False  # the requested batch did not fit: accumulation raised to keep the effective batch
    probes: int = 0
    tried: list[int] = field(default_factory=list)
    local_fit: int | None = None  # the largest size that fitted on this rank, before the ranks agreed

    def as_dict(self) -> dict[str, Any]:
        return {"batchSize": self.per_device, "gradientAccumulationSteps": self.accumulation, "automatic": self.automatic,
                "accumulationRaised": self.changed, "probes": self.probes, "tried": self.tried, "localFit": self.local_fit}


def _agree_min(value: int) -> int:
    """Every rank trains with one batch size: the smallest that fits everywhere."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.long, device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())
    return value


def make_probe(model: Any, dataset: Any, collate: Any, task: str, hp: Any, device: torch.device, autocast: Any,
               *, oom_above: int | None = None):
    """One forward+backward on the longest examples at a given batch size (no optimizer step).

    oom_above: fault injection; above it the probe raises torch's own OutOfMemoryError type with torch's
    message text, which is exactly what a GPU raises and what the search recognises.
    """
    longest = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))

    def probe(batch_size: int) -> None:
        if oom_above is not None and batch_size > oom_above:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {batch_size} MiB ({FAULT_OOM_ENV}={oom_above}, fault injection)"
            )
        rows = [dataset[longest[i % len(longest)]] for i in range(batch_size)]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        try:
            with autocast():
                loss, _ = forward(model, batch, task, hp, train=True)
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)

    return probe


def plan_batch(hp: Any, *, probe: Any, examples_per_rank: int, on_gpu: bool, agree: Any = _agree_min,
               job: str = "") -> BatchPlan:
    """The per-device batch and accumulation to train with.

    on_gpu: whether probing can fail with a catchable out-of-memory error (a GPU, or the fault-injection
    knob on CPU). Without it a requested batch size is trained as given.
    """
    requested_acc = hp.gradient_accumulation_steps or 1
    if hp.batch_size is None:
        limit = max(1, min(examples_per_rank, GPU_AUTO_BATCH_LIMIT if on_gpu else CPU_AUTO_BATCH_LIMIT))
        search = find_batch_size(probe, limit=limit, agree=agree)
        log.info("job %s: automatic batch size %d after %d probes (%d out of memory, %d fitted on this rank): tried %s",
                 job, search.batch_size, search.probes, search.ooms, search.local_batch_size, search.tried)
        return BatchPlan(search.batch_size, requested_acc, True, False, search.probes, search.tried, search.local_batch_size)
    if not on_gpu:
        # Nothing to learn from a CPU probe (no catchable out-of-memory): train what was asked.
        return BatchPlan(hp.batch_size, requested_acc, False)
    search = find_batch_size(probe, limit=hp.batch_size, agree=agree)
    per_device, accumulation, changed = plan_accumulation(hp.batch_size, search.batch_size, requested_acc)
    if changed:
        log.warning(
            "job %s: batch size %d does not fit (largest %d): training %d x %d accumulation steps to keep the effective batch of %d",
            job, hp.batch_size, search.batch_size, per_device, accumulation, hp.batch_size * requested_acc,
        )
    return BatchPlan(per_device, accumulation, False, changed, search.probes, search.tried, search.local_batch_size)
