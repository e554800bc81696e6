"""The periodic pass: grace periods, the stall watchdog, and retries of failed passes.

Why not kopf.timer: kopf puts a finalizer on every object that has a timer or daemon, so a FineTuneJob
could not be deleted while the operator is down or uninstalled, and each job would cost one more write.
One loop over the jobs that need a revisit (Reconciler.periodic) does the same without either.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor, wait

from .reconcile import Reconciler

log = logging.getLogger("finetune_operator")


class Resync:
    def __init__(self, reconciler: Reconciler, interval: float, workers: int):
        self.reconciler, self.interval = reconciler, interval
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resync")
        self.thread = threading.Thread(target=self._loop, name="resync", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=self.interval + 1)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            keys = self.reconciler.periodic_keys()
            futures = [self.pool.submit(self.reconciler.reconcile, ns, name, "timer") for ns, name in keys]
            # One round at a time: a slow API server slows the loop down instead of piling up passes.
            wait(futures)
