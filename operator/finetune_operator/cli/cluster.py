"""The CLI's cluster access: one place that turns API failures into one clear line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..api import constants as c
from .errors import CliError

__all__ = ["CliError", "Cluster"]

REQUEST_TIMEOUT = (5, 30)  # connect, read seconds


@dataclass
class Cluster:
    api: Any  # kubernetes.client.CustomObjectsApi
    namespace: str
    host: str

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None) -> Cluster:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        try:
            config.load_kube_config(config_file=kubeconfig, context=context)
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            default_ns = (active or {}).get("context", {}).get("namespace") or "default"
        except (ConfigException, FileNotFoundError, TypeError) as err:
            try:
                config.load_incluster_config()
                default_ns = "default"
            except ConfigException:
                raise CliError(f"no cluster configured: set KUBECONFIG or create ~/.kube/config ({err})") from None
        api_client = client.ApiClient()
        return cls(client.CustomObjectsApi(api_client), namespace or default_ns, api_client.configuration.host)

    def _call(self, verb: str, name: str, fn, *args, **kwargs):
        """One API call; `verb` is the RBAC verb (get, list, patch) and `name` the job ("" for lists)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as err:
            if err.status == 404:
                if "the server could not find the requested resource" in (err.body or "") or "page not found" in (err.body or "").lower():
                    raise CliError(f"the FineTuneJob CRD ({c.CRD_NAME}) is not installed in this cluster: install the chart or kubectl apply -f crds/") from None
                raise CliError(f"no FineTuneJob {name} in namespace {self.namespace}") from None
            if err.status == 401:
                raise CliError(f"unauthorized: {self.host} rejected the credentials in your kubeconfig ({_reason(err)})") from None
            if err.status == 403:
                raise CliError(f"permission denied: you may not {verb} finetunejobs in namespace {self.namespace} ({_reason(err)})") from None
            raise CliError(f"the API server refused the request ({err.status}): {_reason(err)}") from None
        except (HTTPError, OSError) as err:
            raise CliError(f"cannot reach the cluster at {self.host}: {_network_reason(err)}") from None

    def get(self, name: str) -> dict[str, Any]:
        return self._call("get", name, self.api.get_namespaced_custom_object, c.GROUP, c.VERSION, self.namespace, c.PLURAL, name)

    def list(self, all_namespaces: bool = False) -> list[dict[str, Any]]:
        if all_namespaces:
            out = self._call("list", "", self.api.list_cluster_custom_object, c.GROUP, c.VERSION, c.PLURAL)
        else:
            out = self._call("list", "", self.api.list_namespaced_custom_object, c.GROUP, c.VERSION, self.namespace, c.PLURAL)
        return out.get("items", [])

    def request_stop(self, name: str) -> dict[str, Any]:
        # An annotation, not spec.stop: GitOps tools that own the spec see no drift.
        body = {"metadata": {"annotations": {c.Annotation.STOP: "true"}}}
        return self._call("patch", name, self.api.patch_namespaced_custom_object, c.GROUP, c.VERSION, self.namespace, c.PLURAL,
                          name, body)


def _network_reason(err: BaseException) -> str:
    """The innermost cause in a few words: urllib3 wraps 'connection refused' in MaxRetryError(NewConnectionError)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        if "timed out" in str(cause).lower():
            return "timed out"
        nxt = getattr(cause, "reason", None)
        cause = nxt if isinstance(nxt, BaseException) else (cause.__cause__ or cause.__context__)
    text = str(err).lower()
    for needle, reason in (("refused", "connection refused"), ("name or service not known", "host not found"),
                           ("certificate", "TLS certificate rejected")):
        if needle in text:
            return reason
    return type(err).__name__


def _reason(err: Any) -> str:
    try:
        return json.loads(err.body).get("message") or err.reason
    except (TypeError, ValueError):
        return str(err.reason)
