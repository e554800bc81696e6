"""The trainer's inputs: the resolved job config (a file) and the process environment (one place)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from finetune_contract.spec import FineTuneJobSpec

DEFAULT_CONFIG_PATH = "/etc/finetune/config.json"
MODEL_PVC_MOUNT = "/models"
DATA_PVC_MOUNT = "/data"


@dataclass(frozen=True)
class TrainerConfig:
    """`ResolvedJob.trainer_config()` parsed back into the API types (every hyperparameter filled)."""

    name: str
    namespace: str
    spec: FineTuneJobSpec

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainerConfig:
        if raw.get("kind") != "TrainerConfig":
            raise ValueError(f"trainer config: kind must be TrainerConfig (got {raw.get('kind')!r})")
        return cls(name=raw["name"], namespace=raw.get("namespace") or "default", spec=FineTuneJobSpec.model_validate(raw["spec"]))

    @classmethod
    def load(cls, path: str) -> TrainerConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _int(env: dict[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return int(value)
    return None


@dataclass(frozen=True)
class Runtime:
    """Everything the trainer reads from its environment, read once (STYLE rule 6).

    World layout precedence: the operator's FINETUNE_* variables, then the `PET_*` variables
    Kubeflow's PyTorchJob sets for torchrun, then the spec. The node rank comes from the
    Indexed Job's JOB_COMPLETION_INDEX (or PET_NODE_RANK).
    """

    config_path: str
    output_dir: str | None  # FINETUNE_OUTPUT_DIR; None: spec.output.path
    job_name: str | None
    namespace: str | None
    nnodes: int | None
    nproc_per_node: int | None
    node_rank: int
    master_addr: str
    master_port: int
    metrics_port: int | None  # None: no metrics server (local runs)
    status_enabled: bool
    stop_poll_seconds: float
    stop_file: str | None  # a file whose existence requests a graceful stop (local runs, tests)
    # Set by torchrun (or a PyTorchJob) in each worker process.
    rank: int | None
    world_size: int | None
    local_rank: int | None
    expected_world_size: int | None  # FINETUNE_WORLD_SIZE, set by our launcher for its workers
    kubeconfig: str | None = None  # KUBECONFIG: credentials for status reports outside a cluster
    fault_oom_above: str | None = None  # FINETUNE_FAULT_OOM_ABOVE: batch probes above it fail as out of memory

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Runtime:
        env = dict(os.environ if env is None else env)
        port = env.get("FINETUNE_METRICS_PORT")
        return cls(
            config_path=env.get("FINETUNE_CONFIG") or DEFAULT_CONFIG_PATH,
            output_dir=env.get("FINETUNE_OUTPUT_DIR") or None,
            job_name=env.get("FINETUNE_JOB_NAME") or None,
            namespace=env.get("FINETUNE_JOB_NAMESPACE") or None,
            nnodes=_int(env, "FINETUNE_NNODES", "PET_NNODES"),
            nproc_per_node=_int(env, "FINETUNE_NPROC_PER_NODE", "PET_NPROC_PER_NODE"),
            node_rank=_int(env, "JOB_COMPLETION_INDEX", "PET_NODE_RANK", "NODE_RANK", "GROUP_RANK") or 0,
            master_addr=env.get("MASTER_ADDR") or env.get("PET_MASTER_ADDR") or "127.0.0.1",
            master_port=_int(env, "MASTER_PORT", "PET_MASTER_PORT") or 29500,
            metrics_port=int(port) if port not in (None, "") else None,
            status_enabled=(env.get("FINETUNE_STATUS") or "on").lower() not in ("off", "false", "0", "no"),
            stop_poll_seconds=float(env.get("FINETUNE_STOP_POLL_SECONDS") or 5),
            stop_file=env.get("FINETUNE_STOP_FILE") or None,
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK"),
            expected_world_size=_int(env, "FINETUNE_WORLD_SIZE"),
            kubeconfig=env.get("KUBECONFIG") or None,
            fault_oom_above=env.get("FINETUNE_FAULT_OOM_ABOVE") or None,
        )

    def layout(self, spec: FineTuneJobSpec) -> tuple[int, int]:
        """(nodes, processes per node): the environment wins over the spec."""
        return (self.nnodes or spec.distributed.nodes, self.nproc_per_node or spec.distributed.processes_per_node)
