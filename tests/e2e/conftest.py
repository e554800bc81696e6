"""Fixtures for end-to-end tests: a Kubernetes API (the emulation, or a real cluster), namespaces, clients,
and the pod runner.

- `kube` (session): where the API is. Without `FTJ_E2E_KUBECONFIG`, the emulation (`emulator.py`) runs as
  a subprocess on 127.0.0.1 with a kubeconfig written for it; with it, that cluster is used. Either way
  the FineTuneJob CRD from crds/ is applied through the API.
- `namespace`: a fresh namespace per test (deleted afterwards, without waiting).
- `api`: official-client API objects (`core`, `batch`, `custom`, `rbac`, `extensions`) for `kube`.
- `pod_runner`: the Job controller + kubelet stand-in for the test's namespace (`pod_runner.py`).
- `wait_for`: polls a condition, failing with the pod runner's view of the pods.
- `operator` (overrides operator_fixture's): the real operator process, with `FTO_TRAINER_IMAGE` set to
  `FTJ_E2E_TRAINER_IMAGE` so that a real cluster's kubelet pulls the image you built.

Who runs pods: `FTJ_E2E_POD_RUNNER=auto|on|off` (default auto: on for the emulation, off for a real
cluster, whose own Job controller and kubelet run them; both at once would run every pod twice).
With the runner off, `pod_runner` is a read-only `ClusterPods` view (pod states and logs for failure
messages), and tests that need local processes are skipped with the reason: those marked `local_pods`,
those using the stand-in trainer (`fake_trainer_env`) and the pod runner's own tests. See README.md.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .kubeconfig import ApiClients, api_clients
from .pod_runner import PodRunner

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"


@dataclasses.dataclass
class KubeTarget:
    kubeconfig: Path
    url: str
    emulated: bool


def _start_emulator(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    kubeconfig = workdir / "kubeconfig.yaml"
    log = (workdir / "emulator.log").open("w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "e2e.emulator", "--kubeconfig", str(kubeconfig)],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # `READY <url>` once listening (the kubeconfig is written before)
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"the API emulator did not start: {line!r}; see {workdir / 'emulator.log'}")
    return proc, line.split()[1]


def apply_crds(api: ApiClients) -> None:
    """Create or replace every CRD in crds/ (works the same on the emulation and a real cluster)."""
    from kubernetes.client.exceptions import ApiException

    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            try:
                api.extensions.create_custom_resource_definition(crd)  # type: ignore[attr-defined]
            except ApiException as exc:
                if exc.status != 409:
                    raise
                current = api.extensions.read_custom_resource_definition(crd["metadata"]["name"])  # type: ignore[attr-defined]
                crd["metadata"]["resourceVersion"] = current.metadata.resource_version
                api.extensions.replace_custom_resource_definition(crd["metadata"]["name"], crd)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeTarget]:
    real = os.environ.get("FTJ_E2E_KUBECONFIG")
    if real:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=real, client_configuration=cfg)
        target = KubeTarget(Path(real), cfg.host, emulated=False)
        api = api_clients(target.kubeconfig)
        apply_crds(api)
        api.close()
        yield target
        return
    workdir = tmp_path_factory.mktemp("kube")
    proc, url = _start_emulator(workdir)
    try:
        target = KubeTarget(workdir / "kubeconfig.yaml", url, emulated=True)
        api = api_clients(target.kubeconfig)
        apply_crds(api)
        api.close()
        yield target
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def api(kube: KubeTarget) -> Iterator[ApiClients]:
    clients = api_clients(kube.kubeconfig)
    yield clients
    clients.close()


@pytest.fixture
def namespace(api: ApiClients) -> Iterator[str]:
    name = f"e2e-{secrets.token_hex(4)}"
    api.core.create_namespace({"metadata": {"name": name, "labels": {"e2e.finetune.dev/test": "true"}}})  # type: ignore[attr-defined]
    yield name
    from kubernetes.client.exceptions import ApiException

    try:
        api.core.delete_namespace(name)  # type: ignore[attr-defined]
    except ApiException as exc:
        if exc.status != 404:
            raise


POD_RUNNER_MODES = ("auto", "on", "off")
# Fixtures that only make sense when pods are local processes: the stand-in trainer is a script in the
# test's temp dir put first on the pod's PATH.
LOCAL_ONLY_FIXTURES = {"fake_trainer_env": "runs the stand-in trainer, a local script, as the pod's command"}
# Modules whose every test exercises the local pod runner itself.
LOCAL_ONLY_MODULES = {"test_pod_runner": "tests the local pod runner itself"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "local_pods: needs the local pod runner (its knobs, local paths or files); "
                                       "skipped when FTJ_E2E_POD_RUNNER is off")
    config.addinivalue_line("markers", "emulation_only(reason): acts on the emulation itself (fault injection, "
                                       "restarts, compaction), which a real cluster does not offer; skipped there")


def pod_runner_enabled(kube: KubeTarget | None = None) -> bool:
    """FTJ_E2E_POD_RUNNER: `on`/`off`, or `auto` (default): on for the emulation, off for a real cluster."""
    mode = os.environ.get("FTJ_E2E_POD_RUNNER", "auto").strip().lower() or "auto"
    if mode not in POD_RUNNER_MODES:
        raise pytest.UsageError(f"FTJ_E2E_POD_RUNNER={mode!r}: expected one of {', '.join(POD_RUNNER_MODES)}")
    emulated = kube.emulated if kube is not None else not os.environ.get("FTJ_E2E_KUBECONFIG")
    return emulated if mode == "auto" else mode == "on"


def _local_only_reason(node: pytest.Item) -> str | None:
    marker = node.get_closest_marker("local_pods")
    if marker is not None:
        return str(marker.kwargs.get("reason") or (marker.args[0] if marker.args else "marked local_pods"))
    for fixture, reason in LOCAL_ONLY_FIXTURES.items():
        if fixture in getattr(node, "fixturenames", ()):
            return reason
    module = getattr(node, "module", None)
    return LOCAL_ONLY_MODULES.get((getattr(module, "__name__", "") or "").rsplit(".", 1)[-1])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With the cluster running pods itself, tests that need local processes (or an image to run) are skipped
    at collection, each with its reason in the report; so are tests marked emulation_only against a real cluster."""
    if os.environ.get("FTJ_E2E_KUBECONFIG"):
        for item in items:
            marker = item.get_closest_marker("emulation_only")
            if marker is not None:
                item.add_marker(pytest.mark.skip(reason=f"needs the emulation: {marker.args[0]}"))
    if pod_runner_enabled():
        return
    for item in items:
        if "pod_runner" not in getattr(item, "fixturenames", ()):
            continue
        reason = _local_only_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"needs the local pod runner ({reason}); FTJ_E2E_POD_RUNNER is off"))
        elif not os.environ.get("FTJ_E2E_TRAINER_IMAGE"):
            item.add_marker(pytest.mark.skip(reason="pods run on the cluster: set FTJ_E2E_TRAINER_IMAGE to a trainer image its nodes can pull"))


