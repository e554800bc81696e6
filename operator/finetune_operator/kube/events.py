"""Kubernetes Events (core/v1) on a FineTuneJob: what `kubectl describe ftj` shows."""

from __future__ import annotations

import logging
import os
import uuid
from datetime import UTC, datetime
from typing import Any

from ..api import constants as c
from .client import KubeClient, collection_path

log = logging.getLogger("finetune_operator.kube")
INSTANCE = os.environ.get("HOSTNAME", "finetune-operator")  # the pod name in a cluster


def post_event(client: KubeClient, ftj: dict[str, Any], type_: str, reason: str, message: str, *,
               kind: str = c.KIND) -> None:
    """Best effort: an Event that cannot be posted is logged, never fails the reconcile."""
    meta = ftj.get("metadata") or {}
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": c.API_VERSION,
            "kind": kind,
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": c.FIELD_MANAGER},
        "reportingComponent": c.FIELD_MANAGER,
        "reportingInstance": INSTANCE,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        client.request("POST", collection_path("v1", "events", meta.get("namespace")), body=body)
    except Exception as err:  # noqa: BLE001 - best effort: API errors, timeouts, refused connections
        log.warning("could not post event %s for job %s/%s: %s", reason, meta.get("namespace"), meta.get("name"), err)
