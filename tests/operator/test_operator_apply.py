"""Desired child vs. cached child (kube/diff.py): what is sent, and that a child in sync sends nothing."""

from __future__ import annotations

import copy

import pytest
from ftj_builders import manifest

from finetune_operator.api.validation import validate_manifest
from finetune_operator.kube import diff
from finetune_operator.kube.diff import Action
from finetune_operator.plan.children import desired_children
from finetune_operator.settings import Settings

UID = "uid-1"


def children(**spec) -> dict[str, dict]:
    m = manifest(**spec)
    m["metadata"]["uid"] = UID
    return {c["kind"]: c for c in desired_children(validate_manifest(m), Settings())}


def served(sent: dict) -> dict:
    """What a server stores for `sent`: uid, resourceVersion, defaults inside lists, status, managedFields."""
    obj = copy.deepcopy(sent)
    obj["metadata"].update(uid="child-uid", resourceVersion="7", managedFields=[{"manager": "x"}])
    if obj["kind"] == "Job":
        obj["spec"]["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": "child-uid"}}
        obj["spec"]["template"]["metadata"]["labels"]["controller-uid"] = "child-uid"
        obj["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
        obj["spec"].setdefault("podReplacementPolicy", "TerminatingOrFailed")  # the API server keeps what we send
        obj["status"] = {"active": 0}
    if obj["kind"] == "Service":
        obj["spec"]["type"] = "ClusterIP"
        obj["spec"]["ports"][0]["protocol"] = "TCP"
    return obj


def converge(desired: dict, observed: dict | None = None, started: bool = False) -> tuple[dict, str]:
    """One pass: plan, then what the server holds after the write, and the remembered digest."""
    p = diff.plan(desired, observed, UID, started=started)
    assert p.action in (Action.CREATE, Action.APPLY)
    answer = served(p.manifest)
    return answer, diff.remember(p.manifest, answer)


@pytest.mark.parametrize("kind", ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "Job"])
def test_missing_is_created_then_nothing_is_sent(kind):
    desired = children()[kind]
    assert diff.plan(desired, None, UID).action is Action.CREATE
    stored, remembered = converge(desired)
    # The server added defaults, status, managedFields: still in sync, with or without a remembered answer.
    assert diff.plan(desired, stored, UID, remembered=remembered).action is Action.NONE
    assert diff.plan(desired, stored, UID).action is Action.NONE


@pytest.mark.parametrize("kind,edit", [
    ("ConfigMap", lambda o: o["data"].update({"config.json": "{}"})),
    ("Service", lambda o: o["spec"].update(publishNotReadyAddresses=False)),
    ("Role", lambda o: o["rules"][0]["verbs"].append("delete")),
    ("RoleBinding", lambda o: o["subjects"].append({"kind": "User", "name": "mallory"})),
    ("ServiceAccount", lambda o: o["metadata"]["labels"].pop("app.kubernetes.io/managed-by")),
    ("Job", lambda o: o["spec"].update(backoffLimit=99)),
    ("Job", lambda o: o["spec"].update(suspend=True)),
    ("ConfigMap", lambda o: o["metadata"]["annotations"].pop(diff.APPLIED_HASH)),
])
def test_drift_in_a_field_we_set_is_applied_again(kind, edit):
    desired = children()[kind]
    stored, remembered = converge(desired)
    edited = copy.deepcopy(stored)
    edit(edited)
    edited["metadata"]["resourceVersion"] = "8"
    for memory in (remembered, None):
        p = diff.plan(desired, edited, UID, remembered=memory)
        assert p.action is Action.APPLY, memory
        assert p.manifest["metadata"]["annotations"][diff.APPLIED_HASH] == stored["metadata"]["annotations"][diff.APPLIED_HASH]


