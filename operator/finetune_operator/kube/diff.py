"""Desired child vs. the child the watch cache holds: what to send, if anything. Pure (no I/O).

What we compare is only what we manage:
- `finetune.dev/applied-hash`, an annotation we put on every child: the digest of the whole object we last
  applied. A changed template (an operator upgrade, a spec edit) changes the digest, including fields that
  were *removed* from the template, which a field-by-field comparison could not see.
- the fields we set, as the server last answered them (`digest(project(answer, desired))`, remembered per
  object): someone else's edit of one of our fields (drift) changes the projection. Comparing with the
  server's answer instead of our manifest matters because the server normalises values (quantities such
  as `1000m` -> `1`, defaults inside list elements); comparing with the manifest would re-apply forever.
  Without a remembered answer (after a restart) the manifest must be contained in the object instead.
Fields other managers own (labels added by others, status, server defaults) are never compared.

Immutable fields (https://kubernetes.io/docs/concepts/workloads/controllers/job/): a Job's
`spec.template`, `completionMode`, `selector` and (except elastic Indexed Jobs) `completions` cannot change
after create. Since Kubernetes 1.27 a *suspended Job that never started* may change a few template
fields (node affinity/selector, tolerations, labels, annotations, scheduling gates) but not containers or
volumes, so a template change of a Job that has not started any pod is rolled out by deleting and
re-creating the Job (`Action.RECREATE`); a started Job keeps the template it runs (we apply it back as the
server holds it, so server-side apply neither changes nor drops it) and only mutable fields follow:
suspend, parallelism, backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished, labels, annotations.
A PersistentVolumeClaim's spec is immutable after create except `resources.requests.storage` (growth
only, where the storage class allows expansion), so an existing PVC gets only its metadata applied.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Any

from ..api import constants as c
from ..jsonbytes import compact_sorted

APPLIED_HASH = f"{c.GROUP}/applied-hash"
TEMPLATE_HASH = f"{c.GROUP}/template-hash"
# Fields of a Job's spec fixed at create; a started Job keeps the server's values.
JOB_IMMUTABLE = ("template", "completions", "completionMode", "selector", "manualSelector", "podFailurePolicy")


class Action(enum.Enum):
    NONE = "none"  # desired == observed: no request at all
    CREATE = "create"  # missing: POST (never apply, which would take over an object we cannot see)
    APPLY = "apply"  # drift or a new template: server-side apply of the whole object, force
    RECREATE = "recreate"  # a Job whose immutable template changed before any pod started
    CONFLICT = "conflict"  # an object with our name that another owner made: never touched


@dataclass(frozen=True)
class Plan:
    action: Action
    manifest: dict[str, Any]  # what to send (with our annotations), or the desired object for NONE/CONFLICT
    why: str = ""


def canonical_json(obj: Any) -> bytes:
    """`json.dumps(obj, sort_keys=True, separators=(",", ":"))`, byte for byte: the digests below are stored in
    annotations and compared across operator versions (orjson where it writes the same bytes: jsonbytes.py)."""
    return compact_sorted(obj)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()[:16]


def project(obj: Any, shape: Any) -> Any:
    """`obj` restricted to the keys `shape` has (dicts recursed; lists and scalars taken whole)."""
    if isinstance(shape, dict) and shape:
        if not isinstance(obj, dict):
            return None
        return {k: project(obj[k], v) for k, v in shape.items() if k in obj}
    return obj


def contains(obj: Any, want: Any) -> bool:
    """Every field of `want` is in `obj` with the same value; list elements pairwise (same length)."""
    if isinstance(want, dict):
        return isinstance(obj, dict) and all(k in obj and contains(obj[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(obj, list) and len(obj) == len(want) and all(contains(o, w) for o, w in zip(obj, want, strict=True))
    return obj == want


def owned_by(obj: dict[str, Any], owner_uid: str | None) -> bool:
    """Ours: owned by this FineTuneJob, or (a PVC kept after its job was deleted) carrying our job label and
    no controller owner at all. Anything else with our name belongs to someone else."""
    meta = obj.get("metadata") or {}
    refs = meta.get("ownerReferences") or []
    if owner_uid and any(r.get("uid") == owner_uid for r in refs):
        return True
    if not owner_uid:
        return True  # no uid to check against (only in tests that build jobs without one)
    labels = meta.get("labels") or {}
    return (obj.get("kind") == "PersistentVolumeClaim" and not any(r.get("controller") for r in refs)
            and labels.get(c.Label.MANAGED_BY) == c.FIELD_MANAGER)


def _with_annotations(obj: dict[str, Any], extra: dict[str, str]) -> dict[str, Any]:
    """A copy of `obj` with `extra` annotations (and no applied-hash); nested objects are shared, never
    mutated (the desired children are cached and reused across passes)."""
    meta = obj.get("metadata") or {}
    ann = {k: v for k, v in (meta.get("annotations") or {}).items() if k != APPLIED_HASH}
    ann.update(extra)
    return {**obj, "metadata": {**meta, "annotations": ann}}


def _annotate(manifest: dict[str, Any], extra: dict[str, str] | None = None,
              basis: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest with our annotations; the applied-hash is the digest of `basis` (default: the manifest)."""
    out = _with_annotations(manifest, extra or {})
    hashed = out if basis is None else _with_annotations(basis, extra or {})
    out["metadata"]["annotations"][APPLIED_HASH] = digest(hashed)
    return out


