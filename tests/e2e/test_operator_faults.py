"""API faults through the emulation (issue 12): 409 conflicts, 429 with Retry-After, 500s, answers slower
than the client's timeout, dropped watches, 410 Gone, an API server restart. Each must be retried with
backoff, and none may corrupt a job's status.

One operator serves the module (starting one costs ~5 s); it authenticates with its own token, so faults
aimed at that token (the emulation's `/_e2e/faults`, see emulator.py) hit only its requests, never the
test's own reads and writes. Jobs are created suspended: the operator's work (children, status) is all
there is, no pods.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO, apply_crds
from .drill import Recorder, history_violations
from .kubeconfig import api_clients
from .operator_fixture import OperatorProcess
from .operator_helpers import (
    children,
    condition,
    create,
    faults,
    ftj,
    kube_client,
    patch,
    status,
    token_kubeconfig,
)

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = [pytest.mark.e2e, pytest.mark.emulation_only("injects faults through the emulation's /_e2e/faults endpoint")]

TOKEN = "faults-operator"
API_TIMEOUT = 2  # FTO_API_TIMEOUT_SECONDS of the module's operator: the slow-answer test waits beyond it


@pytest.fixture(scope="module")
def op(kube, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults-operator")
    proc = OperatorProcess(token_kubeconfig(kube.kubeconfig, TOKEN, workdir / "kubeconfig.yaml"), workdir,
                           FTO_API_TIMEOUT_SECONDS=str(API_TIMEOUT))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def c(kube):
    client = kube_client(kube.kubeconfig)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _clear_faults(kube):
    yield
    if kube.emulated:
        urllib.request.urlopen(urllib.request.Request(f"{kube.url}/_e2e/faults", method="DELETE"), timeout=10).close()


def inject(kube, namespace: str, **fault) -> str:
    """Add one fault aimed at the operator in `namespace`; returns its id for `hits`."""
    fault_id = f"{namespace}-{time.monotonic_ns()}"
    faults(kube.url, {"id": fault_id, "token": TOKEN, "namespace": namespace, **fault})
    return fault_id


def hits(kube, fault_id: str) -> list[float]:
    """Wall times at which the fault answered a request."""
    return next(f["hitTimes"] for f in faults(kube.url)["faults"] if f.get("id") == fault_id)


def suspended(c, namespace: str, name: str, wait_for, timeout: float = 30):
    return wait_for(lambda: (s := status(c, namespace, name)).get("phase") == "Suspended" and s, timeout=timeout,
                    what=f"{name} Suspended")


def assert_status_whole(st: dict, generation: int = 1) -> None:
    """What a good pass writes: the phase with its reason, the generation it saw, every condition there."""
    assert st["phase"] == "Suspended" and st["reason"] and st["observedGeneration"] == generation
    assert st["jobName"] and condition(st, "Valid")["status"] == "True"
    assert all(cond.get("observedGeneration", 0) <= generation for cond in st.get("conditions") or [])


def failed_passes(op: OperatorProcess, namespace: str, name: str) -> list[str]:
    return [line for line in op.logs().splitlines()
            if f"reconcile of job {namespace}/{name} failed" in line]


def one_of_each(c, namespace: str, name: str) -> None:
    kids = children(c, namespace, name)
    assert {k: len(v) for k, v in kids.items()} == dict.fromkeys(kids, 1), kids


def test_conflict_on_status_patch_is_retried_by_the_work_queue(kube, op, c, namespace, wait_for):
    # 409 is a verdict about the request, not a passing fault: the client does not retry it, the pass fails
    # and the work queue runs it again with backoff, re-reading the cache and re-planning.
    fid = inject(kube, namespace, code=409, verbs=["patch"], resource="finetunejobs/status", count=3)
    create(c, namespace, ftj("conflicted", suspend=True))
    st = suspended(c, namespace, "conflicted", wait_for)
    assert len(hits(kube, fid)) == 3
    assert len(failed_passes(op, namespace, "conflicted")) == 3
    assert_status_whole(st)
    one_of_each(c, namespace, "conflicted")


def test_conflict_on_apply_is_retried_and_the_drift_repaired(kube, op, c, namespace, wait_for):
    create(c, namespace, ftj("drifted", suspend=True))
    suspended(c, namespace, "drifted", wait_for)
    config = f"/api/v1/namespaces/{namespace}/configmaps/drifted-config"
    original = c.get(config)["data"]
    fid = inject(kube, namespace, code=409, verbs=["patch"], resource="configmaps", count=2)
    c.request("PATCH", config, body={"data": {next(iter(original)): "edited by hand"}},
              content_type="application/merge-patch+json")
    wait_for(lambda: c.get(config)["data"] == original, timeout=30, what="the ConfigMap applied back")
    assert len(hits(kube, fid)) == 2
    assert len(failed_passes(op, namespace, "drifted")) == 2
    assert_status_whole(status(c, namespace, "drifted"))
    one_of_each(c, namespace, "drifted")


def test_429_waits_the_servers_retry_after_inside_the_client(kube, op, c, namespace, wait_for):
    fid = inject(kube, namespace, code=429, retryAfter=1, verbs=["create"], resource="configmaps", count=2)
    create(c, namespace, ftj("throttled", suspend=True))
    st = suspended(c, namespace, "throttled", wait_for)
    times = hits(kube, fid)
    assert len(times) == 2 and times[1] - times[0] >= 0.95, times  # Retry-After: 1, not the 0.2 s backoff
    assert failed_passes(op, namespace, "throttled") == []  # absorbed by the client: the pass never failed
    assert_status_whole(st)
    one_of_each(c, namespace, "throttled")


def test_500s_are_retried_with_growing_backoff(kube, op, c, namespace, wait_for):
    fid = inject(kube, namespace, code=500, verbs=["patch"], resource="finetunejobs/status", count=3)
    create(c, namespace, ftj("erring", suspend=True))
    st = suspended(c, namespace, "erring", wait_for)
    times = hits(kube, fid)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 3 and gaps[0] >= 0.19 and gaps[1] >= 0.39, gaps  # 0.2 s, then 0.4 s (RetryPolicy)
    assert failed_passes(op, namespace, "erring") == []
    assert_status_whole(st)


def test_an_answer_slower_than_the_client_timeout_is_abandoned_and_retried(kube, op, c, namespace, wait_for):
    # Without a read timeout the worker would wait the full minute for this answer.
    fid = inject(kube, namespace, delay=60, verbs=["patch"], resource="finetunejobs/status", count=1)
    started = time.monotonic()
    create(c, namespace, ftj("slow", suspend=True))
    st = suspended(c, namespace, "slow", wait_for, timeout=25)
    assert len(hits(kube, fid)) == 1 and time.monotonic() - started >= API_TIMEOUT
    assert_status_whole(st)


def test_dropped_watches_are_reopened(kube, op, c, namespace, wait_for):
    create(c, namespace, ftj("before", suspend=True))
    suspended(c, namespace, "before", wait_for)
    dropped = faults(kube.url, action="drop-watches")["dropped"]
    print(f"dropped watch streams: {dropped}")
    assert dropped >= 9  # the operator's FineTuneJob watch and its 8 child/pod watches, at least
    create(c, namespace, ftj("after", suspend=True))  # while the operator re-connects
    assert_status_whole(suspended(c, namespace, "after", wait_for))
    one_of_each(c, namespace, "after")


def test_410_gone_makes_the_operator_relist_and_see_what_it_missed(kube, op, c, namespace, wait_for):
    create(c, namespace, ftj("relisted", suspend=True))
    suspended(c, namespace, "relisted", wait_for)
    # etcd compacted as the operator sees it: its watches must not resume from any version it has seen.
    fid = f"gone-{namespace}"  # the operator watches cluster-wide: no namespace filter here
    faults(kube.url, {"id": fid, "token": TOKEN, "code": 410, "verbs": ["watch"], "count": 100})
    faults(kube.url, action="drop-watches")
    create(c, namespace, ftj("missed", suspend=True))  # while the operator is away: only a re-list shows it
    assert_status_whole(suspended(c, namespace, "missed", wait_for))
    gone = hits(kube, fid)
    print(f"watches answered 410 Gone: {len(gone)}")
    assert len(gone) >= 9  # every resumed watch was answered 410 (then re-listed)
    one_of_each(c, namespace, "missed")
    one_of_each(c, namespace, "relisted")


# -- an API server restart: the emulation stopped and started on the same port, its objects kept -----------

class RestartableApi:
    def __init__(self, workdir: Path):
        self.workdir, self.kubeconfig, self.state = workdir, workdir / "kubeconfig.yaml", workdir / "state.json"
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> str:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "e2e.emulator", "--kubeconfig", str(self.kubeconfig), "--port", str(self.port),
             "--state", str(self.state)],
            stdout=subprocess.PIPE, stderr=(self.workdir / "emulator.log").open("a"), text=True, env=env, cwd=REPO)
        line = self.proc.stdout.readline()
        assert line.startswith("READY "), f"{line!r}: {(self.workdir / 'emulator.log').read_text()[-2000:]}"
        url = line.split()[1]
        self.port = int(url.rsplit(":", 1)[1])
        return url

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.mark.emulation_only("restarts the emulation")
def test_api_server_restart_with_state_kept(kube, tmp_path, wait_for):
    server = RestartableApi(tmp_path)
    server.start()
    operator = OperatorProcess(server.kubeconfig, tmp_path / "operator")
    recorder = None
    try:
        api = api_clients(server.kubeconfig)
        apply_crds(api)
        api.core.create_namespace({"metadata": {"name": "restart"}})
        api.close()
        operator.start()
        c = kube_client(server.kubeconfig)
        recorder = Recorder(server.kubeconfig, {"ftj": "/apis/finetune.dev/v1alpha1/namespaces/restart/finetunejobs"}).start()
        for i in range(3):
            create(c, "restart", ftj(f"kept-{i}", suspend=True))
        before = {f"kept-{i}": suspended(c, "restart", f"kept-{i}", wait_for) for i in range(3)}
        server.stop()
        time.sleep(2)  # the operator's watches and calls fail meanwhile: it must keep retrying, not exit
        assert operator.proc.poll() is None, operator.logs()[-3000:]
        server.start()
        create(c, "restart", ftj("after-restart", suspend=True))
        assert_status_whole(suspended(c, "restart", "after-restart", wait_for, timeout=60))
        patch(c, "restart", "kept-0", {"spec": {"suspend": False}})  # an existing job still gets reconciled
        wait_for(lambda: children(c, "restart", "kept-0")["Job"][0]["spec"]["suspend"] is False, timeout=30,
                 what="kept-0 resumed after the restart")
        for name in ("kept-1", "kept-2"):
            assert status(c, "restart", name) == before[name]  # untouched by the restart
            one_of_each(c, "restart", name)
        time.sleep(0.5)
        recorder.stop()
        assert history_violations(recorder.events["ftj"]) == []
        c.close()
    finally:
        if recorder:
            recorder.stop()
        operator.stop()
        server.stop()
    assert json.loads(server.state.read_text())["rv"] > 0
