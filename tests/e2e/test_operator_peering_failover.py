"""Two operator replicas with kopf peering: the higher-priority one works, the other stands by; SIGKILL the
active one and the standby takes over once the dead replica's peering record expires
(FTO_PEERING_LIFETIME_SECONDS, 5 s here; the default is kopf's 60 s). Prints the measured hand-over."""

from __future__ import annotations

import secrets
import signal
import time

import pytest

from .operator_fixture import OperatorProcess
from .operator_helpers import children, create, ftj, kube_client, status

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = pytest.mark.e2e

LIFETIME = 5
PEERINGS = "/apis/kopf.dev/v1/clusterkopfpeerings"


def handled_by(proc: OperatorProcess, namespace: str, name: str) -> bool:
    return f"job {namespace}/{name}:" in proc.logs()


def test_killing_the_active_replica_hands_over_to_the_standby(kube, namespace, tmp_path, wait_for):
    c = kube_client(kube.kubeconfig)
    peering = f"fto-{secrets.token_hex(3)}"
    c.request("POST", PEERINGS, body={"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                      "metadata": {"name": peering}})
    env = {"FTO_PEERING": peering, "FTO_PEERING_LIFETIME_SECONDS": str(LIFETIME)}
    active = OperatorProcess(kube.kubeconfig, tmp_path / "active", FTO_PEERING_PRIORITY="20", **env)
    standby = OperatorProcess(kube.kubeconfig, tmp_path / "standby", FTO_PEERING_PRIORITY="10", **env)
    try:
        active.start()
        standby.start()
        wait_for(lambda: len((c.get(f"{PEERINGS}/{peering}") or {}).get("status") or {}) == 2, timeout=30,
                 what="both replicas in the peering record")
        create(c, namespace, ftj("first", suspend=True))
        wait_for(lambda: status(c, namespace, "first").get("phase") == "Suspended", timeout=30, what="first Suspended")
        # The pass logs after its status patch: wait for the line rather than race it.
        wait_for(lambda: handled_by(active, namespace, "first"), timeout=10, what="the active replica's log of it")
        assert not handled_by(standby, namespace, "first"), standby.logs()[-3000:]

        active.kill(signal.SIGKILL)
        killed = time.monotonic()
        create(c, namespace, ftj("second", suspend=True))
        wait_for(lambda: status(c, namespace, "second").get("phase") == "Suspended", timeout=LIFETIME + 30,
                 what="second Suspended by the standby")
        handover = time.monotonic() - killed
        print(f"hand-over after SIGKILL of the active replica: {handover:.1f} s (peering lifetime {LIFETIME} s)")
        wait_for(lambda: handled_by(standby, namespace, "second"), timeout=10, what="the standby's log of it")
        # The standby waited for the dead record to expire: it did not take over while the active one lived.
        assert handover <= LIFETIME + 15, handover
        kids = children(c, namespace)
        assert all(len(v) == 2 for v in kids.values()), {k: len(v) for k, v in kids.items()}
    finally:
        active.stop()
        standby.stop()
        c.request("DELETE", f"{PEERINGS}/{peering}")
        c.close()
