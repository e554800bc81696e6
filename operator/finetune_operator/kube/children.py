"""Writes of a FineTuneJob's children: create when missing, server-side apply when they differ, else nothing.

The decision is kube/diff.py's (pure); this module sends it. Server-side apply (`PATCH
application/apply-patch+yaml`, field manager `finetune-operator`, `force=true`) of the whole desired object
is what Kubeflow Trainer and JobSet do: drift in any field we set is repaired and a new template rolls
out. A missing child is *created* (POST), not applied, because an apply would silently take over an
object with our name that another owner made and our label-selected watch cannot see; a 409 then reads
that object once (GET) to tell "ours, not yet in the cache" from "someone else's" (reported, never touched).

Generic over kinds: `PLURALS` maps every kind the plan may produce to its resource.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import diff
from .cache import Cache, JobKey
from .client import APPLY_PATCH, ApiError, KubeClient, collection_path, object_path

log = logging.getLogger("finetune_operator.kube")

PLURALS = {
    "ConfigMap": "configmaps",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Job": "jobs",
}
# (apiVersion, plural) of every kind the operator watches for its children (handlers/kopf_handlers.py).
WATCHED = {
    "ConfigMap": ("v1", "configmaps"),
    "Service": ("v1", "services"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": ("batch/v1", "jobs"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "Pod": ("v1", "pods"),
}


def paths(manifest: dict[str, Any]) -> tuple[str, str]:
    meta = manifest["metadata"]
    plural = PLURALS[manifest["kind"]]
    return (collection_path(manifest["apiVersion"], plural, meta["namespace"]),
            object_path(manifest["apiVersion"], plural, meta["namespace"], meta["name"]))


@dataclass
class Outcome:
    """What one pass did to a job's children (for status, logs and Events)."""

    created: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # "Kind name" of objects another owner made
    found: list[str] = field(default_factory=list)  # ours, existed but not yet cached: compare next pass
    errors: list[ApiError] = field(default_factory=list)

    @property
    def wrote(self) -> bool:
        return bool(self.created or self.applied or self.recreated)


