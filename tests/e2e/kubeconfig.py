"""Kubeconfig files and API clients for the e2e fixtures (the same code talks to the emulation or a cluster)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

# The emulation accepts any token; a static one keeps clients that insist on credentials happy.
STATIC_TOKEN = "e2e-static-token"


def write_kubeconfig(path: Path, server: str, token: str = STATIC_TOKEN, namespace: str = "default") -> Path:
    """Write a one-context kubeconfig for `server` (http://127.0.0.1:<port> for the emulation)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server}}],
        "users": [{"name": "e2e", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e", "namespace": namespace}}],
        "current-context": "e2e",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


@dataclasses.dataclass
class ApiClients:
    """Official-client API objects bound to one kubeconfig (the `api` fixture)."""

    kubeconfig: Path
    client: object  # kubernetes.client.ApiClient
    core: object  # CoreV1Api
    batch: object  # BatchV1Api
    custom: object  # CustomObjectsApi
    rbac: object  # RbacAuthorizationV1Api
    extensions: object  # ApiextensionsV1Api

    def close(self) -> None:
        self.client.close()  # type: ignore[attr-defined]


def api_clients(kubeconfig: Path) -> ApiClients:
    """Clients with their own configuration object, so nothing leaks into the global default config."""
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    api = client.ApiClient(configuration)
    return ApiClients(
        kubeconfig=Path(kubeconfig),
        client=api,
        core=client.CoreV1Api(api),
        batch=client.BatchV1Api(api),
        custom=client.CustomObjectsApi(api),
        rbac=client.RbacAuthorizationV1Api(api),
        extensions=client.ApiextensionsV1Api(api),
    )


class AsyncKube:
    """A small aiohttp client for the Kubernetes HTTP API, configured from a kubeconfig.

    The pod runner uses it (not the emulator's internals) so the same fixture works against a real
    API server: TLS, client certificates and bearer tokens come from the kubeconfig through the
    official client's loader.
    """

    def __init__(self, kubeconfig: Path, *, request_timeout: float = 30.0) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        self.base = cfg.host.rstrip("/")
        self.headers = {"Accept": "application/json"}
        token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if token:
            prefix = (cfg.api_key_prefix or {}).get("authorization", "")
            self.headers["Authorization"] = f"{prefix} {token}".strip() if not token.startswith("Bearer") else token
        self.ssl: object = None
        if self.base.startswith("https"):
            import ssl

            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
            if cfg.cert_file:
                ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
            if not cfg.verify_ssl:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self.ssl = ctx
        self.request_timeout = request_timeout
        self._session: object = None

    @property
    def session(self):  # noqa: ANN201 - aiohttp.ClientSession, created lazily inside the running loop
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers,
                                                  connector=aiohttp.TCPConnector(limit=16, ssl=self.ssl))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()  # type: ignore[attr-defined]
            self._session = None

    async def request(self, method: str, path: str, *, body: object = None, params: dict | None = None,
                      content_type: str = "application/json", ok_missing: bool = False) -> dict | None:
        """One API call; returns the decoded body, or None for a 404 when `ok_missing`."""
        import aiohttp

        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(  # type: ignore[attr-defined]
            method, self.base + path, data=data, params=params, headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.request_timeout),
        ) as resp:
            payload = await resp.read()
            if resp.status == 404 and ok_missing:
                return None
            if resp.status >= 400:
                raise KubeApiError(resp.status, method, path, payload.decode(errors="replace"))
            return json.loads(payload) if payload else {}

    async def watch_from(self, path: str, params: dict | None, rv: str):  # noqa: ANN201 - async iterator
        """Watch from a resourceVersion already listed: yields (type, object), skipping bookmarks.

        Reconnects from the last seen resourceVersion when the server ends the stream; raises
        KubeApiError (410 when the version is too old) so the caller relists.
        """
        import aiohttp

        while True:
            query = {**(params or {}), "watch": "true", "allowWatchBookmarks": "true", "resourceVersion": rv,
                     "timeoutSeconds": "300"}
            async with self.session.get(  # type: ignore[attr-defined]
                self.base + path, params=query, timeout=aiohttp.ClientTimeout(total=None, sock_read=330),
            ) as resp:
                if resp.status >= 400:
                    raise KubeApiError(resp.status, "WATCH", path, (await resp.read()).decode())
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        raise KubeApiError(obj.get("code", 500), "WATCH", path, json.dumps(obj))
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if event.get("type") != "BOOKMARK":
                        yield event["type"], obj


class KubeApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body
