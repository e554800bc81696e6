"""FineTuneSweeps (issue 14): kopf registrations and the reconcile pass, beside the FineTuneJob's.

The same shape as handlers/kopf_handlers.py + handlers/reconcile.py: watch events only update the stores
and queue the sweep's key (a trial FineTuneJob's event queues its sweep, found by the trial's label); a
worker thread drains the queue and runs one pass: read the sweep and its trials from the watch-fed
caches, plan (plan/sweep.py, pure), then write only what differs: the status first (it records every new
trial's parameters before the trial exists, so a restart can neither lose nor repeat a trial), then the
trial FineTuneJobs that are missing, then the stops of pruned trials, then Events.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kopf

from .. import metrics
from ..api import constants as c
from ..api import sweep as s
from ..kube.cache import JobKey, SweepStore
from ..kube.client import KubeClient
from ..kube.sweeps import create_trial, patch_sweep_status, stop_trial, sweep_event
from ..plan.sweep import plan_sweep, status_patch
from ..settings import Settings
from .workqueue import WorkQueue

log = logging.getLogger("finetune_operator")


def _now() -> datetime:
    return datetime.now(UTC)


class SweepReconciler:
    def __init__(self, client: KubeClient, settings: Settings, clock: Callable[[], datetime] = _now) -> None:
        self.client, self.settings, self.clock = client, settings, clock
        self.sweeps = SweepStore()
        self.trials = SweepStore()  # the trial FineTuneJobs, as their watch events and our writes gave them
        self.queue = WorkQueue(settings.retry_base_seconds, settings.retry_max_seconds)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        # One worker: sweeps are few and a pass is cheap; passes of one sweep never overlap either way.
        self._threads += self.queue.start_workers(self.process, 1, "sweep-reconcile")

    def close(self) -> None:
        self.queue.shutdown()
        for t in self._threads:
            t.join(timeout=5)

    passes = 0  # read by memory.MemoryTrimmer

    def trial_event(self, type_: str, obj: dict[str, Any]) -> None:
        """A watch event of a trial (a FineTuneJob with the sweep label): the sweep's own copy, and a pass of it."""
        meta = obj.get("metadata") or {}
        namespace, name = meta.get("namespace") or "", meta.get("name") or ""
        if type_ == "DELETED":
            self.trials.drop((namespace, name))
        elif not self.trials.put(obj):
            return
        self.queue.add((namespace, (meta.get("labels") or {})[s.SWEEP_LABEL]))

    def process(self, key: JobKey) -> str:
        namespace, name = key
        self.passes += 1
        try:
            result = self._pass(key)
        except Exception as err:  # noqa: BLE001 - API errors and bugs alike: retried with backoff
            delay = self.queue.backoff(key)
            log.warning("reconcile of sweep %s/%s failed (%s); retrying in %.1f s", namespace, name, err, delay,
                        extra={"sweep": name, "namespace": namespace, "action": "reconcile", "result": "error"})
            self.queue.add_after(key, delay)
            return "error"
        self.queue.forget(key)
        return result

    def _pass(self, key: JobKey) -> str:
        namespace, name = key
        sweep = self.sweeps.get(key)
        if sweep is None or (sweep.get("metadata") or {}).get("deletionTimestamp"):
            metrics.SWEEP_TRIALS.set(key, None)
            return "gone"
        uid = (sweep.get("metadata") or {}).get("uid")
        recorded = [t.get("name") for t in (sweep.get("status") or {}).get("trials") or []]
        observed = {n: self.trials.get((namespace, n)) for n in recorded if n}
        plan = plan_sweep(sweep, observed, self.clock())
        old = dict(sweep.get("status") or {})
        patch = status_patch(old, plan.status)
        if patch:
            answer = patch_sweep_status(self.client, namespace, name, patch)
            if answer:
                self.sweeps.put(answer)
        created = []
        for manifest in plan.create:
            outcome = create_trial(self.client, self.trials, manifest, uid)
            if outcome == "conflict":
                sweep_event(self.client, sweep, "Warning", "TrialNotOwned",
                            f"FineTuneJob {manifest['metadata']['name']} exists and is not owned by this sweep; "
                            "delete or rename it")
                self.queue.add_after(key, self.queue.backoff(key))
            else:
                created.append(manifest["metadata"]["name"])
        for trial, message in plan.stop:
            stop_trial(self.client, self.trials, namespace, trial, message)
            log.info("sweep %s/%s: stopping trial %s (%s)", namespace, name, trial, message,
                     extra={"sweep": name, "namespace": namespace, "action": "prune", "trial": trial})
        for ev in plan.events:
            sweep_event(self.client, sweep, ev.type, ev.reason, ev.message)
        metrics.SWEEP_TRIALS.set(key, plan.status.get("trials") or [])
        if patch or created or plan.stop:
            log.info("sweep %s/%s: phase %s (%s)%s", namespace, name, plan.status.get("phase"), plan.status.get("reason"),
                     f"; created {', '.join(created)}" if created else "",
                     extra={"sweep": name, "namespace": namespace, "action": "reconcile",
                            "phase": plan.status.get("phase")})
            return "changed"
        return "ok"


def register(registry: kopf.OperatorRegistry, sweeps: SweepReconciler, kopf_jobs: bool = True) -> None:
    """kopf's handlers of FineTuneSweeps and (`kopf_jobs`: with peering, where kopf watches FineTuneJobs) of trials."""

    @kopf.on.event(c.GROUP, c.VERSION, s.SWEEP_PLURAL, registry=registry)
    async def sweep_event_handler(event: dict[str, Any], name: str, namespace: str, **_: Any) -> None:
        key = (namespace, name)
        if event.get("type") == "DELETED":
            sweeps.sweeps.drop(key)
        elif not sweeps.sweeps.put(event.get("object") or {}):
            return
        sweeps.queue.add(key)

    if not kopf_jobs:
        return  # the FineTuneJob Reflector's feed calls sweeps.trial_event (handlers/watches.py)

    # A second handler on FineTuneJobs, for trials only: it keeps the sweep's own copy of the trial and
    # queues the trial's sweep (the FineTuneJob handler, untouched, keeps reconciling the trial as a job).
    @kopf.on.event(c.GROUP, c.VERSION, c.PLURAL, labels={s.SWEEP_LABEL: kopf.PRESENT}, registry=registry)
    async def trial_event(event: dict[str, Any], **_: Any) -> None:
        sweeps.trial_event(event.get("type") or "", event.get("object") or {})


