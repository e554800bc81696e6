"""Every (apiGroup, resource, verb) the operator process uses: our own calls in kube/ and kopf's.

The chart's ClusterRole must grant exactly these (the chart's RBAC test compares them). Keep this
list in step with kube/children.py, kube/status.py, kube/events.py and handlers/.
"""

from __future__ import annotations

from ..api.constants import GROUP, PLURAL

OPERATOR_PERMISSIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        # FineTuneJobs: kopf lists/watches them; we GET one at the start of each reconcile.
        (GROUP, PLURAL, "get"),
        (GROUP, PLURAL, "list"),
        (GROUP, PLURAL, "watch"),
        # Status: written once per pass with a merge patch (never spec or metadata).
        (GROUP, f"{PLURAL}/status", "patch"),
        # Children: create-if-missing, read back, merge-patch drift (Job suspend, ConfigMap data).
        ("", "configmaps", "create"),
        ("", "configmaps", "get"),
        ("", "configmaps", "patch"),
        ("", "persistentvolumeclaims", "create"),
        ("", "persistentvolumeclaims", "get"),
        ("", "services", "create"),
        ("", "services", "get"),
        ("", "serviceaccounts", "create"),
        ("", "serviceaccounts", "get"),
        ("rbac.authorization.k8s.io", "roles", "create"),
        ("rbac.authorization.k8s.io", "roles", "get"),
        ("rbac.authorization.k8s.io", "rolebindings", "create"),
        ("rbac.authorization.k8s.io", "rolebindings", "get"),
        ("batch", "jobs", "create"),
        ("batch", "jobs", "get"),
        ("batch", "jobs", "patch"),
        # kopf watches the training Jobs and pods (child handlers); we list pods for failure reasons.
        ("batch", "jobs", "list"),
        ("batch", "jobs", "watch"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        # Events for every transition (core/v1, what `kubectl describe` shows).
        ("", "events", "create"),
        # kopf: resource discovery watches CRDs; namespace list/watch when FTO_NAMESPACES are given.
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    }
)

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
