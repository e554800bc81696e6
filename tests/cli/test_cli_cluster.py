"""`finetune list/status/plot/stop` against the Kubernetes API (the e2e emulation, or the cluster named by
FTJ_E2E_KUBECONFIG): a running, an early-stopped and a failed FineTuneJob, their statuses written through
the status subresource as the trainer and the operator do; and every error a user can meet, each one line.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# The e2e fixtures (API emulation or real cluster, official clients); imported, not re-implemented.
from e2e.conftest import _start_emulator, api, apply_crds, kube  # noqa: F401
from e2e.kubeconfig import api_clients, write_kubeconfig

from finetune_operator.api import constants as c
from finetune_operator.cli import main

from .objects import early_stopped, failed, running

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent  # the venv's console scripts: finetune, kubectl-finetune


@pytest.fixture(scope="module")
def jobs(api) -> Iterator[str]:  # noqa: F811 - the e2e `api` fixture
    """A namespace holding the three FineTuneJobs; statuses patched through /status like a trainer would."""
    from kubernetes.client.exceptions import ApiException

    ns = f"cli-{secrets.token_hex(4)}"
    api.core.create_namespace({"metadata": {"name": ns}})
    for obj in (running(), early_stopped(), failed()):
        status = obj.pop("status")
        obj["metadata"]["namespace"] = ns
        api.custom.create_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL, obj)
        api.custom.patch_namespaced_custom_object_status(c.GROUP, c.VERSION, ns, c.PLURAL, obj["metadata"]["name"],
                                                         {"status": status})
    yield ns
    try:
        api.core.delete_namespace(ns)
    except ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture
def cli(kube, jobs, capsys):  # noqa: F811 - the e2e `kube` fixture
    """cli(*args) -> (exit code, stdout, stderr) of `finetune ARGS --kubeconfig K -n NS`, in this process."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--kubeconfig", str(kube.kubeconfig), "-n", jobs])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _one_line_error(code: int, out: str, err: str) -> str:
    assert code == 1 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got: {err!r}"
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# list / status


def test_list_shows_the_three_jobs(cli):
    code, out, err = cli("list")
    assert code == 0 and err == ""
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert out.splitlines()[0].split() == ["NAME", "PHASE", "REASON", "EPOCH", "TRAIN-LOSS", "VAL-LOSS", "BEST"]
    assert rows["bbc-running"] == ["bbc-running", "Running", "PodsRunning", "2/10", "0.81", "0.52", "0.91"]
    assert rows["bbc-stopped"] == ["bbc-stopped", "Succeeded", "EarlyStopped", "5/10", "0.05", "0.49", "0.95"]
    assert rows["bbc-failed"] == ["bbc-failed", "Failed", "OOMKilled", "0/10", "-", "-", "-"]


def test_list_all_namespaces_names_the_namespace(kube, jobs, capsys):  # noqa: F811
    assert main(["list", "-A", "--kubeconfig", str(kube.kubeconfig)]) == 0
    ours = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(jobs + " ")]
    assert sorted(r[1] for r in ours) == ["bbc-failed", "bbc-running", "bbc-stopped"]


def test_list_in_an_empty_namespace(kube, api, capsys):  # noqa: F811
    ns = f"cli-empty-{secrets.token_hex(3)}"
    api.core.create_namespace({"metadata": {"name": ns}})
    assert main(["list", "--kubeconfig", str(kube.kubeconfig), "-n", ns]) == 0
    assert capsys.readouterr().out.strip() == f"no FineTuneJobs in namespace {ns}"


def test_status_of_a_running_job(cli, jobs):
    code, out, err = cli("status", "bbc-running")
    assert code == 0 and err == ""
    assert f"Name:        {jobs}/bbc-running" in out
    assert "Phase:       Running (PodsRunning)" in out
    assert "Epoch:       2/10   step 60" in out
    assert "Loss:        train 0.81   validation 0.52" in out
    assert "Best:        val_accuracy 0.91 at epoch 2" in out
    assert "Early stop:  continue (no stop requested)" in out
    # the terminal loss curves: plotext's frame, legend and axis label
    assert "train loss" in out and "validation loss" in out and "epoch" in out
    assert sum(1 for line in out.splitlines() if "│" in line) >= 10


def test_status_of_an_early_stopped_job(cli):
    code, out, err = cli("status", "bbc-stopped")
    assert code == 0 and err == ""
    assert "Phase:       Succeeded (EarlyStopped)" in out
    assert "Message:     stopped early at epoch 5; best val_accuracy 0.95 at epoch 3" in out
    assert "Best:        val_accuracy 0.95 at epoch 3" in out
    assert "Early stop:  stop requested (PatienceExhausted): val_accuracy has not increased" in out
    assert "Saved:       5 epoch(s) not run thanks to early stopping" in out
    assert "EarlyStopRequested=True PatienceExhausted" in out
    assert "validation loss" in out


