"""Create-if-missing + merge patch of a FineTuneJob's children.

kmock's emulator (used by the tests) has no server-side apply, so instead of one apply per child we
POST each child and treat 409 AlreadyExists as "exists"; then only the fields the operator changes
after creation are patched: the Job's `spec.suspend` and the ConfigMap's config (when its hash differs).
"""

from __future__ import annotations

import logging
from typing import Any

from ..api import constants as c
from .client import MERGE_PATCH, ApiError, KubeClient, collection_path, object_path

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


def _path(manifest: dict[str, Any]) -> tuple[str, str]:
    meta = manifest["metadata"]
    plural = PLURALS[manifest["kind"]]
    return (collection_path(manifest["apiVersion"], plural, meta["namespace"]),
            object_path(manifest["apiVersion"], plural, meta["namespace"], meta["name"]))


def get_child(client: KubeClient, manifest: dict[str, Any]) -> dict[str, Any] | None:
    return client.get(_path(manifest)[1])


def _owned_by(obj: dict[str, Any], owner_uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == owner_uid for r in refs)


def ensure(client: KubeClient, manifest: dict[str, Any], existing: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
    """(the object as stored, created?) Creates it when missing, else returns what exists."""
    collection, path = _path(manifest)
    if existing is None:
        try:
            created = client.request("POST", collection, body=manifest)
            return created or manifest, True  # kmock 0.8 answers create with an empty body
        except ApiError as err:
            if not err.conflict:
                raise
        existing = client.get(path)
        if existing is None:  # deleted between our POST and GET: the next pass creates it
            raise ApiError(409, "Conflict", f"{manifest['kind']} {manifest['metadata']['name']} is being deleted")
    return existing, False


def converge(client: KubeClient, manifest: dict[str, Any], existing: dict[str, Any]) -> dict[str, Any]:
    """Patch the fields that may change after creation; the rest of a child is fixed by its name."""
    if not manifest["metadata"].get("ownerReferences"):
        return existing  # a retained output claim: unowned on purpose, and nothing of it changes after creation
    owner = manifest["metadata"]["ownerReferences"][0]["uid"]
    if owner and not _owned_by(existing, owner):
        # Never take over an object someone else made with our name; the reconcile reports it.
        raise ApiError(409, "Conflict", f"{manifest['kind']} {manifest['metadata']['name']} exists and is not owned by this FineTuneJob")
    patch: dict[str, Any] = {}
    if manifest["kind"] == "Job":
        want = manifest["spec"]["suspend"]
        if bool((existing.get("spec") or {}).get("suspend")) != want:
            patch = {"spec": {"suspend": want}}
    elif manifest["kind"] == "ConfigMap":
        want_hash = manifest["metadata"]["annotations"][c.Annotation.CONFIG_HASH]
        if ((existing.get("metadata") or {}).get("annotations") or {}).get(c.Annotation.CONFIG_HASH) != want_hash:
            patch = {"metadata": {"annotations": {c.Annotation.CONFIG_HASH: want_hash}}, "data": manifest["data"]}
    if not patch:
        return existing
    updated = client.request("PATCH", _path(manifest)[1], body=patch, content_type=MERGE_PATCH)
    return updated or existing


def apply_children(
    client: KubeClient, children: list[dict[str, Any]], job_obj: dict[str, Any] | None, full: bool
) -> tuple[dict[str, Any], list[str]]:
    """Make the children exist and match; returns (the batch Job as stored, kinds created).

    `full=False` is the steady-state fast path: the other children were created for this generation
    already, so only the batch Job (which we observed anyway) is converged.
    """
    created: list[str] = []
    stored_job = job_obj
    for manifest in children:
        is_job = manifest["kind"] == "Job"
        if not full and not is_job:
            continue
        obj, was_created = ensure(client, manifest, job_obj if is_job else None)
        if was_created:
            created.append(manifest["kind"])
        else:
            obj = converge(client, manifest, obj)
        if is_job:
            stored_job = obj
    assert stored_job is not None
    return stored_job, created


def list_pods(client: KubeClient, namespace: str, selector: str) -> list[dict[str, Any]]:
    answer = client.request("GET", collection_path("v1", "pods", namespace), query={"labelSelector": selector})
    return list((answer or {}).get("items") or [])
