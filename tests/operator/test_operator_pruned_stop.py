"""A sweep's pruner stops a trial FineTuneJob through the user's graceful-stop path (the stop annotation),
saying why (issue 14): the job records the stop as the sweep's decision and finishes Succeeded/Pruned."""

from __future__ import annotations

from ftj_builders import manifest
from test_operator_status import T0, batch_job, pod, reasons, run, running

from finetune_operator.api.constants import Condition, Phase, Reason
from finetune_operator.plan.conditions import find


def _pruned(obj):
    obj["metadata"]["annotations"] = {"finetune.dev/stop": "true", "finetune.dev/stop-reason": "Pruned",
                                      "finetune.dev/stop-message": "pruned by sweep lr after epoch 1"}
    return obj


def test_a_pruned_trial_stops_gracefully_and_ends_pruned():
    obj = _pruned(manifest(hyperparameters={"epochs": 4}))
    _, events = run(obj, {})
    assert "Pruned" in reasons(events)  # recorded at the first pass, with the sweep's words
    st = running(obj, epoch=1)
    st, _ = run(obj, st, batch_job(active=1, start=T0), [pod()])
    cond = find(st["conditions"], Condition.EARLY_STOP_REQUESTED)
    assert (cond["reason"], st["stopDecidedBy"]) == ("Pruned", "sweep") and "pruned by sweep lr" in st["stopReason"]
    st, _ = run(obj, st, batch_job(("Complete", "")), [])
    assert (st["phase"], st["reason"]) == (Phase.SUCCEEDED, "Pruned") and "pruned by its sweep" in st["message"]
    assert st["epochsSaved"] == 3


def test_a_stop_reason_without_the_stop_annotation_stops_nothing():
    obj = manifest()
    obj["metadata"]["annotations"] = {"finetune.dev/stop-reason": "Pruned"}
    st = running(obj, epoch=1)
    st, _ = run(obj, st, batch_job(active=1), [pod()])
    assert not st.get("stopRequestedTime") and st["phase"] == Phase.RUNNING


def test_a_plain_user_stop_is_still_the_users():
    obj = manifest()
    obj["metadata"]["annotations"] = {"finetune.dev/stop": "true"}
    st = running(obj, epoch=1)
    st, _ = run(obj, st, batch_job(active=1), [pod()])
    st, _ = run(obj, st, batch_job(("Complete", "")), [])
    assert st["reason"] == Reason.STOPPED_BY_USER
