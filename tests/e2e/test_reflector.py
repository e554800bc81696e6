"""The operator's Reflector (kube/reflector.py) against a real watch stream: list, watch, bookmarks, 410, drops.

These are client-go's Reflector promises, checked on the emulation's HTTP watch (chunked JSON lines, resourceVersions,
`drop-watches` with and without compaction), not on a fake: a complete listing replaces the store; events are
delivered in order from the listing's resourceVersion; a stream that ends is resumed from the last version seen (no
second LIST); a 410 makes it LIST again and the deletion it missed is seen; `close()` ends a blocked read at once.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from finetune_operator.kube.client import KubeClient
from finetune_operator.kube.reflector import Reflector

from .operator_helpers import faults, kube_client

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(bool(os.environ.get("FTJ_E2E_KUBECONFIG")), reason="injects faults into the emulation"),
]
SELECTOR = "app.kubernetes.io/managed-by=finetune-operator"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.listings: list[set[str]] = []
        self.lock = threading.Lock()

    def event(self, kind: str, type_: str, obj: dict) -> None:
        with self.lock:
            self.events.append((type_, obj["metadata"]["name"]))

    def replaced(self, kind: str, namespace: str | None, listed: list[dict], rv: str | None) -> None:
        assert rv, "a listing carries the resourceVersion to watch from"
        with self.lock:
            self.listings.append({o["metadata"]["name"] for o in listed})


def configmap(ns: str, name: str, labelled: bool = True) -> dict:
    labels = {"app.kubernetes.io/managed-by": "finetune-operator"} if labelled else {"other": "x"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "data": {"k": "v"}}


@pytest.fixture
def c(kube):
    client = kube_client(kube.kubeconfig)
    yield client
    client.close()


def start(c: KubeClient, ns: str, sink: Recorder, timeout_seconds: int = 300) -> Reflector:
    r = Reflector(c, "ConfigMap", "v1", "configmaps", ns, SELECTOR, sink, timeout_seconds)
    r.start()
    return r


def test_lists_then_streams_events_from_the_listing_only_of_selected_objects(c, namespace, wait_for):
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    c.request("POST", path, body=configmap(namespace, "before"))
    c.request("POST", path, body=configmap(namespace, "unlabelled", labelled=False))
    sink = Recorder()
    r = start(c, namespace, sink)
    try:
        wait_for(lambda: r.watches == 1, what="the watch open")
        assert sink.listings == [{"before"}] and sink.events == []  # listed objects are not replayed as events
        c.request("POST", path, body=configmap(namespace, "after"))
        c.request("PATCH", f"{path}/after", body={"data": {"k": "w"}}, content_type="application/merge-patch+json")
        c.request("DELETE", f"{path}/before")
        c.request("POST", path, body=configmap(namespace, "ignored", labelled=False))
        wait_for(lambda: len(sink.events) >= 3, what="three events")
        time.sleep(0.2)
        assert sink.events == [("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "before")]
        assert r.lists == 1
    finally:
        r.close()


def test_a_dropped_stream_resumes_from_the_last_version_without_listing_again(kube, c, namespace, wait_for):
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    sink = Recorder()
    r = start(c, namespace, sink)
    try:
        wait_for(lambda: r.watches == 1, what="the watch open")
        c.request("POST", path, body=configmap(namespace, "one"))
        wait_for(lambda: sink.events == [("ADDED", "one")], what="the first event")
        assert faults(kube.url, action="drop-watches")["dropped"] >= 1
        c.request("POST", path, body=configmap(namespace, "two"))  # may fall between the drop and the re-watch
        wait_for(lambda: r.watches == 2, what="the watch re-opened")
        wait_for(lambda: ("ADDED", "two") in sink.events, what="the event of the gap")
        assert sink.events == [("ADDED", "one"), ("ADDED", "two")] and r.lists == 1
    finally:
        r.close()


def test_410_gone_lists_again_and_the_listing_shows_what_was_deleted_meanwhile(kube, c, namespace, wait_for):
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    c.request("POST", path, body=configmap(namespace, "kept"))
    c.request("POST", path, body=configmap(namespace, "doomed"))
    sink = Recorder()
    r = start(c, namespace, sink)
    try:
        wait_for(lambda: r.watches == 1, what="the watch open")
        # Our LISTs are refused for now, so the deletion surely falls between the 410 and the listing after it.
        faults(kube.url, {"code": 429, "retryAfter": 1, "count": 1_000_000, "verbs": ["list"],
                          "resource": "configmaps", "namespace": namespace})
        assert faults(kube.url, {"expire": True}, action="drop-watches")["expired"] is True
        c.request("DELETE", f"{path}/doomed")
        wait_for(lambda: any(f["hits"] > 0 for f in faults(kube.url)["faults"]), what="the re-list after 410")
        faults(kube.url, method="DELETE")
        wait_for(lambda: len(sink.listings) == 2, timeout=30, what="the second listing")
        assert sink.listings == [{"kept", "doomed"}, {"kept"}]
        assert ("DELETED", "doomed") not in sink.events  # never sent: only the listing shows it
        wait_for(lambda: r.watches >= 2, what="watching again")
        c.request("POST", path, body=configmap(namespace, "new"))
        wait_for(lambda: ("ADDED", "new") in sink.events, what="events after the re-list")
    finally:
        faults(kube.url, method="DELETE")
        r.close()


def test_a_failing_list_backs_off_and_succeeds_later(kube, c, namespace, wait_for):
    sink = Recorder()
    faults(kube.url, {"code": 500, "count": 6, "verbs": ["list"], "resource": "configmaps", "namespace": namespace})
    r = start(c, namespace, sink)  # the client retries each LIST 5 times: the first listing fails, the second works
    try:
        wait_for(lambda: r.watches == 1, timeout=30, what="listed and watching despite the 500s")
        assert sink.listings == [set()]
    finally:
        faults(kube.url, method="DELETE")
        r.close()


def test_close_ends_a_blocked_read_at_once(c, namespace, wait_for):
    r = start(c, namespace, Recorder(), timeout_seconds=600)
    wait_for(lambda: r.watches == 1, what="the watch open")
    began = time.monotonic()
    r.close(timeout=10)
    assert not r._thread.is_alive() and time.monotonic() - began < 5


def test_a_listing_is_read_page_by_page_and_handed_over_whole(c, namespace, wait_for, monkeypatch):
    import finetune_operator.kube.reflector as reflector

    monkeypatch.setattr(reflector, "PAGE", 2)
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    for i in range(5):
        c.request("POST", path, body=configmap(namespace, f"paged-{i}"))
    sink = Recorder()
    calls = c.calls
    r = Reflector(c, "ConfigMap", "v1", "configmaps", namespace, SELECTOR, sink)
    r.list()
    assert sink.listings == [{f"paged-{i}" for i in range(5)}]  # one Replace, after the last page
    assert c.calls - calls == 3  # pages of 2, 2 and 1
