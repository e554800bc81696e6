"""The pod runner plays the Job controller and kubelet faithfully enough for the operator's e2e tests."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from .pod_runner import INDEX_KEY, METRICS_PORT_ANNOTATION

pytestmark = pytest.mark.e2e


def job_manifest(name: str, code: str, *, completions: int = 1, indexed: bool = True, **spec: Any) -> dict:
    container = {"name": "main", "image": "python:3.11", "command": [sys.executable, "-c", textwrap.dedent(code)]}
    container.update(spec.pop("container", {}))
    pod_spec = {"restartPolicy": "Never", "containers": [container], "terminationGracePeriodSeconds": 2}
    pod_spec.update(spec.pop("pod", {}))
    body = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"completions": completions, "parallelism": completions, "backoffLimit": 0,
                 "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec}, **spec},
    }
    if indexed:
        body["spec"]["completionMode"] = "Indexed"
    return body


def job_status(api: Any, namespace: str, name: str) -> dict:
    return api.batch.read_namespaced_job_status(name, namespace).to_dict()["status"] or {}


def condition(status: dict, type_: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_ and c["status"] == "True"), None)


def test_indexed_job_runs_with_env_hostnames_and_volumes(api, namespace, pod_runner, wait_for, tmp_path):
    api.core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"config.json": '{"a": 1}'}})
    code = """
        import json, os, socket, pathlib
        out = pathlib.Path(os.environ["OUT"]) / f"rank-{os.environ['JOB_COMPLETION_INDEX']}.json"
        out.write_text(json.dumps({
            "index": os.environ["JOB_COMPLETION_INDEX"], "pod": os.environ["POD_NAME"], "ns": os.environ["POD_NS"],
            "master": os.environ["MASTER_ADDR"], "master_ip": socket.gethostbyname(os.environ["MASTER_ADDR"]),
            "port": os.environ["MASTER_PORT"], "metrics": os.environ["FINETUNE_METRICS_PORT"],
            "config": open(os.environ["FINETUNE_CONFIG"]).read(), "hostname": os.environ["HOSTNAME"],
            "expanded": os.environ["EXPANDED"], "kubeconfig": os.environ["KUBECONFIG"],
        }))
    """
    body = job_manifest("idx", code, completions=2, container={
        "env": [
            {"name": "OUT", "value": "/data/out"},
            {"name": "FINETUNE_CONFIG", "value": "/etc/finetune/config.json"},
            {"name": "MASTER_ADDR", "value": f"idx-0.idx-svc.{namespace}.svc"},
            {"name": "MASTER_PORT", "value": "29500"},
            {"name": "FINETUNE_METRICS_PORT", "value": "9400"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "EXPANDED", "value": "rank=$(JOB_COMPLETION_INDEX)"},
        ],
        "volumeMounts": [{"name": "config", "mountPath": "/etc/finetune"}, {"name": "data", "mountPath": "/data"}],
    }, pod={"subdomain": "idx-svc", "volumes": [
        {"name": "config", "configMap": {"name": "cfg"}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}},
    ]})
    # The PVC directory must exist before the pods write into its subdirectory.
    (pod_runner.workdir / "pvc" / namespace / "shared" / "out").mkdir(parents=True)
    api.batch.create_namespaced_job(namespace, body)
    status = wait_for(lambda: condition(job_status(api, namespace, "idx"), "Complete") and job_status(
        api, namespace, "idx"), what="Job idx Complete")
    assert status["succeeded"] == 2 and not status.get("failed") and status["completed_indexes"] == "0-1"
    assert status["start_time"] and status["completion_time"]
    assert condition(status, "SuccessCriteriaMet")

    pods = api.core.list_namespaced_pod(namespace, label_selector="app=idx").items
    assert sorted(p.metadata.labels[INDEX_KEY] for p in pods) == ["0", "1"]
    results = {}
    for pod in pods:
        index = pod.metadata.annotations[INDEX_KEY]
        assert pod.metadata.name.startswith(f"idx-{index}-")
        assert pod.spec.hostname == f"idx-{index}" and pod.spec.subdomain == "idx-svc"
        assert pod.metadata.owner_references[0].kind == "Job" and pod.metadata.owner_references[0].controller
        assert pod.status.phase == "Succeeded"
        assert pod.status.container_statuses[0].state.terminated.exit_code == 0
        out = pod_runner.workdir / "pvc" / namespace / "shared" / "out" / f"rank-{index}.json"
        results[index] = json.loads(out.read_text())
        assert results[index]["pod"] == pod.metadata.name
        assert results[index]["metrics"] == pod.metadata.annotations[METRICS_PORT_ANNOTATION]
    assert results["0"]["ns"] == namespace and results["0"]["config"] == '{"a": 1}'
    assert results["0"]["master"] == results["1"]["master"] == "127.0.0.1" == results["0"]["master_ip"]
    assert results["0"]["port"] == results["1"]["port"] != "29500"  # one free port per Job
    assert results["0"]["metrics"] != results["1"]["metrics"]  # one free port per pod
    assert results["1"]["hostname"] == "idx-1" and results["1"]["expanded"] == "rank=1"
    assert results["0"]["kubeconfig"] == str(pod_runner.kubeconfig)


def test_failed_pod_is_retried_up_to_backoff_limit(api, namespace, pod_runner, wait_for):
    # Fails until a marker file exists: the first attempt fails, the retry succeeds.
    code = """
        import os, pathlib, sys
        marker = pathlib.Path(os.environ["STATE"]) / "attempted"
        if not marker.exists():
            marker.write_text("1"); print("first attempt fails"); sys.exit(3)
        print("second attempt succeeds")
    """
    body = job_manifest("retry", code, backoffLimit=1, container={
        "env": [{"name": "STATE", "value": "/state"}], "volumeMounts": [{"name": "s", "mountPath": "/state"}]},
        pod={"volumes": [{"name": "s", "persistentVolumeClaim": {"claimName": "retry-state"}}]})
    api.batch.create_namespaced_job(namespace, body)
    status = wait_for(lambda: (s := job_status(api, namespace, "retry")) and condition(s, "Complete") and s,
                      what="Job retry Complete")
    assert status["failed"] == 1 and status["succeeded"] == 1
    failed = [p for p in api.core.list_namespaced_pod(namespace).items if p.status.phase == "Failed"]
    assert len(failed) == 1 and failed[0].status.container_statuses[0].state.terminated.exit_code == 3
    assert "first attempt fails" in pod_runner.logs(failed[0].metadata.name)


def test_backoff_limit_exceeded_fails_the_job(api, namespace, pod_runner, wait_for):
    api.batch.create_namespaced_job(namespace, job_manifest("doomed", "import sys; sys.exit(1)", backoffLimit=1))
    status = wait_for(lambda: (s := job_status(api, namespace, "doomed")) and condition(s, "Failed") and s,
                      what="Job doomed Failed")
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
    assert condition(status, "FailureTarget")
    assert status["failed"] == 2 and not status.get("active")


def test_active_deadline_fails_the_job(api, namespace, pod_runner, wait_for):
    api.batch.create_namespaced_job(namespace, job_manifest("slow", "import time; time.sleep(60)",
                                                            activeDeadlineSeconds=1))
    status = wait_for(lambda: (s := job_status(api, namespace, "slow")) and condition(s, "Failed") and s,
                      what="Job slow Failed")
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: not api.core.list_namespaced_pod(namespace).items, what="pods deleted")


def test_suspend_stops_pods_and_resume_restarts_them(api, namespace, pod_runner, wait_for):
    code = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (print("got SIGTERM", flush=True), sys.exit(0)))
        print("started", flush=True)
        time.sleep(60)
    """
    api.batch.create_namespaced_job(namespace, job_manifest("susp", code))
    wait_for(lambda: job_status(api, namespace, "susp").get("ready") == 1, what="pod ready")
    first = pod_runner.pod_names("susp")
    wait_for(lambda: "started" in pod_runner.logs(first[0]), what="process started")

    api.batch.patch_namespaced_job("susp", namespace, {"spec": {"suspend": True}})
    status = wait_for(lambda: (s := job_status(api, namespace, "susp")) and condition(s, "Suspended") and s,
                      what="Suspended condition")
    assert condition(status, "Suspended")["reason"] == "JobSuspended"
    wait_for(lambda: not api.core.list_namespaced_pod(namespace).items, what="pods deleted on suspend")
    assert "got SIGTERM" in pod_runner.logs(first[0])
    assert not status.get("failed")  # a suspended pod is not a failure

    api.batch.patch_namespaced_job("susp", namespace, {"spec": {"suspend": False}})
    wait_for(lambda: job_status(api, namespace, "susp").get("ready") == 1, what="pod ready after resume")
    resumed = job_status(api, namespace, "susp")
    assert any(c["type"] == "Suspended" and c["status"] == "False" and c["reason"] == "JobResumed"
               for c in resumed["conditions"])
    assert len(pod_runner.pod_names("susp", include_gone=True)) == 2


