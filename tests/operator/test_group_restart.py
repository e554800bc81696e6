"""Group restarts (issue 15): the Job's podFailurePolicy, the elastic launcher's command, and the restart accounting
in status (restarts, lastRestart, RepeatedFailure), all pure."""

from __future__ import annotations

import copy
import json
from datetime import timedelta

from ftj_builders import manifest
from test_operator_status import T0, batch_job, pod, run, running

from finetune_contract.config import (
    EXIT_DATASET_UNREADABLE,
    EXIT_DISK_FULL,
    EXIT_INCOMPATIBLE_CONFIG,
    EXIT_WORLD_MISMATCH,
)
from finetune_operator.api import validate_manifest
from finetune_operator.api.constants import Phase, Reason
from finetune_operator.plan import children
from finetune_operator.plan.conditions import rfc3339
from finetune_operator.plan.status import REPEATED_FAILURE_LIMIT, RESTART_FOLD_SECONDS
from finetune_operator.settings import Settings

INDEX = "batch.kubernetes.io/job-completion-index"


def two_nodes(**spec):
    return manifest(distributed={"nodes": 2}, **spec)


def failed(name, index, at, code=137, reason="Error", disruption=None):
    p = pod("Failed", name=name, state={"terminated": {"reason": reason, "exitCode": code, "finishedAt": rfc3339(at)}})
    p["metadata"]["annotations"] = {INDEX: str(index)}
    if disruption:
        p["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": disruption,
                                      "message": "preempting", "lastTransitionTime": rfc3339(at)}]
    return p


def live(name="bbc-news-train-0-abcde"):
    return pod("Running", name=name)


