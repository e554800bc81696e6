"""A child deleted while the operator had no watch open, and whose watch then answered 410 Gone, comes back.

The emulation compacts its event history (`drop-watches` with `expire`, as etcd compaction does), so kopf's
resumed watches get 410 and it re-lists; the DELETED event of the child is never sent. Only the fresh
listing shows that the child is gone (client-go's Replace semantics, handlers/relist.py).
"""

from __future__ import annotations

import os

import pytest

from .operator_fixture import OperatorProcess
from .operator_helpers import (
    CHILD_PATHS,
    children,
    create,
    faults,
    ftj,
    kube_client,
    status,
    token_kubeconfig,
)

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(os.environ.get("FTJ_E2E_KUBECONFIG")),
                       reason="compacts the emulation's watch history and injects faults into it"),
]


def test_a_child_deleted_before_a_410_relist_comes_back(kube, namespace, wait_for, tmp_path):
    token = "operator-relist"
    op = OperatorProcess(token_kubeconfig(kube.kubeconfig, token, tmp_path / "relist.yaml"), tmp_path / "op").start()
    c = kube_client(kube.kubeconfig)
    try:
        create(c, namespace, ftj("relist", suspend=True))
        wait_for(lambda: status(c, namespace, "relist").get("phase") == "Suspended", timeout=60, what="Suspended")
        wait_for(lambda: all(len(v) == 1 for v in children(c, namespace, "relist").values()), what="children")
        cm = children(c, namespace, "relist")["ConfigMap"][0]

        # The operator's LISTs are throttled for now, so the deletion below surely falls between the end of its
        # watches and the listing that follows the 410.
        faults(kube.url, {"code": 429, "retryAfter": 1, "count": 1_000_000, "verbs": ["list"], "token": token})
        assert faults(kube.url, {"expire": True}, action="drop-watches")["expired"] is True
        c.request("DELETE", f"{CHILD_PATHS['ConfigMap'].format(ns=namespace)}/{cm['metadata']['name']}")
        wait_for(lambda: any(f.get("token") == token and f["hits"] > 0 for f in faults(kube.url)["faults"]),
                 what="the operator re-listing after 410 Gone")
        faults(kube.url, method="DELETE")

        wait_for(lambda: (now := children(c, namespace, "relist")["ConfigMap"]) and now[0]["metadata"]["uid"] != cm["metadata"]["uid"],
                 what="ConfigMap re-created after the re-list")
        assert "deleted while no watch was open" in op.logs()
    finally:
        faults(kube.url, method="DELETE")
        c.close()
        op.stop()