class Applier:
    """Sends the plans of one job's children, at most `concurrency` at a time across all jobs."""

    def __init__(self, client: KubeClient, cache: Cache, concurrency: int):
        self.client, self.cache = client, cache
        self.pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="apply")
        self._remembered: dict[tuple[str, str, str], tuple[str, str]] = {}  # (kind, ns, name) -> (uid, digest)
        self._guard = threading.Lock()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def forget(self, job: JobKey, names: list[tuple[str, str]]) -> None:
        with self._guard:
            for kind, name in names:
                self._remembered.pop((kind, job[0], name), None)

    def _recall(self, kind: str, ns: str, observed: dict[str, Any] | None) -> str | None:
        if observed is None:
            return None
        with self._guard:
            got = self._remembered.get((kind, ns, observed["metadata"]["name"]))
        return got[1] if got and got[0] == observed["metadata"].get("uid") else None

    def _store(self, job: JobKey, sent: dict[str, Any], answer: dict[str, Any] | None) -> dict[str, Any]:
        obj = answer or sent
        meta = obj.get("metadata") or {}
        if answer:
            with self._guard:
                self._remembered[(sent["kind"], job[0], meta.get("name", ""))] = (meta.get("uid", ""), diff.remember(sent, answer))
        self.cache.put_child(sent["kind"], obj, job, answer=bool(answer))
        return obj

    def plans(self, job: JobKey, wanted: list[dict[str, Any]], owner_uid: str | None, started: bool) -> list[diff.Plan]:
        owned = self.cache.owned(job)
        out = []
        for manifest in wanted:
            observed = owned.get((manifest["kind"], manifest["metadata"]["name"]))
            out.append(diff.plan(manifest, observed, owner_uid, started=started and manifest["kind"] == "Job",
                                 remembered=self._recall(manifest["kind"], job[0], observed)))
        return out

    def run(self, job: JobKey, plans: list[diff.Plan], owner_uid: str | None) -> Outcome:
        """Send every plan that needs a request; the Job after the rest when it is created, so its pods
        find their ServiceAccount, ConfigMap and Service (a pod created without them fails to start)."""
        outcome = Outcome()
        for p in plans:
            if p.action is diff.Action.CONFLICT:
                outcome.conflicts.append(f"{p.manifest['kind']} {p.manifest['metadata']['name']}")
        todo = [p for p in plans if p.action in (diff.Action.CREATE, diff.Action.APPLY, diff.Action.RECREATE)]
        if not todo:
            return outcome
        first = [p for p in todo if not (p.manifest["kind"] == "Job" and p.action is not diff.Action.APPLY)]
        last = [p for p in todo if p not in first]
        for batch in (first, last):
            if len(batch) == 1:
                self._one(job, batch[0], owner_uid, outcome)
            else:
                for f in [self.pool.submit(self._one, job, p, owner_uid, outcome) for p in batch]:
                    f.result()
            if outcome.errors:
                break  # a Job before its ServiceAccount would only produce failing pods
        return outcome

    def _one(self, job: JobKey, p: diff.Plan, owner_uid: str | None, outcome: Outcome) -> None:
        kind, name = p.manifest["kind"], p.manifest["metadata"]["name"]
        self.cache.writing(job, kind, name)
        try:
            if p.action is diff.Action.APPLY:
                self._apply(job, p.manifest)
                outcome.applied.append(kind)
            elif p.action is diff.Action.RECREATE:
                self._recreate(job, p.manifest)
                outcome.recreated.append(kind)
            else:
                result = self._create(job, p.manifest, owner_uid)
                {"created": outcome.created, "found": outcome.found}.get(result, outcome.conflicts).append(
                    kind if result != "conflict" else f"{kind} {name}")
        except ApiError as err:
            outcome.errors.append(err)
        finally:
            if self.cache.written(job, kind, name):
                outcome.found.append(kind)  # changed by someone else while we wrote it: compare next pass

    def _apply(self, job: JobKey, manifest: dict[str, Any]) -> dict[str, Any]:
        answer = self.client.request("PATCH", paths(manifest)[1], body=manifest, content_type=APPLY_PATCH,
                                     query={"force": "true"})
        return self._store(job, manifest, answer)

    def _create(self, job: JobKey, manifest: dict[str, Any], owner_uid: str | None) -> str:
        """"created"; "found" (ours, already there: now cached, the next pass compares it); or "conflict"
        (another owner's object holds the name)."""
        collection, path = paths(manifest)
        try:
            self._store(job, manifest, self.client.request("POST", collection, body=manifest))
            return "created"
        except ApiError as err:
            if not err.conflict:
                raise
        existing = self.client.get(path)  # rare: ours but not yet watched, or someone else's
        if existing is None:
            raise ApiError(409, "Conflict", f"{manifest['kind']} {manifest['metadata']['name']} is being deleted")
        if not diff.owned_by(existing, owner_uid):
            return "conflict"
        self.cache.put_child(manifest["kind"], existing, job)
        return "found"

    def _recreate(self, job: JobKey, manifest: dict[str, Any]) -> None:
        """Delete a Job that never started a pod and create it with the new template. The uid precondition
        makes sure we delete the object we looked at; Background propagation removes the Job at once
        (there are no pods to wait for)."""
        _, path = paths(manifest)
        observed = self.cache.owned(job).get((manifest["kind"], manifest["metadata"]["name"]))
        uid = ((observed or {}).get("metadata") or {}).get("uid")
        try:
            self.client.request("DELETE", path, body={"propagationPolicy": "Background",
                                                      **({"preconditions": {"uid": uid}} if uid else {})})
        except ApiError as err:
            if not err.not_found:
                raise
        if observed is not None:
            self.cache.drop_child(manifest["kind"], observed, job)
        self._store(job, manifest, self.client.request("POST", paths(manifest)[0], body=manifest))
