"""SIGTERM (preemption, node drain, `kubectl delete pod`) becomes a flag the loop reads at the next
step boundary, so the trainer checkpoints mid-epoch and exits instead of dying mid-write."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("finetune_trainer")


class TerminationFlag:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous = None

    def install(self) -> TerminationFlag:
        # Signal handlers can only be set from the main thread; an embedded run in a thread keeps the default.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if not self._event.is_set():
            log.warning("received SIGTERM: will checkpoint at the next step boundary and exit")
        self._event.set()

    def set(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()
