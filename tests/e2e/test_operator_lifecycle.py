"""The real operator process against the API (emulated, or a real cluster) with the pod runner.

Pods run a stand-in trainer (operator_fixture.FAKE_TRAINER) that reports progress the way the real one
does; real training is in test_operator_training.py.
"""

from __future__ import annotations

import pytest

from .operator_helpers import (
    children,
    condition,
    create,
    events_with,
    ftj,
    get,
    items,
    kube_client,
    patch,
    status,
)

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = pytest.mark.e2e


@pytest.fixture
def c(kube):
    client = kube_client(kube.kubeconfig)
    yield client
    client.close()


def test_job_runs_to_success_with_children_status_and_events(c, operator, pod_runner, namespace, fake_trainer_env, wait_for):
    create(c, namespace, ftj("plain", env=fake_trainer_env("obey", "0.5,0.4,0.3"), hyperparameters={"epochs": 3, "batchSize": 8}))
    st = wait_for(lambda: (s := status(c, namespace, "plain")).get("phase") == "Succeeded" and s, timeout=60,
                  what="phase Succeeded")
    assert st["reason"] == "TrainingCompleted" and st["epoch"] == 3
    assert st["observedGeneration"] == 1 and st["jobName"] == "plain-train"
    assert st["startTime"] and st["completionTime"]
    uid = get(c, namespace, "plain")["metadata"]["uid"]
    kids = children(c, namespace, "plain")
    assert {k: len(v) for k, v in kids.items()} == dict.fromkeys(kids, 1)
    for objs in kids.values():
        assert objs[0]["metadata"]["ownerReferences"][0]["uid"] == uid
    job = kids["Job"][0]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["suspend"] is False
    events_with(c, namespace, "plain", wait_for, "ChildrenCreated", "TrainingCompleted")
    # the operator never writes the FineTuneJob's spec or metadata
    meta = get(c, namespace, "plain")["metadata"]
    assert meta.get("generation") == 1 and not meta.get("finalizers") and not meta.get("annotations")
    metrics = operator.metrics()
    assert 'finetune_operator_reconciles_total{result="changed"}' in metrics
    assert "finetune_operator_reconcile_duration_seconds_bucket" in metrics
    # No output.pvc: the pods wrote to a claim the operator made, which outlives the job (no ownerReference).
    claim = f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/plain-output"
    pvc = c.get(claim)
    assert pvc and "ownerReferences" not in pvc["metadata"] and pvc["metadata"]["labels"]["finetune.dev/job-name"] == "plain"
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "plain-output"}
    c.request("DELETE", f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs/plain")
    wait_for(lambda: not any(children(c, namespace, "plain").values()), timeout=60, what="garbage collection of the children")
    assert c.get(claim) is not None
    assert c.get(claim)["metadata"]["annotations"]["finetune.dev/job-uid"] == uid

    # The same name again: a new job (another uid) must not resume the earlier one's checkpoints nor write over
    # its model. No training Job while the claim is there; the condition and a Warning Event name it and both fixes.
    create(c, namespace, ftj("plain", env=fake_trainer_env("obey", "0.5"), hyperparameters={"epochs": 1, "batchSize": 8}))
    ready = wait_for(lambda: (r := condition(status(c, namespace, "plain"), "Ready")).get("reason") == "OutputClaimInUse"
                     and r, what="Ready=False OutputClaimInUse")
    assert ready["status"] == "False" and "plain-output" in ready["message"] and "reuseRetainedClaim" in ready["message"]
    events_with(c, namespace, "plain", wait_for, "OutputClaimInUse")
    assert not children(c, namespace, "plain").get("Job")
    assert c.get(claim)["metadata"]["annotations"]["finetune.dev/job-uid"] == uid  # left alone
    # Deleting the claim is one of the fixes: the job then gets a fresh claim of its own, and its training Job.
    c.request("DELETE", claim)
    new_uid = get(c, namespace, "plain")["metadata"]["uid"]
    wait_for(lambda: children(c, namespace, "plain").get("Job"), timeout=60, what="the training Job after the fix")
    assert c.get(claim)["metadata"]["annotations"]["finetune.dev/job-uid"] == new_uid != uid


def _without_cel(node):
    if isinstance(node, dict):
        return {k: _without_cel(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [_without_cel(v) for v in node]
    return node


@pytest.fixture
def crd_without_cel_rules(api):
    """The FineTuneJob CRD as an older release installed it, without its CEL rules (charts are upgraded
    separately from CRDs, so this happens on real clusters); the operator must still refuse bad specs."""
    import yaml

    from .conftest import CRD_DIR, apply_crds

    crd = yaml.safe_load((CRD_DIR / "finetunejobs.finetune.dev.yaml").read_text())
    current = api.extensions.read_custom_resource_definition(crd["metadata"]["name"])
    stripped = _without_cel(crd)
    stripped["metadata"]["resourceVersion"] = current.metadata.resource_version
    api.extensions.replace_custom_resource_definition(crd["metadata"]["name"], stripped)
    try:
        yield
    finally:
        apply_crds(api)


def test_invalid_spec_fails_with_the_field_named_and_no_children(c, crd_without_cel_rules, operator, namespace, wait_for):
    bad = ftj("bad", hyperparameters={"epochs": 2, "batchSize": 8, "scheduler": {"warmupRatio": 0.1, "warmupSteps": 5}})
    create(c, namespace, bad)
    st = wait_for(lambda: (s := status(c, namespace, "bad")).get("phase") == "Failed" and s, what="phase Failed")
    assert st["reason"] == "InvalidSpec" and "warmupSteps" in st["message"]
    assert condition(st, "Valid")["status"] == "False"
    events_with(c, namespace, "bad", wait_for, "InvalidSpec")
    assert all(not v for v in children(c, namespace, "bad").values())


def test_cel_rules_reject_the_same_spec_at_create(c, namespace):
    """With the current CRD the API server (emulated or real) refuses it before the operator sees it."""
    bad = ftj("bad-cel", hyperparameters={"epochs": 2, "scheduler": {"warmupRatio": 0.1, "warmupSteps": 5}})
    with pytest.raises(Exception, match="warmupSteps"):
        create(c, namespace, bad)


def test_suspend_and_resume(c, operator, pod_runner, namespace, fake_trainer_env, wait_for):
    create(c, namespace, ftj("queued", suspend=True, env=fake_trainer_env("obey", "0.5,0.4", 0.2),
                             hyperparameters={"epochs": 2, "batchSize": 8}))
    wait_for(lambda: status(c, namespace, "queued").get("phase") == "Suspended", what="phase Suspended")
    assert children(c, namespace, "queued")["Job"][0]["spec"]["suspend"] is True
    patch(c, namespace, "queued", {"spec": {"suspend": False}})
    wait_for(lambda: status(c, namespace, "queued").get("phase") == "Succeeded", timeout=60, what="phase Succeeded")
    events_with(c, namespace, "queued", wait_for, "JobResumed")


def test_early_stop_obeyed_by_the_trainer(c, operator, pod_runner, namespace, fake_trainer_env, wait_for):
    create(c, namespace, ftj("overfit", env=fake_trainer_env("obey", "0.5,0.4,0.45,0.47" + ",0.5" * 16, 0.5),
                             hyperparameters={"epochs": 20, "batchSize": 8}, earlyStopping={"patience": 2}))
    st = wait_for(lambda: (s := status(c, namespace, "overfit")).get("phase") == "Succeeded" and s, timeout=60,
                  what="phase Succeeded")
    assert st["reason"] == "EarlyStopped" and not st.get("stopEnforced")
    cond = condition(st, "EarlyStopRequested")
    assert cond["status"] == "True" and cond["reason"] == "PatienceExhausted" and "best 0.4 at epoch 2" in cond["message"]
    assert st["epoch"] < 20 and st["epochsSaved"] == 20 - st["epoch"]
    # Counted with the Event, after the status patch: wait for it rather than read it once.
    wait_for(lambda: 'finetune_operator_early_stops_total{reason="PatienceExhausted"} 1.0' in operator.metrics(),
             what="the early stop counted")


def test_stop_enforced_when_the_trainer_ignores_it(c, operator, pod_runner, namespace, fake_trainer_env, wait_for):
    create(c, namespace, ftj("stubborn", env=fake_trainer_env("ignore", "0.5,0.6,0.7", 0.3),
                             hyperparameters={"epochs": 6, "batchSize": 8},
                             earlyStopping={"patience": 1, "stopGracePeriodSeconds": 2}))
    st = wait_for(lambda: (s := status(c, namespace, "stubborn")).get("phase") == "Succeeded" and s, timeout=60,
                  what="phase Succeeded")
    assert st["reason"] == "EarlyStopped" and st["stopEnforced"] is True
    assert "grace period" in st["message"]
    assert children(c, namespace, "stubborn")["Job"][0]["spec"]["suspend"] is True
    events_with(c, namespace, "stubborn", wait_for, "StopEnforced")
    pods = items(c, f"/api/v1/namespaces/{namespace}/pods", "finetune.dev/job-name=stubborn")
    wait_for(lambda: not [p for p in pods if (p.get("status") or {}).get("phase") == "Running"], what="no running pod")


def test_user_stop_through_spec(c, operator, pod_runner, namespace, fake_trainer_env, wait_for):
    create(c, namespace, ftj("manual", env=fake_trainer_env("obey", ",".join(["0.5"] * 50), 0.3),
                             hyperparameters={"epochs": 50, "batchSize": 8}, earlyStopping={"enabled": False}))
    wait_for(lambda: status(c, namespace, "manual").get("epoch"), timeout=60, what="first epoch")
    patch(c, namespace, "manual", {"spec": {"stop": True}})
    st = wait_for(lambda: (s := status(c, namespace, "manual")).get("phase") == "Succeeded" and s, timeout=60,
                  what="phase Succeeded")
    assert st["reason"] == "StoppedByUser" and condition(st, "EarlyStopRequested")["reason"] == "UserRequested"


def test_stall_watchdog_fails_a_hung_trainer(c, operator, pod_runner, namespace, fake_trainer_env, wait_for):
    create(c, namespace, ftj("hung", env=fake_trainer_env("hang", "0.5,0.4", 0.2), hyperparameters={"epochs": 2, "batchSize": 8},
                             watchdog={"stallTimeoutSeconds": 3}))
    st = wait_for(lambda: (s := status(c, namespace, "hung")).get("phase") == "Failed" and s, timeout=60, what="phase Failed")
    assert st["reason"] == "Stalled" and condition(st, "Stalled")["status"] == "True"
    assert children(c, namespace, "hung")["Job"][0]["spec"]["suspend"] is True
    wait_for(lambda: "finetune_operator_stalled_jobs_total 1.0" in operator.metrics(), what="the stall counted")


def test_immutable_change_refused_while_running(c, operator, pod_runner, namespace, fake_trainer_env, wait_for):
    create(c, namespace, ftj("fixed", env=fake_trainer_env("obey", ",".join(["0.5"] * 50), 0.3),
                             hyperparameters={"epochs": 50, "batchSize": 8}, earlyStopping={"enabled": False}))
    wait_for(lambda: status(c, namespace, "fixed").get("phase") == "Running", timeout=60, what="phase Running")
    patch(c, namespace, "fixed", {"spec": {"distributed": {"nodes": 2}}})
    cond = wait_for(lambda: (x := condition(status(c, namespace, "fixed"), "SpecChangeRefused")).get("status") == "True" and x,
                    what="SpecChangeRefused")
    assert "spec.distributed" in cond["message"]
    assert children(c, namespace, "fixed")["Job"][0]["spec"]["parallelism"] == 1
    events_with(c, namespace, "fixed", wait_for, "ImmutableFieldChanged")
    # A mid-run learning-rate edit is refused too: the running trainer read its config once.
    patch(c, namespace, "fixed", {"spec": {"distributed": {"nodes": 1}, "hyperparameters": {"learningRate": 1e-3}}})
    cond = wait_for(lambda: (x := condition(status(c, namespace, "fixed"), "SpecChangeRefused")).get("message", "")
                    .startswith("spec.hyperparameters.learningRate cannot change") and x, what="the learning-rate refusal")
    assert cond["status"] == "True" and "spec.distributed" not in cond["message"]
    patch(c, namespace, "fixed", {"spec": {"stop": True}})
    wait_for(lambda: status(c, namespace, "fixed").get("phase") == "Succeeded", timeout=60, what="stopped")
