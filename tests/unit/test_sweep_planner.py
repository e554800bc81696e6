"""The pure sweep planner (issue 14): grid enumerates exactly, random and TPE respect the space and the seed,
pruned trials get a stop, and a planner started on a sweep's stored status (an operator restart) rebuilds
the same study and continues with the same trials."""

from __future__ import annotations

import copy
import itertools
import json
import math
from datetime import UTC, datetime

import pytest

from finetune_operator.api import sweep as s
from finetune_operator.plan import sweep as ps

NOW = datetime(2026, 12, 2, tzinfo=UTC)
TEMPLATE = {"model": {"name": "/models/m"}, "dataset": {"source": "/data/train.jsonl"},
            "hyperparameters": {"epochs": 4}}


def sweep(spec: dict, status: dict | None = None, name: str = "lr") -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep",
            "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 1},
            "spec": {"template": {"spec": TEMPLATE}, **spec}, "status": status or {}}


def ftj(manifest: dict, phase: str, history: list[float], reason: str = "", metric: str = "val_loss") -> dict:
    key = "valLoss" if metric == "val_loss" else "valMetric"
    status = {"phase": phase, "reason": reason, "epoch": len(history),
              "valMetricName": None if metric == "val_loss" else metric,
              "history": [{"epoch": i + 1, key: v} for i, v in enumerate(history)]}
    return {**copy.deepcopy(manifest), "status": status}


def drive(obj: dict, curve, epochs: int = 4, max_passes: int = 200) -> tuple[dict, list[ps.SweepPlan]]:
    """Run a sweep to its end: each pass, every running trial advances one epoch (objective from
    `curve(params, epoch)`), a stopped trial ends Pruned, a trial at `epochs` ends Succeeded."""
    cluster: dict[str, dict] = {}
    plans = []
    for _ in range(max_passes):
        plan = ps.plan_sweep(obj, dict(cluster), NOW)
        plan.seen = copy.deepcopy(cluster)  # what this pass observed (for the restart test)
        plan.before = copy.deepcopy(obj)
        plans.append(plan)
        obj = {**obj, "status": plan.status}
        for m in plan.create:
            cluster[m["metadata"]["name"]] = ftj(m, "Pending", [])
        for name, _ in plan.stop:
            cluster[name]["metadata"].setdefault("annotations", {}).update(
                {"finetune.dev/stop": "true", s.STOP_REASON_ANNOTATION: s.PRUNED})
        if plan.status.get("phase") in ("Succeeded", "Failed"):
            return obj, plans
        for job in cluster.values():
            st = job["status"]
            if st["phase"] in ("Succeeded", "Failed"):
                continue
            params = json.loads(job["metadata"]["annotations"][s.TRIAL_PARAMS_ANNOTATION])
            if ps.stop_requested(job):
                st.update(phase="Succeeded", reason=s.PRUNED, epochsSaved=epochs - st["epoch"])
                continue
            n = st["epoch"] + 1
            st["history"].append({"epoch": n, "valLoss": curve(params, n)})
            st.update(epoch=n, phase="Succeeded" if n == epochs else "Running",
                      reason="TrainingCompleted" if n == epochs else "PodsRunning")
    raise AssertionError("the sweep did not finish")


def lr_curve(params: dict, epoch: int) -> float:
    # Best near lr 1e-3; every trial's loss falls with epochs.
    lr = params["hyperparameters.learningRate"]
    return abs(math.log10(lr) + 3) + 1.0 / epoch


