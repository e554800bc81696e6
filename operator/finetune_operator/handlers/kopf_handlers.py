"""kopf registrations. Handlers only trigger Reconciler.reconcile; all decisions live in plan/.

Why watch events instead of kopf's on.create/update/resume + kopf.timer: the reconcile is level-based
(it re-reads everything), so kopf's per-change bookkeeping would only add writes of kopf's own
annotations to every FineTuneJob (metadata a GitOps tool would then see drift in), and kopf timers put
a finalizer on every job (undeletable while the operator is down). Watch events cover create, update,
status changes and the initial listing after a restart ("resume"); handlers/resync.py covers grace
periods, the stall watchdog, and retries of passes that failed.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import kopf

from ..api import constants as c
from ..settings import Settings
from .reconcile import Reconciler

log = logging.getLogger("finetune_operator")
CHILD_LABELS = {c.Label.MANAGED_BY: c.FIELD_MANAGER}


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """kopf's timeouts and limits, set explicitly: its defaults have no watch timeout at all (a silently
    dead connection would stop all reconciles) and an unbounded connection pool."""
    kopf_settings.watching.server_timeout = settings.watch_server_timeout_seconds
    kopf_settings.watching.client_timeout = settings.watch_server_timeout_seconds + 30
    kopf_settings.watching.connect_timeout = settings.api_connect_timeout_seconds
    kopf_settings.networking.request_timeout = max(30.0, settings.api_timeout_seconds * 3)
    kopf_settings.networking.connect_timeout = settings.api_connect_timeout_seconds
    kopf_settings.execution.max_workers = settings.workers
    # Our own Events say what happened in words; kopf's per-handler log Events would double them (~6% cost).
    kopf_settings.posting.enabled = False
    # Should kopf ever store state, keep it in annotations: status.kopf would be pruned by the CRD schema.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=c.GROUP)
    kopf_settings.peering.standalone = not settings.peering
    if settings.peering:
        kopf_settings.peering.name = settings.peering
        kopf_settings.peering.mandatory = True


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, settings: Settings) -> None:
    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, reconciler.settings)

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
        # The same credentials kopf would find itself, but with a bounded connection pool.
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is None:
            return None
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=settings.api_pool_size, ssl=info.as_ssl_context()),
            headers=info.as_http_headers(),
            auth=info.as_aiohttp_basic_auth(),
        )
        return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace, aiohttp_session=session)

    @kopf.on.event(c.GROUP, c.VERSION, c.PLURAL, registry=registry)
    def ftj_event(event: dict[str, Any], body: Any, name: str, namespace: str, **_: Any) -> None:
        key = (namespace, name)
        if event.get("type") == "DELETED":
            reconciler.forget(key)
            return
        reconciler.track(key, body)
        if reconciler.is_own_echo(key, body):
            return
        reconciler.reconcile(namespace, name, trigger=(event.get("type") or "resume").lower())

    def _child_event(event: dict[str, Any], labels: Any, namespace: str, **_: Any) -> None:
        parent = labels.get(c.Label.JOB_NAME)
        if parent:
            reconciler.reconcile(namespace, parent, trigger=f"child-{(event.get('type') or 'resume').lower()}")

    kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS, registry=registry)(_child_event)
    kopf.on.event("", "v1", "pods", labels=CHILD_LABELS, registry=registry)(_child_event)
