"""Observed state -> the FineTuneJob's new status and the Events to post. Pure.

`observe` is the whole phase machine: Pending -> Running -> Succeeded/Failed, Suspended; failure reasons
read from the Job and its pods; refused changes of fields fixed after start; stop requests (early-stopping
policy or the user), their enforcement after the grace period, and the stall watchdog. It returns only
the operator-owned status fields (docs/contracts.md), so the trainer's fields are never overwritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finetune_contract.config import EXIT_NOT_RETRYABLE, FailureReason

from ..api import constants as c
from ..api.constants import Condition, Phase, Reason
from ..api.sweep import PRUNED, STOP_MESSAGE_ANNOTATION, STOP_REASON_ANNOTATION
from ..api.validation import (
    LEGACY_IMMUTABLE_FIELDS,
    MUTABLE_AFTER_START,
    InvalidFineTuneJob,
    Problem,
    ResolvedJob,
    immutable_groups,
    immutable_hash,
    immutable_values,
    validate_manifest,
)
from ..policy import early_stopping
from . import names
from .conditions import find, is_true, parse_time, rfc3339, set_condition

OPERATOR_FIELDS = (
    "observedGeneration", "phase", "reason", "message", "conditions", "jobName", "startTime", "completionTime",
    "stopRequestedTime", "stopReason", "stopEnforced", "stopEnforcedReason", "epochsSaved", "specHash", "stopDecidedBy",
    "restarts", "lastRestart", "restartedPods",
)
# Job-level reasons the Job controller writes on its Failed condition, mapped to our constants.
JOB_FAILURE_REASONS = {"BackoffLimitExceeded": Reason.BACKOFF_LIMIT, "DeadlineExceeded": Reason.DEADLINE,
                       "PodFailurePolicy": Reason.FAILED_BY_POLICY}
# Group restarts (docs/multi-node.md). One lost pod can end others (pod 0 hosts the rendezvous): failures this close
# after a counted restart are folded into it. A rank that fails the same way this many times in a row stops the job.
RESTART_FOLD_SECONDS = 30
REPEATED_FAILURE_LIMIT = 3
RESTARTED_PODS_KEPT = 32  # status.restartedPods' maxItems
IMAGE_PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class JobInput:
    """The FineTuneJob as the plan needs it: validated (or the problems), plus what is not in the spec."""

    name: str
    namespace: str
    uid: str | None
    generation: int | None
    resolved: ResolvedJob | None
    problems: tuple[Problem, ...] = ()
    stop_annotation: bool = False
    status: dict[str, Any] = field(default_factory=dict)
    # A sweep's pruner stops its trial through the stop annotation, saying why (issue 14): (reason, message).
    stop_by_sweep: tuple[str, str] | None = None
    created: str | None = None  # metadata.creationTimestamp: where the apply-to-first-step clock starts
    # What `resolved`/`problems` were validated from (the reconciler's key for reusing them); None: unknown.
    validated_from: Any = field(default=None, compare=False, repr=False)


def job_input(obj: dict[str, Any], validate: bool = True) -> JobInput:
    """The pass's view of a FineTuneJob; `validate=False` leaves resolved/problems empty (the caller fills
    them from an earlier validation of the same spec)."""
    meta = obj.get("metadata") or {}
    name, namespace = meta.get("name", ""), meta.get("namespace") or "default"
    resolved, problems = None, ()
    if validate:
        try:
            resolved = validate_manifest(obj)
        except InvalidFineTuneJob as err:
            problems = tuple(err.problems)
    annotation = str((meta.get("annotations") or {}).get(c.Annotation.STOP, "")).lower() == "true"
    ann = meta.get("annotations") or {}
    by_sweep = None
    if annotation and ann.get(STOP_REASON_ANNOTATION) == PRUNED:
        by_sweep = (PRUNED, str(ann.get(STOP_MESSAGE_ANNOTATION) or "pruned by its sweep"))
    return JobInput(name, namespace, meta.get("uid"), meta.get("generation"), resolved, problems, annotation,
                    dict(obj.get("status") or {}), by_sweep, meta.get("creationTimestamp"))


# -- fields fixed after start ------------------------------------------------------------------------------

FINGERPRINT_PREFIX = "v2/"
SPEC_HASH_MAX = 253  # status.specHash's maxLength in the CRD (an older CRD may still be installed)


# json.dumps(data, sort_keys=True, default=str) byte for byte (the digests are stored in status.specHash), without
# building an encoder per call as json.dumps does when given keyword arguments.
_SORTED = json.JSONEncoder(sort_keys=True, default=str)


def _digest(data: Any, n: int) -> str:
    return hashlib.sha256(_SORTED.encode(data).encode()).hexdigest()[:n]


@functools.cache
def _path_digest(path: str) -> str:
    return _digest(path, 3)  # the paths are a fixed set: hashed once per process


def _token(path: str, value: Any) -> str:
    return _path_digest(path) + _digest(value, 2)


def _user_spec(job: ResolvedJob | Any) -> Any:
    return getattr(job, "user_spec", None) or getattr(job, "spec", job)


def _fixed_values(job: ResolvedJob | Any) -> dict[str, Any]:
    # A resolved job keeps its values (every pass compares them); a bare spec (tests, old callers) computes them.
    return job.fixed_values if isinstance(job, ResolvedJob) else immutable_values(_user_spec(job))


def spec_fingerprint(job: ResolvedJob | Any) -> str:
    """status.specHash: `v2/<hash of every fixed field>/<token per field>`, over the spec as the user wrote it.

    Each token is 3 hex of the field's path + 2 of its value, for the fields that differ from their default, so a
    refusal names the changed fields, and a field a newer operator adds (with its default) changes nothing. The
    hash decides; the tokens only name. They are dropped when the whole would exceed the CRD's maxLength."""
    if isinstance(job, ResolvedJob):
        # Kept with the resolved job, like its fixed values (api/validation.py): two JSON encodings and two hashes per
        # field, and every pass compares it (measured: 160 json.dumps per pass, ~0.3 ms of a new job's creation).
        # A frozen dataclass's __dict__ may be written directly, as functools.cached_property does.
        cached = job.__dict__.get("_spec_fingerprint")
        if cached is None:
            cached = job.__dict__["_spec_fingerprint"] = _fingerprint(_fixed_values(job))
        return cached
    return _fingerprint(_fixed_values(job))