def test_grid_enumerates_every_combination_exactly_once():
    spec = {"algorithm": {"name": "grid", "seed": 3},
            "searchSpace": [{"path": "hyperparameters.learningRate", "type": "choice", "values": [1e-4, 1e-3, 1e-2]},
                            {"path": "hyperparameters.batchSize", "type": "int", "low": 8, "high": 24, "step": 8}],
            "budget": {"maxTrials": 50, "parallelTrials": 4}}
    done, _ = drive(sweep(spec), lambda p, e: p["hyperparameters.batchSize"] / p["hyperparameters.learningRate"])
    seen = [tuple(t["params"].values()) for t in done["status"]["trials"]]
    assert sorted(seen) == sorted(itertools.product([1e-4, 1e-3, 1e-2], [8, 16, 24]))  # 9, not maxTrials 50
    assert done["status"]["phase"] == "Succeeded" and done["status"]["trialsCreated"] == 9
    assert done["status"]["bestParams"] == {"hyperparameters.learningRate": 1e-2, "hyperparameters.batchSize": 8}


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_random_and_tpe_respect_the_space_and_the_seed(algorithm):
    spec = {"algorithm": {"name": algorithm, "seed": 11, "startupTrials": 3},
            "searchSpace": [{"path": "hyperparameters.learningRate", "type": "logUniform", "low": 1e-5, "high": 1e-2},
                            {"path": "hyperparameters.weightDecay", "type": "uniform", "low": 0.0, "high": 0.1},
                            {"path": "lora.rank", "type": "int", "low": 4, "high": 16, "step": 4},
                            {"path": "preset", "type": "choice", "values": ["fast", "balanced"]}],
            "budget": {"maxTrials": 8, "parallelTrials": 2}}
    first, _ = drive(sweep(spec), lr_curve)
    again, _ = drive(sweep(spec), lr_curve)
    other, _ = drive(sweep({**spec, "algorithm": {**spec["algorithm"], "seed": 12}}), lr_curve)
    params = [t["params"] for t in first["status"]["trials"]]
    assert len(params) == 8 and first["status"]["seed"] == 11
    for p in params:
        assert 1e-5 <= p["hyperparameters.learningRate"] <= 1e-2
        assert 0.0 <= p["hyperparameters.weightDecay"] <= 0.1
        assert p["lora.rank"] in (4, 8, 12, 16) and isinstance(p["lora.rank"], int)
        assert p["preset"] in ("fast", "balanced")
    assert params == [t["params"] for t in again["status"]["trials"]]  # same seed: same trials
    assert params != [t["params"] for t in other["status"]["trials"]]
    assert len({json.dumps(p, sort_keys=True) for p in params}) == 8


def test_unset_seed_is_derived_and_recorded():
    spec = {"searchSpace": [{"path": "hyperparameters.learningRate", "type": "uniform", "low": 1e-4, "high": 1e-3}]}
    plan = ps.plan_sweep(sweep(spec), {}, NOW)
    assert plan.status["seed"] == ps.default_seed("uid-1", "lr")


@pytest.mark.parametrize("pruner", ["median", "asha"])
def test_pruned_trials_get_a_stop_and_save_epochs(pruner):
    spec = {"algorithm": {"name": "grid", "seed": 0},
            "searchSpace": [{"path": "hyperparameters.learningRate", "type": "choice",
                             "values": [1e-3, 3e-3, 1e-5, 1e-6, 1e-1, 3e-4]}],
            "pruning": {"algorithm": pruner, "startupTrials": 2, "minEpochs": 1, "reductionFactor": 2},
            "budget": {"maxTrials": 6, "parallelTrials": 2}}
    done, plans = drive(sweep(spec), lr_curve)
    st = done["status"]
    stopped = [name for p in plans for name, _ in p.stop]
    pruned = [t for t in st["trials"] if t["state"] == "Pruned"]
    assert pruned and sorted(stopped) == sorted(t["name"] for t in pruned)  # each pruned trial stopped once
    assert all(t["pruneRequested"] and t["epochs"] < 4 for t in pruned)
    assert st["epochsSavedByPruning"] == sum(4 - t["epochs"] for t in pruned) > 0
    assert st["epochsSpent"] == sum(t["epochs"] for t in st["trials"])
    assert st["phase"] == "Succeeded" and st["bestParams"] == {"hyperparameters.learningRate": 1e-3}
    assert any(e.reason == "Pruned" for p in plans for e in p.events)


def test_no_pruning_runs_every_trial_to_the_end():
    spec = {"searchSpace": [{"path": "hyperparameters.learningRate", "type": "logUniform", "low": 1e-6, "high": 1e-1}],
            "budget": {"maxTrials": 5, "parallelTrials": 2}, "algorithm": {"seed": 1}}
    done, plans = drive(sweep(spec), lr_curve)
    assert not [x for p in plans for x in p.stop]
    assert done["status"]["epochsSpent"] == 20 and done["status"]["epochsSavedByPruning"] == 0


