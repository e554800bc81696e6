"""Writes of a FineTuneSweep's reconcile (issue 14): its status, its trial FineTuneJobs, their stops, Events.

A missing trial is created (POST, with the sweep as controller owner), never applied over an object of
that name another owner made (as kube/children.py does for a job's children); a 409 reads it once to tell
"ours, not cached yet" from "someone else's". A pruned trial is stopped by a merge patch of its stop
annotations only: a server-side apply of a partial object by the field manager that owns the trial's
spec would remove the spec fields it leaves out, and the annotation is the same graceful-stop path a
user takes (`finetune stop`).

Answers are stored in the sweep's own store of trials, never in the FineTuneJob cache: the FineTuneJob
handler treats a version already cached as the echo of the job reconciler's own write and would then
never reconcile the new trial.
"""

from __future__ import annotations

import logging
from typing import Any

from ..api import constants as c
from ..api import sweep as s
from .cache import SweepStore
from .client import MERGE_PATCH, ApiError, KubeClient, collection_path, object_path
from .events import post_event

log = logging.getLogger("finetune_operator.kube")


def sweep_path(namespace: str, name: str) -> str:
    return object_path(c.API_VERSION, s.SWEEP_PLURAL, namespace, name)


def patch_sweep_status(client: KubeClient, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
    return client.request("PATCH", sweep_path(namespace, name) + "/status", body={"status": patch}, content_type=MERGE_PATCH)


def create_trial(client: KubeClient, trials: SweepStore, manifest: dict[str, Any], sweep_uid: str | None) -> str:
    """"created", "found" (ours, now cached) or "conflict" (another owner's FineTuneJob has the name)."""
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    try:
        answer = client.request("POST", collection_path(c.API_VERSION, c.PLURAL, ns), body=manifest)
        trials.put(answer or manifest)
        return "created"
    except ApiError as err:
        if not err.conflict:
            raise
    existing = client.get(object_path(c.API_VERSION, c.PLURAL, ns, name))
    if existing is None:
        raise ApiError(409, "Conflict", f"FineTuneJob {name} is being deleted")
    if not any(r.get("uid") == sweep_uid for r in (existing.get("metadata") or {}).get("ownerReferences") or []):
        return "conflict"
    trials.put(existing)
    return "found"


def stop_trial(client: KubeClient, trials: SweepStore, namespace: str, name: str, message: str) -> None:
    body = {"metadata": {"annotations": {c.Annotation.STOP: "true", s.STOP_REASON_ANNOTATION: s.PRUNED,
                                         s.STOP_MESSAGE_ANNOTATION: message[:1024]}}}
    answer = client.request("PATCH", object_path(c.API_VERSION, c.PLURAL, namespace, name), body=body,
                            content_type=MERGE_PATCH)
    if answer:
        trials.put(answer)


def sweep_event(client: KubeClient, sweep: dict[str, Any], type_: str, reason: str, message: str) -> None:
    post_event(client, sweep, type_, reason, message, kind=s.SWEEP_KIND)
