"""`finetune run`: validate and resolve a manifest here, then start the trainer as its own process.

The CLI imports neither torch nor the trainer (a `pip install finetune-operator[cli]` has neither); it writes
the resolved config the operator would put in the ConfigMap, sets the pod environment of docs/contracts.md
for one machine, and runs the trainer command: `$FINETUNE_TRAINER_COMMAND` (split like a shell), else
`python -m finetune_trainer` when this interpreter has the trainer, else `finetune-trainer` on PATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

from finetune_contract.config import EXIT_INCOMPATIBLE_CONFIG, EXIT_PREEMPTED, TRAINER_COMMAND, Env, Paths

from ..api.validation import ResolvedJob
from .errors import CliError

TRAINER_COMMAND_ENV = "FINETUNE_TRAINER_COMMAND"


def trainer_command(env: dict[str, str] | None = None) -> list[str]:
    env = dict(os.environ if env is None else env)
    if env.get(TRAINER_COMMAND_ENV, "").strip():
        return shlex.split(env[TRAINER_COMMAND_ENV])
    if importlib.util.find_spec("finetune_trainer") is not None:  # finds, does not import (no torch here)
        return [sys.executable, "-m", "finetune_trainer"]
    found = shutil.which(TRAINER_COMMAND[0], path=env.get("PATH"))
    if found:
        return [found]
    raise CliError(
        f"`finetune run` starts the trainer, which is not installed here: install it (`pip install "
        f"'finetune-trainer'`, which brings torch), put `{TRAINER_COMMAND[0]}` on PATH, or set {TRAINER_COMMAND_ENV} "
        "(e.g. 'docker run --rm -v $PWD:$PWD -w $PWD <trainer image> finetune-trainer')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Tee:
    """Copies the trainer's stderr through as it comes (progress bars included) and keeps its end, so a failure
    ends in one line that says what went wrong."""

    def __init__(self, stream: Any, keep: int = 16384):
        self.stream, self.keep, self.tail = stream, keep, b""
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        out = getattr(sys.stderr, "buffer", None)
        while chunk := os.read(self.stream.fileno(), 65536):
            if out is not None:
                out.write(chunk)
                out.flush()
            else:  # pytest's capsys and other text-only streams
                sys.stderr.write(chunk.decode(errors="replace"))
            self.tail = (self.tail + chunk)[-self.keep:]

    def join(self) -> None:
        self.thread.join(timeout=10)
        self.stream.close()

    def last_error(self) -> str:
        """The last line that reads like an error: a traceback's final `Type: message`, or a JSON log's message."""
        lines = [x.strip() for x in self.tail.decode(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
        for line in reversed(lines):
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("level") in ("error", "ERROR", "critical"):
                    return " ".join(str(record.get("message", "")).split())[:500]
                continue
            if ":" in line and not line.startswith(("File ", "raise ", "^", "~")):
                return " ".join(line.split())[:500]
        return ""


def loss_table(history: list[dict[str, Any]], metric: str) -> str:
    lines = [f"{'epoch':>5}  {'train_loss':>10}  {'val_loss':>10}  {metric:>16}  {'lr':>9}"]
    for h in history:
        vm = h.get("valMetric")
        lines.append(
            f"{h['epoch']:>5}  {h.get('trainLoss', float('nan')):>10.4f}  {h.get('valLoss', float('nan')):>10.4f}  "
            f"{(vm if vm is not None else float('nan')):>16.4f}  {h.get('learningRate', 0.0):>9.2e}"
        )
    return "\n".join(lines)


def run(job: ResolvedJob, output_dir: str, *, processes: int | None = None, progress: bool = True,
        env: dict[str, str] | None = None) -> dict[str, Any]:
    """Train `job` on this machine in a trainer process; returns result.json's content."""
    command = trainer_command(env)
    spec = job.spec
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    config_path = os.path.join(output_dir, "config.json")
    with open(config_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(job.trainer_config(), f, indent=2, sort_keys=True)
    os.replace(config_path + ".tmp", config_path)
    result_path = os.path.join(output_dir, Paths.RESULT)
    if os.path.exists(result_path):
        os.remove(result_path)  # a stale result must not pass for this run's
    world = processes or spec.distributed.nodes * spec.distributed.processes_per_node
    run_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", Env.METRICS_PORT)}
    run_env.update({
        Env.CONFIG: config_path,
        Env.OUTPUT_DIR: output_dir,
        Env.JOB_NAME: job.name,
        Env.JOB_NAMESPACE: job.namespace,
        Env.STATUS: "off",  # a local run has no FineTuneJob object to report to
        Env.NNODES: "1",
        Env.NPROC_PER_NODE: str(world),
        Env.WORLD_SIZE: str(world),
        Env.PROGRESS: "1" if progress else "0",
        Env.MASTER_ADDR: "127.0.0.1",
        Env.MASTER_PORT: str(_free_port()),
        **(env or {}),
    })
    try:
        proc = subprocess.Popen(command, env=run_env, stderr=subprocess.PIPE)
    except OSError as err:
        raise CliError(f"cannot start the trainer ({' '.join(command)}): {err.strerror or err}") from None
    tail = _Tee(proc.stderr)
    # A SIGTERM for the CLI (a supervisor, `timeout`) goes to the trainer, which checkpoints and exits 143.
    forward = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM)) if forward else None
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the trainer too (same process group); give it time to write its checkpoint.
        proc.send_signal(signal.SIGTERM)
        code = proc.wait()
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)
    tail.join()
    if code == EXIT_PREEMPTED:
        raise CliError(f"training was interrupted; a checkpoint is in {output_dir}/{Paths.CHECKPOINTS} "
                       "(run the same command again to resume)")
    if code == EXIT_INCOMPATIBLE_CONFIG:
        raise CliError(f"the trainer ({' '.join(command)}) refused the config (see its message above): "
                       "install a trainer of the same release as this CLI")
    if code != 0:
        raise CliError(f"training failed: {tail.last_error() or f'the trainer exited with {code}'} "
                       f"(the trainer's log is above; command: {' '.join(command)})")
    with open(result_path, encoding="utf-8") as f:
        result = json.load(f)
    if progress and result.get("history"):
        metric = result.get("metric")
        print(loss_table(result["history"], metric if metric not in ("val_loss", "train_loss") else result.get("mainMetric", "metric")))
    return result
