"""The watch-fed cache and the clock of a job (pure parts of the reconcile loop)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ftj_builders import manifest

from finetune_operator.handlers.reconcile import next_visit
from finetune_operator.kube.cache import Cache
from finetune_operator.plan.conditions import rfc3339
from finetune_operator.plan.status import job_input

LABELS = {"finetune.dev/job-name": "j", "app.kubernetes.io/managed-by": "finetune-operator"}


def cm(rv: str, uid: str = "u1") -> dict:
    return {"kind": "ConfigMap", "metadata": {"name": "j-config", "namespace": "ns", "uid": uid, "resourceVersion": rv,
                                              "labels": LABELS, "managedFields": [{"manager": "x"}]}}


def test_children_are_kept_by_job_label_without_managed_fields():
    cache = Cache()
    assert cache.put_child("ConfigMap", cm("5")) == ("ns", "j")
    stored = cache.owned(("ns", "j"))[("ConfigMap", "j-config")]
    assert "managedFields" not in stored["metadata"]
    assert cache.put_child("ConfigMap", {"metadata": {"name": "x", "namespace": "ns"}}) is None  # unlabelled


def test_the_echo_of_our_own_write_triggers_nothing_and_late_events_do_not_go_back():
    cache = Cache()
    cache.put_child("ConfigMap", cm("7"))  # our write's answer (write-through)
    assert cache.put_child("ConfigMap", cm("7")) is None  # its watch echo: nothing new
    assert cache.put_child("ConfigMap", cm("6")) is None  # an older event arriving late
    assert cache.owned(("ns", "j"))[("ConfigMap", "j-config")]["metadata"]["resourceVersion"] == "7"
    assert cache.put_child("ConfigMap", cm("8")) == ("ns", "j")  # someone else's edit: a pass


def test_a_late_delete_of_an_older_object_keeps_the_new_one():
    cache = Cache()
    cache.put_child("ConfigMap", cm("9", uid="new"))
    cache.drop_child("ConfigMap", cm("3", uid="old"))
    assert ("ConfigMap", "j-config") in cache.owned(("ns", "j"))
    cache.drop_child("ConfigMap", cm("10", uid="new"))
    assert cache.owned(("ns", "j")) == {}


def test_ftj_echo_is_not_new():
    cache = Cache()
    ftj = {"metadata": {"name": "j", "namespace": "ns", "resourceVersion": "4"}}
    assert cache.put_ftj(ftj) is True
    assert cache.put_ftj(ftj) is False
    assert cache.put_ftj({"metadata": {"name": "j", "namespace": "ns", "resourceVersion": "3"}}) is False
    assert cache.ftj(("ns", "j"))["metadata"]["resourceVersion"] == "4"


NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _job(status: dict, **spec):
    obj = manifest(**spec)
    obj["status"] = status
    return job_input(obj)


def test_only_jobs_whose_clock_matters_are_visited_and_when():
    pending = {"phase": "Pending"}
    assert next_visit(_job(pending), pending, NOW, cap=10) is None
    suspended = {"phase": "Suspended"}
    assert next_visit(_job(suspended, suspend=True), suspended, NOW, cap=10) is None
    # Running: the stall watchdog's deadline (heartbeat + timeout), capped.
    beat = {"phase": "Running", "lastHeartbeatTime": rfc3339(NOW - timedelta(seconds=1795))}
    watched = _job(beat, watchdog={"stallTimeoutSeconds": 1800})
    assert 5 <= next_visit(watched, beat, NOW, cap=600) <= 5.1
    assert next_visit(watched, beat, NOW, cap=2) == 2
    off = {"phase": "Running"}
    assert next_visit(_job(off, watchdog={"stallTimeoutSeconds": 0}), off, NOW, cap=10) is None
    # A pending stop: its grace period.
    stop = {"phase": "Running", "stopRequestedTime": rfc3339(NOW - timedelta(seconds=10))}
    grace = _job(stop, watchdog={"stallTimeoutSeconds": 0}, earlyStopping={"stopGracePeriodSeconds": 30})
    assert 20 <= next_visit(grace, stop, NOW, cap=600) <= 20.1
    done = {"phase": "Succeeded", "reason": "TrainingCompleted"}
    assert next_visit(_job(done), done, NOW, cap=10) is None


def test_pods_are_kept_without_their_spec_and_nothing_keeps_kubectls_copy():
    cache = Cache()
    pod = {"kind": "Pod", "metadata": {"name": "p", "namespace": "ns", "labels": LABELS, "resourceVersion": "1",
                                       "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "a": "b"}},
           "spec": {"containers": [{"name": "trainer"}]}, "status": {"phase": "Running"}}
    cache.put_child("Pod", pod)
    stored = cache.owned(("ns", "j"))[("Pod", "p")]
    assert "spec" not in stored and stored["status"] == {"phase": "Running"}
    assert stored["metadata"]["annotations"] == {"a": "b"}
    assert pod["spec"] and "kubectl.kubernetes.io/last-applied-configuration" in pod["metadata"]["annotations"]
