"""One reconcile pass against a recording fake API client: what it sends, and what it does not."""

from __future__ import annotations

import copy
import itertools

from ftj_builders import manifest

from finetune_operator.handlers.reconcile import Reconciler
from finetune_operator.kube.client import ApiError
from finetune_operator.settings import Settings

KEY = ("team-a", "bbc-news")


class FakeApi:
    """Answers like a server: creates and applies return the object with uid/resourceVersion."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail: ApiError | None = None
        self.rv = itertools.count(100)
        self.deleted = False  # the FineTuneJob is gone from the server (its cache entry may not know yet)

    def request(self, method, path, *, body=None, query=None, content_type="application/json"):
        self.calls.append((method, path))
        if self.fail is not None:
            raise self.fail
        if body is None or path.endswith("/events"):
            return None
        answer = copy.deepcopy(body)
        if "/status" in path:  # the whole FineTuneJob, its status merged
            self.ftj = {**self.ftj, "status": {**(self.ftj.get("status") or {}), **body["status"]}}
            self.ftj["metadata"] = {**self.ftj["metadata"], "resourceVersion": str(next(self.rv))}
            return copy.deepcopy(self.ftj)
        answer["metadata"].update(uid=f"uid-{next(self.rv)}", resourceVersion=str(next(self.rv)))
        return answer

    def get(self, path, query=None):
        self.calls.append(("GET", path))
        if path.endswith("/finetunejobs") and query == {"fieldSelector": "metadata.name=bbc-news"}:
            return {"items": [] if self.deleted else [copy.deepcopy(self.ftj)]}
        return None


def reconciler() -> tuple[Reconciler, FakeApi]:
    api = FakeApi()
    r = Reconciler(api, Settings(resync_seconds=10))  # type: ignore[arg-type]
    obj = manifest(suspend=True)
    obj["metadata"]["resourceVersion"] = "1"
    api.ftj = obj
    r.cache.put_ftj(obj)
    return r, api


def test_first_pass_creates_everything_then_passes_send_nothing():
    r, api = reconciler()
    assert r.process(KEY) == "changed"
    verbs = sorted(m for m, _ in api.calls)
    assert verbs == ["PATCH"] + ["POST"] * 8  # seven children (the output claim included) + one Event; one status patch
    for _ in range(3):  # a follow-up pass and any number of later ones: desired == observed
        api.calls.clear()
        assert r.process(KEY) == "ok"
        assert api.calls == []


def test_a_creating_pass_observes_its_own_answers_instead_of_queueing_another_pass():
    """The status written by the creating pass is the one a second pass would write (the Job is there, no pods
    yet), one Event says what was made, and nothing is queued at once: one pass per new job, not two."""
    api = FakeApi()
    r = Reconciler(api, Settings(resync_seconds=10))  # type: ignore[arg-type]
    obj = manifest()
    obj["metadata"]["resourceVersion"] = "1"
    api.ftj = obj
    r.cache.put_ftj(obj)
    events = []
    real = api.request

    def recording(method, path, *, body=None, **kw):
        if path.endswith("/events"):
            events.append((body["reason"], body["message"]))
        return real(method, path, body=body, **kw)

    api.request = recording
    assert r.process(KEY) == "changed"
    st = r.cache.ftj(KEY)["status"]
    assert (st["phase"], st["reason"]) == ("Pending", "PodsPending")
    assert [reason for reason, _ in events] == ["ChildrenCreated"]
    assert "created ServiceAccount" in events[0][1] and "training Job bbc-news-train" in events[0][1]
    assert len(r.queue) == 0  # no immediate revisit
    api.calls.clear()
    assert r.process(KEY) == "ok" and api.calls == []


def test_a_deleted_child_comes_back_with_one_create():
    r, api = reconciler()
    r.process(KEY)
    r.process(KEY)
    cm = r.cache.owned(KEY)[("ConfigMap", "bbc-news-config")]
    r.cache.drop_child("ConfigMap", cm)
    api.calls.clear()
    r.process(KEY)
    assert api.calls == [("GET", "/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs"),
                         ("POST", "/api/v1/namespaces/team-a/configmaps")]


def test_children_of_a_job_deleted_on_the_server_are_not_re_created():
    # The garbage collector's DELETED events for the children can come before the job's own: the cache still
    # holds the job. A live read before re-creating says it is gone.
    r, api = reconciler()
    r.process(KEY)
    r.process(KEY)
    for (kind, _), obj in r.cache.owned(KEY).items():
        r.cache.drop_child(kind, obj)
    api.deleted = True
    api.calls.clear()
    assert r.process(KEY) == "gone"
    assert api.calls == [("GET", "/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs")]
    assert r.cache.ftj(KEY) is None


def test_another_owners_object_is_reported_not_touched():
    r, api = reconciler()
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "bbc-news-workers", "namespace": "team-a", "uid": "x", "resourceVersion": "5",
        "labels": {"finetune.dev/job-name": "bbc-news", "app.kubernetes.io/managed-by": "finetune-operator"},
        "ownerReferences": [{"uid": "someone-else", "controller": True}]}}
    r.cache.put_child("Service", foreign)
    assert r.process(KEY) == "conflict"
    assert not any("/services" in p for _, p in api.calls)
    st = r.cache.ftj(KEY)["status"]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ChildNotOwned" and "Service bbc-news-workers" in ready["message"]
    api.calls.clear()
    r.process(KEY)  # the same conflict again: no new status write, no new Event
    assert api.calls == []


def test_a_failed_pass_is_retried_with_growing_backoff():
    r, api = reconciler()
    api.fail = ApiError(503, "Service Unavailable", "{}")
    assert r.process(KEY) == "error"
    assert r.process(KEY) == "error"
    assert r.queue.failures(KEY) == 2
    api.fail = None
    assert r.process(KEY) == "changed"
    assert r.queue.failures(KEY) == 0


def test_the_cache_is_primed_before_any_pass_so_a_restart_sees_every_child():
    # After a restart the listings could arrive one resource at a time; a pass that saw the job but not yet its
    # Job wrote Pending over Running (kill drill). One LIST per resource first, children before jobs, every job queued.
    from finetune_operator.handlers.watches import Watches

    first, api = reconciler()
    first.process(KEY)
    first.process(KEY)
    ftj = first.cache.ftj(KEY)
    owned = first.cache.owned(KEY)
    lists = {"finetunejobs": [ftj]}
    for (kind, _), obj in owned.items():
        lists.setdefault(kind.lower() + "s", []).append(obj)
    listed: list[str] = []
    write = api.request

    def request(method, path, *, body=None, query=None, content_type="application/json"):
        if method != "GET":
            return write(method, path, body=body, query=query, content_type=content_type)
        api.calls.append(("GET", path))
        plural = path.rsplit("/", 1)[-1]
        listed.append(plural)
        selector = query.get("labelSelector")
        assert selector is None if plural == "finetunejobs" else selector == "app.kubernetes.io/managed-by=finetune-operator"
        return {"items": lists.get(plural, []), "metadata": {"resourceVersion": "500"}}

    api.request = request
    restarted = Reconciler(api, Settings(resync_seconds=10))  # type: ignore[arg-type]
    assert Watches(api, restarted.cache, restarted.queue, Settings()).sync() == 1  # type: ignore[arg-type]
    assert listed[-1] == "finetunejobs" and len(listed) == 9  # 8 kinds of children and pods, then the jobs
    assert restarted.cache.owned(KEY).keys() == owned.keys()
    api.calls.clear()
    assert restarted.queue.get() == KEY
    assert restarted.process(KEY) == "ok" and api.calls == []  # nothing to create, nothing to patch
