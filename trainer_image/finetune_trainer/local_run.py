"""Train a resolved trainer config on this machine, from Python (tests, benchmarks, notebooks).

The input is what the operator writes into the ConfigMap (`finetune_contract.config.TrainerConfig`, e.g.
`finetune_operator.api.validate_manifest(manifest).trainer_config()`); the trainer never resolves a
FineTuneJob manifest itself (that is the operator's and `finetune run`'s job; the trainer image carries no
operator). World size 1 trains in this process; more processes run under torchrun (gloo on CPU) exactly as
in a pod.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

from finetune_contract.config import KIND, Env, Paths

from .checkpoints import write_json_atomic
from .config import Runtime, TrainerConfig

DEFAULT_OUTPUT_ROOT = "runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(config: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(config, dict):
        raw = config
    else:
        with open(config, encoding="utf-8") as f:
            raw = json.load(f)
    if raw.get("kind") != KIND:
        raise TypeError(f"local_run.run takes a {KIND} (the operator's resolved config), got kind {raw.get('kind')!r}: "
                        "resolve a FineTuneJob with finetune_operator.api.validate_manifest(m).trainer_config(), "
                        "or train it with `finetune run job.yaml`")
    return raw


def run(
    config: dict[str, Any] | str | os.PathLike,
    *,
    output_dir: str | None = None,
    processes: int | None = None,
    progress: bool = True,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train locally; returns result.json's content (raises on incompatible configs and failed runs).

    `processes` overrides nodes x processesPerNode; `env` adds variables for the trainer (e.g. FINETUNE_STOP_FILE).
    """
    raw = _load(config)
    cfg = TrainerConfig.from_dict(raw, warn=True)
    spec = cfg.spec
    if output_dir is None:
        # The API default /output is a pod path; locally, write under ./runs/<name>.
        output_dir = spec.output.path if spec.output.path != Paths.OUTPUT_DIR else os.path.join(DEFAULT_OUTPUT_ROOT, cfg.name)
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    config_path = os.path.join(output_dir, "config.json")
    write_json_atomic(config_path, raw)
    result_path = os.path.join(output_dir, Paths.RESULT)
    if os.path.exists(result_path):
        os.remove(result_path)  # a stale result must not pass for this run's
    world = processes or spec.distributed.nodes * spec.distributed.processes_per_node
    run_env = {**os.environ, **local_env(config_path, output_dir, cfg.name, cfg.namespace, world, progress), **(env or {})}
    if Env.METRICS_PORT not in (env or {}):
        run_env.pop(Env.METRICS_PORT, None)  # metrics only when asked: a fixed port would clash between runs
    if world == 1:
        import time

        from .timings import START_ENV

        run_env[START_ENV] = str(time.time())  # trains in this (long-lived) process: its stages start now
        return _run_in_process(run_env, progress)
    return _run_torchrun(run_env, world, result_path)


def local_env(config_path: str, output_dir: str, name: str, namespace: str, world: int, progress: bool) -> dict[str, str]:
    """The pod environment of docs/contracts.md, for one machine (`finetune run` sets the same)."""
    return {
        Env.CONFIG: config_path,
        Env.OUTPUT_DIR: output_dir,
        Env.JOB_NAME: name,
        Env.JOB_NAMESPACE: namespace,
        Env.STATUS: "off",  # a local run has no FineTuneJob object to report to
        Env.NNODES: "1",
        Env.NPROC_PER_NODE: str(world),
        Env.WORLD_SIZE: str(world),
        Env.PROGRESS: "1" if progress else "0",
    }


def _run_in_process(run_env: dict[str, str], progress: bool) -> dict[str, Any]:
    from . import worker

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        run_env.pop(key, None)
    rt = Runtime.from_env(run_env)
    cfg = TrainerConfig.load(rt.config_path)
    worker.reset_accelerate_state()
    from .timings import START_ENV

    saved = {k: os.environ.get(k) for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", START_ENV)}
    if run_env.get(START_ENV):
        os.environ[START_ENV] = run_env[START_ENV]  # the stage clock reads it here: this run's start, not the process's
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
