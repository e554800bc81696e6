"""kopf registrations: watches feed the cache and queue job keys; the reconcile workers do the rest.

This is controller-runtime's shape on kopf: an informer per resource (with peering kopf's watch streams, children
and pods label-selected on the server so only ours travel; standalone the Reflectors of handlers/watches.py
instead), event handlers that only update the store and enqueue the owning job's key (handlers/cache_feed.py),
and a de-duplicating work queue drained by a few worker threads (handlers/reconcile.py). Handlers are async and
never block kopf's event loop: no API call here.

Why watch events instead of kopf's on.create/update/resume + kopf.timer: the reconcile is level-based, so
kopf's per-change bookkeeping would only add writes of kopf's own annotations to every FineTuneJob
(metadata a GitOps tool would then see drift in), and kopf timers put a finalizer on every job
(undeletable while the operator is down). Watch events cover create, update, status changes, deletions
of children and the initial listing after a restart or a re-established watch; the queue's delayed adds
cover grace periods, the stall watchdog and retries of failed passes.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import kopf

from ..api import constants as c
from ..kube.children import WATCHED
from ..settings import Settings
from .reconcile import Reconciler
from .relist import Relists
from .watches import CHILD_SELECTOR

log = logging.getLogger("finetune_operator")
CHILD_LABELS = {c.Label.MANAGED_BY: c.FIELD_MANAGER}


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf builds a "diff base" (a deep copy of the body, for on.update handlers' diffs) for every event of
    every watched object; with only on.event handlers nothing reads it, and it was ~6% of the operator's
    CPU while creating jobs (py-spy). Never stored, never fetched."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


def _selector_key(api_version: str, plural: str) -> tuple[str, ...]:
    group, _, version = api_version.rpartition("/")
    return (group, version, plural) if group else (version, plural)


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """kopf's timeouts and limits, set explicitly: its defaults have no watch timeout at all (a silently
    dead connection would stop all reconciles) and an unbounded connection pool."""
    # A watch the server closes (timeoutSeconds) or that breaks is re-opened by kopf after
    # reconnect_backoff, resuming from the last resourceVersion or re-listing on 410 Gone; each re-listed
    # object is delivered as an event again, so the cache heals and the jobs are re-queued.
    kopf_settings.watching.server_timeout = settings.watch_server_timeout_seconds
    kopf_settings.watching.client_timeout = settings.watch_server_timeout_seconds + 30
    kopf_settings.watching.connect_timeout = settings.api_connect_timeout_seconds
    kopf_settings.watching.reconnect_backoff = 1.0
    # After 410 Gone kopf re-lists without telling handlers which cached objects vanished meanwhile;
    # handlers/relist.py sees each listing on our HTTP session and drops them (client-go's Replace).
    # Only our children and pods are streamed: the label selector is sent to the server.
    for api_version, plural in WATCHED.values():
        kopf_settings.watching.label_selectors[_selector_key(api_version, plural)] = CHILD_SELECTOR
    kopf_settings.networking.request_timeout = max(30.0, settings.api_timeout_seconds * 3)
    kopf_settings.networking.connect_timeout = settings.api_connect_timeout_seconds
    # kopf keeps a worker (a task, a queue, the last event) per object for idle_timeout after its last event:
    # 5 s by default, so while jobs are created (~10 events per job, with peering) thousands stay alive, and the
    # memory they leave behind stays with the process. 0.5 s: RSS at 1,000 jobs created 175 -> 101 MiB
    # (bench/operator_throughput.py -n 1000 --no-steady --peering bench; 0.1 s: 93, 1 s: 110). Our handlers
    # only feed the cache, so a worker started again for a later event costs nothing that matters.
    kopf_settings.queueing.idle_timeout = 0.5
    kopf_settings.execution.max_workers = 2  # no sync handlers remain; kopf needs a thread only for login
    # Our own Events say what happened in words; kopf's per-handler log Events would double them (~6% cost).
    kopf_settings.posting.enabled = False
    # Should kopf ever store state, keep it in annotations: status.kopf would be pruned by the CRD schema.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    kopf_settings.persistence.diffbase_storage = NoDiffBase()
    kopf_settings.peering.standalone = not settings.peering
    if settings.peering:
        kopf_settings.peering.name = settings.peering
        kopf_settings.peering.mandatory = True
        kopf_settings.peering.lifetime = settings.peering_lifetime_seconds


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, settings: Settings) -> None:
    """kopf's handlers. FineTuneJobs, children and pods are watched by kopf only with peering (`settings.peering`):
    there kopf decides which replica sees events, and a standby must not reconcile. Standalone, the Reflectors
    of handlers/watches.py watch them at a fraction of kopf's cost per event."""
    cache, queue = reconciler.cache, reconciler.queue
    kopf_watches = bool(settings.peering)
    relists = Relists(cache, queue, {c.KIND: (c.API_VERSION, c.PLURAL), **WATCHED})
    feed = relists.feed  # one feed for events and listings alike

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
            # kopf's listings replace the cache (handlers/relist.py) where kopf watches jobs and children.
            trace_configs=[relists.trace_config()] if kopf_watches else [],
        )
        return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace, aiohttp_session=session)

    if not kopf_watches:
        return

    @kopf.on.event(c.GROUP, c.VERSION, c.PLURAL, registry=registry)
    async def ftj_event(event: dict[str, Any], **_: Any) -> None:
        feed.event(c.KIND, event.get("type") or "", event.get("object") or {})

    def child_handler(kind: str):
        async def child_event(event: dict[str, Any], **_: Any) -> None:
            feed.event(kind, event.get("type") or "", event.get("object") or {})

        child_event.__name__ = child_event.__qualname__ = f"{kind.lower()}_event"
        return child_event

    for kind, (api_version, plural) in WATCHED.items():
        group, _, version = api_version.rpartition("/")
        kopf.on.event(group, version, plural, labels=CHILD_LABELS, registry=registry)(child_handler(kind))
