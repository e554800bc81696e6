"""SIGKILL the operator in the middle of reconciling 20 jobs; the restarted one converges without duplicates."""

from __future__ import annotations

import signal
import time

import pytest

from .operator_helpers import children, create, ftj, items, kube_client

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = pytest.mark.e2e

N = 20


def test_restart_mid_reconcile_converges_without_duplicates(kube, operator, namespace, wait_for):
    c = kube_client(kube.kubeconfig)
    # Suspended jobs get every child and a status, but no pods: this test is about the operator alone.
    for i in range(N):
        create(c, namespace, ftj(f"job-{i:02d}", suspend=True))

    def with_status():
        return [o for o in items(c, f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs")
                if (o.get("status") or {}).get("phase")]

    deadline = time.monotonic() + 30
    while not with_status() and time.monotonic() < deadline:
        time.sleep(0.01)
    operator.kill(signal.SIGKILL)
    done_before = len(with_status())
    operator.start()
    wait_for(lambda: len([o for o in with_status() if o["status"]["phase"] == "Suspended"]) == N, timeout=120,
             what=f"all {N} jobs Suspended")
    kids = children(c, namespace)
    for kind, objs in kids.items():
        names = sorted(o["metadata"]["name"] for o in objs)
        assert len(names) == len(set(names)) == N, f"{kind}: {len(names)} objects for {N} jobs"
    assert all(o["spec"]["suspend"] is True for o in kids["Job"])
    print(f"killed with {done_before}/{N} jobs reconciled")
    c.close()