def test_status_of_a_failed_job(cli):
    code, out, err = cli("status", "bbc-failed")
    assert code == 0 and err == ""
    assert "Phase:       Failed (OOMKilled)" in out
    assert "raise resources.limits.memory or lower batchSize" in out
    assert "Failed=True OOMKilled: out of memory" in out
    assert "(no epochs finished yet: no loss curves)" in out


def test_status_json_is_the_stored_status(cli):
    for make in (running, early_stopped, failed):
        obj = make()
        code, out, _ = cli("status", obj["metadata"]["name"], "-o", "json")
        assert code == 0
        assert json.loads(out) == obj["status"]


# ----------------------------------------------------------------------------------------------------------
# plot


def _check_png(path: Path) -> None:
    from PIL import Image

    img = Image.open(path)
    assert img.format == "PNG" and img.size == (800, 450)
    rgb = img.convert("RGB")
    # The plot area (inside the axes) must hold coloured curve pixels, not just white and grey/black.
    w, h = rgb.size
    area = rgb.crop((int(w * 0.1), int(h * 0.12), int(w * 0.88), int(h * 0.85)))
    coloured = [px for px in area.get_flattened_data() if max(px) - min(px) > 60]
    assert len(coloured) > 500, f"only {len(coloured)} coloured pixels in the plot area"


@pytest.mark.parametrize("name", ["bbc-running", "bbc-stopped"])
def test_plot_writes_a_png(cli, tmp_path, name):
    out_file = tmp_path / f"{name}.png"
    code, out, err = cli("plot", name, "-o", str(out_file))
    assert code == 0 and err == ""
    assert out.strip() == f"wrote {out_file}"
    _check_png(out_file)


def test_plot_marks_the_stop_only_when_stopped(cli, tmp_path):
    """The red stop line (matplotlib's tab:red) appears on the early-stopped job's plot, not the running one's."""
    from PIL import Image

    def red_pixels(name: str) -> int:
        f = tmp_path / f"{name}.png"
        assert cli("plot", name, "-o", str(f))[0] == 0
        return sum(1 for r, g, b in Image.open(f).convert("RGB").get_flattened_data() if r > 180 and g < 80 and b < 80)

    assert red_pixels("bbc-stopped") > 100
    assert red_pixels("bbc-running") == 0


def test_plot_of_a_job_without_epochs_is_one_line(cli, tmp_path):
    line = _one_line_error(*cli("plot", "bbc-failed", "-o", str(tmp_path / "x.png")))
    assert "bbc-failed has no finished epoch yet" in line
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------------------
# stop


def test_stop_sets_the_annotation(cli, api, jobs):  # noqa: F811
    code, out, err = cli("stop", "bbc-running")
    assert code == 0 and err == ""
    assert out.startswith(f"stop requested for {jobs}/bbc-running")
    obj = api.custom.get_namespaced_custom_object(c.GROUP, c.VERSION, jobs, c.PLURAL, "bbc-running")
    assert obj["metadata"]["annotations"][c.Annotation.STOP] == "true"
    assert obj["status"]["phase"] == "Running" and not obj["spec"].get("stop")  # the spec is left to its owner
    assert obj["metadata"].get("generation") == 1


@pytest.mark.parametrize(("name", "phase"), [("bbc-stopped", "Succeeded"), ("bbc-failed", "Failed")])
def test_stop_of_a_finished_job_is_refused(cli, api, jobs, name, phase):  # noqa: F811
    line = _one_line_error(*cli("stop", name))
    assert line == f"error: FineTuneJob {name} already finished ({phase}): nothing to stop"
    obj = api.custom.get_namespaced_custom_object(c.GROUP, c.VERSION, jobs, c.PLURAL, name)
    assert c.Annotation.STOP not in (obj["metadata"].get("annotations") or {})


# ----------------------------------------------------------------------------------------------------------
# errors: one clear line each


@pytest.mark.parametrize("command", [["status", "nope"], ["plot", "nope"], ["stop", "nope"]])
def test_no_such_job(cli, jobs, command):
    line = _one_line_error(*cli(*command))
    assert line == f"error: no FineTuneJob nope in namespace {jobs}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket goes: connections are refused


def test_cluster_unreachable(tmp_path, capsys):
    port = _closed_port()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    expected = f"error: cannot reach the cluster at http://127.0.0.1:{port}: connection refused"
    for command in (["list"], ["status", "bbc"], ["stop", "bbc"]):
        assert _one_line_error(main([*command, "--kubeconfig", str(kubeconfig)]), *capsys.readouterr()) == expected
    # As a user runs it: outside pytest no log handler is installed, so a library's retry warnings would
    # reach stderr (Python's last-resort handler); the error must still be the only line.
    proc = subprocess.run([str(BIN / "finetune"), "list"], env=_cli_env(tmp_path, KUBECONFIG=str(kubeconfig)),
                          capture_output=True, text=True, timeout=60)
    assert _one_line_error(proc.returncode, proc.stdout, proc.stderr) == expected


def _cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's environment without a kubeconfig or in-cluster credentials (HOME is an empty directory)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")}
    env.update({"HOME": str(home), "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")]), **extra})
    return env


