"""handlers/cache_feed.py: what watch events and complete listings do to the cache, the job queue and the sweeps."""

from __future__ import annotations

from finetune_operator.api.sweep import SWEEP_LABEL
from finetune_operator.handlers.cache_feed import CacheFeed
from finetune_operator.handlers.workqueue import WorkQueue
from finetune_operator.kube.cache import Cache

JOB_LABELS = {"finetune.dev/job-name": "j", "app.kubernetes.io/managed-by": "finetune-operator"}


def ftj(name: str, rv: str, sweep: str | None = None) -> dict:
    labels = {SWEEP_LABEL: sweep} if sweep else {}
    return {"kind": "FineTuneJob", "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}",
                                                "resourceVersion": rv, "labels": labels}}


def child(rv: str) -> dict:
    return {"kind": "ConfigMap", "metadata": {"name": "j-config", "namespace": "ns", "uid": "c", "resourceVersion": rv,
                                              "labels": JOB_LABELS}}


def drain(q: WorkQueue) -> list:
    out = []
    while (key := q.get(0)) is not None:
        out.append(key)
        q.done(key)
    return out


def test_events_queue_what_changed_and_the_echo_of_a_known_version_queues_nothing():
    cache, q, trials = Cache(), WorkQueue(), []
    feed = CacheFeed(cache, q, lambda t, o: trials.append((t, o["metadata"]["name"])), SWEEP_LABEL)
    feed.event("FineTuneJob", "ADDED", ftj("j", "5"))
    feed.event("FineTuneJob", "ADDED", ftj("t1", "6", sweep="s"))
    feed.event("ConfigMap", "ADDED", child("7"))
    assert drain(q) == [("ns", "j"), ("ns", "t1")]  # j queued once (its child's event folded into it)
    feed.event("ConfigMap", "MODIFIED", child("7"))
    feed.event("FineTuneJob", "MODIFIED", ftj("j", "5"))
    assert drain(q) == []
    feed.event("ConfigMap", "DELETED", child("8"))
    assert drain(q) == [("ns", "j")] and cache.owned(("ns", "j")) == {}
    assert trials == [("ADDED", "t1")]  # only trials reach the sweeps


def test_a_listing_drops_what_was_deleted_while_no_watch_was_open_and_tells_the_sweep_of_its_trials():
    cache, q, trials = Cache(), WorkQueue(), []
    feed = CacheFeed(cache, q, lambda t, o: trials.append((t, o["metadata"]["name"])), SWEEP_LABEL)
    for obj in (ftj("j", "5"), ftj("t1", "6", sweep="s"), ftj("t2", "7", sweep="s")):
        feed.event("FineTuneJob", "ADDED", obj)
    feed.event("ConfigMap", "ADDED", child("8"))
    drain(q)
    trials.clear()
    feed.replaced("FineTuneJob", None, [ftj("j", "5"), ftj("t2", "7", sweep="s")], "20")  # t1 deleted meanwhile
    assert cache.ftj(("ns", "t1")) is None and drain(q) == [("ns", "t1")]  # its pass finds it gone
    # Listed trials are passed on too (the sweep's own store ignores a version it holds); t1 is gone.
    assert trials == [("ADDED", "t2"), ("DELETED", "t1")]
    trials.clear()
    feed.replaced("ConfigMap", "ns", [], "21")  # the child deleted meanwhile: its job gets a pass, it comes back
    assert cache.owned(("ns", "j")) == {} and drain(q) == [("ns", "j")]
    feed.replaced("FineTuneJob", None, [ftj("j", "5")], "3")  # a listing older than t2's version keeps t2
    assert cache.ftj(("ns", "t2")) is not None and ("DELETED", "t2") not in trials
