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


def test_the_echo_of_a_write_still_in_flight_queues_nothing_and_a_newer_change_meanwhile_is_reported():
    # The Reflector's connection can deliver the watch event of our create before the create's own answer.
    cache, job = Cache(), ("ns", "j")
    cache.writing(job, "ConfigMap", "j-config")
    assert cache.put_child("ConfigMap", cm("7")) is None  # the echo, first: stored, no pass
    cache.put_child("ConfigMap", cm("7"), job, answer=True)  # the answer
    assert cache.written(job, "ConfigMap", "j-config") is False  # nothing newer: no pass needed
    assert cache.put_child("ConfigMap", cm("8")) == job  # after the write, an edit queues a pass again

    cache.writing(job, "ConfigMap", "j-config")
    assert cache.put_child("ConfigMap", cm("10")) is None  # someone else's edit, while our apply is in flight
    cache.put_child("ConfigMap", cm("9"), job, answer=True)  # our answer is older than what the cache holds
    assert cache.written(job, "ConfigMap", "j-config") is True  # so the caller passes again
    assert cache.owned(job)[("ConfigMap", "j-config")]["metadata"]["resourceVersion"] == "10"
    cache.writing(job, "ConfigMap", "j-config")
    assert cache.put_child("ConfigMap", cm("11")) is None
    assert cache.written(job, "ConfigMap", "j-config") is False  # a failed write (no answer) reports nothing


