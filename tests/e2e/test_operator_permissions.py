"""The operator's real API calls, read from the API server's audit log, are exactly what its RBAC grants.

The chart's RBAC test checks the chart against kube/permissions.py; this test checks kube/permissions.py
against what the running operator actually does (so a new call without a grant fails here, not in
production with a 403).
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from finetune_operator.kube.permissions import OPERATOR_PERMISSIONS

from .operator_fixture import OperatorProcess
from .operator_helpers import create, ftj, kube_client, patch, status

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(os.environ.get("FTJ_E2E_KUBECONFIG")),
                       reason="reads the emulation's audit log; on a real cluster RBAC itself enforces the grants"),
]
TOKEN = "operator-under-audit"


def test_operator_calls_only_what_its_rbac_grants(kube, pod_runner, namespace, fake_trainer_env, wait_for, tmp_path):
    audit = kube.kubeconfig.parent / "audit.jsonl"
    assert audit.exists(), "the emulation writes an audit log beside its kubeconfig"
    config = yaml.safe_load(kube.kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": TOKEN}
    kubeconfig = tmp_path / "operator-kubeconfig.yaml"
    kubeconfig.write_text(yaml.safe_dump(config))

    op = OperatorProcess(kubeconfig, tmp_path / "operator").start()
    c = kube_client(kube.kubeconfig)
    try:
        # Paths that exercise every kind of call: children, status, events, suspend, early stop, watchdog.
        create(c, namespace, ftj("done", env=fake_trainer_env("obey", "0.5,0.4"), hyperparameters={"epochs": 2, "batchSize": 8}))
        create(c, namespace, ftj("queued", suspend=True, env=fake_trainer_env("obey", "0.5"),
                                 hyperparameters={"epochs": 1, "batchSize": 8}))
        create(c, namespace, ftj("stubborn", env=fake_trainer_env("ignore", "0.5,0.6,0.7", 0.3),
                                 hyperparameters={"epochs": 6, "batchSize": 8},
                                 earlyStopping={"patience": 1, "stopGracePeriodSeconds": 1}))
        wait_for(lambda: status(c, namespace, "queued").get("phase") == "Suspended", timeout=60, what="suspended")
        patch(c, namespace, "queued", {"spec": {"suspend": False}})
        for name in ("done", "queued", "stubborn"):
            wait_for(lambda n=name: status(c, namespace, n).get("phase") == "Succeeded", timeout=90, what=f"{name} done")
    finally:
        c.close()
        op.stop()

    used = set()
    for line in audit.read_text().splitlines():
        entry = json.loads(line)
        if entry["token"] == TOKEN:
            used.add((entry["apiGroup"], entry["resource"], entry["verb"]))
    assert used, "the operator made no audited call"
    assert used <= OPERATOR_PERMISSIONS, f"calls without a grant: {sorted(used - OPERATOR_PERMISSIONS)}"
    # Not vacuous: the calls every job needs were seen.
    assert {("finetune.dev", "finetunejobs/status", "patch"), ("batch", "jobs", "create"), ("batch", "jobs", "patch"),
            ("", "events", "create"), ("finetune.dev", "finetunejobs", "watch")} <= used
    print("unused grants:", sorted(OPERATOR_PERMISSIONS - used))
