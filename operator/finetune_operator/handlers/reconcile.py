"""One reconcile pass of one FineTuneJob: read the cache, plan (pure), write only what differs.

Level-based and idempotent: every pass reads the FineTuneJob, its children and pods from the watch-fed
cache (kube/cache.py), so it does not matter which trigger started it or how often it runs; a pass that
finds desired == observed sends no request at all. The status is patched only when it changed, Events
are posted only for transitions (plan/status.py decides both), and the children that differ are applied
concurrently. Passes of one job never overlap (the work queue guarantees it).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .. import metrics
from ..api import constants as c
from ..api.constants import Condition, Phase, Reason
from ..kube import diff
from ..kube.cache import FTJ_WRITE, Cache, JobKey
from ..kube.children import Applier
from ..kube.client import ApiError, KubeClient, collection_path
from ..kube.events import post_event
from ..kube.status import patch_status
from ..plan import names
from ..plan.children import creates_output_pvc, desired_children
from ..plan.conditions import find, parse_time, set_condition
from ..plan.output_claim import Verdict, check_claim, refusal_message
from ..plan.status import Event, JobInput, is_terminal, job_input, observe, spec_change_refused, status_patch
from ..settings import Settings
from .workqueue import WorkQueue

PARSED_INPUTS_KEPT = 128  # see Reconciler._inputs

log = logging.getLogger("finetune_operator")
Key = JobKey


def _now() -> datetime:
    return datetime.now(UTC)


class PassFailed(Exception):
    """The pass could not finish (API errors after the client's retries): re-queued with backoff."""


@dataclass
class Result:
    result: str  # ok, changed, invalid, gone, conflict (metric label)
    requeue_after: float | None = None  # when this job's clock next matters (seconds)


def next_visit(job: JobInput, status: dict[str, Any], now: datetime, cap: float) -> float | None:
    """Seconds until a pass is due without any watch event, or None when only events matter.

    Only two clocks exist: a pending stop's grace period and the stall watchdog (the time since the
    trainer's last heartbeat). Visiting early is harmless (the pass re-schedules itself); `cap` bounds
    the wait so a clock read from a stale cache entry is re-read at least that often.
    """
    if job.resolved is None or is_terminal(job, status):
        return None
    spec = job.resolved.spec
    waits: list[float] = []
    requested = parse_time(status.get("stopRequestedTime"))
    if requested and not status.get("stopEnforced"):
        waits.append((requested - now).total_seconds() + spec.early_stopping.stop_grace_period_seconds)
    timeout = spec.watchdog.stall_timeout_seconds
    if timeout and status.get("phase") == Phase.RUNNING and not status.get("stopEnforced"):
        marks = [m for m in (parse_time(status.get("lastHeartbeatTime")), parse_time(status.get("startTime"))) if m]
        waits.append((max(marks) - now).total_seconds() + timeout if marks else 0.0)
    if not waits:
        return None
    return min(cap, max(0.05, min(waits) + 0.05))


class Reconciler:
    def __init__(self, client: KubeClient, settings: Settings, cache: Cache | None = None,
                 queue: WorkQueue | None = None, clock: Callable[[], datetime] = _now):
        self.client, self.settings, self.clock = client, settings, clock
        self.cache = cache or Cache()
        self.queue = queue or WorkQueue(settings.retry_base_seconds, settings.retry_max_seconds)
        self.applier = Applier(client, self.cache, settings.apply_concurrency)
        # The last parsed input of the jobs seen most recently (their validated spec is reused), bounded:
        # one per job cost ~10 KiB each (tracemalloc; 10 MiB of RSS at 1,000 jobs), while the jobs whose
        # passes repeat (training ones, reporting every epoch) are few and stay in it; a job that drops out
        # is validated again on its next pass (~1 ms).
        self._inputs: OrderedDict[Key, JobInput] = OrderedDict()
        self._guard = threading.Lock()
        self._workers: list[threading.Thread] = []

    # -- the worker loop --------------------------------------------------------------------------------

    passes = 0

    def start(self, workers: int) -> None:
        self._workers += self.queue.start_workers(self.process, workers, "reconcile")

    def close(self) -> None:
        self.queue.shutdown()
        for t in self._workers:
            t.join(timeout=5)
        self.applier.close()

    def process(self, key: Key) -> str:
        """One pass with its bookkeeping: metrics, logs, backoff on failure, the next clock visit."""
        namespace, name = key
        started = time.perf_counter()
        self.passes += 1  # read by memory.MemoryTrimmer (a rough counter: an increment lost to a race is harmless)
        try:
            outcome = self._pass(key)
        except (ApiError, PassFailed) as err:
            delay = self.queue.backoff(key)
            outcome = Result("error")
            log.warning("reconcile of job %s/%s failed (%s); retrying in %.1f s", namespace, name, err, delay,
                        extra={"job": name, "namespace": namespace, "action": "reconcile", "result": "error"})
            self.queue.add_after(key, delay)
        except Exception:  # noqa: BLE001 - a bug must not kill the worker; the job is retried like an API error
            delay = self.queue.backoff(key)
            outcome = Result("error")
            log.exception("reconcile of job %s/%s crashed; retrying in %.1f s", namespace, name, delay,
                          extra={"job": name, "namespace": namespace, "action": "reconcile", "result": "error"})
            self.queue.add_after(key, delay)
        else:
            if outcome.result == "conflict":
                # Someone else's object holds a child's name; it may be deleted without any event we see.
                self.queue.add_after(key, self.queue.backoff(key))
            else:
                self.queue.forget(key)
            if outcome.requeue_after is not None:
                self.queue.add_after(key, outcome.requeue_after)
        metrics.RECONCILES.labels(result=outcome.result).inc()
        metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)
        return outcome.result

    def forget(self, key: Key) -> None:
        owned = self.cache.owned(key)
        self.applier.forget(key, [k for k in owned if k[0] != "Pod"])
        with self._guard:
            self._inputs.pop(key, None)
        self.queue.discard(key)
        metrics.PHASES.set(key, None)

    def _input(self, key: Key, ftj: dict[str, Any]) -> JobInput:
        """job_input, with the spec validated once per spec: most passes are triggered by children or by
        status writes (ours and the trainer's), which leave the parsed spec as it was."""
        with self._guard:
            previous = self._inputs.get(key)
        parsed = job_input_reusing(ftj, previous)
        with self._guard:
            self._inputs[key] = parsed
            self._inputs.move_to_end(key)
            while len(self._inputs) > PARSED_INPUTS_KEPT:
                self._inputs.popitem(last=False)
        return parsed

    def _observed(self, key: Key, job: JobInput) -> tuple[dict[Any, dict[str, Any]], dict[str, Any] | None,
                                                         list[dict[str, Any]]]:
        """The job's children from the cache: all of them, its Job (only if owned by this job) and its pods."""
        owned = self.cache.owned(key)
        if job.resolved is None:
            return owned, None, []
        job_obj = owned.get(("Job", names.batch_job_name(key[1])))
        if job_obj is not None and not diff.owned_by(job_obj, job.uid):
            job_obj = None  # a Job of an earlier FineTuneJob with this name, or someone else's
        return owned, job_obj, [o for (kind, _), o in sorted(owned.items()) if kind == "Pod"]

    def _desired(self, job: JobInput, enforced: bool) -> list[dict[str, Any]]:
        # Built again each pass (~1 ms) rather than kept per job: the copies of 1,000 jobs' pod templates
        # cost more memory than the passes cost CPU (passes are rare once jobs run).
        return desired_children(job.resolved, self.settings, enforced_stop=enforced)

    # -- one pass ---------------------------------------------------------------------------------------

    def _pass(self, key: Key) -> Result:
        namespace, name = key
        ftj = self.cache.ftj(key)
        if ftj is None or (ftj.get("metadata") or {}).get("deletionTimestamp"):
            self.forget(key)
            return Result("gone")
        job = self._input(key, ftj)
        status = job.status
        now = self.clock()
        if is_terminal(job, status):
            metrics.PHASES.set(key, status.get("phase"))
            return Result("ok")

        owned, job_obj, pods = self._observed(key, job)
        new, events = observe(job, status, job_obj, pods, now)

        outcome = None
        claim_refusal: str | None = None
        again = False  # what decided the children changed when they were observed again: one more pass
        if job.resolved is not None:
            enforced = bool(new.get("stopEnforced"))
            wanted = self._desired(job, enforced)
            if spec_change_refused(new):
                # The running job keeps its children: only the Job's mutable fields follow (suspend, our stops),
                # with the node count it was started with.
                wanted = [w for w in wanted if w["kind"] == "Job"] if job_obj is not None else []
                for w in wanted:
                    w["spec"] = {**w["spec"], "parallelism": (job_obj.get("spec") or {}).get("parallelism",
                                                                                           w["spec"]["parallelism"])}
            claim_refusal = self._claim_refusal(job, owned, ftj) if job_obj is None else None
            if claim_refusal is not None:
                # An earlier job's output: no pod may mount it, and the claim is not touched (not even its metadata).
                wanted = [w for w in wanted if w["kind"] not in ("Job", "PersistentVolumeClaim")]
            started = diff.job_started(job_obj, len(pods), status)
            plans = self.applier.plans(key, wanted, job.uid, started)
            if status.get("phase") and any(p.action is diff.Action.CREATE for p in plans) and not self._still_there(key, job):
                self.forget(key)
                return Result("gone")
            outcome = self.applier.run(key, plans, job.uid)
            if outcome.errors:
                raise PassFailed("; ".join(str(e) for e in outcome.errors[:3]))
            if outcome.wrote:
                # Observe again what the API answered (the cache holds the answers), so this pass's status is the
                # one a second pass would write: a new Job's suspend, a re-created Job. Once, not one more pass
                # per written job: that was half the operator's passes while creating jobs.
                owned, job_obj, pods = self._observed(key, job)
                new, events = observe(job, status, job_obj, pods, now)
                again = bool(new.get("stopEnforced")) != enforced
                pending = [e for e in events if new.get("phase") == Phase.PENDING and e.reason == new.get("reason")]
                if "Job" in outcome.created and pending:
                    # One Event says what the operator made and what the job waits for (`kubectl describe`), in
                    # place of the Pending phase's own (one write per new job, not two). A job created suspended
                    # keeps its JobSuspended Event alone.
                    events = [Event("Normal", Reason.CREATED,
                                    f"{_words(outcome)}training Job {new.get('jobName')}; {new.get('message')}"),
                              *(e for e in events if e not in pending)]
            if outcome.conflicts:
                what = ", ".join(outcome.conflicts)
                new["conditions"] = set_condition(
                    new["conditions"], Condition.READY, False, Reason.CHILD_NOT_OWNED,
                    f"{what} exists and is not owned by this FineTuneJob: the operator does not touch it; delete or "
                    "rename it, or rename the FineTuneJob", now, job.generation)
                _keep_transition_time(status, new, Condition.READY)
            if claim_refusal is not None:
                new["conditions"] = set_condition(new["conditions"], Condition.READY, False, Reason.OUTPUT_CLAIM_IN_USE,
                                                  claim_refusal, now, job.generation)
                _keep_transition_time(status, new, Condition.READY)

        patch = status_patch(status, new)
        if patch:
            self.cache.writing(key, *FTJ_WRITE)
            try:
                answer = patch_status(self.client, namespace, name, patch)
                if answer:
                    self.cache.put_ftj(answer, answer=True)
            finally:
                # Someone else's change that arrived while the status was written queued nothing: pass again.
                again = self.cache.written(key, *FTJ_WRITE) or again
            if (patch.get("timings") or {}).get("podStartSeconds") is not None:
                metrics.POD_START.observe(patch["timings"]["podStartSeconds"])
        if outcome is not None and outcome.conflicts and patch.get("conditions"):
            events = [*events, _conflict_event(outcome.conflicts)]
        if claim_refusal is not None and patch.get("conditions"):
            events = [*events, Event("Warning", Reason.OUTPUT_CLAIM_IN_USE, claim_refusal)]
        for ev in events:
            post_event(self.client, ftj, ev.type, ev.reason, ev.message)
            self._count(ev.reason)
        if patch.get("restarts") and (new.get("lastRestart") or {}).get("reason"):
            # Counted once per restart the status records (a folded failure adds none).
            metrics.GROUP_RESTARTS.labels(reason=new["lastRestart"]["reason"]).inc(
                int(new["restarts"]) - int(status.get("restarts") or 0))
        metrics.PHASES.set(key, new.get("phase"))

        wrote = bool(outcome and outcome.wrote)
        if wrote or patch:
            log.info("job %s/%s: %s%s", namespace, name, _words(outcome) if outcome else "",
                     f"phase {new.get('phase')} ({new.get('reason')})",
                     extra={"job": name, "namespace": namespace, "action": "reconcile",
                            "phase": new.get("phase"), "reason": new.get("reason")})
        merged = {**status, **{k: v for k, v in new.items() if v is not None}}
        visit = next_visit(job, merged, now, self.settings.resync_seconds)
        if again or (outcome is not None and outcome.found):
            # Children found that were not cached yet (a 409 on create): one more pass compares them. Written ones
            # were observed again above, and the watch echoes of our own writes trigger nothing (the cache had them).
            visit = 0.0
        if new.get("reason") == Reason.INVALID_SPEC:
            return Result("invalid", visit)
        if (outcome is not None and outcome.conflicts) or claim_refusal is not None:
            return Result("conflict", visit)
        return Result("changed" if (wrote or patch) else "ok", visit)

    def _claim_refusal(self, job: JobInput, owned: dict[Any, dict[str, Any]], ftj: dict[str, Any]) -> str | None:
        """The message when the job's retained output claim is an earlier job's and reuse was not asked for."""
        if job.resolved is None or not creates_output_pvc(job.resolved):
            return None
        claim_name = names.output_pvc_name(job.name)
        claim = owned.get(("PersistentVolumeClaim", claim_name))
        check = check_claim(claim, job.uid, (ftj.get("metadata") or {}).get("creationTimestamp"),
                            reuse=job.resolved.spec.output.reuse_retained_claim)
        if check.verdict is Verdict.ADOPTED:
            log.info("job %s/%s: reusing the retained output claim %s of an earlier job (%s), as "
                     "spec.output.reuseRetainedClaim asks", job.namespace, job.name, claim_name, check.earlier_uid,
                     extra={"job": job.name, "namespace": job.namespace, "action": "adopt-claim"})
        return refusal_message(claim_name, job.namespace, job.name, check) if check.refused else None

    def _still_there(self, key: Key, job: JobInput) -> bool:
        """A live read of the FineTuneJob before re-creating a child it had (its status says a pass ran): when
        the job is deleted, the garbage collector's DELETED events for its children can arrive before the job's
        own (separate watch streams), and a pass reading the cache would re-create the children of a deleted
        job, whose Job then starts pods until the collector catches up (found by the kill drill). One GET, only
        in passes that create; never in steady state. A LIST by name: the operator's RBAC grants list, not get."""
        listed = self.client.get(collection_path(c.API_VERSION, c.PLURAL, key[0]),
                                 {"fieldSelector": f"metadata.name={key[1]}"}) or {}
        live = next(iter(listed.get("items") or []), None)
        if live is None or (live.get("metadata") or {}).get("uid") != job.uid or (live.get("metadata") or {}).get("deletionTimestamp"):
            log.info("job %s/%s is gone: not re-creating its children", key[0], key[1],
                     extra={"job": key[1], "namespace": key[0], "action": "reconcile", "result": "gone"})
            if live is None:
                self.cache.drop_ftj(key)
            return False
        return True

    @staticmethod
    def _count(reason: str) -> None:
        if reason in (Reason.PATIENCE_EXHAUSTED, Reason.USER_REQUESTED, Reason.NAN_LOSS, Reason.METRIC_MISSING):
            metrics.EARLY_STOPS.labels(reason=reason).inc()
        elif reason == Reason.STALLED:
            metrics.STALLED.inc()
        elif reason == Reason.STOP_ENFORCED:
            metrics.ENFORCED.inc()