def _fingerprint(values: dict[str, Any]) -> str:
    whole = _digest(sorted(values.items()), 12)
    tokens = "".join(sorted(_token(k, v) for k, v in values.items()))
    fingerprint = f"{FINGERPRINT_PREFIX}{whole}/{tokens}"
    return fingerprint if len(fingerprint) <= SPEC_HASH_MAX else f"{FINGERPRINT_PREFIX}{whole}/"


def _legacy_digest(spec: Any, key: str) -> str:
    value = getattr(spec, key)
    data = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:6]


def changed_immutable_fields(old: str, job: ResolvedJob | Any) -> list[str]:
    """The `spec.` paths of fixed fields that differ from the fingerprint `old`; [] when nothing fixed changed."""
    if not old.startswith(FINGERPRINT_PREFIX):
        # A fingerprint of release 0.1.0 (model, task, dataset, distributed of the resolved spec).
        resolved = getattr(job, "spec", job)
        if old.split("/")[0] == immutable_hash(resolved):
            return []
        parts = old.split("/")[1].split(".") if "/" in old else []
        if len(parts) != len(LEGACY_IMMUTABLE_FIELDS):
            return [f"spec.{k}" for k in LEGACY_IMMUTABLE_FIELDS]
        return [f"spec.{k}" for k, d in zip(LEGACY_IMMUTABLE_FIELDS, parts, strict=True) if d != _legacy_digest(resolved, k)]
    _, whole, tokens = (old.split("/", 2) + ["", ""])[:3]
    if whole == spec_fingerprint(job).split("/")[1]:
        return []
    values = _fixed_values(job)
    old_tokens = {tokens[i:i + 5] for i in range(0, len(tokens) - 4, 5)}
    now = {k: _token(k, v) for k, v in values.items()}
    changed = []
    for path in immutable_groups():
        prefix = _digest(path, 3)
        if path in now:
            if now[path] not in old_tokens:
                changed.append(path)
        elif any(t.startswith(prefix) and t not in now.values() for t in old_tokens):
            changed.append(path)  # set before, back to its default now
    if not changed:
        return ["spec (a field fixed after start; see docs/api-reference.md)"]
    return [f"spec.{p}" for p in changed]


def is_legacy_fingerprint(value: str) -> bool:
    return not value.startswith(FINGERPRINT_PREFIX)


# -- reading the Job and its pods ----------------------------------------------------------------------------

