"""Drift and liveness: every child of a Pending, a Running and a Suspended job, deleted or edited behind the
operator's back, comes back as desired, each with exactly one write (the pass its watch event triggered).

The operator runs with its own token so the emulation's audit log tells its requests apart; the Running job
runs the stand-in trainer under the pod runner, the Pending and Suspended ones live in a namespace no pod
runner serves (their Jobs get no pods).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from .operator_fixture import OperatorProcess
from .operator_helpers import (
    CHILD_PATHS,
    audit,
    children,
    kube_client,
    running_pending_suspended,
    status,
    token_kubeconfig,
    writes,
)

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(os.environ.get("FTJ_E2E_KUBECONFIG")), reason="counts requests in the emulation's audit log"),
]
TOKEN = "operator-drift"
MERGE = "application/merge-patch+json"
KINDS = ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "Job")
PLURAL = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings", "ConfigMap": "configmaps",
          "Service": "services", "Job": "jobs"}

# An edit of a field the operator sets, and how to tell it was put back.
EDITS = {
    "ServiceAccount": ({"metadata": {"labels": {"app.kubernetes.io/component": "edited"}}},
                       lambda o: o["metadata"]["labels"]["app.kubernetes.io/component"] == "rbac"),
    "Role": ({"rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]},
             lambda o: o["rules"][0]["verbs"] == ["get", "watch"] and len(o["rules"]) == 2),
    "RoleBinding": ({"subjects": [{"kind": "User", "name": "mallory", "apiGroup": "rbac.authorization.k8s.io"}]},
                    lambda o: o["subjects"][0]["kind"] == "ServiceAccount"),
    "ConfigMap": ({"data": {"config.json": "{}"}}, lambda o: o["data"]["config.json"] != "{}"),
    "Service": ({"spec": {"publishNotReadyAddresses": False}}, lambda o: o["spec"]["publishNotReadyAddresses"] is True),
    "Job": ({"spec": {"backoffLimit": 42}}, lambda o: o["spec"]["backoffLimit"] != 42),
}


@pytest.fixture
def op(kube, tmp_path):
    proc = OperatorProcess(token_kubeconfig(kube.kubeconfig, TOKEN, tmp_path / "op-kubeconfig.yaml"), tmp_path / "op").start()
    yield proc
    proc.stop()


def _repairs(before: int, kube, ns: str) -> Counter:
    """Writes of the operator to children in `ns` since audit entry `before`, by (resource, name, verb)."""
    return Counter((e["resource"], e["name"], e["verb"]) for e in writes(audit(kube.kubeconfig, TOKEN)[before:])
                   if e["namespace"] == ns and e["resource"] in PLURAL.values())


def _check(c, kube, wait_for, ns: str, job: str, kinds: tuple[str, ...], action: str) -> None:
    kids = {k: v[0] for k, v in children(c, ns, job).items()}
    before = len(audit(kube.kubeconfig, TOKEN))
    for kind in kinds:
        path = f"{CHILD_PATHS[kind].format(ns=ns)}/{kids[kind]['metadata']['name']}"
        if action == "delete":
            c.request("DELETE", path)
        else:
            c.request("PATCH", path, body=EDITS[kind][0], content_type=MERGE)

    def repaired():
        now = children(c, ns, job)
        for kind in kinds:
            if len(now[kind]) != 1:
                return False
            obj = now[kind][0]
            if action == "delete" and obj["metadata"]["uid"] == kids[kind]["metadata"]["uid"]:
                return False
            if action == "edit" and not EDITS[kind][1](obj):
                return False
        return now

    wait_for(repaired, timeout=30, what=f"{action}d children of {job} back")
    verb = "create" if action == "delete" else "patch"
    done = _repairs(before, kube, ns)
    for kind in kinds:
        # One write per repaired child: the pass its watch event triggered (a later pass found nothing to do).
        name = None if verb == "create" else kids[kind]["metadata"]["name"]  # a create names the collection
        assert done[(PLURAL[kind], name, verb)] == 1, (kind, done)
    assert sum(done.values()) == len(kinds), done


def test_every_child_of_pending_running_and_suspended_jobs_comes_back(kube, op, pod_runner, namespace, quiet_namespace,
                                                                     fake_trainer_env, wait_for):
    c = kube_client(kube.kubeconfig)
    try:
        running_pending_suspended(c, namespace, quiet_namespace, fake_trainer_env, wait_for, epochs=60,
                                  seconds_per_epoch=0.5, with_children=True)

        for action in ("edit", "delete"):
            _check(c, kube, wait_for, quiet_namespace, "pending", KINDS, action)
            _check(c, kube, wait_for, quiet_namespace, "suspended", KINDS, action)
            # A running Job is not deleted under its pods (that would orphan them); every other child is.
            _check(c, kube, wait_for, namespace, "running", KINDS if action == "edit" else KINDS[:-1], action)
        assert status(c, namespace, "running").get("phase") == "Running"
        assert status(c, quiet_namespace, "pending").get("phase") == "Pending"
        assert status(c, quiet_namespace, "suspended").get("phase") == "Suspended"
    finally:
        c.close()