def _validated_part(obj: dict[str, Any]) -> tuple[Any, ...]:
    """What validate_manifest reads: everything but the status and the metadata it ignores."""
    meta = obj.get("metadata") or {}
    return (sorted(k for k in obj if k != "status"), obj.get("apiVersion"), obj.get("kind"), meta.get("name"), meta.get("namespace"),
            meta.get("uid"), obj.get("spec"))


def job_input_reusing(obj: dict[str, Any], previous: JobInput | None) -> JobInput:
    """job_input(obj), reusing `previous`'s validated spec when what validation reads is unchanged (the same
    object, spec and all): validating through pydantic costs milliseconds, the comparison microseconds."""
    if previous is not None and previous.validated_from is not None and previous.validated_from == _validated_part(obj):
        fresh = job_input(obj, validate=False)
        return dataclasses.replace(fresh, resolved=previous.resolved, problems=previous.problems,
                                   validated_from=previous.validated_from)
    return dataclasses.replace(job_input(obj), validated_from=_validated_part(obj))


def _keep_transition_time(status: dict[str, Any], new: dict[str, Any], type_: str) -> None:
    """A condition overridden after observe() keeps the stored lastTransitionTime while its status holds
    (otherwise every pass would rewrite the status)."""
    stored = find(list(status.get("conditions") or []), type_)
    conds = new.get("conditions") or []
    cond = find(conds, type_)
    if stored and cond and stored.get("status") == cond.get("status"):
        new["conditions"] = [{**x, "lastTransitionTime": stored.get("lastTransitionTime")} if x is cond else x
                             for x in conds]


def _conflict_event(conflicts: list[str]):
    from ..plan.status import Event

    return Event("Warning", Reason.CHILD_NOT_OWNED,
                 f"{', '.join(conflicts)} exists and is not owned by this FineTuneJob; it was left alone")


def _words(outcome: Any) -> str:
    parts = []
    for verb, kinds in (("created", outcome.created), ("applied", outcome.applied), ("re-created", outcome.recreated)):
        if kinds:
            parts.append(f"{verb} {', '.join(kinds)}")
    return "; ".join(parts) + ("; " if parts else "")