def _job_condition(job_obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((job_obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def _container_states(pod: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(kind, state) pairs of every container: kind is waiting/terminated/running, current and last."""
    out = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        for key in ("state", "lastState"):
            for kind, state in (cs.get(key) or {}).items():
                out.append((kind, state or {}))
    return out


def _pod_name(pod: dict[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("name", "?")


def failure_from_pods(pods: list[dict[str, Any]], spec: Any) -> tuple[str, str] | None:
    """The most specific failure the pods show, as (reason, message a user can act on)."""
    for pod in pods:
        for kind, state in _container_states(pod):
            if kind == "terminated" and state.get("reason") == "OOMKilled":
                limit = spec.resources.limits.get("memory") if spec else None
                return Reason.OOM_KILLED, (
                    f"pod {_pod_name(pod)} ran out of memory (OOMKilled"
                    f"{f', memory limit {limit}' if limit else ''}): lower spec.hyperparameters.batchSize "
                    "(or unset it so the trainer finds one that fits), enable LoRA, or raise spec.resources.limits.memory"
                )
    for pod in pods:
        for kind, state in _container_states(pod):
            trainer = trainer_failure(state.get("message")) if kind == "terminated" else None
            if trainer is not None:
                return trainer[0], (f"{trainer[1]} (pod {_pod_name(pod)}, exit code {state.get('exitCode')}; "
                                    "a restarted pod would fail the same way)")
    for pod in pods:
        for kind, state in _container_states(pod):
            if kind == "terminated" and state.get("exitCode") not in (0, None):
                detail = state.get("message") or state.get("reason") or ""
                return Reason.POD_FAILED, (
                    f"pod {_pod_name(pod)} exited with code {state.get('exitCode')}"
                    f"{': ' + detail.strip()[-300:] if detail else ''}; see `kubectl logs {_pod_name(pod)}`"
                )
    return None


def trainer_failure(message: str | None) -> tuple[str, str] | None:
    """(reason, message) of the trainer's termination message for a failure a restart cannot fix
    (finetune_trainer.failures: one JSON object), None for anything else (a log tail, a signal)."""
    if not message or not message.lstrip().startswith("{"):
        return None
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or parsed.get("reason") not in FailureReason.ALL:
        return None
    return str(parsed["reason"]), str(parsed.get("message") or parsed["reason"])[:2000]


def image_pull_problem(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    for pod in pods:
        for kind, state in _container_states(pod):
            if kind == "waiting" and state.get("reason") in IMAGE_PULL_REASONS:
                return Reason.IMAGE_PULL, (
                    f"pod {_pod_name(pod)} cannot pull its image ({state.get('reason')}: "
                    f"{(state.get('message') or '').strip()[:300]}): check spec.image (or the operator's trainer image) "
                    "and the registry's pull secret"
                )
    return None


def scheduling_problem(pods: list[dict[str, Any]]) -> str | None:
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("message"):
                return f"pod {_pod_name(pod)} cannot be scheduled: {cond['message']}"
    return None


def _running_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pods if (p.get("status") or {}).get("phase") == "Running" and not (p.get("metadata") or {}).get("deletionTimestamp")]


# -- group restarts ------------------------------------------------------------------------------------------------

def _index(pod: dict[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index") or \
        (meta.get("labels") or {}).get("batch.kubernetes.io/job-completion-index")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def pod_failure(pod: dict[str, Any], spec: Any = None) -> dict[str, Any] | None:
    """A failed training pod as a status.lastRestart record (None unless the pod failed): cause, exit code, whether
    it is charged to spec.backoffLimit (the Job's podFailurePolicy ignores DisruptionTarget pods)."""
    status = pod.get("status") or {}
    if status.get("phase") != "Failed":
        return None
    name, rank = _pod_name(pod), _index(pod)
    terminated = [state for kind, state in _container_states(pod) if kind == "terminated"]
    code = next((t.get("exitCode") for t in terminated if t.get("exitCode") not in (0, None)), None)
    when = max((t.get("finishedAt") or "" for t in terminated), default="") or None
    disruption = next((c for c in status.get("conditions") or []
                       if c.get("type") == "DisruptionTarget" and c.get("status") == "True"), None)
    who = f"pod {name} (node rank {rank})" if rank is not None else f"pod {name}"
    if disruption is not None:
        why = disruption.get("reason") or "DisruptionTarget"
        reason, charged = Reason.DISRUPTED, False
        message = (f"{who} was disrupted ({why}{': ' + disruption['message'] if disruption.get('message') else ''}); "
                   "not charged to spec.backoffLimit")
        when = when or disruption.get("lastTransitionTime")
    elif any(t.get("reason") == "OOMKilled" for t in terminated):
        limit = spec.resources.limits.get("memory") if spec is not None else None
        reason, charged = Reason.OOM_KILLED, True
        message = (f"{who} ran out of memory (OOMKilled{f', memory limit {limit}' if limit else ''}, exit code {code})")
    elif status.get("reason") == "Evicted":
        reason, charged = Reason.EVICTED, True
        message = f"{who} was evicted by its node: {(status.get('message') or '').strip()[:300]}"
    else:
        detail = next((t.get("message") or "" for t in terminated if t.get("message")), "")
        reason, charged = Reason.POD_ERROR, True
        message = f"{who} exited with code {code}{': ' + detail.strip()[-300:] if detail else ''}"
    return {"time": when, "reason": reason, "pod": name, "nodeRank": rank, "exitCode": code, "charged": charged,
            "message": message}


def _signature(record: dict[str, Any]) -> tuple[Any, ...]:
    return record.get("nodeRank"), record.get("reason"), record.get("exitCode")


def _account_restarts(p: _Pass, spec: Any, pods: list[dict[str, Any]]) -> bool:
    """Count each failed training pod once (status.restartedPods) as a group restart, with its cause in
    status.lastRestart; failures within RESTART_FOLD_SECONDS after the last counted one are the same restart. True
    when the job must stop: the same rank failed the same way REPEATED_FAILURE_LIMIT times in a row (not for
    disruptions, which are not the job's fault)."""
    if p.st.get("stopEnforced") or spec.suspend:
        return False  # pods the operator (or the user's suspend) stopped are no failures
    seen = list(p.st.get("restartedPods") or [])
    new = []
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp") or _pod_name(pod) in seen:
            continue
        record = pod_failure(pod, spec)
        # An exit code no restart can fix fails the Job at once (its podFailurePolicy): an outcome, not a restart.
        if record is not None and record.get("exitCode") not in EXIT_NOT_RETRYABLE:
            new.append(record)
    if not new:
        return False
    last = dict(p.st.get("lastRestart") or {})
    restarts = int(p.st.get("restarts") or 0)
    for record in sorted(new, key=lambda r: (r.get("time") or "", r["pod"])):
        seen.append(record["pod"])
        last_time, this_time = parse_time(last.get("time")), parse_time(record.get("time"))
        folded = bool(last and last_time and this_time and 0 <= (this_time - last_time).total_seconds() <= RESTART_FOLD_SECONDS)
        if folded:
            continue  # another pod ended by the same loss (e.g. the rendezvous host): one group restart
        restarts += 1
        repeats = int(last.get("repeats") or 0) + 1 if last and _signature(last) == _signature(record) else 1
        last = {**record, "repeats": repeats}
        p.events.append(Event("Warning" if record["charged"] else "Normal", Reason.GROUP_RESTARTED,
                              f"group restart {restarts}: {record['message']}; every rank resumes from the last checkpoint"))
    p.st["restarts"], p.st["lastRestart"], p.st["restartedPods"] = restarts, last, seen[-RESTARTED_PODS_KEPT:]
    if last.get("charged") and int(last.get("repeats") or 0) >= REPEATED_FAILURE_LIMIT:
        p.st["stopEnforced"] = True  # suspend the Job: another restart would fail the same way
        hint = {Reason.OOM_KILLED: "lower spec.hyperparameters.batchSize (or unset it so the trainer finds one that "
                                   "fits), enable LoRA, or raise spec.resources.limits.memory",
                Reason.EVICTED: "raise the pods' requests (spec.resources.requests) so the node keeps them"}.get(
            last["reason"], f"see `kubectl logs {last['pod']}` for the rank's error")
        p.phase(Phase.FAILED, Reason.REPEATED_FAILURE,
                f"node rank {last.get('nodeRank')} failed {last['repeats']} times in a row the same way "
                f"({last['reason']}, exit code {last.get('exitCode')}): {last['message']}; {hint}", "Warning")
        return True
    return False


# -- the phase machine -------------------------------------------------------------------------------------------

@dataclass
class _Pass:
    """Working state of one observe() call."""

    job: JobInput
    now: datetime
    st: dict[str, Any]
    events: list[Event] = field(default_factory=list)

    def cond(self, type_: str, status: bool | str, reason: str, message: str) -> None:
        self.st["conditions"] = set_condition(self.st["conditions"], type_, status, reason, message, self.now, self.job.generation)

    def clear(self, type_: str, reason: str, message: str) -> None:
        """Set a condition False only if it exists (no noise on jobs that never had it)."""
        if find(self.st["conditions"], type_):
            self.cond(type_, False, reason, message)

    def phase(self, phase: str, reason: str, message: str, event_type: str = "Normal") -> None:
        changed = (self.st.get("phase"), self.st.get("reason")) != (phase, reason)
        self.st.update(phase=phase, reason=reason, message=message)
        for type_ in (Condition.RUNNING, Condition.SUSPENDED, Condition.SUCCEEDED, Condition.FAILED):
            own = {Condition.RUNNING: Phase.RUNNING, Condition.SUSPENDED: Phase.SUSPENDED,
                   Condition.SUCCEEDED: Phase.SUCCEEDED, Condition.FAILED: Phase.FAILED}[type_]
            if own == phase:
                self.cond(type_, True, reason, message)
            else:
                self.clear(type_, reason, f"phase is {phase}")
        if phase in Phase.TERMINAL and not self.st.get("completionTime"):
            self.st["completionTime"] = rfc3339(self.now)
        if changed:
            self.events.append(Event(event_type, reason, message))


def observe(
    job: JobInput,
    status: dict[str, Any],
    job_obj: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    now: datetime,
) -> tuple[dict[str, Any], list[Event]]:
    """The operator-owned status fields after this observation, and the Events for what changed."""
    st = {k: status.get(k) for k in OPERATOR_FIELDS}
    st["conditions"] = list(status.get("conditions") or [])
    p = _Pass(job, now, st)
    if is_terminal(job, status):
        return st, []
    st["observedGeneration"] = job.generation
    st["jobName"] = names.batch_job_name(job.name)

    if job.resolved is None:
        message = "; ".join(str(x) for x in job.problems)
        st["jobName"] = None
        p.cond(Condition.VALID, False, Reason.INVALID_SPEC, message)
        p.phase(Phase.FAILED, Reason.INVALID_SPEC, f"invalid spec: {message}", "Warning")
        return st, p.events
    p.cond(Condition.VALID, True, Reason.VALID, "spec is valid")
    spec = job.resolved.spec

    _check_immutable(p, job.resolved)
    _output_condition(p, spec)
    p.cond(Condition.READY, True, Reason.CREATED, f"children created; training Job {st['jobName']}")

    repeated = _account_restarts(p, spec, pods)
    if _finish_from_job(p, spec, job_obj, pods) or repeated:
        return st, p.events
    if _decide_stop(p, spec, pods, status):
        return st, p.events
    if _watchdog(p, spec, job_obj, pods, status):
        return st, p.events
    job_suspended = bool(((job_obj or {}).get("spec") or {}).get("suspend"))
    if st.get("stopRequestedTime") and st.get("stopEnforced") and not _running_pods(pods) and job_suspended:
        _finish_stopped(p, spec, status, enforced=True)
        return st, p.events
    _progress_phase(p, spec, job_obj, pods)
    return st, p.events


def is_terminal(job: JobInput, status: dict[str, Any]) -> bool:
    """Succeeded/Failed are final, except a rejected spec that the user has since edited."""
    if status.get("phase") not in Phase.TERMINAL:
        return False
    return not (status.get("reason") == Reason.INVALID_SPEC and job.generation != status.get("observedGeneration"))


def _check_immutable(p: _Pass, job: ResolvedJob) -> None:
    fingerprint = spec_fingerprint(job)
    old = p.st.get("specHash")
    if not old:
        p.st["specHash"] = fingerprint
        return
    changed = changed_immutable_fields(old, job)
    if changed:
        message = (
            f"{', '.join(changed)} cannot change after training started (the running trainer read its config once); "
            "the running job keeps its original settings. Revert the change, or delete and re-create the FineTuneJob "
            "to train with the new ones. Fields that may change: " + ", ".join(f"spec.{f}" for f in MUTABLE_AFTER_START)
        )
        if not is_true(p.st["conditions"], Condition.SPEC_CHANGE_REFUSED) or find(p.st["conditions"], Condition.SPEC_CHANGE_REFUSED).get("message") != message:
            p.events.append(Event("Warning", Reason.IMMUTABLE_FIELD, message))
        p.cond(Condition.SPEC_CHANGE_REFUSED, True, Reason.IMMUTABLE_FIELD, message)
    else:
        if is_legacy_fingerprint(old):
            p.st["specHash"] = fingerprint  # same job, started before an upgrade: keep the newer, wider fingerprint
        p.clear(Condition.SPEC_CHANGE_REFUSED, Reason.NO_CHANGE_REFUSED, "the spec matches the running job")


def _output_condition(p: _Pass, spec: Any) -> None:
    """Warn (condition and Event) when the output lives in an emptyDir, which is gone with the pod."""
    if not spec.output.ephemeral:
        p.clear(Condition.OUTPUT_EPHEMERAL, Reason.DURABLE_OUTPUT, "output is on a PersistentVolumeClaim")
        return
    if spec.output.uri:
        message = (f"spec.output.ephemeral: checkpoints live in an emptyDir and do not survive the pod, so a restarted pod "
                   f"starts over; the best model and result.json are uploaded to {spec.output.uri} when training ends")
    else:
        message = ("spec.output.ephemeral: the model, checkpoints and result.json live in an emptyDir and will not survive "
                   "the pod; unset ephemeral (the operator then keeps them on a PersistentVolumeClaim) or set output.uri")
    if not is_true(p.st["conditions"], Condition.OUTPUT_EPHEMERAL):
        p.events.append(Event("Warning", Reason.EPHEMERAL_OUTPUT, message))
    p.cond(Condition.OUTPUT_EPHEMERAL, True, Reason.EPHEMERAL_OUTPUT, message)


def spec_change_refused(status: dict[str, Any]) -> bool:
    return is_true(list(status.get("conditions") or []), Condition.SPEC_CHANGE_REFUSED)


def _best_words(status: dict[str, Any]) -> str:
    best, epoch = status.get("bestMetric"), status.get("bestEpoch")
    if best is None or epoch is None:
        return ""
    name = status.get("valMetricName") or "metric"
    return f"; best {name} {best:.4g} at epoch {epoch}" if isinstance(best, int | float) else ""


def _finish_stopped(p: _Pass, spec: Any, status: dict[str, Any], enforced: bool) -> None:
    user = p.st.get("stopReason", "") or ""
    by_user = p.st.get("stopDecidedBy") == "user" or user.startswith("stop requested by the user")
    reason = Reason.STOPPED_BY_USER if by_user else Reason.EARLY_STOPPED
    if p.st.get("stopDecidedBy") == "sweep":
        reason = PRUNED
    total, done = spec.hyperparameters.epochs, status.get("epoch")
    if isinstance(total, int) and isinstance(done, int):
        p.st["epochsSaved"] = max(0, total - done)
    how = (f"the operator suspended the Job: {p.st.get('stopEnforcedReason') or 'the trainer did not stop in time'}"
           if enforced else "the trainer stopped at the end of the epoch it decided at"
           if p.st.get("stopDecidedBy") == "trainer" else "the trainer stopped gracefully")
    ran = f" after {done} of {total} epochs" if isinstance(done, int) else ""
    words = {Reason.STOPPED_BY_USER: "stopped by the user", PRUNED: "pruned by its sweep"}.get(reason, "early stopped")
    p.phase(Phase.SUCCEEDED, reason, f"{words}"
            f"{ran} ({how}){_best_words(status)}; the best epoch's model is the final model")


def _finish_from_job(p: _Pass, spec: Any, job_obj: dict[str, Any] | None, pods: list[dict[str, Any]]) -> bool:
    status = p.job.status
    failed = _job_condition(job_obj, "Failed")
    if failed:
        reason = JOB_FAILURE_REASONS.get(failed.get("reason", ""), Reason.POD_FAILED)
        detail = failure_from_pods(pods, spec)
        if detail and (detail[0] in (Reason.OOM_KILLED, *FailureReason.ALL) or reason == Reason.POD_FAILED):
            reason, message = detail
        elif reason == Reason.FAILED_BY_POLICY:
            message = (f"{failed.get('message') or 'a pod failed with an exit code no restart can fix'} (the Job's "
                       "podFailurePolicy: exit code 2 is a world other than the job asks for, 3 a config this trainer image "
                       "cannot read); see the pod's log, fix spec.distributed or spec.image, then re-create the job")
        elif reason == Reason.DEADLINE:
            message = (f"the training Job ran longer than spec.activeDeadlineSeconds ({spec.active_deadline_seconds} s); "
                       "raise it, or train fewer epochs")
        else:
            message = (f"training pods failed {spec.backoff_limit + 1} time(s) (spec.backoffLimit {spec.backoff_limit})"
                       f"{': last failure: ' + detail[1] if detail else ''}")
        p.phase(Phase.FAILED, reason, message, "Warning")
        return True
    if _job_condition(job_obj, "Complete"):
        if p.st.get("stopRequestedTime") or _record_user_stop(p, spec, status) or _record_trainer_stop(p, status):
            _finish_stopped(p, spec, status, enforced=False)
            return True
        total, done = spec.hyperparameters.epochs, status.get("epoch")
        if isinstance(total, int) and isinstance(done, int) and done < total:
            # The trainer applies the same patience rule itself when it cannot reach the API.
            p.st["epochsSaved"] = total - done
            p.phase(Phase.SUCCEEDED, Reason.EARLY_STOPPED,
                    f"the trainer stopped early after {done} of {total} epochs{_best_words(status)}")
        else:
            p.phase(Phase.SUCCEEDED, Reason.COMPLETED, f"trained all {total} epochs{_best_words(status)}")
        return True
    return False


def _request_stop(p: _Pass, reason: str, message: str, *, by: str, at: str | None = None, epoch: Any = None) -> None:
    p.st["stopRequestedTime"] = at or rfc3339(p.now)
    p.st["stopReason"] = message
    p.st["stopDecidedBy"] = by
    epoch = p.job.status.get("epoch") if epoch is None else epoch
    p.cond(Condition.EARLY_STOP_REQUESTED, True, reason,
           f"{message}{f' (at epoch {epoch})' if epoch is not None else ''}; decided by the {by}")
    p.events.append(Event("Normal", reason, f"stop decided by the {by}: {message}"))


def _record_user_stop(p: _Pass, spec: Any, status: dict[str, Any]) -> bool:
    """A user's stop that no pass recorded before the Job completed: the trainer reads spec.stop and the stop
    annotation itself, so it can obey while the operator is down (found by the kill drill). Recorded now, the
    job ends StoppedByUser instead of looking early-stopped by the trainer; a run that finished every epoch
    anyway stays TrainingCompleted."""
    if p.st.get("stopRequestedTime") or not (spec.stop or p.job.stop_annotation):
        return False
    total, done = spec.hyperparameters.epochs, status.get("epoch")
    if isinstance(total, int) and isinstance(done, int) and done >= total:
        return False
    how = "spec.stop" if spec.stop else f"annotation {c.Annotation.STOP}"
    _request_stop(p, Reason.USER_REQUESTED, f"stop requested by the user ({how})", by="user")
    return True


def _record_trainer_stop(p: _Pass, status: dict[str, Any]) -> bool:
    """The trainer applied the early-stopping policy after its evaluation and reported the decision: record it
    as the job's one decision (the trainer stops at that epoch boundary by itself; nothing to request)."""
    if p.st.get("stopRequestedTime") or not status.get("trainerStopTime"):
        return False
    _request_stop(p, status.get("trainerStopReason") or Reason.PATIENCE_EXHAUSTED,
                  status.get("trainerStopMessage") or "the trainer's early-stopping policy", by="trainer",
                  at=status.get("trainerStopTime"), epoch=status.get("trainerStopEpoch"))
    return True


def _decide_stop(p: _Pass, spec: Any, pods: list[dict[str, Any]], status: dict[str, Any]) -> bool:
    """Record stop requests and enforce them; True when the pass is finished (failed by the policy)."""
    if not p.st.get("stopRequestedTime"):
        if p.job.stop_by_sweep and not spec.stop:
            _request_stop(p, p.job.stop_by_sweep[0], p.job.stop_by_sweep[1], by="sweep")
        elif spec.stop or p.job.stop_annotation:
            how = "spec.stop" if spec.stop else f"annotation {c.Annotation.STOP}"
            _request_stop(p, Reason.USER_REQUESTED, f"stop requested by the user ({how})", by="user")
        elif _record_trainer_stop(p, status):
            pass  # one decision: the trainer saw it first, where the metric was computed
        else:
            # A trainer that cannot decide (an older image, or one that lost the API and reports late): the same
            # policy on the same history, here.
            decision = early_stopping.decide(list(status.get("history") or []), early_stopping.Settings.from_spec(spec))
            if decision.fail:
                p.st["stopEnforced"] = True  # free the nodes now; there is nothing worth finishing
                p.cond(Condition.EARLY_STOP_REQUESTED, True, decision.reason, decision.message)
                p.phase(Phase.FAILED, decision.reason, decision.message, "Warning")
                return True
            if decision.stop:
                _request_stop(p, decision.reason, decision.message, by="operator")
    if p.st.get("stopRequestedTime") and not p.st.get("stopEnforced"):
        requested = parse_time(p.st["stopRequestedTime"]) or p.now
        grace = spec.early_stopping.stop_grace_period_seconds
        # Nothing to stop gracefully when no pod has started yet; a pod that finished is the trainer obeying.
        not_started = not _running_pods(pods) and not any((x.get("status") or {}).get("phase") == "Succeeded" for x in pods)
        if not_started or (p.now - requested).total_seconds() >= grace:
            p.st["stopEnforced"] = True
            words = ("no pod was running" if not_started
                     else f"the trainer did not stop within the grace period of {grace} s")
            p.st["stopEnforcedReason"] = words
            p.events.append(Event("Warning" if _running_pods(pods) else "Normal", Reason.STOP_ENFORCED,
                                  f"suspending training Job {p.st['jobName']}: {words}"))
    return False


def _watchdog(p: _Pass, spec: Any, job_obj: dict[str, Any] | None, pods: list[dict[str, Any]], status: dict[str, Any]) -> bool:
    """Fail a running job whose step counter stopped advancing for spec.watchdog.stallTimeoutSeconds.

    The trainer sends `lastHeartbeatTime` (with `step`) every heartbeatSeconds only while its step counter
    (training steps, evaluation batches, checkpoint saves) advances, so the heartbeat's age is the time since the
    last progress, whatever an epoch lasts: a hung step is caught within the timeout plus one heartbeat interval
    (plus one resync period of the operator), and a long healthy epoch never is.
    """
    timeout = spec.watchdog.stall_timeout_seconds
    if not timeout or p.st.get("phase") != Phase.RUNNING or not _running_pods(pods) or p.st.get("stopEnforced"):
        return False
    # The latest sign of progress: the trainer's heartbeat, or when the pods (re)started (a resumed Job resets its
    # startTime), so loading the model counts against the same timeout.
    marks = [parse_time(status.get("lastHeartbeatTime")), parse_time(p.st.get("startTime")),
             parse_time(((job_obj or {}).get("status") or {}).get("startTime"))]
    latest = max((m for m in marks if m), default=None)
    if latest is None or (p.now - latest).total_seconds() < timeout:
        return False
    step = status.get("step")
    message = (f"no progress for {int((p.now - latest).total_seconds())} s (spec.watchdog.stallTimeoutSeconds {timeout})"
               f"{f', step counter stuck at {step}' if step is not None else ''} while pods were running: a hung "
               "collective or data loader; the Job was suspended to free its nodes. Check the pods' logs, then "
               "re-create the job (it resumes from the last checkpoint on a PVC)")
    p.st["stopEnforced"] = True
    p.cond(Condition.STALLED, True, Reason.STALLED, message)
    p.phase(Phase.FAILED, Reason.STALLED, message, "Warning")
    return True


def _progress_phase(p: _Pass, spec: Any, job_obj: dict[str, Any] | None, pods: list[dict[str, Any]]) -> None:
    st = p.st
    if spec.suspend and not st.get("stopEnforced"):
        p.phase(Phase.SUSPENDED, Reason.JOB_SUSPENDED, "suspended (spec.suspend); set it to false to resume from the last checkpoint")
        return
    if st.get("phase") == Phase.SUSPENDED and st.get("reason") == Reason.JOB_SUSPENDED and not spec.suspend:
        p.events.append(Event("Normal", Reason.JOB_RESUMED, "resumed; training continues from the last checkpoint"))
    if job_obj is None:
        p.phase(Phase.PENDING, Reason.CREATED, f"created training Job {st['jobName']}; waiting for its pods")
        return
    running = _running_pods(pods)
    if st.get("stopRequestedTime") and st.get("stopEnforced"):
        p.phase(Phase.RUNNING, Reason.STOP_ENFORCED, f"stopping: the operator suspended training Job {st['jobName']}")
        return
    finished = [x for x in pods if (x.get("status") or {}).get("phase") == "Succeeded"]
    job_status = job_obj.get("status") or {}
    counted = int(job_status.get("active") or 0) + int(job_status.get("succeeded") or 0)
    # A job seen running stays Running while its Job still counts pods and none is cached: right after an
    # operator restart the Job can be in the cache before its pods are (separate watch streams; found by the
    # kill drill as Running -> Pending -> Running in the status history). Cached pods (a pending replacement
    # with a pull problem, say) are judged as they are.
    held = st.get("phase") == Phase.RUNNING and counted > 0 and not pods
    if running or finished or held:  # a finished pod before the Job's Complete condition: still the running job
        if not st.get("startTime"):
            st["startTime"] = rfc3339(p.now)
        _pod_start_timing(p, running + finished)
        nodes = spec.distributed.nodes
        p.phase(Phase.RUNNING, Reason.JOB_RUNNING, f"{max(len(running) + len(finished), counted)} of {nodes} pod(s) running or done")
        return
    pull = image_pull_problem(pods)
    if pull:
        p.phase(Phase.PENDING, pull[0], pull[1], "Warning")
        return
    unschedulable = scheduling_problem(pods)
    p.phase(Phase.PENDING, Reason.JOB_PENDING, unschedulable or f"waiting for the pods of training Job {st['jobName']}")


def _container_started(pod: dict[str, Any]) -> datetime | None:
    """When the pod's first container started running (the kubelet's time), else the pod's startTime."""
    times = []
    for kind, state in _container_states(pod):
        started = parse_time(state.get("startedAt")) if kind in ("running", "terminated") else None
        if started is not None:
            times.append(started)
    return min(times) if times else parse_time((pod.get("status") or {}).get("startTime"))


def _pod_start_timing(p: _Pass, pods: list[dict[str, Any]]) -> None:
    """status.timings.podStartSeconds, once: FineTuneJob created to its first trainer container running. Written as
    a merge patch of that one key, so the trainer's keys of the same object are never overwritten."""
    if (p.job.status.get("timings") or {}).get("podStartSeconds") is not None:
        return
    created = parse_time(p.job.created)
    started = [t for t in (_container_started(pod) for pod in pods) if t is not None]
    if created is None:
        return
    first = min(started) if started else p.now
    p.st["timings"] = {"podStartSeconds": round(max(0.0, (first - created).total_seconds()), 3)}


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Merge patch of the operator-owned fields that changed (None removes a field)."""
    return {k: v for k, v in new.items() if old.get(k) != v and not (v is None and k not in old)}
