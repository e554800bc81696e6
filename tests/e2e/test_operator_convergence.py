"""Level-based convergence: children deleted behind the operator's back come back without a spec change."""

from __future__ import annotations

import pytest

from .operator_helpers import CHILD_PATHS, children, create, ftj, kube_client, status

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = pytest.mark.e2e


def test_deleted_children_of_a_running_job_are_recreated(kube, operator, pod_runner, namespace, fake_trainer_env, wait_for):
    c = kube_client(kube.kubeconfig)
    try:
        create(c, namespace, ftj("heal", env=fake_trainer_env("obey", ",".join(["0.5"] * 40), 0.5),
                                 hyperparameters={"epochs": 40, "batchSize": 8}, earlyStopping={"enabled": False}))
        wait_for(lambda: status(c, namespace, "heal").get("phase") == "Running", timeout=60, what="phase Running")
        before = {kind: objs[0]["metadata"]["uid"] for kind, objs in children(c, namespace, "heal").items()}
        for kind in ("ConfigMap", "Service", "Role", "RoleBinding", "ServiceAccount"):
            name = children(c, namespace, "heal")[kind][0]["metadata"]["name"]
            c.request("DELETE", f"{CHILD_PATHS[kind].format(ns=namespace)}/{name}")

        def healed():
            now = children(c, namespace, "heal")
            return all(len(now[k]) == 1 and now[k][0]["metadata"]["uid"] != before[k]
                       for k in ("ConfigMap", "Service", "Role", "RoleBinding", "ServiceAccount")) and now

        now = wait_for(healed, timeout=30, what="deleted children recreated")
        assert now["Job"][0]["metadata"]["uid"] == before["Job"]  # the running Job was left alone
        assert status(c, namespace, "heal").get("phase") == "Running"
    finally:
        c.close()
