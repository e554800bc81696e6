"""client-go's workqueue, in small: a de-duplicating queue of job keys, delayed adds, per-key backoff.

Watch events only say "this job may need a pass" (`add`); a key queued twice is processed once, and a key
added while it is being processed is processed again afterwards (never two passes of one job at once).
`add_after` schedules a pass for when a job's clock matters (grace period, watchdog); a failed pass comes
back after `backoff(key)`: exponential, capped, reset by the next pass that succeeds. Nothing is dropped.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """client-go's ItemExponentialFailureRateLimiter: base * 2^(failures-1), capped."""
    if failures <= 0:
        return 0.0
    return min(cap, base * 2 ** min(failures - 1, 62))


class WorkQueue:
    def __init__(self, base_backoff: float = 0.5, max_backoff: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.base_backoff, self.max_backoff, self.clock = base_backoff, max_backoff, clock
        self._cond = threading.Condition()
        self._queue: deque[Hashable] = deque()
        self._dirty: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._delayed: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}
        self._failures: dict[Hashable, int] = {}
        self._seq = itertools.count()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def add(self, key: Hashable) -> None:
        with self._cond:
            self._add(key)

    def _add(self, key: Hashable) -> None:
        if self._closed or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: Hashable, delay: float) -> None:
        """Queue `key` in `delay` seconds; an earlier schedule of the same key wins (visiting early is harmless)."""
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            due = self.clock() + delay
            if self._closed or self._due.get(key, float("inf")) <= due:
                return
            self._due[key] = due
            heapq.heappush(self._delayed, (due, next(self._seq), key))
            self._cond.notify()

    def backoff(self, key: Hashable) -> float:
        """Count a failure of `key`; the delay before its retry."""
        with self._cond:
            self._failures[key] = self._failures.get(key, 0) + 1
            return backoff_delay(self._failures[key], self.base_backoff, self.max_backoff)

    def forget(self, key: Hashable) -> None:
        """A pass of `key` succeeded: its next failure starts the backoff from the beginning."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: Hashable) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def discard(self, key: Hashable) -> None:
        """The job is gone: drop its schedule and failure count (a queued pass still runs and finds it gone)."""
        with self._cond:
            self._due.pop(key, None)
            self._failures.pop(key, None)

    def _promote(self) -> float | None:
        now = self.clock()
        while self._delayed and self._delayed[0][0] <= now:
            due, _, key = heapq.heappop(self._delayed)
            if self._due.get(key) == due:
                del self._due[key]
                self._add(key)
        return self._delayed[0][0] - now if self._delayed else None

    def get(self, timeout: float | None = None) -> Hashable | None:
        """The next key to process (marked processing until `done`), or None on shutdown or timeout."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            while True:
                wait = self._promote()
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                if self._closed:
                    return None
                if deadline is not None:
                    left = deadline - self.clock()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self, process: Callable[[Hashable], object]) -> None:
        """A worker's loop: process each key handed out, until shutdown (client-go's processNextWorkItem)."""
        while True:
            key = self.get()
            if key is None:
                return
            try:
                process(key)
            finally:
                self.done(key)

    def start_workers(self, process: Callable[[Hashable], object], count: int, name: str) -> list[threading.Thread]:
        """`count` daemon threads draining the queue; passes of one key never overlap (see the module doc)."""
        threads = [threading.Thread(target=self.drain, args=(process,), name=f"{name}-{i}", daemon=True)
                   for i in range(count)]
        for t in threads:
            t.start()
        return threads

