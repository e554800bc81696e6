"""Give the memory that reconcile passes freed back to the operating system, every half minute of work.

Creating 1,000 jobs leaves the heap holding the pages of every request, answer and watch event decoded on the
way: CPython frees the objects, glibc keeps the pages (`malloc_trim` is what returns them), so the RSS a
platform team sizes the pod by stays at the burst's peak although the steady state needs far less. While
the operator works, one full garbage collection and one `malloc_trim(0)` per interval return
it. Measured with bench/operator_throughput.py -n 1000: 178-181 MiB RSS with 1,000 running jobs without it,
160-165 MiB with it. (Capping glibc's arenas with mallopt(M_ARENA_MAX, 2) changed nothing there: tried, dropped.)"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("finetune_operator")


def _malloc_trim() -> Callable[[], int] | None:
    """glibc's malloc_trim(0), or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is None:
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: fn(0)


class MemoryTrimmer:
    """Every `interval` seconds, if `work()` (a counter of passes) moved since the last trim: collect and trim.
    Not only when no pass runs at all: running jobs get a watchdog pass every resync interval, so a cluster
    with running jobs is never that quiet. Nothing is done while nothing happens (one comparison)."""

    def __init__(self, work: Callable[[], int], interval: float = 30.0,
                 trim: Callable[[], int] | None = None) -> None:
        self.work, self.interval = work, interval
        self.trim = trim if trim is not None else _malloc_trim()
        self._stop = threading.Event()
        self._trimmed_at: int | None = None
        self.trims = 0

    def check(self) -> bool:
        """One look; True when it collected and trimmed."""
        now = self.work()
        if now == self._trimmed_at or self.trim is None:
            return False
        gc.collect()
        self.trim()
        self._trimmed_at = now
        self.trims += 1
        return True

    def start(self) -> None:
        if self.trim is None:
            log.info("no malloc_trim in this C library: memory freed after bursts stays with the process",
                     extra={"action": "memory-trim"})
            return
        threading.Thread(target=self._run, name="memory-trim", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def close(self) -> None:
        self._stop.set()
