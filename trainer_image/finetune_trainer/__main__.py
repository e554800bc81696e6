"""`finetune-trainer` (also `python -m finetune_trainer`): the container's entry point, and what `finetune run`
starts on a workstation.

It reads the config first (refusing, with both versions named, one whose schemaVersion it cannot read, and
warning once about fields of a newer operator it ignores). World size 1 then trains in this process.
Otherwise it becomes torchrun (exec, so SIGTERM from the kubelet reaches torchrun, which forwards it to every
worker) with the node layout from the environment, and each worker checks that the world it joined is the
one the job asked for.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from pydantic import ValidationError

from finetune_contract.config import EXIT_INCOMPATIBLE_CONFIG, Env

from .config import IncompatibleConfig, Runtime, TrainerConfig


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


def _refuse(message: str) -> int:
    print(json.dumps({"level": "error", "message": message}), file=sys.stderr)
    return EXIT_INCOMPATIBLE_CONFIG


def main(argv: list[str] | None = None) -> int:
    rt = Runtime.from_env()
    try:
        cfg = TrainerConfig.load(rt.config_path, warn=True)
    except IncompatibleConfig as err:
        return _refuse(str(err))
    except ValidationError as err:
        return _refuse(f"trainer config {rt.config_path} is not valid for this trainer: {err}")
    from .timings import START_ENV, process_start_time

    # The container's start, for the trainer's stage timings (torchrun's workers start later than the container).
    os.environ[START_ENV] = str(process_start_time() or "")
    nnodes, nproc = rt.layout(cfg.spec)
    world = nnodes * nproc
    # Imported after the config check: a refused config costs no torch import.
    from . import worker

    if rt.rank is not None and rt.world_size is not None:
        # Already a worker (a PyTorchJob-style pod with RANK/WORLD_SIZE, or started by torchrun).
        os.environ.setdefault(Env.WORLD_SIZE, str(world))
        return worker.main()
    if world == 1:
        os.environ.update({Env.WORLD_SIZE: "1", "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
        # A one-process group still rendezvouses with itself: outside a pod nothing set these.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        return worker.main()
    env = {**os.environ, Env.WORLD_SIZE: str(world)}
    os.execve(sys.executable, torchrun_command(rt, nnodes, nproc), env)
    return 0  # not reached


def cli() -> None:
    """The console script: exits like a torchrun worker does (see worker.exit_process)."""
    code = main()
    if "finetune_trainer.worker" in sys.modules:
        sys.modules["finetune_trainer.worker"].exit_process(code)
    raise SystemExit(code)


if __name__ == "__main__":
    cli()
