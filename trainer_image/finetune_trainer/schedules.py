"""Learning-rate schedules: constant / linear / cosine with linear warm-up, and one-cycle.

Built from library schedulers (transformers.get_scheduler, torch's OneCycleLR), stepped once per optimizer
step. Each scheduler scales every parameter group's own learning rate, so the head multiplier and the
layer-wise decay from optim.py keep their ratios through the whole schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR
from transformers import get_scheduler

# Our API names -> transformers' SchedulerType names (all with linear warm-up from 0 to the peak).
_TRANSFORMERS_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class _OneCycleLR(OneCycleLR):
    """torch's OneCycleLR, except that stepping past the end holds the final rate instead of raising.

    The transformers schedules simply stay at their last value; one extra optimizer step (a resumed partial
    epoch, a rounding difference in the step count) must not crash a run at its very end.
    """

    def get_lr(self) -> list[float]:
        if self.last_epoch < self.total_steps:
            return super().get_lr()
        saved = self.last_epoch
        self.last_epoch = self.total_steps - 1
        try:
            return super().get_lr()
        finally:
            self.last_epoch = saved


def warmup_steps_for(hp: Any, total_steps: int) -> int:
    """Warm-up length in optimizer steps: `warmupSteps` when set, else floor(warmupRatio * total), else 0.

    Raises ValueError naming the field when the warm-up would not leave a single step of training after it.
    """
    if total_steps < 1:
        raise ValueError(
            f"spec.hyperparameters: training has {total_steps} optimizer steps; add data or epochs, "
            "or lower batchSize/gradientAccumulationSteps"
        )
    spec = hp.scheduler
    steps = getattr(spec, "warmup_steps", None) if spec is not None else None
    ratio = getattr(spec, "warmup_ratio", None) if spec is not None else None
    if steps is not None:
        warmup, field = int(steps), "warmupSteps"
    elif ratio is not None:
        # floor keeps ratio < 1 strictly shorter than training
        warmup, field = int(ratio * total_steps), "warmupRatio"
    else:
        return 0
    if warmup >= total_steps:
        raise ValueError(
            f"spec.hyperparameters.scheduler.{field}: warm-up ({warmup} steps) must be shorter than training "
            f"({total_steps} optimizer steps); lower it or add epochs"
        )
    return warmup


def build_scheduler(optimizer: torch.optim.Optimizer, hp: Any, total_steps: int) -> LRScheduler:
    """The scheduler named in `hp.scheduler.name` (default linear) for `total_steps` optimizer steps."""
    spec = hp.scheduler
    name = (spec.name if spec is not None and spec.name else "linear").lower()
    warmup = warmup_steps_for(hp, total_steps)
    if name in _TRANSFORMERS_NAMES:
        return get_scheduler(
            _TRANSFORMERS_NAMES[name], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
        )
    if name == "onecycle":
        # The warm-up is the cycle's rising phase. cycle_momentum=False keeps the user's betas/momentum:
        # OneCycleLR would otherwise overwrite them with its own 0.85-0.95 cycle.
        return _OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=warmup / total_steps,
            anneal_strategy="cos",
            cycle_momentum=False,
        )
    raise ValueError(
        f"spec.hyperparameters.scheduler.name: unknown scheduler {name!r} (constant, linear, cosine, onecycle)"
    )
