"""Fixtures for end-to-end tests: a Kubernetes API (the emulation, or a real cluster), namespaces, clients,
and the pod runner.

- `kube` (session): where the API is. Without `FTJ_E2E_KUBECONFIG`, the emulation (`emulator.py`) runs as
  a subprocess on 127.0.0.1 with a kubeconfig written for it; with it, that cluster is used. Either way
  the FineTuneJob CRD from crds/ is applied through the API.
- `namespace`: a fresh namespace per test (deleted afterwards, without waiting).
- `api`: official-client API objects (`core`, `batch`, `custom`, `rbac`, `extensions`) for `kube`.
- `pod_runner`: the Job controller + kubelet stand-in for the test's namespace (`pod_runner.py`).
- `wait_for`: polls a condition, failing with the pod runner's view of the pods.
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


@pytest.fixture
def pod_runner(kube: KubeTarget, namespace: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PodRunner]:
    runner = PodRunner(kube.kubeconfig, tmp_path / "pod-runner", namespace=namespace)
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
