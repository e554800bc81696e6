"""`finetune-trainer`: the container's entry point.

World size 1 trains in this process. Otherwise it becomes torchrun (exec, so SIGTERM from the
kubelet reaches torchrun, which forwards it to every worker) with the node layout from the
environment, and each worker checks that the world it joined is the one the job asked for.
"""

from __future__ import annotations

import os
import socket
import sys

from .config import Runtime, TrainerConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(rt: Runtime, nnodes: int, nproc: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--node-rank", str(rt.node_rank),
        "--master-addr", rt.master_addr, "--master-port", str(rt.master_port),
        "-m", "finetune_trainer.worker",
    ]


def main(argv: list[str] | None = None) -> int:
    rt = Runtime.from_env()
    cfg = TrainerConfig.load(rt.config_path)
    nnodes, nproc = rt.layout(cfg.spec)
    world = nnodes * nproc
    from . import worker

    if rt.rank is not None and rt.world_size is not None:
        # Already a worker (a PyTorchJob-style pod with RANK/WORLD_SIZE, or started by torchrun).
        os.environ.setdefault("FINETUNE_WORLD_SIZE", str(world))
        return worker.main()
    if world == 1:
        os.environ.update({"FINETUNE_WORLD_SIZE": "1", "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
        # A one-process group still rendezvouses with itself: outside a pod nothing set these.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        return worker.main()
    env = {**os.environ, "FINETUNE_WORLD_SIZE": str(world)}
    os.execve(sys.executable, torchrun_command(rt, nnodes, nproc), env)
    return 0  # not reached


def cli() -> None:
    """The console script: exits like a torchrun worker does (see worker.exit_process)."""
    from .worker import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