def test_no_cluster_configured(tmp_path):
    """The installed console script, as a user runs it, with no ~/.kube/config and no $KUBECONFIG."""
    proc = subprocess.run([str(BIN / "finetune"), "list"], env=_cli_env(tmp_path), capture_output=True, text=True, timeout=60)
    line = _one_line_error(proc.returncode, proc.stdout, proc.stderr)
    assert line.startswith("error: no cluster configured: set KUBECONFIG or create ~/.kube/config")


@pytest.fixture(scope="module")
def crdless_kubeconfig(tmp_path_factory) -> Iterator[Path]:
    """A second API emulation whose FineTuneJob CRD was installed, then deleted (as `helm uninstall` does).

    The emulation serves finetunejobs from the start so an operator may start before the CRD exists;
    deleting the CRD stops that, as on a real API server."""
    workdir = tmp_path_factory.mktemp("crdless")
    proc, _ = _start_emulator(workdir)
    try:
        clients = api_clients(workdir / "kubeconfig.yaml")
        apply_crds(clients)
        clients.extensions.delete_custom_resource_definition(c.CRD_NAME)
        clients.close()
        yield workdir / "kubeconfig.yaml"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("command", [["list"], ["status", "bbc"], ["stop", "bbc"]])
def test_crd_not_installed(crdless_kubeconfig, capsys, command):
    line = _one_line_error(main([*command, "--kubeconfig", str(crdless_kubeconfig)]), *capsys.readouterr())
    assert line.startswith(f"error: the FineTuneJob CRD ({c.CRD_NAME}) is not installed in this cluster")


class _Forbidding(BaseHTTPRequestHandler):
    """Answers as a real API server does for a ServiceAccount that may only read the job `readable`
    (a Role with `get` on that resourceName), and 401 for an expired token."""

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self) -> None:
        if self.headers.get("Authorization") == "Bearer expired":
            self._send(401, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                             "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
            return
        if self.command == "GET" and self.path.split("?")[0].endswith("/finetunejobs/readable"):
            obj = running()
            obj["metadata"]["name"] = "readable"
            self._send(200, obj)
            return
        verb = {"GET": "get" if "/finetunejobs/" in self.path else "list", "PATCH": "patch"}.get(self.command, "update")
        self._send(403, {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Forbidden", "code": 403,
            "message": f'finetunejobs.finetune.dev is forbidden: User "system:serviceaccount:default:viewer" cannot {verb} '
                       'resource "finetunejobs" in API group "finetune.dev" in the namespace "default"',
            "details": {"group": "finetune.dev", "kind": "finetunejobs"},
        })

    do_GET = do_PATCH = do_PUT = do_POST = _answer

    def log_message(self, *args: object) -> None:  # keep the test's stderr for the CLI
        pass


@pytest.fixture(scope="module")
def forbidding_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Forbidding)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("command", "verb"), [(["list"], "list"), (["status", "bbc"], "get"), (["plot", "bbc"], "get"),
                                               (["stop", "bbc"], "get"), (["stop", "readable"], "patch")])
def test_permission_denied(forbidding_server, tmp_path, capsys, command, verb):
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", forbidding_server)
    line = _one_line_error(main([*command, "--kubeconfig", str(kubeconfig)]), *capsys.readouterr())
    assert line.startswith(f"error: permission denied: you may not {verb} finetunejobs in namespace default")
    assert "system:serviceaccount:default:viewer" in line  # who was refused, from the API server's message


def test_expired_credentials(forbidding_server, tmp_path, capsys):
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", forbidding_server, token="expired")
    line = _one_line_error(main(["list", "--kubeconfig", str(kubeconfig)]), *capsys.readouterr())
    assert line == f"error: unauthorized: {forbidding_server} rejected the credentials in your kubeconfig (Unauthorized)"


# ----------------------------------------------------------------------------------------------------------
# the console scripts, as installed


def test_finetune_console_script(kube, jobs, tmp_path):  # noqa: F811
    proc = subprocess.run([str(BIN / "finetune"), "status", "bbc-stopped", "--kubeconfig", str(kube.kubeconfig), "-n", jobs],
                          env=_cli_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Succeeded (EarlyStopped)" in proc.stdout


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH")
def test_kubectl_plugin(kube, jobs, tmp_path):  # noqa: F811
    """kubectl runs `kubectl-finetune` from PATH for `kubectl finetune ...` (its plugin mechanism)."""
    env = _cli_env(tmp_path, KUBECONFIG=str(kube.kubeconfig))
    plugins = subprocess.run(["kubectl", "plugin", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert str(BIN / "kubectl-finetune") in plugins.stdout, plugins.stdout + plugins.stderr
    proc = subprocess.run(["kubectl", "finetune", "list", "-n", jobs], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "bbc-running" in proc.stdout and "EarlyStopped" in proc.stdout
    proc = subprocess.run(["kubectl", "finetune", "status", "nope", "-n", jobs], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: no FineTuneJob nope in namespace {jobs}"