def test_fields_of_other_managers_are_not_drift():
    desired = children()["Service"]
    stored, remembered = converge(desired)
    other = copy.deepcopy(stored)
    other["metadata"]["labels"]["team"] = "a"
    other["metadata"].setdefault("annotations", {})["kubectl.kubernetes.io/last-applied-configuration"] = "{}"
    other["spec"]["sessionAffinity"] = "None"
    other["status"] = {"loadBalancer": {}}
    assert diff.plan(desired, other, UID, remembered=remembered).action is Action.NONE


def test_server_normalised_values_do_not_loop():
    """A value the server rewrites (a quantity) differs from the manifest; the remembered answer is in sync."""
    desired = children(resources={"limits": {"cpu": "1000m"}})["Job"]
    p = diff.plan(desired, None, UID)
    answer = served(p.manifest)
    answer["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "1"
    remembered = diff.remember(p.manifest, answer)
    assert diff.plan(desired, answer, UID, remembered=remembered).action is Action.NONE


def test_a_new_template_rolls_out_and_removed_fields_count():
    old = children()["ConfigMap"]
    stored, remembered = converge(old)
    new = copy.deepcopy(old)
    del new["metadata"]["labels"]["app.kubernetes.io/part-of"]  # a field removed by an operator upgrade
    assert diff.plan(new, stored, UID, remembered=remembered).action is Action.APPLY


def test_job_template_change_before_start_recreates_after_start_keeps_the_running_template():
    old = children()["Job"]
    stored, remembered = converge(old)
    new = children(env={"EXTRA": "1"})["Job"]
    assert diff.plan(new, stored, UID, remembered=remembered).action is Action.RECREATE
    running = copy.deepcopy(stored)
    running["status"] = {"active": 1, "startTime": "2026-01-01T00:00:00Z"}
    assert diff.job_started(running)
    p = diff.plan(new, running, UID, remembered=remembered, started=True)
    # The template is immutable once pods ran: nothing to send, and what would be sent is the server's template.
    assert p.action is Action.NONE
    assert p.manifest["spec"]["template"] == running["spec"]["template"]
    # A mutable field still follows the spec on a started Job.
    suspended = children(env={"EXTRA": "1"}, suspend=True)["Job"]
    p = diff.plan(suspended, running, UID, remembered=remembered, started=True)
    assert p.action is Action.APPLY and p.manifest["spec"]["suspend"] is True
    assert p.manifest["spec"]["template"] == running["spec"]["template"]
    assert p.manifest["spec"]["selector"] == running["spec"]["selector"]


def test_another_owners_object_is_never_touched():
    desired = children()["ConfigMap"]
    foreign = served(desired)
    foreign["metadata"]["ownerReferences"] = [{"uid": "someone-else", "controller": True}]
    assert diff.plan(desired, foreign, UID).action is Action.CONFLICT
    foreign["metadata"].pop("ownerReferences")
    assert diff.plan(desired, foreign, UID).action is Action.CONFLICT


def test_a_kept_claim_without_owner_is_ours_and_only_its_metadata_is_applied():
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": "j-output", "namespace": "ns", "labels": {"app.kubernetes.io/managed-by": "finetune-operator",
                                                                            "finetune.dev/job-name": "j"},
                          "ownerReferences": [{"uid": UID, "controller": True}]},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    kept = served(claim)
    kept["metadata"].pop("ownerReferences")
    kept["spec"]["volumeName"] = "pv-1"
    bigger = copy.deepcopy(claim)
    bigger["spec"]["accessModes"] = ["ReadWriteMany"]
    p = diff.plan(bigger, kept, UID)
    assert p.action is Action.APPLY and "spec" not in p.manifest  # never an immutable PVC field


def test_contains_and_project():
    assert diff.contains({"a": 1, "b": [{"x": 1, "y": 2}]}, {"b": [{"x": 1}]})
    assert not diff.contains({"b": [{"x": 1}, {"x": 2}]}, {"b": [{"x": 1}]})
    assert diff.project({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 0}}) == {"a": {"b": 1}}
