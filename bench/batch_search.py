"""Batch-size search: ours (double, then bisect) vs accelerate's `find_executable_batch_size` (-10% per OOM).

Part 1 simulates a memory limit with a probe that raises torch's real OutOfMemoryError above it and
prints, for each (limit, accelerate start), probes, OOMs and the size each finder settles on.
Part 2 runs both finders against REAL allocations: a child process caps its address space
(RLIMIT_AS) so torch's CPU allocator itself fails ("DefaultCPUAllocator: can't allocate memory").

    .venv/bin/python bench/batch_search.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

LIMITS = (7, 24, 100, 250, 1000)
STARTS = (128, 512)


def simulated_table() -> None:
    import accelerate.utils.memory as accel_memory
    import torch

    import finetune_trainer.batch_size as ours_module
    from finetune_trainer.batch_size import accelerate_finder_probes, find_batch_size

    # Both finders gc-collect between probes; with simulated probes that is all the time they spend,
    # so it is switched off here to make the table instant (probe counts are unaffected).
    ours_module.release_memory = lambda *objects: []
    accel_memory.clear_device_cache = lambda garbage_collection=False: None

    def probe_for(limit: int):
        def probe(batch: int) -> None:
            if batch > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch} MiB.")

        return probe

    print("simulated limit: probes / OOMs / size found (accelerate only shrinks: below its start it is exact")
    print("only by luck, above its start it never grows; ours always lands on the limit itself)")
    print(f"{'limit':>6} {'start':>6} | {'ours':>14} | {'accelerate':>14} | probes ratio (acc/ours)  OOM ratio  exact?")
    for limit in LIMITS:
        ours = find_batch_size(probe_for(limit))
        for start in STARTS:
            theirs = accelerate_finder_probes(limit, start)
            ours_s = f"{ours.probes}/{ours.ooms}/{ours.batch_size}"
            theirs_s = f"{theirs.probes}/{theirs.ooms}/{theirs.batch_size}"
            oom_ratio = theirs.ooms / ours.ooms if ours.ooms else float("inf")
            print(
                f"{limit:>6} {start:>6} | {ours_s:>14} | {theirs_s:>14} | "
                f"{theirs.probes / ours.probes:>23.2f}  {oom_ratio:>9.2f}  "
                f"ours={ours.batch_size == limit} acc={theirs.batch_size == limit}"
            )


# Runs in a child process: the address-space cap must not constrain this interpreter.
_CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from finetune_trainer.batch_size import find_batch_size
from accelerate.utils import find_executable_batch_size

MIB = 1 << 20
cap_mib, start, which = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + cap_mib * MIB, resource.RLIM_INFINITY))
tried = []

def step(batch):
    # a stand-in training step: an activation of 1 MiB per example, then an op that needs a second copy
    tried.append(batch)
    x = torch.ones(batch, MIB // 4)
    y = x * 2.0
    return float(y[0, 0])

t0 = time.perf_counter()
if which == "ours":
    found = find_batch_size(step, limit=4096)
    out = {"size": found.batch_size, "probes": found.probes, "ooms": found.ooms}
else:
    @find_executable_batch_size(starting_batch_size=start)
    def run(batch_size):
        step(batch_size)
        return batch_size
    size = run()
    out = {"size": size, "probes": len(tried), "ooms": len(tried) - 1}
out["seconds"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def real_allocation(cap_mib: int = 200, start: int = 512) -> None:
    print(f"\nreal allocations under an address-space cap of {cap_mib} MiB above start-up (1 MiB/example, x2 for the op)")
    results = {}
    for which in ("ours", "accelerate"):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(cap_mib), str(start), which],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            print(f"{which}: child failed: {proc.stderr.strip().splitlines()[-1:]}")
            return
        results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[which]
        print(f"{which:>10}: size {r['size']:>4}  probes {r['probes']:>3}  OOMs {r['ooms']:>3}  search {r['seconds']:.2f}s")
    ours, theirs = results["ours"], results["accelerate"]
    print(
        f"ratio accelerate/ours: probes {theirs['probes'] / ours['probes']:.2f}, "
        f"search time {theirs['seconds'] / ours['seconds']:.2f}, size found {theirs['size'] / ours['size']:.2f}"
    )


def main() -> None:
    t0 = time.perf_counter()
    simulated_table()
    real_allocation()
    print(f"\n(total {time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
