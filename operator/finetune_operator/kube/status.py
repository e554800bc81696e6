"""Status writes: one merge patch of the operator-owned fields on the status subresource."""

from __future__ import annotations

from typing import Any

from ..api import constants as c
from .client import MERGE_PATCH, KubeClient, object_path


def ftj_path(namespace: str, name: str) -> str:
    return object_path(c.API_VERSION, c.PLURAL, namespace, name)


def patch_status(client: KubeClient, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
    # A merge patch sends only our fields: the trainer's progress fields are never overwritten.
    return client.request("PATCH", ftj_path(namespace, name) + "/status", body={"status": patch}, content_type=MERGE_PATCH)
