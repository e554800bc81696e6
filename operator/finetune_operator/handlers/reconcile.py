"""One reconcile pass of one FineTuneJob: read, plan (pure), apply children, write status once, post Events.

Level-based and idempotent: every pass re-reads the FineTuneJob and its training Job, so it does not
matter which trigger (watch event, child event, timer, restart) started it or how often it runs.
Passes for one job are serialised; a trigger that arrives while a pass is waiting is folded into it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .. import metrics
from ..api.constants import Condition, Phase, Reason
from ..kube import children as kube_children
from ..kube.client import ApiError, KubeClient
from ..kube.events import post_event
from ..kube.status import get_ftj, patch_status
from ..plan import names
from ..plan.children import desired_children
from ..plan.conditions import find
from ..plan.status import is_terminal, job_input, observe, spec_change_refused, status_patch
from ..settings import Settings

log = logging.getLogger("finetune_operator")
Key = tuple[str, str]


def _now() -> datetime:
    return datetime.now(UTC)


class Reconciler:
    def __init__(self, client: KubeClient, settings: Settings, clock: Callable[[], datetime] = _now):
        self.client, self.settings, self.clock = client, settings, clock
        self._locks: dict[Key, threading.Lock] = {}
        self._waiting: set[Key] = set()
        self._guard = threading.Lock()
        self.written_versions: dict[Key, str] = {}  # resourceVersion of our own last status write (echo filter)
        self.periodic: set[Key] = set()  # jobs the resync loop must revisit (see needs_timer)

    def _lock(self, key: Key) -> threading.Lock | None:
        with self._guard:
            if key in self._waiting:
                return None  # a pass is already queued and will read the newest state
            self._waiting.add(key)
            return self._locks.setdefault(key, threading.Lock())

    def forget(self, key: Key) -> None:
        with self._guard:
            self._locks.pop(key, None)
            self.written_versions.pop(key, None)
            self.periodic.discard(key)
        metrics.PHASES.set(key, None)

    def track(self, key: Key, body: dict[str, Any]) -> None:
        with self._guard:
            if needs_timer(body):
                self.periodic.add(key)
            else:
                self.periodic.discard(key)

    def periodic_keys(self) -> list[Key]:
        with self._guard:
            return sorted(self.periodic)

    def is_own_echo(self, key: Key, body: dict[str, Any]) -> bool:
        rv = (body.get("metadata") or {}).get("resourceVersion")
        return rv is not None and self.written_versions.get(key) == rv

    def reconcile(self, namespace: str, name: str, trigger: str) -> str:
        key = (namespace, name)
        lock = self._lock(key)
        if lock is None:
            return "coalesced"
        with lock:
            with self._guard:
                self._waiting.discard(key)
            started = time.perf_counter()
            try:
                result = self._pass(namespace, name, trigger)
            except ApiError as err:
                result = "error"
                log.warning("reconcile of job %s/%s failed (%s); the next event or timer retries", namespace, name, err,
                            extra={"job": name, "namespace": namespace, "action": "reconcile", "result": result})
            except Exception:  # noqa: BLE001 - a bug or a network error must not kill the handler thread
                result = "error"
                log.exception("reconcile of job %s/%s crashed", namespace, name,
                              extra={"job": name, "namespace": namespace, "action": "reconcile", "result": result})
            metrics.RECONCILES.labels(result=result).inc()
            metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)
            return result

    def _pass(self, namespace: str, name: str, trigger: str) -> str:
        key = (namespace, name)
        ftj = get_ftj(self.client, namespace, name)
        if ftj is None or (ftj.get("metadata") or {}).get("deletionTimestamp"):
            self.forget(key)
            return "gone"
        job = job_input(ftj)
        status = job.status
        if is_terminal(job, status):
            metrics.PHASES.set(key, status.get("phase"))
            self.track(key, ftj)
            return "unchanged"

        job_obj = pods = None
        if job.resolved is not None:
            job_obj = self.client.get(kube_children.object_path("batch/v1", "jobs", namespace, names.batch_job_name(name)))
            pods = kube_children.list_pods(self.client, namespace, names.selector(name)) if job_obj else []
        new, events = observe(job, status, job_obj, pods or [], self.clock())

        created: list[str] = []
        if job.resolved is not None:
            wanted = desired_children(job.resolved, self.settings, enforced_stop=bool(new.get("stopEnforced")))
            if spec_change_refused(new):
                # The running job keeps its children; only suspend still follows the spec (and our stops).
                if job_obj is not None:
                    kube_children.converge(self.client, wanted[-1], job_obj)
            else:
                ready = find(status.get("conditions") or [], Condition.READY)
                # Event-driven passes only converge the Job (watched); the periodic pass re-checks every
                # child, so a deleted ConfigMap, Service or RBAC object comes back without a spec change.
                fast = bool(job_obj is not None and ready and ready.get("status") == "True"
                            and ready.get("observedGeneration") == job.generation and trigger != "timer")
                _, created = kube_children.apply_children(self.client, wanted, job_obj, full=not fast)

        patch = status_patch(status, new)
        if patch:
            updated = patch_status(self.client, namespace, name, patch)
            rv = ((updated or {}).get("metadata") or {}).get("resourceVersion")
            if rv:
                self.written_versions[key] = rv
        for ev in events:
            post_event(self.client, ftj, ev.type, ev.reason, ev.message)
            self._count(ev.reason)
        metrics.PHASES.set(key, new.get("phase"))
        self.track(key, {"metadata": ftj.get("metadata") or {}, "status": {**status, **new}})

        if created or patch:
            log.info("job %s/%s: %s%s (trigger %s)", namespace, name,
                     f"created {', '.join(created)}; " if created else "",
                     f"phase {new.get('phase')} ({new.get('reason')})", trigger,
                     extra={"job": name, "namespace": namespace, "action": "reconcile",
                            "phase": new.get("phase"), "reason": new.get("reason")})
        if new.get("reason") == Reason.INVALID_SPEC:
            return "invalid"
        return "changed" if (created or patch) else "ok"

    @staticmethod
    def _count(reason: str) -> None:
        if reason in (Reason.PATIENCE_EXHAUSTED, Reason.USER_REQUESTED, Reason.NAN_LOSS, Reason.METRIC_MISSING):
            metrics.EARLY_STOPS.labels(reason=reason).inc()
        elif reason == Reason.STALLED:
            metrics.STALLED.inc()
        elif reason == Reason.STOP_ENFORCED:
            metrics.ENFORCED.inc()


def needs_timer(body: dict[str, Any]) -> bool:
    """Whether the periodic pass has anything to do: a pending stop's grace period, the stall watchdog,
    or a pass that failed (status not yet written for this generation). Terminal jobs cost nothing."""
    status = body.get("status") or {}
    meta = body.get("metadata") or {}
    if status.get("phase") in Phase.TERMINAL:
        return status.get("reason") == Reason.INVALID_SPEC and status.get("observedGeneration") != meta.get("generation")
    if status.get("observedGeneration") != meta.get("generation") or not status.get("phase"):
        return True
    if status.get("stopRequestedTime") and not status.get("stopEnforced"):
        return True
    return status.get("phase") == Phase.RUNNING
