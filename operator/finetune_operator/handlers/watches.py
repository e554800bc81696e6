"""The Reflectors of FineTuneJobs, of every child kind and of pods, in every watched namespace (or cluster-wide).

Standalone (one replica, the default), these feed the cache instead of kopf's watches (kube/reflector.py says
why); kopf keeps the FineTuneSweeps, the login and the liveness endpoint. With peering kopf watches everything,
because it decides which replica sees events at all.

`sync()` lists everything before the first pass (controller-runtime's WaitForCacheSync: a pass that saw a
FineTuneJob but not yet its Job or pods would write Pending over Running and create children that exist; so
children first, jobs last, and every listed job is queued); `start()` then watches each resource from its
listing's resourceVersion, on a thread of its own.
"""

from __future__ import annotations

import logging

from ..api import constants as c
from ..api import sweep as s
from ..kube.cache import Cache
from ..kube.children import WATCHED
from ..kube.client import ApiError, KubeClient
from ..kube.reflector import Reflector
from ..settings import Settings
from .cache_feed import CacheFeed, TrialEvent
from .workqueue import WorkQueue

log = logging.getLogger("finetune_operator")
CHILD_SELECTOR = f"{c.Label.MANAGED_BY}={c.FIELD_MANAGER}"  # only our children and our jobs' pods travel


class Watches:
    def __init__(self, client: KubeClient, cache: Cache, queue: WorkQueue, settings: Settings,
                 trial: TrialEvent | None = None):
        self.cache = cache
        feed = CacheFeed(cache, queue, trial, s.SWEEP_LABEL)
        scopes: list[str | None] = list(settings.namespaces) or [None]
        kinds = [(kind, api_version, plural, CHILD_SELECTOR) for kind, (api_version, plural) in WATCHED.items()]
        kinds.append((c.KIND, c.API_VERSION, c.PLURAL, ""))  # last: its listing queues the jobs
        self.reflectors = [Reflector(client, kind, api_version, plural, ns, selector, feed,
                                     settings.watch_server_timeout_seconds)
                           for ns in scopes for kind, api_version, plural, selector in kinds]

    def sync(self) -> int:
        """One LIST per reflector (the objects cached, the jobs queued); the number of FineTuneJobs. A failed
        listing is left to that reflector's own loop (it lists before it watches, with backoff)."""
        for r in self.reflectors:
            try:
                r.list()
            except ApiError as err:
                log.warning("could not list %s (%s); its watch will list it", r.kind, err,
                            extra={"action": "list", "kind": r.kind, "result": "error"})
        return len(self.cache.ftj_keys())

    def start(self) -> None:
        for r in self.reflectors:
            r.start()

    def close(self) -> None:
        for r in self.reflectors:
            r.close()