class ClusterPods:
    """The pod runner's place when the cluster runs pods itself: reads pods and logs for failure messages."""

    def __init__(self, api: ApiClients, namespace: str) -> None:
        self.api, self.namespace = api, namespace

    def pod_names(self, job: str | None = None) -> list[str]:
        selector = f"job-name={job}" if job else None
        pods = self.api.core.list_namespaced_pod(self.namespace, label_selector=selector).items  # type: ignore[attr-defined]
        return [p.metadata.name for p in pods]

    def logs(self, name: str, tail: int | None = None) -> str:
        return self.api.core.read_namespaced_pod_log(name, self.namespace, tail_lines=tail)  # type: ignore[attr-defined]

    def describe(self, tail: int = 40) -> str:
        lines = [f"pods in {self.namespace} (run by the cluster; FTJ_E2E_POD_RUNNER is off)"]
        try:
            pods = self.api.core.list_namespaced_pod(self.namespace).items  # type: ignore[attr-defined]
        except Exception as exc:  # a failure report must not fail itself
            return f"{lines[0]}: cannot list them: {exc!r}"
        for pod in pods:
            states = []
            phase = pod.status.phase if pod.status else None
            for cs in (pod.status.container_statuses if pod.status else None) or []:
                state = cs.state
                kind = next((k for k in ("waiting", "running", "terminated") if getattr(state, k, None)), "unknown")
                detail = getattr(state, kind, None)
                states.append(f"{cs.name}={kind}:{getattr(detail, 'reason', '') or ''}"
                              f"{f' exit={detail.exit_code}' if kind == 'terminated' else ''}")
            lines.append(f"--- {pod.metadata.name} phase={phase} {' '.join(states)}")
            try:
                lines.extend((self.logs(pod.metadata.name, tail) or "").splitlines())
            except Exception as exc:  # e.g. the container has not started yet
                lines.append(f"(no logs: {type(exc).__name__})")
        return "\n".join(lines)


@pytest.fixture
def pod_runner(kube: KubeTarget, api: ApiClients, namespace: str, tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[PodRunner | ClusterPods]:
    """The local pod runner for the test's namespace, or (runner off) a read-only view of the cluster's pods."""
    if not pod_runner_enabled(kube):  # tests that cannot run this way were skipped at collection
        view = ClusterPods(api, namespace)
        request.node._e2e_pod_runner = view
        yield view
        return
    runner = PodRunner(kube.kubeconfig, tmp_path / "pod-runner", namespace=namespace,
                       service_account_tokens=kube.emulated)
    with pytest.MonkeyPatch.context() as env:
        threads = os.environ.get("FTJ_E2E_POD_THREADS", "1")
        if threads and "OMP_NUM_THREADS" not in os.environ:
            # Pods inherit this process's environment (a pod's own spec.env still wins). Without it torch
            # (and accelerate, which sets OMP_NUM_THREADS to the core count) runs 2 OpenMP threads on the 2
            # shared cores; with one core busy elsewhere every parallel region waits for the descheduled
            # thread: MiniLM steps measured ~10x slower (1.2-1.7 vs 15.5-16.2 samples/s, see README.md).
            env.setenv("OMP_NUM_THREADS", threads)
        runner.start()
        request.node._e2e_pod_runner = runner  # for the failure report below
        try:
            yield runner
        finally:
            runner.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    runner = getattr(item, "_e2e_pod_runner", None)
    if runner is not None and report.failed:
        report.sections.append(("pod runner", runner.describe()))


@pytest.fixture
def wait_for(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """`wait_for(fn, timeout=30, what="...")`: poll until fn() is truthy and return it; fail with context."""

    def wait(fn: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while True:
            try:
                value = fn()
                if value:
                    return value
            except Exception as exc:  # e.g. 404 while an object is not created yet
                last_exc = exc
            if time.monotonic() > deadline:
                runner = getattr(request.node, "_e2e_pod_runner", None)
                context = f"\n{runner.describe()}" if runner is not None else ""
                pytest.fail(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r}){context}")
            time.sleep(interval)

    return wait