def test_a_restart_mid_sweep_rebuilds_the_same_study_and_continues_the_same():
    spec = {"algorithm": {"name": "tpe", "seed": 5, "startupTrials": 2},
            "searchSpace": [{"path": "hyperparameters.learningRate", "type": "logUniform", "low": 1e-6, "high": 1e-1}],
            "pruning": {"algorithm": "asha", "minEpochs": 1, "reductionFactor": 2},
            "budget": {"maxTrials": 7, "parallelTrials": 2}}
    uninterrupted, plans = drive(sweep(spec), lr_curve)
    k = 6
    # A restarted operator has only what the API server holds: the sweep (its status as stored after pass
    # k - 1, through JSON) and the trial FineTuneJobs. It must take pass k's decisions exactly.
    stored = json.loads(json.dumps(plans[k].before))
    assert stored["status"]["trials"] and any(t["state"] == "Running" for t in stored["status"]["trials"])
    restarted = ps.plan_sweep(stored, json.loads(json.dumps(plans[k].seen)), NOW)
    assert restarted.status == plans[k].status
    assert restarted.stop == plans[k].stop and restarted.create == plans[k].create
    # The rebuilt study is the one the sweep had: same trials, states, values, pruner rungs.
    parsed = s.FineTuneSweepSpec.model_validate(stored["spec"])
    st = plans[k].status

    def view(study):
        return [(t.number, t.state, t.params, t.value, t.intermediate_values, t.system_attrs) for t in study.trials]

    assert view(ps.build_study(parsed, st["trials"], st["seed"], st["direction"])) == \
        view(ps.build_study(parsed, json.loads(json.dumps(st["trials"])), st["seed"], st["direction"]))
    # No trial repeated or lost: the uninterrupted sweep's trials start with the restarted pass's.
    names = [t["name"] for t in uninterrupted["status"]["trials"]]
    assert len(names) == len(set(names)) == 7
    assert [t["params"] for t in uninterrupted["status"]["trials"]][:len(st["trials"])] == [t["params"] for t in st["trials"]]
    # With no trial FineTuneJob in the cache yet (just restarted), the unfinished ones are asked for again
    # under their recorded names and parameters, and no new trial is sampled in their place.
    cold = ps.plan_sweep(stored, {}, NOW)
    unfinished = [t["name"] for t in stored["status"]["trials"] if t["state"] in ("Pending", "Running")]
    assert [m["metadata"]["name"] for m in cold.create] == unfinished
    assert len(cold.status["trials"]) == len(stored["status"]["trials"])


def test_trial_manifests_say_which_trial_and_are_owned_by_the_sweep():
    spec = {"searchSpace": [{"path": "hyperparameters.learningRate", "type": "choice", "values": [1e-4]}],
            "objective": {"metric": "val_accuracy"}, "budget": {"maxTrials": 1, "parallelTrials": 1}}
    (m,) = ps.plan_sweep(sweep(spec), {}, NOW).create
    assert m["metadata"]["name"] == "lr-0"
    assert m["metadata"]["labels"][s.SWEEP_LABEL] == "lr" and m["metadata"]["labels"][s.TRIAL_INDEX_LABEL] == "0"
    assert m["metadata"]["ownerReferences"][0] | {"kind": "FineTuneSweep", "uid": "uid-1", "controller": True} == \
        m["metadata"]["ownerReferences"][0]
    assert m["spec"]["hyperparameters"] == {"epochs": 4, "learningRate": 1e-4}
    assert m["spec"]["earlyStopping"]["metric"] == "val_accuracy"  # the trial reports the objective


@pytest.mark.parametrize(("bad", "path"), [
    ({"path": "hyperparameters.learningRate", "type": "uniform", "low": 1e-3, "high": 1e-4}, "spec.searchSpace[0].high"),
    ({"path": "hyperparameters.learningRate", "type": "logUniform", "low": 0.0, "high": 1e-4}, "spec.searchSpace[0].low"),
    ({"path": "hyperparameters.learningRate", "type": "choice"}, "spec.searchSpace[0].values"),
    ({"path": "hyperparameters.noSuchField", "type": "choice", "values": [1]}, "spec.searchSpace[0].path"),
    ({"path": "hyperparameters.learningRate", "type": "choice", "values": [-1.0]}, "spec.searchSpace[0].values[0]"),
    ({"path": "hyperparameters.batchSize", "type": "int", "low": 0, "high": 4}, "spec.searchSpace[0].low"),
])
def test_invalid_sweeps_fail_naming_the_field(bad, path):
    plan = ps.plan_sweep(sweep({"searchSpace": [bad]}), {}, NOW)
    assert plan.status["phase"] == "Failed" and plan.status["reason"] == "InvalidSpec"
    assert path in plan.status["message"] and not plan.create


def test_grid_only_over_choice_and_int():
    bad = {"algorithm": {"name": "grid"},
           "searchSpace": [{"path": "hyperparameters.learningRate", "type": "uniform", "low": 1e-4, "high": 1e-3}]}
    plan = ps.plan_sweep(sweep(bad), {}, NOW)
    assert "spec.searchSpace: grid search needs every parameter to be choice or int" in plan.status["message"]
