"""`finetune run job.yaml`: validate a FineTuneJob manifest and train it on this machine.

World size 1 trains in this process; more processes run under torchrun (gloo on CPU) exactly as
in a pod. A progress bar per epoch shows loss and samples/s; the loss table follows at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

import yaml

from finetune_operator.api import validate_manifest

from .checkpoints import write_json_atomic
from .config import Runtime, TrainerConfig

DEFAULT_OUTPUT_ROOT = "runs"


def _load(manifest: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(manifest, dict):
        return manifest
    with open(manifest, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    if len(docs) != 1:
        raise ValueError(f"{manifest}: expected one FineTuneJob document, found {len(docs)}")
    return docs[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loss_table(history: list[dict[str, Any]], metric: str) -> str:
    lines = [f"{'epoch':>5}  {'train_loss':>10}  {'val_loss':>10}  {metric:>16}  {'lr':>9}"]
    for h in history:
        vm = h.get("valMetric")
        lines.append(
            f"{h['epoch']:>5}  {h.get('trainLoss', float('nan')):>10.4f}  {h.get('valLoss', float('nan')):>10.4f}  "
            f"{(vm if vm is not None else float('nan')):>16.4f}  {h.get('learningRate', 0.0):>9.2e}"
        )
    return "\n".join(lines)


def run(
    manifest: dict[str, Any] | str | os.PathLike,
    *,
    output_dir: str | None = None,
    processes: int | None = None,
    progress: bool = True,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train a manifest locally; returns result.json's content (raises on invalid manifests and failed runs).

    `processes` overrides nodes x processesPerNode; `env` adds variables for the trainer (e.g. FINETUNE_STOP_FILE).
    """
    resolved = validate_manifest(_load(manifest))
    spec = resolved.spec
    if output_dir is None:
        # The API default /output is a pod path; locally, write under ./runs/<name>.
        output_dir = spec.output.path if spec.output.path != "/output" else os.path.join(DEFAULT_OUTPUT_ROOT, resolved.name)
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    config_path = os.path.join(output_dir, "config.json")
    write_json_atomic(config_path, resolved.trainer_config())
    result_path = os.path.join(output_dir, "result.json")
    if os.path.exists(result_path):
        os.remove(result_path)  # a stale result must not pass for this run's
    world = processes or spec.distributed.nodes * spec.distributed.processes_per_node
    run_env = {
        **os.environ,
        "FINETUNE_CONFIG": config_path,
        "FINETUNE_OUTPUT_DIR": output_dir,
        "FINETUNE_JOB_NAME": resolved.name,
        "FINETUNE_JOB_NAMESPACE": resolved.namespace,
        "FINETUNE_STATUS": "off",  # a local run has no FineTuneJob object to report to
        "FINETUNE_NNODES": "1",
        "FINETUNE_NPROC_PER_NODE": str(world),
        "FINETUNE_WORLD_SIZE": str(world),
        "FINETUNE_PROGRESS": "1" if progress else "0",
        **(env or {}),
    }
    if "FINETUNE_METRICS_PORT" not in (env or {}):
        run_env.pop("FINETUNE_METRICS_PORT", None)  # metrics only when asked: a fixed port would clash between runs
    result = _run_in_process(run_env, progress) if world == 1 else _run_torchrun(run_env, world, result_path)
    if progress and result.get("history"):
        metric = result.get("metric")
        print(loss_table(result["history"], metric if metric not in ("val_loss", "train_loss") else result.get("mainMetric", "metric")))
        print(f"{result['outcome']}: best epoch {result.get('bestEpoch')}, model in {result.get('modelPath')}")
    return result


def _run_in_process(run_env: dict[str, str], progress: bool) -> dict[str, Any]:
    from . import worker

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        run_env.pop(key, None)
    rt = Runtime.from_env(run_env)
    cfg = TrainerConfig.load(rt.config_path)
    worker.reset_accelerate_state()
    saved = {k: os.environ.get(k) for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU")}
    try:
        result = worker.train(cfg, rt, progress=progress)
    finally:
        worker.reset_accelerate_state()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if result["outcome"] == "preempted":
        raise RuntimeError(f"training was interrupted; a checkpoint is in {rt.output_dir}/checkpoints")
    return result


def _run_torchrun(run_env: dict[str, str], world: int, result_path: str) -> dict[str, Any]:
    port = _free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(world),
        "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "finetune_trainer.worker",
    ]
    # CPU threads: torchrun sets OMP_NUM_THREADS=1 per worker unless told otherwise, which is right on a small machine.
    proc = subprocess.run(cmd, env=run_env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed: torchrun exited with {proc.returncode}")
    with open(result_path, encoding="utf-8") as f:
        return json.load(f)
