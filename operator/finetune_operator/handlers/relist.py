"""Deletes that happened while no watch was open: every complete LIST kopf receives replaces the cache's view.

Why: a watch that the server ends with 410 Gone (its resourceVersion was compacted away, e.g. after a long
disconnect) cannot be resumed; kopf re-lists and streams every listed object as an event again, but it
never says which objects are *missing* from the new listing, so a child (or FineTuneJob) deleted in
between would stay in the cache for good: the deleted child never comes back, a deleted FineTuneJob keeps
being reconciled. client-go's informers close this gap with Replace (the store becomes exactly the
listing); kopf gives handlers no hook for it, so we observe the listings on the HTTP session we hand kopf
(handlers/kopf_handlers.py's login): an aiohttp trace sees each LIST of a resource we watch, reads its
body (aiohttp keeps it for kopf, which reads it next) and passes the listed names to Cache.replace.
Watch requests, single-object GETs and other resources are ignored.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp

from ..kube.cache import Cache
from .cache_feed import CacheFeed
from .workqueue import WorkQueue

log = logging.getLogger("finetune_operator")


class Relists:
    def __init__(self, cache: Cache, queue: WorkQueue, kinds: dict[str, tuple[str, str]]):
        """`kinds`: kind -> (apiVersion, plural) of every watched resource."""
        self.feed = CacheFeed(cache, queue)
        self._kinds = {(api_version, plural): kind for kind, (api_version, plural) in kinds.items()}
        self._partial: dict[tuple[str, str | None], set[tuple[str, str]]] = {}  # chunks of a paginated LIST

    def trace_config(self) -> aiohttp.TraceConfig:
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(self._on_request_end)
        return trace

    def target(self, path: str) -> tuple[str, str | None] | None:
        """(kind, namespace or None for all namespaces) of a collection path we watch; None otherwise."""
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            api_version, rest = "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            api_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None
        namespace = None
        if len(rest) == 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if len(rest) != 1:
            return None  # a single object, a subresource, or the namespaces themselves
        kind = self._kinds.get((api_version, rest[0]))
        return (kind, namespace) if kind else None

    async def _on_request_end(self, session: aiohttp.ClientSession, ctx: Any,
                              params: aiohttp.TraceRequestEndParams) -> None:
        if params.method != "GET" or params.response.status != 200:
            return
        if params.url.query.get("watch") in ("true", "1"):
            return
        target = self.target(params.url.path)
        if target is None:
            return
        try:
            doc = json.loads(await params.response.read())
        except (ValueError, aiohttp.ClientError) as err:
            log.warning("could not read a listing of %s: %s", params.url.path, err)
            return
        self.listed(target[0], target[1], bool(params.url.query.get("continue")), doc)

    def listed(self, kind: str, namespace: str | None, continued: bool, doc: dict[str, Any]) -> None:
        """One LIST answer (or chunk of one): once the listing is complete, replace what the cache holds."""
        key = (kind, namespace)
        present = self._partial.pop(key, set()) if continued else set()
        for item in doc.get("items") or []:
            meta = item.get("metadata") or {}
            present.add((meta.get("namespace") or "", meta.get("name") or ""))
        meta = doc.get("metadata") or {}
        if meta.get("continue"):
            self._partial[key] = present
            return
        self.feed.forget_missing(kind, namespace, present, meta.get("resourceVersion"))
