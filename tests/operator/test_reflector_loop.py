"""The Reflector's loop without a server: what it does when watches end at once or fail (kube/reflector.py)."""

from __future__ import annotations

import threading
import time

from finetune_operator.kube.client import ApiError
from finetune_operator.kube.reflector import Reflector, backoff


class _Stream:
    def __init__(self, events):
        self._events = events

    def events(self):
        yield from self._events

    def close(self) -> None:
        pass


class _Client:
    def __init__(self, watches):
        self.watches, self.opened, self.lists = list(watches), 0, 0

    def request(self, method, path, *, query=None, **_):
        self.lists += 1
        return {"items": [], "metadata": {"resourceVersion": "10"}}

    def watch(self, path, query, read_timeout):
        self.opened += 1
        nxt = self.watches.pop(0) if self.watches else []
        if isinstance(nxt, Exception):
            raise nxt
        return _Stream(nxt)


class _Sink:
    def __init__(self):
        self.events = []

    def event(self, kind, type_, obj):
        self.events.append(type_)

    def replaced(self, *args):
        pass


def run_for(reflector: Reflector, seconds: float) -> None:
    t = threading.Thread(target=reflector.run, daemon=True)
    t.start()
    time.sleep(seconds)
    reflector.close(timeout=2)
    reflector._stop.set()
    t.join(3)


def test_watches_that_end_at_once_back_off_instead_of_hammering_the_server():
    client = _Client([])  # every watch: an empty stream that ends immediately
    r = Reflector(client, "ConfigMap", "v1", "configmaps", None, "", _Sink())  # type: ignore[arg-type]
    run_for(r, 1.2)
    assert client.lists == 1 and client.opened <= 2  # 1 s, then 2 s of backoff: not thousands of watches


def test_a_410_event_lists_again_and_a_bookmark_moves_the_version():
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}}
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "42"}}}
    added = {"type": "ADDED", "object": {"metadata": {"name": "a", "resourceVersion": "43"}}}
    client = _Client([[bookmark], [gone], [added]])
    sink = _Sink()
    r = Reflector(client, "ConfigMap", "v1", "configmaps", None, "", sink)  # type: ignore[arg-type]
    r.list()
    assert r.rv == "10"
    r.watch()
    assert r.rv == "42" and sink.events == []  # a bookmark is no event, only a newer version to resume from
    run_for(r, 0.5)
    assert client.lists == 2 and sink.events == ["ADDED"] and r.rv == "43"


def test_failures_back_off_exponentially_with_a_cap_and_never_stop():
    assert [backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    client = _Client([ApiError(500, "InternalError", "boom"), [{"type": "ADDED", "object": {"metadata": {"resourceVersion": "11"}}}]])
    sink = _Sink()
    r = Reflector(client, "ConfigMap", "v1", "configmaps", None, "", sink)  # type: ignore[arg-type]
    run_for(r, 1.5)  # the 500, one second of backoff, then the watch that delivers
    assert sink.events == ["ADDED"]
