"""The CLI's cluster access: one place that turns API failures into one clear line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..api import constants as c

REQUEST_TIMEOUT = (5, 30)  # connect, read seconds


class CliError(Exception):
    """A failure the user can act on, printed as one line."""


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

    def _call(self, what: str, fn, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as err:
            if err.status == 404:
                if "the server could not find the requested resource" in (err.body or "") or "page not found" in (err.body or "").lower():
                    raise CliError(f"the FineTuneJob CRD ({c.CRD_NAME}) is not installed in this cluster: install the chart or kubectl apply -f crds/") from None
                raise CliError(f"no FineTuneJob {what} in namespace {self.namespace}") from None
            if err.status in (401, 403):
                raise CliError(f"permission denied to {what.split()[0] if what else 'access'} finetunejobs in namespace {self.namespace}: {_reason(err)}") from None
            raise CliError(f"the API server refused the request ({err.status}): {_reason(err)}") from None
        except (HTTPError, OSError) as err:
            raise CliError(f"cannot reach the cluster at {self.host}: {type(err).__name__}") from None

    def get(self, name: str) -> dict[str, Any]:
        return self._call(name, self.api.get_namespaced_custom_object, c.GROUP, c.VERSION, self.namespace, c.PLURAL, name)

    def list(self, all_namespaces: bool = False) -> list[dict[str, Any]]:
        if all_namespaces:
            out = self._call("", self.api.list_cluster_custom_object, c.GROUP, c.VERSION, c.PLURAL)
        else:
            out = self._call("", self.api.list_namespaced_custom_object, c.GROUP, c.VERSION, self.namespace, c.PLURAL)
        return out.get("items", [])

    def request_stop(self, name: str) -> dict[str, Any]:
        # An annotation, not spec.stop: GitOps tools that own the spec see no drift.
        body = {"metadata": {"annotations": {c.Annotation.STOP: "true"}}}
        return self._call(name, self.api.patch_namespaced_custom_object, c.GROUP, c.VERSION, self.namespace, c.PLURAL, name, body)


def _reason(err: Any) -> str:
    try:
        return json.loads(err.body).get("message") or err.reason
    except (TypeError, ValueError):
        return str(err.reason)
