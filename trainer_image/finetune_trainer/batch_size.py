"""Automatic per-device batch size: the largest batch whose training step fits in memory.

accelerate's `find_executable_batch_size` starts high and shrinks by 10% per failure (128 -> 8 takes
23 tries, and it stops at the first fit, not the largest). Here the search doubles from 1 until the
first out-of-memory error, then bisects between the last fit and the first failure: about 2*log2(limit)
probes, and it lands on the exact largest fitting size. Out-of-memory recognition and memory release
stay accelerate's (`should_reduce_batch_size`, `release_memory`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate.utils import find_executable_batch_size
from accelerate.utils.memory import release_memory, should_reduce_batch_size

log = logging.getLogger(__name__)


@dataclass
class BatchSearch:
    batch_size: int
    probes: int
    ooms: int
    tried: list[int] = field(default_factory=list)
    local_batch_size: int = 0  # what this rank's own probes found, before `agree`


def is_out_of_memory(error: BaseException) -> bool:
    """accelerate's test (torch's OOM texts on CUDA/XPU/MPS/CPU), plus torch's OutOfMemoryError type."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, Exception) and should_reduce_batch_size(error)
    )


def find_batch_size(
    probe: Callable[[int], None],
    *,
    limit: int = 4096,
    agree: Callable[[int], int] = lambda b: b,
) -> BatchSearch:
    """Largest batch size in [1, limit] for which `probe(batch)` does not run out of memory.

    `probe` runs one real training step (forward, backward) at that batch size and raises the
    framework's out-of-memory error when it does not fit; any other error propagates. `agree` combines
    the result across ranks (the loop passes an all-reduce MIN) so every rank trains with one size;
    it is called once, after the local search, whatever the local outcome.
    """
    if limit < 1:
        raise ValueError(f"batch size limit must be >= 1, got {limit}")
    tried: list[int] = []
    ooms = 0

    def fits(batch: int) -> bool:
        nonlocal ooms
        tried.append(batch)
        try:
            probe(batch)
            return True
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            ooms += 1
            log.info("batch size probe %d ran out of memory", batch)
            return False
        finally:
            # gc + the device cache, between every probe: a failed probe's tensors are only
            # reachable from the traceback and would otherwise shrink the next probe's headroom.
            release_memory()

    # Phase 1: double from 1 (capped at limit) until a probe fails or the limit fits.
    fit, fail = 0, None
    batch = 1
    while True:
        if fits(batch):
            fit = batch
            if batch >= limit:
                break
            batch = min(batch * 2, limit)
        else:
            fail = batch
            break
    # Phase 2: bisect the open interval (last fit, first failure).
    if fail is not None:
        while fail - fit > 1:
            mid = (fit + fail) // 2
            if fits(mid):
                fit = mid
            else:
                fail = mid
    if fit == 0:
        # Even one example does not fit: no batch size can fix that, the model or sequence length must shrink.
        agree(0)  # keep the collective in step with ranks that did find a size
        raise RuntimeError("out of memory at batch size 1: lower dataset.maxLength, enable LoRA, or use a larger machine")
    agreed = int(agree(fit))
    if agreed < 1:
        raise RuntimeError("another rank ran out of memory at batch size 1")
    return BatchSearch(batch_size=agreed, probes=len(tried), ooms=ooms, tried=tried, local_batch_size=fit)


def plan_accumulation(requested_batch: int, fitted: int, requested_accumulation: int = 1) -> tuple[int, int, bool]:
    """(per_device, accumulation, changed) keeping the effective batch when the requested batch does not fit.

    The effective batch per device is requested_batch * requested_accumulation. When requested_batch fits,
    nothing changes. Otherwise the per-device batch becomes the largest divisor of the effective batch that
    fits, and accumulation makes up the rest, so the optimizer sees the same number of examples per step.
    """
    if requested_batch < 1 or fitted < 1 or requested_accumulation < 1:
        raise ValueError(f"batch sizes must be >= 1 (requested {requested_batch}, fitted {fitted}, accumulation {requested_accumulation})")
    if requested_batch <= fitted:
        return requested_batch, requested_accumulation, False
    effective = requested_batch * requested_accumulation
    per_device = max(d for d in range(1, fitted + 1) if effective % d == 0)
    return per_device, effective // per_device, True


def accelerate_finder_probes(limit: int, start: int = 128) -> BatchSearch:
    """What accelerate's `find_executable_batch_size` does for a simulated memory limit (for comparison).

    The probe raises torch's real OutOfMemoryError with torch's own message above `limit`, which is what
    accelerate's recogniser needs (a hand-written RuntimeError text is re-raised, not retried).
    """
    tried: list[int] = []

    @find_executable_batch_size(starting_batch_size=start)
    def run(batch_size: int) -> int:
        tried.append(batch_size)
        if batch_size > limit:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {batch_size} MiB (simulated limit {limit})."
            )
        return batch_size

    found = run()
    return BatchSearch(batch_size=found, probes=len(tried), ooms=len(tried) - 1, tried=tried)
