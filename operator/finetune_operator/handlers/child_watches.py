"""The Reflectors of every child kind and of pods, in every watched namespace (or cluster-wide), feeding the cache.

`sync()` lists them all before the first pass (controller-runtime's WaitForCacheSync: a pass that saw a
FineTuneJob but not yet its Job or pods would write Pending over Running and create children that exist);
`start()` then watches each from its listing's resourceVersion, on a thread of its own.
"""

from __future__ import annotations

import logging

from ..api import constants as c
from ..kube.cache import Cache
from ..kube.children import WATCHED
from ..kube.client import ApiError, KubeClient
from ..kube.reflector import Reflector
from ..settings import Settings
from .cache_feed import CacheFeed
from .workqueue import WorkQueue

log = logging.getLogger("finetune_operator")
CHILD_SELECTOR = f"{c.Label.MANAGED_BY}={c.FIELD_MANAGER}"  # only our children and our jobs' pods travel


class ChildWatches:
    def __init__(self, client: KubeClient, cache: Cache, queue: WorkQueue, settings: Settings):
        feed = CacheFeed(cache, queue)
        scopes: list[str | None] = list(settings.namespaces) or [None]
        self.reflectors = [Reflector(client, kind, api_version, plural, ns, CHILD_SELECTOR, feed,
                                     settings.watch_server_timeout_seconds)
                           for ns in scopes for kind, (api_version, plural) in WATCHED.items()]

    def sync(self) -> int:
        """One LIST per reflector (the objects cached); how many succeeded. A failed listing is left to the
        reflector's own loop (it lists before it watches, with backoff)."""
        synced = 0
        for r in self.reflectors:
            try:
                r.list()
                synced += 1
            except ApiError as err:
                log.warning("could not list %s (%s); its watch will list it", r.kind, err,
                            extra={"action": "list", "kind": r.kind, "result": "error"})
        return synced

    def start(self) -> None:
        for r in self.reflectors:
            r.start()

    def close(self) -> None:
        for r in self.reflectors:
            r.close()
