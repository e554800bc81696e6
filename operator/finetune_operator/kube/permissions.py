"""Every (apiGroup, resource, verb) the operator process uses: our own calls in kube/ and kopf's.

The chart's ClusterRole must grant exactly these (the chart's RBAC test compares them). Keep this
list in step with kube/children.py, kube/status.py, kube/events.py and handlers/.
"""

from __future__ import annotations

from ..api.constants import GROUP, PLURAL

_CHILDREN = (
    ("", "configmaps"), ("", "services"), ("", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "roles"), ("rbac.authorization.k8s.io", "rolebindings"), ("batch", "jobs"),
)

OPERATOR_PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        # FineTuneJobs: listed and watched (our Reflectors, or kopf with peering); every read of a pass comes from
        # that watch (no GET).
        (GROUP, PLURAL, "list"),
        (GROUP, PLURAL, "watch"),
        # Status: a merge patch only when it changed (never spec or metadata).
        (GROUP, f"{PLURAL}/status", "patch"),
        # Children: watched (label-selected) into the cache; created when missing; server-side applied
        # (patch) when they differ; read once (get) only when a create answers 409, to tell our object
        # from someone else's. Jobs are also deleted, to re-create one whose pod template changed before
        # it started a pod (the template is immutable).
        *((group, plural, verb) for group, plural in _CHILDREN for verb in ("list", "watch", "create", "patch", "get")),
        ("batch", "jobs", "delete"),
        # The output PersistentVolumeClaim (kept after its job is deleted) is a child like the others.
        *(("", "persistentvolumeclaims", verb) for verb in ("list", "watch", "create", "patch", "get")),
        # Pods: watched for phases and failure reasons (OOMKilled, image pulls); never written.
        ("", "pods", "list"),
        ("", "pods", "watch"),
        # Events for every transition (core/v1, what `kubectl describe` shows).
        ("", "events", "create"),
        # kopf (FineTuneSweeps, peering): resource discovery watches CRDs; namespace list/watch when FTO_NAMESPACES
        # are given.
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    }
)

# FineTuneSweeps (issue 14): watched into a store, their status merge-patched; their trials are FineTuneJobs
# the operator creates (get once after a 409, like children) and stops by a merge patch of annotations.
SWEEP_PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        (GROUP, "finetunesweeps", "list"),
        (GROUP, "finetunesweeps", "watch"),
        (GROUP, "finetunesweeps/status", "patch"),
        (GROUP, PLURAL, "create"),
        (GROUP, PLURAL, "patch"),
        (GROUP, PLURAL, "get"),
    }
)
OPERATOR_PERMISSIONS = OPERATOR_PERMISSIONS | SWEEP_PERMISSIONS

# The Role the operator creates for each trainer needs the operator to hold the same rights
# (Kubernetes forbids granting what one does not have, unless the operator may `escalate`/`bind`).
TRAINER_PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset(
    {(GROUP, PLURAL, "get"), (GROUP, PLURAL, "watch"), (GROUP, f"{PLURAL}/status", "patch")}
)

# Only when FTO_PEERING is set (several replicas): kopf's peering objects.
PEERING_PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("kopf.dev", "kopfpeerings", "list"),
        ("kopf.dev", "kopfpeerings", "watch"),
        ("kopf.dev", "kopfpeerings", "patch"),
        ("kopf.dev", "clusterkopfpeerings", "list"),
        ("kopf.dev", "clusterkopfpeerings", "watch"),
        ("kopf.dev", "clusterkopfpeerings", "patch"),
    }
)
