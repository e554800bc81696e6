"""Group restart after losing a pod: seconds from the pod's death to the first training step after the restart.

Two "pods" of a 2-node x 1-process job run as two `finetune-trainer` launchers on this machine (as the pod runner
runs them: JOB_COMPLETION_INDEX 0 and 1, MASTER_ADDR 127.0.0.1 standing for pod 0's DNS name, one MASTER_PORT),
each becoming torchrun with the elastic c10d rendezvous the operator's pods use. Once training is under way, pod 1's
processes are SIGKILLed (node loss, OOM kill) and a replacement pod 1 is started at once, as the Job controller
does (the bench plays it: any pod that fails is replaced; `--kill-pod 0` loses the rendezvous host instead). The surviving agent restarts its worker, both join the next rendezvous round, every rank resumes from the last
checkpoint, and the job finishes. The first optimizer step after the kill (from rank 0's step log) marks the
recovery. Printed: the recovery time, the per-epoch losses against an uninterrupted run of the same job in the same
session (tolerance 1e-4, as bench/resume.py), and last the recovery time as a fraction of torch's default process
group timeout (30 min; target <= 0.1).

    .venv/bin/python bench/group_restart.py [--rounds 1] [--kill-after-steps 14] [--kill-pod 1] [--replace-after-seconds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "trainer"))
sys.path.insert(0, str(ROOT / "tests"))

from e2e.pod_runner import kill_tree  # noqa: E402
from tiny_models import build_tiny_bert, make_manifest, trainer_env, write_tiny_data  # noqa: E402

TOLERANCE = 1e-4
TORCH_DEFAULT_PG_TIMEOUT_SECONDS = 1800.0  # torch.distributed's default_pg_timeout (gloo; NCCL's is 10 minutes)


def job(model: str, data: str) -> dict:
    return make_manifest(
        model, data, name="bench-group-restart",
        hyperparameters={"epochs": 2, "batchSize": 2, "learningRate": 1e-3, "seed": 7, "mixedPrecision": "no"},
        distributed={"nodes": 2, "processesPerNode": 1, "processGroupTimeoutSeconds": 60},
        # A checkpoint every ~1.5 s: the restart resumes within the epoch, not from its start.
        checkpointing={"intervalMinutes": 0.025},
        earlyStopping={"enabled": False},
        output={"keepCheckpoints": 2},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pods:
    """The two pods of one job on one output directory (the shared PVC)."""

    def __init__(self, manifest: dict, out: Path):
        self.out = out
        self.step_log = out / "steps.log"
        self.port = free_port()
        self.env = trainer_env(manifest, out, "bench-group-restart", FINETUNE_RDZV_ID=f"bench-{self.port}",
                               FINETUNE_NNODES="2", FINETUNE_NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(self.port))

    def start(self, index: int) -> subprocess.Popen:
        log = open(self.out / f"pod-{index}.log", "a")  # noqa: SIM115
        return subprocess.Popen([sys.executable, "-m", "finetune_trainer"], env={**self.env, "JOB_COMPLETION_INDEX": str(index)},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def steps(self) -> list[int]:
        if not self.step_log.exists():
            return []
        return [int(line) for line in self.step_log.read_text().splitlines() if line.isdigit()]

    def result(self) -> dict:
        return json.loads((self.out / "result.json").read_text())


def losses(result: dict) -> list[tuple[int, float, float]]:
    return [(h["epoch"], h["trainLoss"], h["valLoss"]) for h in result["history"]]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            codes.append(proc.wait())
    return codes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="interrupted runs (the median recovery is reported)")
    parser.add_argument("--kill-after-steps", type=int, default=14, help="optimizer steps before pod 1 is killed")
    parser.add_argument("--kill-pod", type=int, default=1, choices=(0, 1),
                        help="the pod to lose: 1, or 0 (the rendezvous host: its peers' agents end too)")
    parser.add_argument("--replace-after-seconds", type=float, default=0.0,
                        help="delay before the replacement pod starts (scheduling, image pull)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-group-restart-") as tmp:
        root = Path(os.environ.get("BENCH_DIR") or tmp)
        manifest = job(build_tiny_bert(root), write_tiny_data(root / "train.jsonl", n=96))

        t0 = time.perf_counter()
        base = Pods(manifest, root / "uninterrupted")
        codes = wait_all([base.start(0), base.start(1)], 600)
        if codes != [0, 0]:
            print(f"the uninterrupted run failed (exit codes {codes}); see {base.out}/pod-*.log")
            return 1
        reference = base.result()
        print(f"uninterrupted: {reference['globalStep']} steps on 2 pods in {time.perf_counter() - t0:.1f} s")

        recoveries, worst = [], 0.0
        for r in range(1, args.rounds + 1):
            pods = Pods(manifest, root / f"interrupted-{r}")
            running = {0: pods.start(0), 1: pods.start(1)}
            while len(pods.steps()) < args.kill_after_steps:
                if any(p.poll() is not None for p in running.values()):
                    print(f"round {r}: a pod ended before the kill; see {pods.out}/pod-*.log")
                    return 1
                time.sleep(0.01)
            logged = len(pods.steps())
            killed_at = pods.steps()[-1]
            # The pod is lost: its agent and its worker (in a session of its own) die at once.
            kill_tree(running[args.kill_pod].pid)
            died = time.monotonic()
            failures = 0  # pods that failed, the killed one included (what the Job controller would count)
            first_step, done = None, set()
            deadline = died + 900
            # The Job controller: a failed pod is replaced (after --replace-after-seconds), a succeeded one is done.
            while len(done) < 2 and time.monotonic() < deadline:
                if first_step is None and len(pods.steps()) > logged:
                    first_step = time.monotonic()
                for index, proc in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[index]
                    if code == 0:
                        done.add(index)
                        continue
                    failures += 1
                    if failures > 4:
                        print(f"round {r}: {failures} pod failures; see {pods.out}/pod-*.log")
                        return 1
                    time.sleep(args.replace_after_seconds)
                    running[index] = pods.start(index)
                time.sleep(0.005)
            if first_step is None or len(done) < 2:
                print(f"round {r}: the job did not recover; see {pods.out}/pod-*.log")
                return 1
            seconds = first_step - died
            recoveries.append(seconds)
            result = pods.result()
            resumed_step = pods.steps()[logged] - 1
            print(f"round {r}: pod {args.kill_pod} killed at step {killed_at}; first step after the restart (step "
                  f"{resumed_step + 1}, resumed from the checkpoint at step {resumed_step}) {seconds:.2f} s after the "
                  f"kill; pod failures {failures} (the killed one included); elastic restarts of rank 0's agent "
                  f"{result.get('elasticRestarts')}")
            for (e1, t1, v1), (_, t2, v2) in zip(losses(reference), losses(result), strict=True):
                worst = max(worst, abs(t1 - t2), abs(v1 - v2))
                print(f"  epoch {e1}: train_loss {t1:.6f} vs {t2:.6f}, val_loss {v1:.6f} vs {v2:.6f} (uninterrupted vs restarted)")
            if len(losses(result)) != len(losses(reference)):
                print("  the restarted run has another number of epochs")
                return 1
        median = statistics.median(recoveries)
        same = worst <= TOLERANCE
        print(f"largest per-epoch loss difference {worst:.2e} (tolerance {TOLERANCE}): {'match' if same else 'MISMATCH'}")
        print(f"recovery: {median:.2f} s from the pod's death to the first training step after the restart "
              f"(median of {len(recoveries)}) = {median / TORCH_DEFAULT_PG_TIMEOUT_SECONDS:.4f} of torch's default "
              f"process group timeout ({TORCH_DEFAULT_PG_TIMEOUT_SECONDS:.0f} s; target <= 0.1)")
        return 0 if same and median / TORCH_DEFAULT_PG_TIMEOUT_SECONDS <= 0.1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
