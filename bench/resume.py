"""Resume after SIGKILL and SIGTERM: steps redone, and whether the resumed run is the uninterrupted one.

A real (tiny: 2-layer BERT, dropout 0.1, no downloads) fine-tune runs as its own trainer process
(`python -m finetune_trainer.worker`, as in a pod) with time-based checkpoints
(`checkpointing.intervalMinutes`). It is killed with SIGKILL at --kills random moments and once with
SIGTERM, each time restarted on the same output directory, and then left to finish. Per kill it prints the
optimizer steps redone after the resume (the last step the killed process finished, from its step log, minus
the step the next process resumed at), and last the worst case as a fraction of the checkpoint interval in
steps, as measured in an uninterrupted run of the same job in the same session (the baseline): target <= 1.0
for SIGKILL, 0 steps for SIGTERM. It then checks that the per-epoch training and validation losses of the
interrupted run equal the uninterrupted run's within 1e-4 (CPU, fixed seed).

    .venv/bin/python bench/resume.py [--kills 5] [--interval-seconds 1.5] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "trainer"))

from tiny_models import build_tiny_bert, make_manifest, trainer_env, write_tiny_data  # noqa: E402

from finetune_trainer import checkpoints as ckpt  # noqa: E402

TOLERANCE = 1e-4


def job(model: str, data: str, interval_seconds: float) -> dict:
    return make_manifest(
        model, data, name="bench-resume",
        hyperparameters={"epochs": 3, "batchSize": 1, "learningRate": 1e-3, "seed": 7},
        checkpointing={"intervalMinutes": interval_seconds / 60.0},
        earlyStopping={"enabled": False},
        output={"keepCheckpoints": 2},
    )


class Trainer:
    """One trainer process on an output directory; every run of it appends to the same step log."""

    def __init__(self, manifest: dict, out: Path):
        self.out = out
        self.step_log = out / "steps.log"
        self.env = trainer_env(manifest, out, "bench-resume", FINETUNE_WORLD_SIZE="1", FINETUNE_NNODES="1",
                               FINETUNE_NPROC_PER_NODE="1")

    def start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "finetune_trainer.worker"], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=open(self.out / "trainer.log", "a"))  # noqa: SIM115

    def steps(self) -> list[int]:
        if not self.step_log.exists():
            return []
        return [int(line) for line in self.step_log.read_text().splitlines() if line.isdigit()]

    def checkpoint_steps(self) -> list[tuple[int, str]]:
        if not self.step_log.exists():
            return []
        lines = [line.split() for line in self.step_log.read_text().splitlines() if line.startswith("checkpoint ")]
        return [(int(step), kind) for _, step, kind in lines]

    def last_step(self) -> int:
        steps = self.steps()
        return steps[-1] if steps else 0

    def result(self) -> dict:
        return json.loads((self.out / "result.json").read_text())


def losses(result: dict) -> list[tuple[int, float, float]]:
    return [(h["epoch"], h["trainLoss"], h["valLoss"]) for h in result["history"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs at random moments (>= 5)")
    parser.add_argument("--interval-seconds", type=float, default=1.0, help="checkpointing.intervalMinutes, in seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        root = Path(tmp)
        manifest = job(build_tiny_bert(root), write_tiny_data(root / "train.jsonl"), args.interval_seconds)

        # Baseline: the same job, uninterrupted, in this session.
        t0 = time.perf_counter()
        base = Trainer(manifest, root / "uninterrupted")
        if base.start().wait() != 0:
            print("the uninterrupted run failed; see", base.out / "trainer.log")
            return 1
        reference = base.result()
        mids = [s for s, kind in base.checkpoint_steps() if kind == "mid"]
        boundaries = [s for s, _ in base.checkpoint_steps()]
        gaps = [b - a for a, b in zip([0, *boundaries], boundaries, strict=False) if b in mids]
        if not gaps:
            print("no time-based checkpoint in the baseline run: lower --interval-seconds;", base.checkpoint_steps())
            return 1
        interval_steps = max(gaps)
        print(f"baseline: {reference['globalStep']} steps in {time.perf_counter() - t0:.1f} s; time-based checkpoints every "
              f"{args.interval_seconds} s = {min(gaps)}..{interval_steps} steps (worst case measured against {interval_steps})")

        trainer = Trainer(manifest, root / "interrupted")
        plan = ["SIGKILL"] * args.kills + ["SIGTERM"]
        rng.shuffle(plan)
        rows = []
        for i, how in enumerate(plan, 1):
            logged = len(trainer.steps())
            proc = trainer.start()
            # A random moment once training is under way in this process (its first step logged, imports done).
            while len(trainer.steps()) <= logged and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 2.0 * args.interval_seconds))
            if proc.poll() is not None:
                print(f"kill {i}: the run finished before the {how}; use a longer job or shorter waits")
                return 1
            proc.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
            code = proc.wait()
            killed_at = trainer.last_step()
            next_at = (ckpt.latest(str(trainer.out)) or (None, {"globalStep": 0}))[1].get("globalStep", 0)
            redone = killed_at - next_at
            rows.append((how, killed_at, next_at, redone))
            print(f"kill {i}: {how:7s} at step {killed_at:4d} (exit {code}); resumes at step {next_at:4d}: "
                  f"{redone} step(s) redone = {redone / interval_steps:.2f} of the checkpoint interval")
        proc = trainer.start()
        if proc.wait() != 0:
            print("the resumed run failed; see", trainer.out / "trainer.log")
            return 1
        result = trainer.result()

        worst_kill = max(r[3] for r in rows if r[0] == "SIGKILL")
        term = [r[3] for r in rows if r[0] == "SIGTERM"]
        print(f"worst SIGKILL: {worst_kill} steps = {worst_kill / interval_steps:.2f} of the checkpoint interval "
              f"(target <= 1.0); SIGTERM: {term[0]} steps redone (target 0)")
        ok = worst_kill <= interval_steps and term[0] == 0
        diffs = []
        for (e1, t1, v1), (_, t2, v2) in zip(losses(reference), losses(result), strict=True):
            diffs.append(max(abs(t1 - t2), abs(v1 - v2)))
            print(f"epoch {e1}: train_loss {t1:.6f} vs {t2:.6f}, val_loss {v1:.6f} vs {v2:.6f} (uninterrupted vs interrupted)")
        same = len(losses(reference)) == len(losses(result)) and max(diffs) <= TOLERANCE
        print(f"largest per-epoch loss difference {max(diffs):.2e} (tolerance {TOLERANCE}): {'match' if same else 'MISMATCH'}")
        return 0 if ok and same else 1


if __name__ == "__main__":
    raise SystemExit(main())
