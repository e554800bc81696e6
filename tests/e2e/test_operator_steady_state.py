"""Steady state costs no requests; throttling (429 + Retry-After) and dropped watches are survived.

Counted by the server: the emulation's audit log, for the operator's own token. Windows are delimited by
events, not by time: the trainer's status reports and our own annotation edits each trigger passes (the
operator's reconcile counter shows they ran), and those passes must send nothing.
"""

from __future__ import annotations

import os
import re

import pytest

from .operator_fixture import OperatorProcess
from .operator_helpers import (
    CHILD_PATHS,
    audit,
    children,
    create,
    faults,
    ftj,
    kube_client,
    patch,
    running_pending_suspended,
    status,
    token_kubeconfig,
)

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(os.environ.get("FTJ_E2E_KUBECONFIG")),
                       reason="counts requests in the emulation's audit log and injects faults into it"),
]


def _passes(op: OperatorProcess) -> int:
    return int(sum(float(v) for v in re.findall(r'^finetune_operator_reconciles_total\{result="[a-z]+"\} ([0-9.e+]+)$',
                                                 op.metrics(), re.M)))


def _start(kube, tmp_path, token: str, **env: str) -> OperatorProcess:
    return OperatorProcess(token_kubeconfig(kube.kubeconfig, token, tmp_path / f"{token}.yaml"), tmp_path / token, **env).start()


def test_a_steady_state_makes_no_request(kube, pod_runner, namespace, quiet_namespace, fake_trainer_env, wait_for, tmp_path):
    token = "operator-steady"
    op = _start(kube, tmp_path, token)
    c = kube_client(kube.kubeconfig)
    try:
        running_pending_suspended(c, namespace, quiet_namespace, fake_trainer_env, wait_for, epochs=50,
                                  seconds_per_epoch=0.3)

        def epochs_later(k: int) -> None:
            start = status(c, namespace, "running").get("epoch") or 0
            wait_for(lambda: (status(c, namespace, "running").get("epoch") or 0) >= start + k, timeout=60,
                     what=f"{k} more epochs")

        epochs_later(2)  # settle: the writes of the first passes are behind us
        requests_before, passes_before = len(audit(kube.kubeconfig, token)), _passes(op)
        for i in range(3):  # events on every job: each triggers a pass that must find nothing to do
            patch(c, quiet_namespace, "pending", {"metadata": {"annotations": {"example.com/touch": str(i)}}})
            patch(c, quiet_namespace, "suspended", {"metadata": {"annotations": {"example.com/touch": str(i)}}})
        epochs_later(3)  # ... and the trainer's status reports (heartbeats) trigger passes of the running job
        window = audit(kube.kubeconfig, token)[requests_before:]
        passes = _passes(op) - passes_before
        assert passes >= 9, f"only {passes} passes ran in the window: the count below would prove nothing"
        assert window == [], f"{len(window)} requests in a steady state over {passes} passes: {window[:10]}"
    finally:
        c.close()
        op.stop()


def test_throttling_with_retry_after_is_honoured_and_no_pass_fails(kube, namespace, wait_for, tmp_path):
    token = "operator-throttled"
    op = _start(kube, tmp_path, token)
    c = kube_client(kube.kubeconfig)
    try:
        # API Priority and Fairness's answer to the first three writes: 429 TooManyRequests, Retry-After: 1.
        faults(kube.url, {"code": 429, "retryAfter": 1, "count": 3, "verbs": ["create", "patch"], "token": token})
        create(c, namespace, ftj("throttled", suspend=True))
        wait_for(lambda: status(c, namespace, "throttled").get("phase") == "Suspended", timeout=60, what="Suspended")
        assert all(len(v) == 1 for v in children(c, namespace, "throttled").values())
        left = faults(kube.url)["faults"]
        assert [f["hits"] for f in left if f.get("token") == token] == [3], left
        # The client waited and retried inside the pass: no pass failed, and the writes were repeated, not lost.
        assert not re.search(r'^finetune_operator_reconciles_total\{result="error"\} [1-9]', op.metrics(), re.M)
        writes = [e for e in audit(kube.kubeconfig, token) if e["verb"] in ("create", "patch")]
        assert len(writes) >= 6 + 1 + 3  # six children, the status, and three refused attempts
    finally:
        c.close()
        op.stop()


def test_dropped_watches_are_reestablished_and_children_still_come_back(kube, namespace, wait_for, tmp_path):
    token = "operator-rewatched"
    op = _start(kube, tmp_path, token)
    c = kube_client(kube.kubeconfig)
    try:
        create(c, namespace, ftj("rewatch", suspend=True))
        wait_for(lambda: status(c, namespace, "rewatch").get("phase") == "Suspended", timeout=60, what="Suspended")
        watches = sum(1 for e in audit(kube.kubeconfig, token) if e["verb"] == "watch")
        assert faults(kube.url, action="drop-watches")["dropped"] >= 8  # FineTuneJobs, 7 child kinds, pods
        wait_for(lambda: sum(1 for e in audit(kube.kubeconfig, token) if e["verb"] == "watch") >= watches + 8,
                 what="watches re-established")
        cm = children(c, namespace, "rewatch")["ConfigMap"][0]
        c.request("DELETE", f"{CHILD_PATHS['ConfigMap'].format(ns=namespace)}/{cm['metadata']['name']}")
        wait_for(lambda: (now := children(c, namespace, "rewatch")["ConfigMap"]) and now[0]["metadata"]["uid"] != cm["metadata"]["uid"],
                 what="ConfigMap re-created through the re-established watch")
    finally:
        c.close()
        op.stop()
