"""A thin synchronous REST client on top of the official `kubernetes` package's transport.

Why not the typed APIs: kubernetes 37's generated models validate every response strictly and
cost a model round-trip per call; the reconciler works on plain dicts (what the pure plan
produces), so we use the package only for what it is good at here: kubeconfig / in-cluster
credentials, TLS, token refresh and a bounded urllib3 pool. Every call has a timeout.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote, urlencode

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from ..api.constants import FIELD_MANAGER

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: str):
        self.status, self.reason, self.body = status, reason, body
        try:
            message = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            message = body
        super().__init__(f"{status} {reason}: {str(message)[:300]}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def load_configuration(pool_size: int) -> k8s.Configuration:
    cfg = k8s.Configuration()
    if os.environ.get("KUBECONFIG") or os.path.exists(os.path.expanduser("~/.kube/config")):
        k8s_config.load_kube_config(client_configuration=cfg)
    else:
        k8s_config.load_incluster_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = pool_size
    return cfg


class KubeClient:
    def __init__(self, cfg: k8s.Configuration, timeout: float = 10.0, connect_timeout: float = 5.0):
        self.api = k8s.ApiClient(cfg)
        self.timeout = (connect_timeout, timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """One API call; the decoded JSON answer, or ApiError for a status >= 400."""
        params = dict(query or {})
        if method in ("POST", "PATCH", "PUT"):
            params.setdefault("fieldManager", FIELD_MANAGER)
        url_path = path + ("?" + urlencode(params) if params else "")
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, _, _ = self.api.param_serialize(method, url_path, header_params=headers, auth_settings=["BearerToken"])
        response = self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=self.timeout)
        data = response.read()
        if response.status >= 400:
            raise ApiError(response.status, response.reason or "", data.decode(errors="replace") if data else "")
        return json.loads(data) if data else None

    def get(self, path: str, query: dict[str, str] | None = None) -> dict[str, Any] | None:
        """GET, or None when the object does not exist."""
        try:
            return self.request("GET", path, query=query)
        except ApiError as err:
            if err.not_found:
                return None
            raise

    def close(self) -> None:
        self.api.close()


def collection_path(api_version: str, plural: str, namespace: str | None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{base}/namespaces/{quote(namespace)}/{plural}" if namespace else f"{base}/{plural}"


def object_path(api_version: str, plural: str, namespace: str | None, name: str) -> str:
    return f"{collection_path(api_version, plural, namespace)}/{quote(name)}"
