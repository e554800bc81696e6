"""`finetune-trainer` (also `python -m finetune_trainer`): the container's entry point, and what `finetune run`
starts on a workstation.

It reads the config first (refusing, with both versions named, one whose schemaVersion it cannot read, and
warning once about fields of a newer operator it ignores). World size 1 then trains in this process.
Otherwise it runs torchrun's elastic agent in this process (so SIGTERM from the kubelet reaches it, and it forwards
it to every worker) with the node layout from the environment and an elastic rendezvous (group restart,
docs/multi-node.md); each worker checks that the world it joined is the one the job asked for, and a rank that
fails ends the pod with that rank's exit code and a termination message naming it (run_torchrun).
"""

from __future__ import annotations

import json
import os
import socket
import sys

from pydantic import ValidationError

from finetune_contract.config import EXIT_INCOMPATIBLE_CONFIG, EXIT_NOT_RETRYABLE, Env
from finetune_contract.spec import DistributedSpec

from .config import IncompatibleConfig, Runtime, TrainerConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RDZV_JOIN_TIMEOUT_SECONDS = 600  # torch's default: a replacement pod may need minutes to be scheduled and pulled


def torchrun_command(rt: Runtime, nnodes: int, nproc: int, distributed: DistributedSpec | None = None) -> list[str]:
    """torchrun with an elastic c10d rendezvous hosted by node 0's agent (pod 0's DNS name on the headless Service).

    A static rendezvous (`--master-addr/--node-rank`) cannot take a replacement pod into a running group; with c10d
    and `--max-restarts`, the agents that survive a lost pod stop their workers, open the next rendezvous round, the
    Job controller's replacement pod joins it, and every rank resumes from the last complete checkpoint
    (docs/multi-node.md). `is_host` is explicit: the endpoint's address is also local to every "pod" when they share a
    machine (tests), and only node 0 may host the store. Store reads time out with the process group.
    """
    d = distributed or DistributedSpec()
    timeout = d.process_group_timeout_seconds
    # In-place restarts only where a peer pod can be lost and replaced: in a one-pod job a dead rank is a failure of
    # the pod (named in its termination message, retried through the Job's backoffLimit from the last checkpoint).
    restarts = d.max_restarts if nnodes > 1 else 0
    conf = f"is_host={1 if rt.node_rank == 0 else 0},read_timeout={timeout},join_timeout={max(RDZV_JOIN_TIMEOUT_SECONDS, timeout)}"
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{rt.master_addr}:{rt.master_port}",
        "--rdzv-id", rt.rdzv_id or rt.job_name or "finetune", "--rdzv-conf", conf,
        "--max-restarts", str(restarts),
        "-m", "finetune_trainer.worker",
    ]


def _no_restart_on_fatal_exit() -> None:
    """Make the elastic agent spend no restart on a worker exit code that no restart can fix.

    torch elastic restarts a failed worker group in place up to --max-restarts times whatever the exit code: a full
    disk or an unreadable dataset on a multi-node job was retried maxRestarts times (each one a rendezvous, a
    checkpoint load and training up to the next save) before the pod exited 4 or 5 and the Job's podFailurePolicy
    failed it. The agent reads its budget after every look at its workers, so zeroing it when a failed rank's code is
    one of EXIT_NOT_RETRYABLE makes that look final: the agent stops the other ranks and run_torchrun exits with
    that code. torch has no option for this (its restarts are by count only); _monitor_workers is the one place
    that sees the codes before the restart decision, so it is wrapped here, in the agent's own process only.
    """
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = LocalElasticAgent._monitor_workers
    if getattr(monitor, "finetune_no_restart_on_fatal", False):
        return

    def _monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if result.is_failed() and any(f.exitcode in EXIT_NOT_RETRYABLE for f in result.failures.values()):
            if self._remaining_restarts:
                print(json.dumps({"level": "warning", "message": "a rank exited with a code no restart can fix; "
                                  f"the agent's {self._remaining_restarts} remaining restarts are not used"}),
                      file=sys.stderr)
            self._remaining_restarts = 0
        return result

    _monitor_workers.finetune_no_restart_on_fatal = True  # type: ignore[attr-defined]
    LocalElasticAgent._monitor_workers = _monitor_workers  # type: ignore[method-assign]


def run_torchrun(command: list[str]) -> int:
    """Run torchrun's elastic agent in this process (what exec'ing it did: SIGTERM from the kubelet reaches the agent,
    which forwards it to every worker), and exit the way the pod should.

    torchrun itself exits 1 whatever its workers' codes, which hid two things: which rank died (torch elastic stops
    the others at once, so no collective hangs, but the reason stayed in the log) and the worker's own exit code,
    which the Job's podFailurePolicy reads (full disk, unreadable dataset: fail the Job at once). Here the first
    failed rank's exit code becomes the pod's, and its rank, pid and error go into the termination message (the
    pod's status, then the FineTuneJob's) unless the worker wrote one of its own (failures.FatalError).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from . import failures

    assert command[1:3] == ["-m", "torch.distributed.run"], command
    _no_restart_on_fatal_exit()
    try:
        run(parse_args(command[3:]))
    except ChildFailedError as err:
        rank, failure = failures.root_failure(err.failures)
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # a signal: the shell's 128+N
        message = failures.rank_failure_message(rank, failure, sorted(err.failures))
        print(json.dumps({"level": "error", "rank": rank, "exitCode": code, "message": message}), file=sys.stderr)
        if code not in EXIT_NOT_RETRYABLE:  # those wrote their own message (reason and fix)
            failures.write_termination_text(message)
        return code
    except SignalException as err:  # SIGTERM/SIGINT: the workers got it too and have saved what they could
        return 128 + int(err.sigval)
    return 0


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
    env = {**os.environ, Env.WORLD_SIZE: str(world),
           # torch 2.13's c10d rendezvous shares the agent's TCPStore with the workers and writes its address into
           # the first round only: a replacement pod that joins a later round waits for it forever (DistStoreError
           # after read_timeout, seen here). Without sharing, every round's rank 0 publishes a fresh worker store
           # at its own address (socket.getfqdn(): the pod's name on the headless Service).
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    os.environ.update(env)
    return run_torchrun(torchrun_command(rt, nnodes, nproc, cfg.spec.distributed))


def cli() -> None:
    """The console script: exits like a torchrun worker does (see worker.exit_process)."""
    code = main()
    if "finetune_trainer.worker" in sys.modules:
        sys.modules["finetune_trainer.worker"].exit_process(code)
    raise SystemExit(code)


if __name__ == "__main__":
    cli()
