"""The real operator as a subprocess (`python -m finetune_operator`) against the `kube` fixture's API.

Use it from a test module with `pytest_plugins = ["e2e.operator_fixture"]`. The `operator` fixture is a
started `OperatorProcess`; tests may `kill()` (SIGKILL) and `start()` it again, read its log and metrics.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_TRAINER_IMAGE = "finetune-trainer:e2e"  # never pulled when the pod runner runs pods as local processes


def trainer_image() -> str:
    """The image a real cluster's pods should run (FTJ_E2E_TRAINER_IMAGE); the emulation never pulls it."""
    return os.environ.get("FTJ_E2E_TRAINER_IMAGE") or DEFAULT_TRAINER_IMAGE


class OperatorProcess:
    def __init__(self, kubeconfig: Path, workdir: Path, **env: str):
        self.kubeconfig, self.workdir = Path(kubeconfig), Path(workdir)
        self.metrics_port, self.health_port = _free_port(), _free_port()
        self.env = {
            "FTO_METRICS_PORT": str(self.metrics_port),
            "FTO_HEALTH_PORT": str(self.health_port),
            "FTO_RESYNC_SECONDS": "0.5",  # grace periods and the watchdog are seconds long in these tests
            "FTO_LOG_FORMAT": "json",
            "FTO_TRAINER_IMAGE": trainer_image(),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"operator-{self.starts}.log"

    def start(self, timeout: float = 60) -> OperatorProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        env = {**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig)}
        self.proc = subprocess.Popen([sys.executable, "-m", "finetune_operator"], env=env, cwd=REPO,
                                     stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"operator not healthy after {timeout}s:\n{self.logs()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return "\n".join((self.workdir / f"operator-{i}.log").read_text(errors="replace")
                         for i in range(1, self.starts + 1) if (self.workdir / f"operator-{i}.log").exists())

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


FAKE_TRAINER = '''#!/usr/bin/env python3
"""A stand-in trainer for the operator's e2e tests (the real one is tested with real training elsewhere).

It speaks the trainer's side of docs/contracts.md over the API - status patches with history and
heartbeat, polling for stop requests - and misbehaves on purpose when FAKE_MODE says so:
  obey   - stop gracefully (exit 0) once a stop is requested (what the real trainer does)
  ignore - keep "training" whatever the operator asks (for stop enforcement)
  hang   - report one epoch, then stop reporting while the process stays alive (for the watchdog)
FAKE_VAL_LOSSES: comma list, one validation loss per epoch; FAKE_EPOCH_SECONDS: time per epoch;
FAKE_POLL_SECONDS: time between its stop checks (0.1).
"""

import json
import os
import sys
import time
from datetime import UTC, datetime

sys.path.insert(0, os.environ["FAKE_REPO"] + "/operator")
from finetune_operator.kube.client import MERGE_PATCH, KubeClient, load_configuration  # noqa: E402

name, ns = os.environ["FINETUNE_JOB_NAME"], os.environ["FINETUNE_JOB_NAMESPACE"]
path = f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/{name}"
mode = os.environ.get("FAKE_MODE", "obey")
losses = [float(x) for x in os.environ.get("FAKE_VAL_LOSSES", "0.5,0.4").split(",")]
epoch_seconds = float(os.environ.get("FAKE_EPOCH_SECONDS", "0.3"))
poll_seconds = float(os.environ.get("FAKE_POLL_SECONDS", "0.1"))  # how often it asks whether to stop
client = KubeClient(load_configuration(2))
config = json.load(open(os.environ["FINETUNE_CONFIG"]))
total = config["spec"]["hyperparameters"]["epochs"]


def now():
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def call(fn, *args, **kwargs):
    # Like the real trainer's reporter: an overloaded API server must not kill training.
    delay = 0.2
    for _ in range(12):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - timeouts and connection errors alike
            print(f"API call failed ({err}); retrying in {delay:.1f} s", flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 10)
    return fn(*args, **kwargs)


def stop_requested():
    obj = call(client.get, path) or {}
    return bool(obj.get("spec", {}).get("stop") or (obj.get("status") or {}).get("stopRequestedTime"))


history = []
for epoch in range(1, min(total, len(losses)) + 1):
    time.sleep(epoch_seconds)
    history.append({"epoch": epoch, "trainLoss": 1.0 / epoch, "valLoss": losses[epoch - 1], "time": now()})
    best = min(history, key=lambda p: p["valLoss"])
    call(client.request, "PATCH", path + "/status", content_type=MERGE_PATCH, body={"status": {
        "epoch": epoch, "totalEpochs": total, "valLoss": losses[epoch - 1], "trainLoss": 1.0 / epoch,
        "bestEpoch": best["epoch"], "bestMetric": best["valLoss"], "valMetricName": "val_loss",
        "history": history, "lastHeartbeatTime": now(), "trainerPhase": "Training"}})
    if mode == "hang":
        time.sleep(3600)
    deadline = time.monotonic() + epoch_seconds
    while time.monotonic() < deadline:
        if mode == "obey" and stop_requested():
            print(f"stop requested after epoch {epoch}", flush=True)
            sys.exit(0)
        time.sleep(poll_seconds)
if mode == "ignore":
    while True:  # keeps holding its "GPUs"
        time.sleep(1)
print("all epochs done", flush=True)
'''


def fake_trainer(bindir: Path):
    """Install the stand-in trainer as `bindir/finetune-trainer`; returns env(mode, losses, epoch_seconds) ->
    spec.env that makes pods run it (its directory first on PATH, so the pod's command resolves to it)."""
    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / "finetune-trainer"
    exe.write_text(FAKE_TRAINER)
    exe.chmod(0o755)

    def env(mode: str = "obey", losses: str = "0.5,0.4", epoch_seconds: float = 0.3) -> dict[str, str]:
        path = os.pathsep.join([str(bindir), str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
        return {"PATH": path, "FAKE_MODE": mode, "FAKE_VAL_LOSSES": losses, "FAKE_EPOCH_SECONDS": str(epoch_seconds),
                "FAKE_REPO": str(REPO)}

    return env


@pytest.fixture
def fake_trainer_env(tmp_path: Path):
    """Returns env(mode, losses, epoch_seconds) -> spec.env that makes pods run the fake trainer above."""
    return fake_trainer(tmp_path / "fakebin")


@pytest.fixture
def operator(kube, tmp_path: Path) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(kube.kubeconfig, tmp_path / "operator")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    proc = item.funcargs.get("operator") if hasattr(item, "funcargs") else None
    if isinstance(proc, OperatorProcess) and report.failed and report.when == "call":
        report.sections.append(("operator log", proc.logs()[-6000:]))


@pytest.fixture
def quiet_namespace(api):
    """A second namespace, for jobs that must not share `namespace` with a running one (no pod runner there)."""
    name = f"e2e-quiet-{secrets.token_hex(3)}"
    api.core.create_namespace({"metadata": {"name": name}})
    yield name
    api.core.delete_namespace(name)
