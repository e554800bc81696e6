"""What a watch event or a complete listing does: update the cache, queue the jobs (and sweeps) concerned.

One place for it, whoever watches: the Reflectors (kube/reflector.py, the default) or kopf's watches (with
peering, where kopf decides which replica sees events; handlers/kopf_handlers.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..api import constants as c
from ..kube.cache import Cache
from .workqueue import WorkQueue

log = logging.getLogger("finetune_operator")


TrialEvent = Callable[[str, dict[str, Any]], None]  # (event type, FineTuneJob) of a sweep's trial


class CacheFeed:
    def __init__(self, cache: Cache, queue: WorkQueue, trial: TrialEvent | None = None, trial_label: str = ""):
        """`trial`: told of every event of a FineTuneJob that carries `trial_label` (the sweeps' own copy)."""
        self.cache, self.queue, self.trial, self.trial_label = cache, queue, trial, trial_label

    def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        """One watch event. A FineTuneJob: stored (or dropped) and queued unless nothing is new (the echo of our
        own status write). A child or pod: a deleted or edited child gets its job a pass (it comes back); the
        echo of our own write (already cached at that resourceVersion) queues nothing."""
        if kind == c.KIND:
            self._job_event(type_, obj)
            return
        job = self.cache.drop_child(kind, obj) if type_ == "DELETED" else self.cache.put_child(kind, obj)
        if job is not None:
            self.queue.add(job)

    def _job_event(self, type_: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        if type_ == "DELETED":
            self.cache.drop_ftj(key)
            self.queue.add(key)
        elif self.cache.put_ftj(obj):
            self.queue.add(key)
        if self.trial is not None and self.trial_label in (meta.get("labels") or {}):
            self.trial(type_, obj)

    def replaced(self, kind: str, namespace: str | None, listed: list[dict[str, Any]], rv: str | None) -> None:
        """A complete LIST: every listed object as an event, then what the cache holds but the listing lacks is
        dropped (deleted while no watch was open)."""
        present = set()
        for obj in listed:
            self.event(kind, "ADDED", obj)
            meta = obj.get("metadata") or {}
            present.add((meta.get("namespace") or "", meta.get("name") or ""))
        trials = self._trials_missing(kind, namespace, present)
        self.forget_missing(kind, namespace, present, rv)
        for key, obj in trials:
            if self.cache.ftj(key) is None:  # dropped (not newer than the listing): its sweep learns it is gone
                self.trial("DELETED", obj)  # type: ignore[misc]

    def _trials_missing(self, kind: str, namespace: str | None, present: set[tuple[str, str]]) -> list[tuple[Any, dict]]:
        if kind != c.KIND or self.trial is None:
            return []
        out = []
        for key in self.cache.ftj_keys():
            if key in present or (namespace is not None and key[0] != namespace):
                continue
            obj = self.cache.ftj(key)
            if obj is not None and self.trial_label in ((obj.get("metadata") or {}).get("labels") or {}):
                out.append((key, obj))
        return out

    def forget_missing(self, kind: str, namespace: str | None, present: set[tuple[str, str]], rv: str | None) -> None:
        touched = self.cache.replace(kind, namespace, present, rv)
        if touched:
            log.info("a fresh listing of %s lacks %d cached object(s) deleted while no watch was open; "
                     "their jobs get a pass", kind, len(touched), extra={"action": "relist", "kind": kind})
        for job in touched:
            self.queue.add(job)
