"""Run the operator (`python -m finetune_operator`) under cProfile, every thread, CPU time only.

Why not `python -m cProfile`: it sees only the main thread (kopf's event loop), not the reconcile and apply
threads, and it counts wall time, so time spent waiting for the GIL held by another thread shows up as cost.
Each thread gets its own profiler with `time.thread_time` as the clock; on exit (SIGTERM: kopf stops
gracefully) they are merged into one pstats file.

    python bench/profile_operator.py OUT.prof        # used by operator_throughput.py --profile
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
import time

profiles: list[cProfile.Profile] = []
_run = threading.Thread.run


def _profiled_run(self: threading.Thread) -> None:
    prof = cProfile.Profile(time.thread_time)
    profiles.append(prof)
    prof.enable()
    try:
        _run(self)
    finally:
        prof.disable()


def main() -> None:
    out = sys.argv[1]
    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
    from finetune_operator.__main__ import main as operator_main

    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    try:
        operator_main()
    finally:
        prof.disable()
        stats = pstats.Stats(prof)
        for other in list(profiles):
            other.create_stats()  # a still-running daemon thread: what it recorded so far
            stats.add(other)
        stats.dump_stats(out)


if __name__ == "__main__":
    main()