def test_the_echo_of_a_status_write_in_flight_queues_nothing():
    from finetune_operator.kube.cache import FTJ_WRITE

    def ftj(rv: str) -> dict:
        return {"kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "ns", "uid": "u", "resourceVersion": rv}}

    cache, job = Cache(), ("ns", "j")
    assert cache.put_ftj(ftj("3")) is True
    cache.writing(job, *FTJ_WRITE)
    assert cache.put_ftj(ftj("4")) is False  # the status write's watch event, before its answer
    cache.put_ftj(ftj("4"), answer=True)
    assert cache.written(job, *FTJ_WRITE) is False
    cache.writing(job, *FTJ_WRITE)
    assert cache.put_ftj(ftj("6")) is False  # a spec edit landing while our status write is in flight
    cache.put_ftj(ftj("5"), answer=True)  # our answer, older than the edit
    assert cache.written(job, *FTJ_WRITE) is True  # the pass that wrote must run again
    assert cache.put_ftj(ftj("7")) is True


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


# -- a fresh listing replaces what the cache holds (client-go's Replace) -------------------------------------

def _cm(name: str, rv: str, ns: str = "ns", job: str = "j") -> dict:
    return {"kind": "ConfigMap", "metadata": {"name": name, "namespace": ns, "uid": name, "resourceVersion": rv,
                                              "labels": {**LABELS, "finetune.dev/job-name": job}}}


def test_a_listing_drops_what_it_lacks_and_keeps_what_is_newer():
    cache = Cache()
    cache.put_child("ConfigMap", _cm("a", "5"))
    cache.put_child("ConfigMap", _cm("b", "6", job="k"))
    cache.put_child("ConfigMap", _cm("c", "12"))  # our own write, answered after the listing below
    cache.put_child("ConfigMap", _cm("d", "4", ns="other"))
    cache.put_child("Service", {"kind": "Service", "metadata": {"name": "s", "namespace": "ns", "resourceVersion": "3",
                                                                "labels": LABELS}})
    touched = cache.replace("ConfigMap", "ns", {("ns", "a")}, "10")
    assert touched == {("ns", "k")}  # b is gone; c is newer than the listing; d is outside its namespace
    assert set(cache.owned(("ns", "j"))) == {("ConfigMap", "a"), ("ConfigMap", "c"), ("Service", "s")}
    assert cache.owned(("ns", "k")) == {}
    assert cache.replace("ConfigMap", None, set(), "20") == {("ns", "j"), ("other", "j")}  # cluster-wide
    assert set(cache.owned(("ns", "j"))) == {("Service", "s")}


def test_a_listing_of_finetunejobs_drops_the_deleted_ones():
    cache = Cache()
    for name in ("x", "y"):
        cache.put_ftj({"metadata": {"name": name, "namespace": "ns", "resourceVersion": "3"}})
    assert cache.replace("FineTuneJob", None, {("ns", "x")}, "9") == {("ns", "y")}
    assert cache.ftj_keys() == [("ns", "x")]


def test_listings_are_recognised_by_path_and_chunks_are_joined():
    from finetune_operator.handlers.relist import Relists
    from finetune_operator.handlers.workqueue import WorkQueue
    from finetune_operator.kube.children import WATCHED

    cache, queue = Cache(), WorkQueue()
    relists = Relists(cache, queue, {"FineTuneJob": ("finetune.dev/v1alpha1", "finetunejobs"), **WATCHED})
    assert relists.target("/api/v1/configmaps") == ("ConfigMap", None)
    assert relists.target("/api/v1/namespaces/ns/configmaps") == ("ConfigMap", "ns")
    assert relists.target("/apis/batch/v1/namespaces/ns/jobs") == ("Job", "ns")
    assert relists.target("/apis/finetune.dev/v1alpha1/finetunejobs") == ("FineTuneJob", None)
    assert relists.target("/api/v1/namespaces/ns/configmaps/one") is None  # a single object
    assert relists.target("/api/v1/namespaces/ns/pods/p/status") is None
    assert relists.target("/api/v1/namespaces") is None
    assert relists.target("/api/v1/secrets") is None  # not watched

    for name in ("a", "b", "c"):
        cache.put_child("ConfigMap", _cm(name, "5"))
    item = {"metadata": {"name": "a", "namespace": "ns"}}
    relists.listed("ConfigMap", None, False, {"metadata": {"resourceVersion": "9", "continue": "t1"}, "items": [item]})
    assert len(cache.owned(("ns", "j"))) == 3  # an incomplete listing decides nothing
    relists.listed("ConfigMap", None, True, {"metadata": {"resourceVersion": "9"},
                                             "items": [{"metadata": {"name": "b", "namespace": "ns"}}]})
    assert set(cache.owned(("ns", "j"))) == {("ConfigMap", "a"), ("ConfigMap", "b")}
    assert queue.get(timeout=0) == ("ns", "j")  # the job gets a pass: its ConfigMap comes back


# -- what a pass reuses instead of recomputing -------------------------------------------------------------

def test_a_status_change_reuses_the_validated_spec_and_a_spec_change_does_not():
    from finetune_operator.handlers.reconcile import job_input_reusing

    obj = manifest()
    obj["metadata"].update(uid="u1", resourceVersion="1", generation=1)
    first = job_input_reusing(obj, None)
    assert first.resolved is not None
    later = {**obj, "metadata": {**obj["metadata"], "resourceVersion": "2"}, "status": {"phase": "Pending"}}
    second = job_input_reusing(later, first)
    assert second.resolved is first.resolved and second.status == {"phase": "Pending"}  # not validated again
    edited = {**later, "spec": {**later["spec"], "hyperparameters": {"epochs": 7}}}
    third = job_input_reusing(edited, second)
    assert third.resolved is not first.resolved and third.resolved.spec.hyperparameters.epochs == 7
    broken = {**later, "spec": {**later["spec"], "hyperparameters": {"epochs": 0}}}
    fourth = job_input_reusing(broken, third)
    assert fourth.resolved is None and fourth.problems
    assert job_input_reusing({**broken, "status": {"phase": "Failed"}}, fourth).problems == fourth.problems


def test_parsed_specs_are_kept_for_the_most_recent_jobs_only(monkeypatch):
    """The reuse above is bounded (memory at 1,000 jobs): the least recently passed job drops out, and its
    next pass validates it again with the same result."""
    from finetune_operator.handlers import reconcile
    from finetune_operator.settings import Settings

    monkeypatch.setattr(reconcile, "PARSED_INPUTS_KEPT", 3)
    r = reconcile.Reconciler(None, Settings())  # type: ignore[arg-type]
    objs = {}
    for i in range(5):
        obj = manifest()
        obj["metadata"].update(name=f"job-{i}", uid=f"u{i}", resourceVersion="1", generation=1)
        objs[i] = obj
        r._input(("team-a", f"job-{i}"), obj)
    assert list(r._inputs) == [("team-a", "job-2"), ("team-a", "job-3"), ("team-a", "job-4")]
    kept = r._inputs[("team-a", "job-2")].resolved
    assert r._input(("team-a", "job-2"), objs[2]).resolved is kept  # reused, and now the most recent
    assert list(r._inputs)[-1] == ("team-a", "job-2")
    again = r._input(("team-a", "job-0"), objs[0])  # dropped out: validated afresh
    assert again.resolved is not None and again.resolved.spec == reconcile.job_input(objs[0]).resolved.spec
    assert ("team-a", "job-3") not in r._inputs and len(r._inputs) == 3


def test_a_resolved_job_computes_its_config_and_fixed_values_once():
    from finetune_operator.api.validation import validate_manifest

    job = validate_manifest(manifest())
    assert job.config_json is job.config_json and job.fixed_values is job.fixed_values


def test_the_phase_gauge_follows_each_job_incrementally():
    from finetune_operator.metrics import JOBS, PhaseTracker

    def gauge(phase: str) -> float:
        return JOBS.labels(phase=phase).collect()[0].samples[0].value  # type: ignore[no-any-return]

    tracker = PhaseTracker()
    tracker.set(("ns", "a"), "Pending")
    tracker.set(("ns", "b"), "Pending")
    tracker.set(("ns", "a"), "Pending")  # unchanged
    assert (gauge("Pending"), gauge("Running")) == (2, 0)
    tracker.set(("ns", "a"), "Running")
    assert (gauge("Pending"), gauge("Running")) == (1, 1)
    tracker.set(("ns", "b"), None)
    tracker.set(("ns", "zz"), None)  # a job never seen
    assert (gauge("Pending"), gauge("Running")) == (0, 1)