def test_job_fails_fast_on_config_errors_and_ignores_disruptions():
    job = children.batch_job(validate_manifest(two_nodes()), Settings())
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never" and spec["podReplacementPolicy"] == "Failed"
    fail_job, ignore = spec["podFailurePolicy"]["rules"]
    assert fail_job == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                               "values": [EXIT_WORLD_MISMATCH, EXIT_INCOMPATIBLE_CONFIG,
                                                                          EXIT_DISK_FULL, EXIT_DATASET_UNREADABLE]}}
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert spec["template"]["spec"]["containers"][0]["name"] == "trainer"
    env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert env["FINETUNE_RDZV_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/controller-uid']"


def test_launcher_uses_an_elastic_rendezvous_hosted_by_node_zero():
    from finetune_contract.spec import DistributedSpec
    from finetune_trainer.__main__ import torchrun_command
    from finetune_trainer.config import Runtime

    env = {"MASTER_ADDR": "j-train-0.j-rdzv", "MASTER_PORT": "29500", "FINETUNE_RDZV_ID": "uid-1",
           "JOB_COMPLETION_INDEX": "1"}
    cmd = torchrun_command(Runtime.from_env(env), 2, 1, DistributedSpec(processGroupTimeoutSeconds=90, maxRestarts=4))
    args = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert args["--rdzv-backend"] == "c10d" and args["--rdzv-endpoint"] == "j-train-0.j-rdzv:29500"
    assert args["--rdzv-id"] == "uid-1" and args["--max-restarts"] == "4" and "--node-rank" not in cmd
    assert args["--rdzv-conf"] == "is_host=0,read_timeout=90,join_timeout=600"
    host = torchrun_command(Runtime.from_env({**env, "JOB_COMPLETION_INDEX": "0"}), 2, 1, DistributedSpec())
    assert "is_host=1,read_timeout=180," in host[host.index("--rdzv-conf") + 1]
    # One pod: no peer pod to wait for, so a dead rank fails the pod (backoffLimit) instead of restarting in place.
    one = torchrun_command(Runtime.from_env({**env, "JOB_COMPLETION_INDEX": "0"}), 1, 4, DistributedSpec(maxRestarts=4))
    assert one[one.index("--max-restarts") + 1] == "0"


def test_a_rank_failure_message_names_the_rank_the_cause_and_fits_the_operator_s_300_characters(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from finetune_trainer.failures import rank_failure_message

    error_file = tmp_path / "error.json"
    error_file.write_text(json.dumps({"message": {"message": "RuntimeError: " + "x" * 500,
                                                  "extraInfo": {"py_callstack": "...", "timestamp": "1"}}}))
    raised = ProcessFailure(local_rank=3, pid=42, exitcode=1, error_file=str(error_file))
    text = rank_failure_message(7, raised, [5, 7])
    assert text.startswith("rank 7 (local rank 3, pid 42) failed first, with exit code 1: RuntimeError: xxx")
    assert "ranks 5 failed after it" in text and len(text) <= 300
    killed = ProcessFailure(local_rank=0, pid=9, exitcode=-9, error_file=str(tmp_path / "none"))
    assert "with signal SIGKILL: Signal 9 (SIGKILL) received by PID 9" in rank_failure_message(0, killed, [0])


def test_a_lost_pod_is_one_restart_with_its_rank_and_cause_counted_once():
    obj = two_nodes()
    st = running(obj)
    lost = failed("bbc-news-train-1-aaaaa", 1, T0 + timedelta(seconds=5))
    st, events = run(obj, st, batch_job(active=1), [live(), lost], T0 + timedelta(seconds=6))
    assert st["phase"] == Phase.RUNNING and st["restarts"] == 1
    last = st["lastRestart"]
    assert (last["pod"], last["nodeRank"], last["reason"], last["exitCode"], last["charged"]) == \
        ("bbc-news-train-1-aaaaa", 1, Reason.POD_ERROR, 137, True)
    assert Reason.GROUP_RESTARTED in [e.reason for e in events] and "node rank 1" in events[0].message
    # The same failed pod on the next pass (and the replacement running) changes nothing.
    again, events = run(obj, st, batch_job(active=2), [live(), lost, live("bbc-news-train-1-bbbbb")],
                        T0 + timedelta(seconds=20))
    assert again["restarts"] == 1 and Reason.GROUP_RESTARTED not in [e.reason for e in events]


def test_disruption_is_counted_but_not_charged_and_never_stops_the_job():
    obj = two_nodes()
    st = running(obj)
    pods = [live()]
    for i in range(REPEATED_FAILURE_LIMIT + 1):
        at = T0 + timedelta(seconds=100 * (i + 1))
        pods.append(failed(f"bbc-news-train-1-p{i}", 1, at, code=143, disruption="PreemptionByScheduler"))
        st, _ = run(obj, st, batch_job(active=1), pods, at + timedelta(seconds=1))
    assert st["phase"] == Phase.RUNNING and st["restarts"] == REPEATED_FAILURE_LIMIT + 1
    assert st["lastRestart"]["reason"] == Reason.DISRUPTED and st["lastRestart"]["charged"] is False
    assert "PreemptionByScheduler" in st["lastRestart"]["message"]


def test_failures_right_after_a_restart_fold_into_it():
    obj = two_nodes()
    host_lost = failed("bbc-news-train-0-aaaaa", 0, T0 + timedelta(seconds=5))
    follower = failed("bbc-news-train-1-aaaaa", 1, T0 + timedelta(seconds=5 + RESTART_FOLD_SECONDS - 1), code=1)
    st, _ = run(obj, running(obj), batch_job(active=0), [host_lost, follower], T0 + timedelta(seconds=60))
    assert st["restarts"] == 1 and st["lastRestart"]["pod"] == "bbc-news-train-0-aaaaa"
    assert sorted(st["restartedPods"]) == ["bbc-news-train-0-aaaaa", "bbc-news-train-1-aaaaa"]


def test_the_same_rank_failing_the_same_way_stops_the_job_with_an_actionable_reason():
    obj = two_nodes()
    st = running(obj)
    pods = [live()]
    for i in range(REPEATED_FAILURE_LIMIT):
        at = T0 + timedelta(seconds=100 * (i + 1))
        pods.append(failed(f"bbc-news-train-1-o{i}", 1, at, reason="OOMKilled"))
        st, events = run(obj, st, batch_job(active=1), pods, at + timedelta(seconds=1))
        if i < REPEATED_FAILURE_LIMIT - 1:
            assert st["phase"] == Phase.RUNNING
    assert (st["phase"], st["reason"]) == (Phase.FAILED, Reason.REPEATED_FAILURE)
    assert f"node rank 1 failed {REPEATED_FAILURE_LIMIT} times in a row" in st["message"]
    assert "OOMKilled" in st["message"] and "batchSize" in st["message"] and st["stopEnforced"] is True


def test_another_cause_resets_the_repeat_count():
    obj = two_nodes()
    st = running(obj)
    pods = [live()]
    for i, reason in enumerate(["OOMKilled", "OOMKilled", "Error", "OOMKilled"]):
        at = T0 + timedelta(seconds=100 * (i + 1))
        pods.append(failed(f"bbc-news-train-1-m{i}", 1, at, reason=reason, code=137 if reason == "OOMKilled" else 1))
        st, _ = run(obj, st, batch_job(active=1), pods, at + timedelta(seconds=1))
    assert st["phase"] == Phase.RUNNING and st["restarts"] == 4 and st["lastRestart"]["repeats"] == 1


def test_pods_stopped_by_a_suspend_are_no_restarts():
    obj = two_nodes(suspend=True)
    st = running(two_nodes())
    st, _ = run(obj, st, batch_job(active=0), [failed("bbc-news-train-1-s", 1, T0, code=143)], T0 + timedelta(seconds=2))
    assert not st.get("restarts")


def test_a_pod_failure_policy_failure_names_the_exit_code():
    obj = two_nodes()
    job = batch_job(("Failed", "PodFailurePolicy"))
    job["status"]["conditions"][0]["message"] = ("Container trainer for pod ns/bbc-news-train-1-x failed with exit code 3 "
                                                "matching FailJob rule at index 0")
    st, _ = run(obj, running(obj), job, [failed("bbc-news-train-1-x", 1, T0, code=3)], T0 + timedelta(seconds=2))
    assert (st["phase"], st["reason"]) == (Phase.FAILED, Reason.FAILED_BY_POLICY)
    assert "exit code 3" in st["message"] and "spec.image" in st["message"]


def test_the_new_status_fields_pass_the_crd_schema():
    from finetune_operator.api.status import FineTuneJobStatus

    obj = two_nodes()
    st, _ = run(obj, running(obj), batch_job(active=1), [live(), failed("bbc-news-train-1-z", 1, T0)], T0)
    FineTuneJobStatus.model_validate(copy.deepcopy(st))


def test_workers_get_the_jobs_process_group_timeout():
    from finetune_contract.spec import FineTuneJobSpec
    from finetune_trainer.worker import process_group_kwargs

    spec = validate_manifest(manifest(distributed={"nodes": 2, "processGroupTimeoutSeconds": 45})).spec
    (kwargs,) = process_group_kwargs(spec)
    assert kwargs.timeout == timedelta(seconds=45)
    assert process_group_kwargs(FineTuneJobSpec.model_validate(
        {"model": {"name": "m"}, "dataset": {"source": "d"}}))[0].timeout == timedelta(seconds=180)
