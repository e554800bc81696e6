"""The trainer's inputs: the resolved job config (a file) and the process environment (one place)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from finetune_contract.config import Env, IncompatibleConfig, Paths, Ports, read_trainer_config
from finetune_contract.spec import FineTuneJobSpec

DEFAULT_CONFIG_PATH = Paths.CONFIG_FILE
MODEL_PVC_MOUNT = Paths.MODEL_PVC_MOUNT
DATA_PVC_MOUNT = Paths.DATA_PVC_MOUNT

log = logging.getLogger("finetune_trainer")

__all__ = ["DATA_PVC_MOUNT", "DEFAULT_CONFIG_PATH", "MODEL_PVC_MOUNT", "IncompatibleConfig", "Runtime", "TrainerConfig"]


@dataclass(frozen=True)
class TrainerConfig:
    """The resolved job (finetune_contract.config.TrainerConfig on the wire), every hyperparameter filled."""

    name: str
    namespace: str
    spec: FineTuneJobSpec
    schema_version: str = "1.0"
    ignored: tuple[str, ...] = ()  # fields of a newer operator this trainer does not know (dropped)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, warn: bool = False) -> TrainerConfig:
        """Raises IncompatibleConfig (naming both versions) for a config this trainer cannot read.

        `warn`: log the one warning that lists ignored fields (the launcher does; workers it starts do not,
        so a pod's log has the line once)."""
        read = read_trainer_config(raw)
        if warn and read.warning():
            log.warning(read.warning())
        cfg = read.config
        return cls(name=cfg.name, namespace=cfg.namespace or "default", spec=cfg.spec, schema_version=read.version,
                   ignored=read.ignored)

    @classmethod
    def load(cls, path: str, *, warn: bool = False) -> TrainerConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), warn=warn)


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
    rdzv_id: str | None = None  # FINETUNE_RDZV_ID: the elastic rendezvous id (the batch Job's uid)
    restart_count: int = 0  # TORCHELASTIC_RESTART_COUNT: group restarts this pod's agent did before this worker

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Runtime:
        env = dict(os.environ if env is None else env)
        port = env.get(Env.METRICS_PORT)
        return cls(
            config_path=env.get(Env.CONFIG) or DEFAULT_CONFIG_PATH,
            output_dir=env.get(Env.OUTPUT_DIR) or None,
            job_name=env.get(Env.JOB_NAME) or None,
            namespace=env.get(Env.JOB_NAMESPACE) or None,
            nnodes=_int(env, Env.NNODES, "PET_NNODES"),
            nproc_per_node=_int(env, Env.NPROC_PER_NODE, "PET_NPROC_PER_NODE"),
            node_rank=_int(env, Env.NODE_RANK, "PET_NODE_RANK", "NODE_RANK", "GROUP_RANK") or 0,
            master_addr=env.get(Env.MASTER_ADDR) or env.get("PET_MASTER_ADDR") or "127.0.0.1",
            master_port=_int(env, Env.MASTER_PORT, "PET_MASTER_PORT") or Ports.RENDEZVOUS,
            metrics_port=int(port) if port not in (None, "") else None,
            status_enabled=(env.get(Env.STATUS) or "on").lower() not in ("off", "false", "0", "no"),
            stop_poll_seconds=float(env.get(Env.STOP_POLL_SECONDS) or 5),
            stop_file=env.get(Env.STOP_FILE) or None,
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK"),
            expected_world_size=_int(env, Env.WORLD_SIZE),
            kubeconfig=env.get("KUBECONFIG") or None,
            fault_oom_above=env.get(Env.FAULT_OOM_ABOVE) or None,
            rdzv_id=env.get(Env.RDZV_ID) or None,
            restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT") or 0,
        )

    def layout(self, spec: FineTuneJobSpec) -> tuple[int, int]:
        """(nodes, processes per node): the environment wins over the spec."""
        return (self.nnodes or spec.distributed.nodes, self.nproc_per_node or spec.distributed.processes_per_node)