def job_started(observed: dict[str, Any] | None, pods: int = 0, ftj_status: dict[str, Any] | None = None) -> bool:
    """Whether a Job ever started a pod: then its template is what runs, whatever we would want now."""
    if observed is None:
        return False
    st = observed.get("status") or {}
    return bool(pods or st.get("startTime") or st.get("active") or st.get("succeeded") or st.get("failed")
                or st.get("completionTime") or (ftj_status or {}).get("startTime"))


def _ann(obj: dict[str, Any] | None, key: str) -> str | None:
    return (((obj or {}).get("metadata") or {}).get("annotations") or {}).get(key)


def prepare(desired: dict[str, Any], observed: dict[str, Any] | None, *, started: bool = False) -> tuple[dict[str, Any], bool]:
    """The object to send for `desired` given what exists: (manifest with our annotations, template changed?).

    Job: carries the digest of the template we want; when a Job exists with another template, the
    server's template (and other immutable fields) are sent back unchanged - unless it never started,
    in which case the caller recreates it. PVC: an existing claim gets only its metadata applied.
    """
    kind = desired.get("kind")
    if kind == "Job":
        # The applied-hash of a Job covers its mutable fields plus the digest of the template in effect, so
        # a Job whose template we send back as the server holds it (defaults included) is still in sync.
        want = digest((desired.get("spec") or {}).get("template"))
        basis = {**desired, "spec": {k: v for k, v in (desired.get("spec") or {}).items() if k not in JOB_IMMUTABLE}}
        if observed is None:
            return _annotate(desired, {TEMPLATE_HASH: want}, basis), False
        have = _ann(observed, TEMPLATE_HASH)
        changed = have != want
        if changed and not started:
            return _annotate(desired, {TEMPLATE_HASH: want}, basis), True
        seen = observed.get("spec") or {}
        spec = {k: v for k, v in (desired.get("spec") or {}).items() if k not in JOB_IMMUTABLE}
        spec.update({k: seen[k] for k in JOB_IMMUTABLE if k in seen})
        pinned = {**desired, "spec": spec}
        return _annotate(pinned, {TEMPLATE_HASH: have or want}, basis), False
    if kind == "PersistentVolumeClaim":
        # The applied-hash covers the metadata only, at create too: otherwise the first pass after the
        # create would see a different hash and send one needless apply per claim.
        meta_only = {k: v for k, v in desired.items() if k != "spec"}
        return (_annotate(desired, basis=meta_only) if observed is None else _annotate(meta_only)), False
    return _annotate(desired), False


def plan(desired: dict[str, Any], observed: dict[str, Any] | None, owner_uid: str | None, *,
         remembered: str | None = None, started: bool = False) -> Plan:
    """What to do for one child. `remembered`: digest(project(server answer, sent manifest)) of our last
    write of this object, if this process made one."""
    if observed is None:
        manifest, _ = prepare(desired, None)
        return Plan(Action.CREATE, manifest, "missing")
    if not owned_by(observed, owner_uid):
        return Plan(Action.CONFLICT, desired, "exists and is not owned by this FineTuneJob")
    manifest, template_changed = prepare(desired, observed, started=started)
    if template_changed:
        return Plan(Action.RECREATE, manifest, "the pod template changed and no pod has started")
    return Plan(Action.NONE, manifest) if in_sync(manifest, observed, remembered) else Plan(Action.APPLY, manifest, "differs")


def _shape(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields that can drift: a Job's immutable fields cannot (the server refuses changes to them), and
    whether we send them pinned to the server's values or not must not change the comparison."""
    if manifest.get("kind") == "PersistentVolumeClaim":
        return {k: v for k, v in manifest.items() if k != "spec"}  # fixed at create (see prepare)
    if manifest.get("kind") != "Job":
        return manifest
    return {**manifest, "spec": {k: v for k, v in (manifest.get("spec") or {}).items() if k not in JOB_IMMUTABLE}}


def in_sync(manifest: dict[str, Any], observed: dict[str, Any], remembered: str | None) -> bool:
    if _ann(observed, APPLIED_HASH) != _ann(manifest, APPLIED_HASH):
        return False
    shape = _shape(manifest)
    if remembered is not None:
        return digest(project(observed, shape)) == remembered
    return contains(observed, shape)


def remember(sent: dict[str, Any], answer: dict[str, Any]) -> str:
    """What `in_sync` compares later: our fields as the server answered them."""
    return digest(project(answer, _shape(sent)))
