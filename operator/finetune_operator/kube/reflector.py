"""List+watch of one resource into a store: client-go's Reflector, for the children and pods kopf need not see.

Why not kopf's watches for these: they only feed the cache (handlers/kopf_handlers.py), and kopf spends ~1 ms of
its event loop on each event (a worker task per object, body wrappers, cause detection, handler invocation
with its logging adapters) and keeps a ResourceMemory for every object it has ever seen. A new job's seven
children and its pod made that about half of the operator's CPU while creating jobs (bench/operator_throughput.py
--profile: 1.2 ms per event, 6.4 child events per job). A Reflector is all that is needed:

- LIST (paginated, label-selected on the server) and hand the complete listing to `sink.replaced`, so objects
  deleted while no watch was open leave the store (client-go's Replace);
- WATCH from the listing's resourceVersion with bookmarks and a server-side timeout, each event to `sink.event`;
  the stream ending (the timeout, a load balancer) is answered by a WATCH from the last resourceVersion seen;
- 410 Gone (the version was compacted away) or an ERROR event: LIST again; any other failure backs off
  exponentially, capped, and tries again, never gives up.

Each Reflector runs on its own thread with its own connection (KubeClient.watch), so a blocked read never holds
a reconcile's connection or kopf's event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from .client import ApiError, KubeClient, WatchStream, collection_path
from .transport import TransportError

log = logging.getLogger("finetune_operator.kube")

SHORT_WATCH_SECONDS = 1.0  # a watch that ends sooner without an event counts as a failure (backoff)
PAGE = 500  # LIST page size: a real server then answers in bounded chunks (client-go's default is 500 too)


class Sink(Protocol):
    def event(self, kind: str, type_: str, obj: dict[str, Any]) -> None: ...

    def replaced(self, kind: str, namespace: str | None, listed: list[dict[str, Any]], rv: str | None) -> None: ...


class Expired(Exception):
    """The watch's resourceVersion is gone (410): only a new LIST can resume."""


def backoff(failures: int, base: float = 1.0, cap: float = 30.0) -> float:
    return min(cap, base * 2 ** min(failures - 1, 16)) if failures > 0 else 0.0


class Reflector:
    def __init__(self, client: KubeClient, kind: str, api_version: str, plural: str, namespace: str | None,
                 selector: str, sink: Sink, timeout_seconds: int = 300):
        self.client, self.kind, self.sink = client, kind, sink
        self.namespace, self.selector, self.timeout_seconds = namespace, selector, timeout_seconds
        self.path = collection_path(api_version, plural, namespace)
        self.rv: str | None = None  # the last resourceVersion seen; None: LIST before the next WATCH
        self.lists = self.watches = 0  # counters for tests
        self._stop = threading.Event()
        self._stream: WatchStream | None = None
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Reflector({self.kind} in {self.namespace or 'all namespaces'})"

    # -- LIST ------------------------------------------------------------------------------------------

    def list(self) -> None:
        """One complete, label-selected LIST (every page), handed to the sink as a whole."""
        items: list[dict[str, Any]] = []
        query = {"limit": str(PAGE), **({"labelSelector": self.selector} if self.selector else {})}
        while True:
            answer = self.client.request("GET", self.path, query=query) or {}
            items.extend(answer.get("items") or [])
            meta = answer.get("metadata") or {}
            if not meta.get("continue"):
                break
            query = {**query, "continue": meta["continue"]}
        self.lists += 1
        self.sink.replaced(self.kind, self.namespace, items, meta.get("resourceVersion"))
        self.rv = meta.get("resourceVersion")

    # -- WATCH -----------------------------------------------------------------------------------------

    def watch(self) -> int:
        """Stream events from `self.rv` until the server ends the stream (or `close`); how many arrived."""
        query = {**({"labelSelector": self.selector} if self.selector else {}), "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(self.timeout_seconds), **({"resourceVersion": self.rv} if self.rv else {})}
        # The read timeout outlasts the server's own by 30 s: a connection that died silently is noticed then.
        stream = self.client.watch(self.path, query, read_timeout=self.timeout_seconds + 30)
        with self._guard:
            if self._stop.is_set():
                stream.close()
                return 0
            self._stream = stream
        self.watches += 1
        seen = 0
        try:
            for event in stream.events():
                seen += 1
                type_, obj = event.get("type"), event.get("object") or {}
                if type_ == "ERROR":
                    if obj.get("code") == 410:
                        raise Expired(obj.get("message", "410 Gone"))
                    raise ApiError(int(obj.get("code") or 500), obj.get("reason") or "Error", str(obj.get("message")))
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if type_ in ("ADDED", "MODIFIED", "DELETED"):
                    self.sink.event(self.kind, type_, obj)
                if rv:
                    self.rv = rv  # BOOKMARKs only move this
        finally:
            with self._guard:
                self._stream = None
            stream.close()
        return seen

    # -- the loop --------------------------------------------------------------------------------------

    def run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if self.rv is None:
                    self.list()
                began = time.monotonic()
                if self.watch() == 0 and time.monotonic() - began < SHORT_WATCH_SECONDS:
                    # Ended at once with nothing in it (a proxy that cuts streams, a server shutting down): like
                    # client-go's "very short watch", back off instead of hammering the server with watches.
                    failures += 1
                    self._stop.wait(backoff(failures))
                    continue
                failures = 0
            except Expired as err:
                log.info("watch of %s expired (%s): listing again", self.kind, err,
                         extra={"action": "relist", "kind": self.kind})
                self.rv = None
            except Exception as err:  # noqa: BLE001 - API and connection errors, and any bug: never stop watching
                if self._stop.is_set():
                    return
                failures += 1
                if isinstance(err, ApiError) and err.status == 410:
                    self.rv = None  # a watch request refused with 410 (not an event): the same as Expired
                delay = backoff(failures)
                expected = isinstance(err, (ApiError, *TransportError, ValueError))
                log.log(logging.WARNING if expected else logging.ERROR, "watch of %s failed (%s: %s); again in %.1f s",
                        self.kind, type(err).__name__, err, delay, exc_info=not expected,
                        extra={"action": "watch", "kind": self.kind, "result": "error"})
                self._stop.wait(delay)

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name=f"watch-{self.kind.lower()}", daemon=True)
        self._thread.start()
        return self._thread

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._guard:
            stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread is not None:
            self._thread.join(timeout)
