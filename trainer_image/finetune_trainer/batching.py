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


@dataclass
class BatchPlan:
    per_device: int
    accumulation: int
    automatic: bool
    changed: bool = False  # the requested batch did not fit: accumulation raised to keep the effective batch
    probes: int = 0
    tried: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"batchSize": self.per_device, "gradientAccumulationSteps": self.accumulation, "automatic": self.automatic,
                "accumulationRaised": self.changed, "probes": self.probes, "tried": self.tried}


def _agree_min(value: int) -> int:
    """Every rank trains with one batch size: the smallest that fits everywhere."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.long, device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())
    return value


def make_probe(model: Any, dataset: Any, collate: Any, task: str, hp: Any, device: torch.device, autocast: Any):
    """One forward+backward on the longest examples at a given batch size (no optimizer step)."""
    longest = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))

    def probe(batch_size: int) -> None:
        rows = [dataset[longest[i % len(longest)]] for i in range(batch_size)]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        try:
            with autocast():
                loss, _ = forward(model, batch, task, hp, train=True)
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)

    return probe


def plan_batch(hp: Any, *, probe: Any, examples_per_rank: int, on_gpu: bool) -> BatchPlan:
    requested_acc = hp.gradient_accumulation_steps or 1
    if hp.batch_size is None:
        limit = max(1, min(examples_per_rank, GPU_AUTO_BATCH_LIMIT if on_gpu else CPU_AUTO_BATCH_LIMIT))
        search = find_batch_size(probe, limit=limit, agree=_agree_min)
        log.info("automatic batch size %d after %d probes (%d out of memory): tried %s", search.batch_size, search.probes, search.ooms, search.tried)
        return BatchPlan(search.batch_size, requested_acc, True, False, search.probes, search.tried)
    if not on_gpu:
        # Nothing to learn from a CPU probe (no catchable out-of-memory): train what was asked.
        return BatchPlan(hp.batch_size, requested_acc, False)
    search = find_batch_size(probe, limit=hp.batch_size, agree=_agree_min)
    per_device, accumulation, changed = plan_accumulation(hp.batch_size, search.batch_size, requested_acc)
    if changed:
        log.warning(
            "batch size %d does not fit (largest %d): training %d x %d accumulation steps to keep the effective batch of %d",
            hp.batch_size, search.batch_size, per_device, accumulation, hp.batch_size * requested_acc,
        )
    return BatchPlan(per_device, accumulation, False, changed, search.probes, search.tried)
