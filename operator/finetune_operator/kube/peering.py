"""Peering preflight: say, in one log line at start, how this replica coordinates with the others.

kopf coordinates replicas through its `kopf.dev` peering CRDs (ClusterKopfPeering for a cluster-wide
operator, KopfPeering per namespace). A real cluster has none unless someone installs them (the chart
does; `kubectl apply -f crds/` does too). Without FTO_PEERING the operator runs standalone; with it and
without the CRDs, kopf could not coordinate, so the operator stops with one line naming the fix.

The check reads API discovery (`/apis/kopf.dev/v1`), which every authenticated client may read, so it
needs no RBAC beyond what the operator has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PEERING_GROUP_VERSION = "/apis/kopf.dev/v1"
PEERING_CRDS_FILE = "crds/kopf-peering.yaml"  # also charts/finetune-operator/crds/kopf-peering.yaml


@dataclass(frozen=True)
class PeeringCheck:
    ok: bool  # False: the operator must not start (peering asked for, impossible)
    level: int  # logging level of `message`
    message: str


def peering_resource(clusterwide: bool) -> str:
    return "clusterkopfpeerings" if clusterwide else "kopfpeerings"


def check_peering(peering: str, clusterwide: bool, get: Callable[[str], dict[str, Any] | None]) -> PeeringCheck:
    """Decide from FTO_PEERING and API discovery; `get` returns a decoded GET answer or None on 404."""
    if not peering:
        return PeeringCheck(True, logging.INFO, "peering off (FTO_PEERING unset): running standalone, so run one "
                            "replica only; set FTO_PEERING to run several")
    plural = peering_resource(clusterwide)
    try:
        served = get(PEERING_GROUP_VERSION)
    except Exception as err:  # noqa: BLE001 - any failure here only means "could not tell"
        return PeeringCheck(True, logging.WARNING, f"peering {peering!r}: could not read API discovery for "
                            f"{plural}.kopf.dev ({err}); if it is missing, kubectl apply -f {PEERING_CRDS_FILE}")
    names = {r.get("name") for r in (served or {}).get("resources") or []}
    if plural not in names:
        return PeeringCheck(False, logging.ERROR, f"peering {peering!r} needs the CRD {plural}.kopf.dev, which this "
                            f"cluster does not serve: kubectl apply -f {PEERING_CRDS_FILE} (or unset FTO_PEERING "
                            "and run one replica)")
    return PeeringCheck(True, logging.INFO, f"peering {peering!r} through {plural}.kopf.dev: replicas coordinate, "
                        "the highest priority one handles objects")
