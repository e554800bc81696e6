"""The phase machine: observe(job, status, job_obj, pods, now) -> (operator-owned status, events)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

from ftj_builders import manifest

from finetune_operator.api.constants import Condition, Phase, Reason
from finetune_operator.plan.conditions import find, rfc3339
from finetune_operator.plan.status import OPERATOR_FIELDS, job_input, observe, spec_fingerprint, status_patch

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def batch_job(*conditions, active=0, start=None):
    status = {"active": active, "conditions": [{"type": t, "status": "True", "reason": r} for t, r in conditions]}
    if start:
        status["startTime"] = rfc3339(start)
    return {"metadata": {"name": "bbc-news-train"}, "spec": {"suspend": False}, "status": status}


def pod(phase="Running", name="bbc-news-train-0-abcde", **container_state):
    cs = [{"name": "trainer", **container_state}] if container_state else []
    return {"metadata": {"name": name}, "status": {"phase": phase, "containerStatuses": cs}}


def run(obj, status, job_obj=None, pods=(), now=T0):
    """observe, then merge the result into the stored status as the API server would."""
    obj = copy.deepcopy(obj)
    obj["status"] = status
    new, events = observe(job_input(obj), status, job_obj, list(pods), now)
    merged = {**status, **{k: v for k, v in new.items() if v is not None}}
    for k, v in new.items():
        if v is None:
            merged.pop(k, None)
    return merged, events


def reasons(events):
    return [e.reason for e in events]


def running(obj, now=T0, **trainer):
    """A job that has been created and has a running pod, plus trainer-written fields."""
    st, _ = run(obj, {}, now=now)
    st, _ = run(obj, st, batch_job(active=1, start=now), [pod()], now)
    st.update(trainer)
    return st


def history(*values, key="valLoss"):
    return [{"epoch": i + 1, key: v, "trainLoss": 1.0} for i, v in enumerate(values)]


def test_first_pass_is_pending_and_records_the_spec_hash():
    obj = manifest()
    st, events = run(obj, {})
    assert st["phase"] == Phase.PENDING and st["reason"] == Reason.CREATED
    assert st["observedGeneration"] == 1 and st["jobName"] == "bbc-news-train"
    assert st["specHash"] == spec_fingerprint(job_input(obj).resolved)
    assert find(st["conditions"], Condition.VALID)["status"] == "True"
    assert find(st["conditions"], Condition.READY)["observedGeneration"] == 1
    assert reasons(events) == [Reason.CREATED]


def test_running_then_idempotent():
    obj = manifest()
    st = running(obj)
    assert st["phase"] == Phase.RUNNING and st["startTime"] == rfc3339(T0)
    again, events = run(obj, st, batch_job(active=1, start=T0), [pod()], T0 + timedelta(seconds=5))
    assert events == [] and status_patch(st, {k: again.get(k) for k in OPERATOR_FIELDS}) == {}


def test_invalid_spec_fails_once_naming_the_field():
    obj = manifest(hyperparameters={"epochs": 0})
    st, events = run(obj, {})
    assert st["phase"] == Phase.FAILED and st["reason"] == Reason.INVALID_SPEC
    assert "spec.hyperparameters.epochs" in st["message"]
    valid = find(st["conditions"], Condition.VALID)
    assert valid["status"] == "False" and valid["reason"] == Reason.INVALID_SPEC
    assert [(e.type, e.reason) for e in events] == [("Warning", Reason.INVALID_SPEC)]
    again, events = run(obj, st, now=T0 + timedelta(hours=1))
    assert again == st and events == []  # no retries
    fixed = manifest()
    fixed["metadata"]["generation"] = 2
    st, _ = run(fixed, st)
    assert st["phase"] == Phase.PENDING  # an edited spec gets a new chance


def test_completed():
    obj = manifest()
    st = running(obj, epoch=5, bestEpoch=4, bestMetric=0.93, valMetricName="accuracy")
    st, events = run(obj, st, batch_job(("Complete", "")), [pod("Succeeded")], T0 + timedelta(minutes=5))
    assert (st["phase"], st["reason"]) == (Phase.SUCCEEDED, Reason.COMPLETED)
    assert "best accuracy 0.93 at epoch 4" in st["message"]
    assert st["completionTime"] == rfc3339(T0 + timedelta(minutes=5))
    assert find(st["conditions"], Condition.SUCCEEDED)["status"] == "True"
    assert find(st["conditions"], Condition.RUNNING)["status"] == "False"
    assert reasons(events) == [Reason.COMPLETED]
    later, events = run(obj, st, None, [], T0 + timedelta(days=1))  # Job removed by its TTL: nothing changes
    assert later == st and events == []


def test_oom_killed_says_what_to_change():
    obj = manifest(resources={"limits": {"memory": "4Gi"}})
    st = running(obj)
    oom = pod("Failed", state={"terminated": {"reason": "OOMKilled", "exitCode": 137}})
    st, events = run(obj, st, batch_job(("Failed", "BackoffLimitExceeded")), [oom])
    assert (st["phase"], st["reason"]) == (Phase.FAILED, Reason.OOM_KILLED)
    assert "batchSize" in st["message"] and "4Gi" in st["message"]
    assert events[0].type == "Warning"


def test_a_trainer_failure_a_restart_cannot_fix_names_the_path_and_the_reason():
    # The trainer's termination message (finetune_trainer.failures); the Job failed through its podFailurePolicy.
    obj = manifest()
    text = ("job bbc-news: no space left on device writing a checkpoint to /output/checkpoints/.tmp-epoch-2: "
            "OSError: [Errno 28] No space left on device; raise spec.output.size")
    full = pod("Failed", state={"terminated": {"reason": "Error", "exitCode": 4,
                                               "message": '{"reason": "DiskFull", "message": "' + text + '"}'}})
    st, events = run(obj, running(obj), batch_job(("Failed", "PodFailurePolicy")), [full])
    assert (st["phase"], st["reason"]) == (Phase.FAILED, Reason.DISK_FULL)
    assert st["message"].startswith(text) and "exit code 4" in st["message"]
    assert find(st["conditions"], Condition.FAILED)["reason"] == Reason.DISK_FULL
    assert [(e.type, e.reason) for e in events] == [("Warning", Reason.DISK_FULL)] and text in events[0].message
    # A log tail that merely looks like JSON, or names an unknown reason, stays a plain pod failure.
    for message in ('{"reason": "Whatever", "message": "x"}', "{not json", "Traceback ..."):
        other = pod("Failed", state={"terminated": {"reason": "Error", "exitCode": 1, "message": message}})
        st, _ = run(obj, running(obj), batch_job(("Failed", "BackoffLimitExceeded")), [other])
        assert st["reason"] == Reason.BACKOFF_LIMIT


def test_backoff_limit_and_deadline():
    obj = manifest(activeDeadlineSeconds=60)
    crashed = pod("Failed", state={"terminated": {"reason": "Error", "exitCode": 1, "message": "ValueError: bad data"}})
    st, _ = run(obj, running(obj), batch_job(("Failed", "BackoffLimitExceeded")), [crashed])
    assert st["reason"] == Reason.BACKOFF_LIMIT and "exited with code 1" in st["message"] and "bad data" in st["message"]
    st, _ = run(obj, running(obj), batch_job(("Failed", "DeadlineExceeded")), [])
    assert st["reason"] == Reason.DEADLINE and "spec.activeDeadlineSeconds (60 s)" in st["message"]


def test_a_failed_rank_named_by_the_launcher_is_named_in_status():
    from finetune_trainer.failures import rank_failure_message

    class Failure:  # torch elastic's ProcessFailure, as the launcher reads it
        local_rank, pid, exitcode, message = 1, 812, 1, {"message": "RuntimeError: CUDA error: an illegal memory access"}

        def signal_name(self) -> str:
            return "N/A"

    text = rank_failure_message(3, Failure(), [3])
    crashed = pod("Failed", state={"terminated": {"reason": "Error", "exitCode": 1, "message": text}})
    obj = manifest()
    st, _ = run(obj, running(obj), batch_job(("Failed", "BackoffLimitExceeded")), [crashed])
    assert st["reason"] == Reason.BACKOFF_LIMIT
    assert "exited with code 1: rank 3 (local rank 1, pid 812) failed first" in st["message"]
    assert "illegal memory access" in st["message"]


def test_image_pull_backoff_is_reported_while_pending():
    obj = manifest(image="registry.example/typo:1")
    st, _ = run(obj, {})
    waiting = pod("Pending", state={"waiting": {"reason": "ImagePullBackOff", "message": "not found"}})
    st, events = run(obj, st, batch_job(), [waiting])
    assert (st["phase"], st["reason"]) == (Phase.PENDING, Reason.IMAGE_PULL)
    assert "spec.image" in st["message"] and events[0].type == "Warning"


def test_immutable_change_is_refused_and_named():
    obj = manifest()
    st = running(obj)
    changed = manifest(dataset={"source": "/data/other", "format": "text-folders"})
    changed["metadata"]["generation"] = 2
    st2, events = run(changed, st, batch_job(active=1, start=T0), [pod()])
    cond = find(st2["conditions"], Condition.SPEC_CHANGE_REFUSED)
    assert cond["status"] == "True" and cond["reason"] == Reason.IMMUTABLE_FIELD
    assert "spec.dataset" in cond["message"] and "spec.model" not in cond["message"]
    assert reasons(events) == [Reason.IMMUTABLE_FIELD]
    assert st2["specHash"] == st["specHash"]  # the running job's fingerprint is kept
    # a change the running job honours (the operator's own stall watchdog) is fine
    tweak = manifest(watchdog={"stallTimeoutSeconds": 7200})
    st3, _ = run(tweak, st, batch_job(active=1, start=T0), [pod()])
    assert find(st3["conditions"], Condition.SPEC_CHANGE_REFUSED) is None


def test_early_stop_request_then_graceful_finish():
    obj = manifest()
    es = history(0.50, 0.41, 0.45, 0.47)
    st = running(obj, history=es, epoch=4, bestEpoch=2, bestMetric=0.41, valMetricName="val_loss")
    st, events = run(obj, st, batch_job(active=1, start=T0), [pod()], T0 + timedelta(minutes=1))
    cond = find(st["conditions"], Condition.EARLY_STOP_REQUESTED)
    assert cond["status"] == "True" and cond["reason"] == Reason.PATIENCE_EXHAUSTED
    assert "best 0.41 at epoch 2" in cond["message"] and "epoch 4" in cond["message"]
    assert st["stopRequestedTime"] == rfc3339(T0 + timedelta(minutes=1)) and not st.get("stopEnforced")
    assert reasons(events) == [Reason.PATIENCE_EXHAUSTED]
    assert st["phase"] == Phase.RUNNING
    st, events = run(obj, st, batch_job(("Complete", "")), [pod("Succeeded")], T0 + timedelta(minutes=2))
    assert (st["phase"], st["reason"]) == (Phase.SUCCEEDED, Reason.EARLY_STOPPED)
    assert st["epochsSaved"] == 1 and "after 4 of 5 epochs" in st["message"]


def test_stop_is_enforced_after_the_grace_period():
    obj = manifest(earlyStopping={"stopGracePeriodSeconds": 60})
    st = running(obj, history=history(0.5, 0.6, 0.7), epoch=3)
    asked = T0 + timedelta(minutes=1)
    st, _ = run(obj, st, batch_job(active=1, start=T0), [pod()], asked)
    st, events = run(obj, st, batch_job(active=1, start=T0), [pod()], asked + timedelta(seconds=59))
    assert not st.get("stopEnforced") and events == []
    st, events = run(obj, st, batch_job(active=1, start=T0), [pod()], asked + timedelta(seconds=60))
    assert st["stopEnforced"] is True and Reason.STOP_ENFORCED in reasons(events)
    assert st["phase"] == Phase.RUNNING  # pods still terminating
    suspended = batch_job(("Suspended", "JobSuspended"))
    suspended["spec"]["suspend"] = True
    st, events = run(obj, st, suspended, [], asked + timedelta(seconds=70))
    assert (st["phase"], st["reason"]) == (Phase.SUCCEEDED, Reason.EARLY_STOPPED)
    assert "the trainer did not stop within the grace period of 60 s" in st["message"] and st["epochsSaved"] == 2


def test_enforced_stop_says_why_when_no_pod_was_running():
    obj = manifest(earlyStopping={"stopGracePeriodSeconds": 600})
    st = running(obj, history=history(0.5, 0.6, 0.7), epoch=3)
    asked = T0 + timedelta(minutes=1)
    # The only pod just failed and its replacement is not up yet: nothing can stop gracefully.
    st, events = run(obj, st, batch_job(active=0, start=T0), [], asked)
    assert st["stopEnforced"] is True and st["stopEnforcedReason"] == "no pod was running"
    suspended = batch_job(("Suspended", "JobSuspended"))
    suspended["spec"]["suspend"] = True
    st, _ = run(obj, st, suspended, [], asked + timedelta(seconds=5))
    assert st["reason"] == Reason.EARLY_STOPPED and "suspended the Job: no pod was running" in st["message"]


def test_user_stop_by_annotation():
    obj = manifest()
    obj["metadata"]["annotations"] = {"finetune.dev/stop": "true"}
    st = running(obj, epoch=1)
    st, events = run(obj, st, batch_job(active=1, start=T0), [pod()])
    assert find(st["conditions"], Condition.EARLY_STOP_REQUESTED)["reason"] == Reason.USER_REQUESTED
    st, _ = run(obj, st, batch_job(("Complete", "")), [])
    assert (st["phase"], st["reason"]) == (Phase.SUCCEEDED, Reason.STOPPED_BY_USER)


def test_a_user_stop_obeyed_while_the_operator_was_down_ends_stopped_by_user():
    # The trainer reads spec.stop itself: with the operator down it stops and its Job completes before any
    # pass recorded the request (the kill drill found these jobs reported as EarlyStopped).
    before = manifest(hyperparameters={"epochs": 40})
    obj = manifest(hyperparameters={"epochs": 40}, stop=True)
    st = running(before, epoch=3)
    done, events = run(obj, st, batch_job(("Complete", "")), [pod("Succeeded")])
    assert (done["phase"], done["reason"], done["stopDecidedBy"]) == (Phase.SUCCEEDED, Reason.STOPPED_BY_USER, "user")
    assert Reason.USER_REQUESTED in reasons(events) and done["epochsSaved"] == 37
    # The same stop after the last epoch changes nothing: every epoch was trained.
    st = running(before, epoch=40)
    done, _ = run(obj, st, batch_job(("Complete", "")), [pod("Succeeded")])
    assert (done["phase"], done["reason"]) == (Phase.SUCCEEDED, Reason.COMPLETED)


def test_a_running_job_whose_pods_are_not_cached_yet_stays_running():
    # After an operator restart the Job may be cached before its pods (the kill drill saw Running -> Pending).
    obj = manifest()
    st = running(obj, epoch=2)
    st, _ = run(obj, st, batch_job(active=1, start=T0), [])
    assert (st["phase"], st["reason"]) == (Phase.RUNNING, "PodsRunning")
    # A Job that never ran a pod the operator saw is still Pending without pods.
    fresh, _ = run(obj, {}, None)
    fresh, _ = run(obj, fresh, batch_job(active=1, start=T0), [])
    assert fresh["phase"] == Phase.PENDING


def test_nan_loss_fails_and_frees_the_nodes():
    obj = manifest()
    st = running(obj, history=history(0.5, float("nan")), epoch=2)
    st, events = run(obj, st, batch_job(active=1, start=T0), [pod()])
    assert (st["phase"], st["reason"]) == (Phase.FAILED, Reason.NAN_LOSS)
    assert st["stopEnforced"] is True and "learningRate" in st["message"]


def test_stall_watchdog():
    obj = manifest(watchdog={"stallTimeoutSeconds": 600})
    st = running(obj, lastHeartbeatTime=rfc3339(T0 + timedelta(minutes=5)))
    st2, events = run(obj, st, batch_job(active=1, start=T0), [pod()], T0 + timedelta(minutes=14))
    assert st2["phase"] == Phase.RUNNING and events == []
    st3, events = run(obj, st, batch_job(active=1, start=T0), [pod()], T0 + timedelta(minutes=15, seconds=1))
    assert (st3["phase"], st3["reason"]) == (Phase.FAILED, Reason.STALLED)
    assert st3["stopEnforced"] is True and find(st3["conditions"], Condition.STALLED)["status"] == "True"
    disabled = manifest(watchdog={"stallTimeoutSeconds": 0})
    st4, _ = run(disabled, running(disabled), batch_job(active=1, start=T0), [pod()], T0 + timedelta(days=1))
    assert st4["phase"] == Phase.RUNNING


def test_watchdog_follows_the_heartbeat_of_progress_not_epochs():
    """Heartbeats every 30 s while steps advance keep a job with a 3-hour epoch alive; the first heartbeat that
    does not come starts the clock, and the job fails one timeout after the last progress, naming the step."""
    obj = manifest(watchdog={"stallTimeoutSeconds": 900, "heartbeatSeconds": 30})
    st = running(obj, epoch=0)
    for beat in range(0, 3 * 3600, 30):  # epoch 1 lasts three hours: no epoch-end report in that time
        st.update(lastHeartbeatTime=rfc3339(T0 + timedelta(seconds=beat)), step=beat // 3)
        st, events = run(obj, st, batch_job(active=1, start=T0), [pod()], T0 + timedelta(seconds=beat + 29))
        assert st["phase"] == Phase.RUNNING, beat
    last = T0 + timedelta(seconds=3 * 3600 - 30)  # the step counter stops at 3590: the heartbeat stops too
    st_ok, _ = run(obj, st, batch_job(active=1, start=T0), [pod()], last + timedelta(seconds=899))
    assert st_ok["phase"] == Phase.RUNNING
    st_failed, events = run(obj, st, batch_job(active=1, start=T0), [pod()], last + timedelta(seconds=900))
    assert (st_failed["phase"], st_failed["reason"]) == (Phase.FAILED, Reason.STALLED)
    assert "step counter stuck at 3590" in st_failed["message"] and reasons(events) == [Reason.STALLED]


def test_the_trainers_early_stop_decision_is_recorded_as_the_one_decision():
    obj = manifest()
    es = history(0.50, 0.41, 0.45, 0.47)
    decided = rfc3339(T0 + timedelta(seconds=30))
    st = running(obj, history=es, epoch=4, trainerStopTime=decided, trainerStopReason=Reason.PATIENCE_EXHAUSTED,
                 trainerStopMessage="val_loss has not decreased for 2 epochs", trainerStopEpoch=4)
    st, events = run(obj, st, batch_job(active=1, start=T0), [pod()], T0 + timedelta(minutes=1))
    cond = find(st["conditions"], Condition.EARLY_STOP_REQUESTED)
    assert cond["reason"] == Reason.PATIENCE_EXHAUSTED and "decided by the trainer" in cond["message"]
    assert "(at epoch 4)" in cond["message"]
    assert (st["stopRequestedTime"], st["stopDecidedBy"]) == (decided, "trainer")  # the trainer's time, not the pass's
    assert reasons(events) == [Reason.PATIENCE_EXHAUSTED]
    again, events = run(obj, st, batch_job(active=1, start=T0), [pod()], T0 + timedelta(minutes=2))
    assert events == [] and again["stopRequestedTime"] == decided  # idempotent: one decision
    done, _ = run(obj, st, batch_job(("Complete", "")), [pod("Succeeded")], T0 + timedelta(minutes=3))
    assert (done["phase"], done["reason"]) == (Phase.SUCCEEDED, Reason.EARLY_STOPPED)
    assert "the trainer stopped at the end of the epoch it decided at" in done["message"]


def test_a_trainer_decision_that_arrives_with_the_jobs_completion_is_still_recorded():
    obj = manifest()
    st = running(obj, history=history(0.50, 0.41, 0.45, 0.47), epoch=4, trainerStopTime=rfc3339(T0),
                 trainerStopReason=Reason.PATIENCE_EXHAUSTED, trainerStopMessage="patience", trainerStopEpoch=4)
    done, events = run(obj, st, batch_job(("Complete", "")), [pod("Succeeded")], T0 + timedelta(minutes=1))
    assert (done["phase"], done["reason"], done["stopDecidedBy"]) == (Phase.SUCCEEDED, Reason.EARLY_STOPPED, "trainer")
    assert Reason.PATIENCE_EXHAUSTED in reasons(events)


def test_an_older_trainer_that_cannot_decide_is_stopped_by_the_operator():
    obj = manifest()
    st = running(obj, history=history(0.50, 0.41, 0.45, 0.47), epoch=4)  # no trainerStop* fields
    st, _ = run(obj, st, batch_job(active=1, start=T0), [pod()], T0 + timedelta(minutes=1))
    assert st["stopDecidedBy"] == "operator" and "decided by the operator" in find(
        st["conditions"], Condition.EARLY_STOP_REQUESTED)["message"]


def test_suspend_and_resume():
    obj = manifest()
    st = running(obj)
    st, events = run(manifest(suspend=True), st, batch_job(("Suspended", "JobSuspended")), [])
    assert (st["phase"], st["reason"]) == (Phase.SUSPENDED, Reason.JOB_SUSPENDED) and reasons(events) == [Reason.JOB_SUSPENDED]
    st, events = run(obj, st, batch_job(), [])
    assert Reason.JOB_RESUMED in reasons(events) and st["phase"] == Phase.PENDING


def test_status_patch_holds_only_changes_of_operator_fields():
    old = {"phase": "Running", "epoch": 3, "history": [{"epoch": 1}], "stopReason": "x"}
    new = {"phase": "Running", "stopReason": None, "message": "m", "epochsSaved": None}
    assert status_patch(old, new) == {"stopReason": None, "message": "m"}


def test_a_trainer_that_exits_after_the_request_is_not_reported_as_enforced():
    obj = manifest(earlyStopping={"stopGracePeriodSeconds": 60})
    st = running(obj, history=history(0.5, 0.6, 0.7), epoch=3)
    st, _ = run(obj, st, batch_job(active=1, start=T0), [pod()], T0 + timedelta(seconds=1))
    # the pod finished but the Job controller has not marked the Job Complete yet
    st, events = run(obj, st, batch_job(start=T0), [pod("Succeeded")], T0 + timedelta(seconds=2))
    assert not st.get("stopEnforced") and events == []
    st, _ = run(obj, st, batch_job(("Complete", "")), [pod("Succeeded")], T0 + timedelta(seconds=3))
    assert (st["phase"], st["reason"]) == (Phase.SUCCEEDED, Reason.EARLY_STOPPED) and "gracefully" in st["message"]


def test_stop_before_any_pod_started_is_enforced_at_once():
    obj = manifest()
    obj["metadata"]["annotations"] = {"finetune.dev/stop": "true"}
    st, _ = run(obj, {})
    st, events = run(obj, st, batch_job(), [pod("Pending")])
    assert st["stopEnforced"] is True and Reason.STOP_ENFORCED in reasons(events)


def test_settings_from_env():
    from finetune_operator.settings import from_env

    s = from_env({"FTO_NAMESPACES": "a, b", "FTO_LOG_FORMAT": "JSON", "FTO_METRICS_PORT": "0", "FTO_TYPO": "1"})
    assert s.namespaces == ("a", "b") and not s.clusterwide and s.log_format == "json" and s.metrics_port == 0
    assert dict(s.extra) == {"FTO_TYPO": "1"}
    assert from_env({}).clusterwide and from_env({}).api_pool_size == 16