def test_deleting_a_pod_counts_as_failure_and_is_replaced(api, namespace, pod_runner, wait_for):
    api.batch.create_namespaced_job(namespace, job_manifest("lost", "import time; time.sleep(60)", backoffLimit=2))
    wait_for(lambda: job_status(api, namespace, "lost").get("ready") == 1, what="pod ready")
    victim = pod_runner.pod_names("lost")[0]
    api.core.delete_namespaced_pod(victim, namespace)  # graceful: the runner terminates, then removes it
    wait_for(lambda: victim not in [p.metadata.name for p in api.core.list_namespaced_pod(namespace).items],
             what="deleted pod gone")
    wait_for(lambda: job_status(api, namespace, "lost").get("failed") == 1 and
             job_status(api, namespace, "lost").get("active") == 1, what="replacement pod")
    assert len(pod_runner.pod_names("lost", include_gone=True)) == 2


def test_fail_pod_and_oom_kill_knobs(api, namespace, pod_runner, wait_for):
    api.batch.create_namespaced_job(namespace, job_manifest("oom", "import time; time.sleep(60)"))
    wait_for(lambda: job_status(api, namespace, "oom").get("ready") == 1, what="pod ready")
    name = pod_runner.pod_names("oom")[0]
    pod_runner.oom_kill(name)
    status = wait_for(lambda: (s := job_status(api, namespace, "oom")) and condition(s, "Failed") and s,
                      what="Job oom Failed")
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
    terminated = api.core.read_namespaced_pod(name, namespace).status.container_statuses[0].state.terminated
    assert (terminated.reason, terminated.exit_code) == ("OOMKilled", 128 + signal.SIGKILL)


def test_deleting_the_job_stops_its_processes(api, namespace, pod_runner, wait_for):
    api.batch.create_namespaced_job(namespace, job_manifest("gone", "import time; time.sleep(60)"))
    wait_for(lambda: job_status(api, namespace, "gone").get("ready") == 1, what="pod ready")
    pod = pod_runner.pods[(namespace, pod_runner.pod_names("gone")[0])]
    api.batch.delete_namespaced_job("gone", namespace, propagation_policy="Background")
    wait_for(lambda: pod.processes and all(p.returncode is not None for p in pod.processes), what="process killed")
    wait_for(lambda: not api.core.list_namespaced_pod(namespace).items, what="pods collected")


def test_non_indexed_job_and_missing_command(api, namespace, pod_runner, wait_for):
    api.batch.create_namespaced_job(namespace, job_manifest("plain", "print('hi')", completions=2, indexed=False))
    status = wait_for(lambda: (s := job_status(api, namespace, "plain")) and condition(s, "Complete") and s,
                      what="Job plain Complete")
    assert status["succeeded"] == 2 and not status.get("completed_indexes")
    assert all("hi" in pod_runner.logs(n) for n in pod_runner.pod_names("plain", include_gone=True))

    body = job_manifest("nocmd", "")
    del body["spec"]["template"]["spec"]["containers"][0]["command"]
    api.batch.create_namespaced_job(namespace, body)
    status = wait_for(lambda: (s := job_status(api, namespace, "nocmd")) and condition(s, "Failed") and s,
                      what="Job nocmd Failed")
    pod = api.core.list_namespaced_pod(namespace, label_selector="app=nocmd").items[0]
    assert pod.status.container_statuses[0].state.terminated.reason == "CreateContainerConfigError"


POLICY = {"rules": [
    {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [2, 3]}},
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
]}


def test_pod_failure_policy_fail_job_on_an_exit_code(api, namespace, pod_runner, wait_for):
    """FailJob: the Job fails at the first such pod, whatever backoffLimit says, with the controller's reason."""
    api.batch.create_namespaced_job(namespace, job_manifest("pfp-fail", "raise SystemExit(3)", backoffLimit=5,
                                                            podFailurePolicy=POLICY))
    status = wait_for(lambda: condition(s := job_status(api, namespace, "pfp-fail"), "Failed") and s, what="Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "PodFailurePolicy" and "exit code 3 matching FailJob rule at index 0" in failed["message"]
    assert status["failed"] == 1 and len(pod_runner.pod_names("pfp-fail", include_gone=True)) == 1


def test_pod_failure_policy_ignores_a_disrupted_pod_and_replaces_it(api, namespace, pod_runner, wait_for, tmp_path):
    """Ignore: the disrupted pod gets the DisruptionTarget condition, is replaced, and is not counted (backoffLimit 0)."""
    marker = tmp_path / "second"
    code = f"""
        import pathlib, time
        marker = pathlib.Path({str(marker)!r})
        if marker.exists():
            raise SystemExit(0)
        marker.write_text("")
        time.sleep(60)
    """
    api.batch.create_namespaced_job(namespace, job_manifest("pfp-ignore", code, podFailurePolicy=POLICY))
    first = wait_for(lambda: marker.exists() and pod_runner.pod_names("pfp-ignore"), what="the first pod running")[0]
    pod_runner.disrupt(first, reason="PreemptionByScheduler")
    status = wait_for(lambda: condition(s := job_status(api, namespace, "pfp-ignore"), "Complete") and s, what="Complete")
    assert not status.get("failed") and status["succeeded"] == 1
    pod = api.core.read_namespaced_pod(first, namespace).to_dict()
    disruption = next(c for c in pod["status"]["conditions"] if c["type"] == "DisruptionTarget")
    assert (pod["status"]["phase"], disruption["status"], disruption["reason"]) == ("Failed", "True", "PreemptionByScheduler")


def test_a_killed_pod_takes_every_process_in_it(api, namespace, pod_runner, wait_for, tmp_path):
    """torch elastic starts workers in sessions of their own: killing the pod must still end them (a container's
    processes die with it), or a "lost" pod's worker would train on."""
    pid_file = tmp_path / "grandchild.pid"
    code = f"""
        import pathlib, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))
        time.sleep(120)
    """
    api.batch.create_namespaced_job(namespace, job_manifest("tree", code))
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the worker started")
    pod_runner.kill(pod_runner.pod_names("tree")[0])
    wait_for(lambda: condition(job_status(api, namespace, "tree"), "Failed"), what="Failed")
    pid = int(pid_file.read_text())
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             what="the session-leader grandchild killed")
