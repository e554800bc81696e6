"""The sweep planner (issue 14), pure: a FineTuneSweep and its trials' FineTuneJobs -> what to do.

`plan_sweep` returns the new status, the trial FineTuneJobs that must exist (created when missing), the
trials to stop (`Pruned`) and the Events of this pass. It keeps no state between passes: the optuna study
is rebuilt on every pass from the sweep's own status (in-memory storage re-filled with
`study.add_trial(create_trial(...))`, the per-epoch objective as intermediate values and the pruner's
rung records as system attributes), so a restarted operator continues exactly where the last one was.
Each new trial's parameters are recorded in the status before its FineTuneJob is created (the handler
writes the status first), so no trial is ever sampled twice, and the sampler is seeded per trial number:
the same study and the same number give the same parameters, whether the pass ran before or after a
restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..api import constants as c
from ..api import sweep as s
from ..api.constants import Phase
from .conditions import rfc3339, set_condition

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

log = logging.getLogger("finetune_operator")


def _optuna() -> Any:
    """optuna, imported on the first sweep pass: ~17 MiB the operator does not spend while no sweep exists
    (measured: peak RSS of kopf, pydantic, aiohttp and prometheus-client 46 MiB, with optuna 63 MiB)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class SweepReason:
    VALID = "SpecValid"
    INVALID_SPEC = "InvalidSpec"
    TRIALS_RUNNING = "TrialsRunning"
    BUDGET_SPENT = "BudgetSpent"
    NO_TRIAL_SUCCEEDED = "NoTrialSucceeded"
    TRIAL_CREATED = "TrialCreated"
    TRIAL_PRUNED = s.PRUNED


class TrialState_:
    PENDING, RUNNING, SUCCEEDED, PRUNED, FAILED = "Pending", "Running", "Succeeded", "Pruned", "Failed"
    TERMINAL = frozenset({"Succeeded", "Pruned", "Failed"})
    ALL = ("Pending", "Running", "Succeeded", "Pruned", "Failed")


T = TrialState_


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


@dataclass
class SweepPlan:
    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)  # trial FineTuneJobs that must exist
    stop: list[tuple[str, str]] = field(default_factory=list)  # (trial name, why) to stop as Pruned
    events: list[Event] = field(default_factory=list)


def trial_name(sweep: str, index: int) -> str:
    return f"{sweep}-{index}"


def default_seed(uid: str | None, name: str) -> int:
    return int(hashlib.sha256((uid or name).encode()).hexdigest()[:8], 16) % (2**31)


def _trial_seed(seed: int, index: int) -> int:
    return int(hashlib.sha256(f"{seed}/{index}".encode()).hexdigest()[:8], 16) % (2**31)


# -- what a trial's FineTuneJob says -------------------------------------------------------------------

def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def objective_values(ftj: dict[str, Any], metric: str) -> list[float]:
    """The objective after each epoch, from the trial's status.history (valLoss, or valMetric when the
    trial reports the objective as its validation metric: the trial spec sets earlyStopping.metric)."""
    st = ftj.get("status") or {}
    if metric != "val_loss" and st.get("valMetricName") not in (None, metric):
        return []
    key = "valLoss" if metric == "val_loss" else "valMetric"
    points = sorted((h for h in st.get("history") or [] if isinstance(h.get("epoch"), int)), key=lambda h: h["epoch"])
    out: list[float] = []
    for h in points:
        if h["epoch"] != len(out) + 1 or not _finite(h.get(key)):
            break  # a gap: intermediate values must be the epochs in order
        out.append(float(h[key]))
    return out


def observed_state(ftj: dict[str, Any]) -> str:
    st = ftj.get("status") or {}
    phase = st.get("phase")
    if phase == Phase.SUCCEEDED:
        return T.PRUNED if st.get("reason") == s.PRUNED else T.SUCCEEDED
    if phase == Phase.FAILED:
        return T.FAILED
    if phase == Phase.RUNNING or st.get("epoch"):
        return T.RUNNING
    return T.PENDING


def owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    return any(r.get("uid") == uid for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


# -- the study -----------------------------------------------------------------------------------------

def distributions(spec: s.FineTuneSweepSpec) -> dict[str, BaseDistribution]:
    """optuna's view of the space. A choice is a categorical over the candidates' indices: optuna's
    categoricals take scalars only, and a candidate may be a list (LoRA target modules, Adam betas)."""
    d = _optuna().distributions
    out: dict[str, BaseDistribution] = {}
    for p in spec.search_space:
        if p.type == "choice":
            out[p.path] = d.CategoricalDistribution(list(range(len(p.values or []))))
        elif p.type == "int":
            out[p.path] = d.IntDistribution(int(p.low), int(p.high), step=p.step or 1)  # type: ignore[arg-type]
        else:
            out[p.path] = d.FloatDistribution(p.low, p.high, log=p.type == "logUniform")  # type: ignore[arg-type]
    return out


def _grid(spec: s.FineTuneSweepSpec) -> dict[str, list[Any]]:
    return {p.path: list(range(len(p.values or []))) if p.type == "choice" else s.grid_values(p) for p in spec.search_space}


def grid_size(spec: s.FineTuneSweepSpec) -> int:
    return math.prod(len(v) for v in _grid(spec).values())


def _to_internal(spec: s.FineTuneSweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for p in spec.search_space:
        value = params.get(p.path)
        if p.type == "choice":
            candidates = list(p.values or [])
            out[p.path] = candidates.index(value) if value in candidates else 0
        else:
            out[p.path] = value
    return out


def _to_values(spec: s.FineTuneSweepSpec, internal: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for p in spec.search_space:
        v = internal[p.path]
        out[p.path] = (p.values or [])[v] if p.type == "choice" else int(v) if p.type == "int" else float(v)
    return out


def sampler_for(spec: s.FineTuneSweepSpec, seed: int, index: int) -> optuna.samplers.BaseSampler:
    if spec.algorithm.name == "grid":
        # One permutation of the grid for the whole sweep; trial number i takes its i-th point.
        return _optuna().samplers.GridSampler(_grid(spec), seed=seed)
    if spec.algorithm.name == "tpe":
        return _optuna().samplers.TPESampler(seed=_trial_seed(seed, index), n_startup_trials=spec.algorithm.startup_trials)
    return _optuna().samplers.RandomSampler(seed=_trial_seed(seed, index))


def pruner_for(spec: s.FineTuneSweepSpec) -> optuna.pruners.BasePruner:
    p = spec.pruning
    if p.algorithm == "median":
        return _optuna().pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.algorithm == "asha":
        return _optuna().pruners.SuccessiveHalvingPruner(min_resource=p.min_epochs, reduction_factor=p.reduction_factor)
    return _optuna().pruners.NopPruner()


def best_of(values: list[float], direction: str) -> float | None:
    return (max(values) if direction == "max" else min(values)) if values else None


def build_study(spec: s.FineTuneSweepSpec, trials: list[dict[str, Any]], seed: int, direction: str) -> optuna.Study:
    """The study as the recorded trials say it is; trial number == index."""
    optuna = _optuna()
    TrialState, create_trial = optuna.trial.TrialState, optuna.trial.create_trial  # noqa: N806
    study = optuna.create_study(direction="maximize" if direction == "max" else "minimize",
                                sampler=sampler_for(spec, seed, len(trials)), pruner=pruner_for(spec))
    dists = distributions(spec)
    grid = _grid(spec) if spec.algorithm.name == "grid" else None
    for t in trials:
        values = list(t.get("values") or [])
        inter = {i + 1: v for i, v in enumerate(values)}
        state, value = {
            T.SUCCEEDED: (TrialState.COMPLETE, best_of(values, direction)),
            T.PRUNED: (TrialState.PRUNED, None),
            T.FAILED: (TrialState.FAIL, None),
        }.get(t["state"], (TrialState.RUNNING, None))
        if state == TrialState.COMPLETE and value is None:
            state = TrialState.FAIL  # finished without reporting the objective
        attrs: dict[str, Any] = dict(t.get("rungs") or {})
        if grid is not None:
            attrs.update({"grid_id": t["index"], "search_space": grid})
        study.add_trial(create_trial(state=state, value=value, params=_to_internal(spec, t.get("params") or {}),
                                     distributions=dists, intermediate_values=inter, system_attrs=attrs))
    return study


# -- one pass ------------------------------------------------------------------------------------------

def trial_manifest(sweep: dict[str, Any], spec: s.FineTuneSweepSpec, template: dict[str, Any],
                   trial: dict[str, Any]) -> dict[str, Any]:
    meta = sweep.get("metadata") or {}
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {
            "name": trial["name"],
            "namespace": meta.get("namespace") or "default",
            "labels": {s.SWEEP_LABEL: meta.get("name"), s.TRIAL_INDEX_LABEL: str(trial["index"]),
                       c.Label.PART_OF: meta.get("name"), c.Label.MANAGED_BY: c.FIELD_MANAGER},
            "annotations": {s.TRIAL_PARAMS_ANNOTATION: json.dumps(trial["params"], sort_keys=True)},
            "ownerReferences": [{"apiVersion": c.API_VERSION, "kind": s.SWEEP_KIND, "name": meta.get("name"),
                                 "uid": meta.get("uid"), "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": s.trial_spec(spec, template, trial["params"]),
    }


def stop_requested(ftj: dict[str, Any]) -> bool:
    ann = (ftj.get("metadata") or {}).get("annotations") or {}
    return str(ann.get(c.Annotation.STOP, "")).lower() == "true" and ann.get(s.STOP_REASON_ANNOTATION) == s.PRUNED


def _phase(st: dict[str, Any], phase: str, reason: str, message: str, now: datetime, gen: Any,
           events: list[Event], type_: str = "Normal") -> None:
    if (st.get("phase"), st.get("reason")) != (phase, reason):
        events.append(Event(type_, reason, message))
    st.update({"phase": phase, "reason": reason, "message": message})
    for cond, on in (("Complete", phase == Phase.SUCCEEDED), ("Failed", phase == Phase.FAILED)):
        st["conditions"] = set_condition(st["conditions"], cond, on, reason, message, now, gen)


def plan_sweep(sweep: dict[str, Any], trials_observed: dict[str, dict[str, Any] | None], now: datetime) -> SweepPlan:
    """`trials_observed`: trial name -> its FineTuneJob from the cache (None when there is none)."""
    meta = sweep.get("metadata") or {}
    name, uid, gen = meta.get("name") or "", meta.get("uid"), meta.get("generation")
    old = dict(sweep.get("status") or {})
    st: dict[str, Any] = json.loads(json.dumps(old))
    st.setdefault("conditions", [])
    st["observedGeneration"] = gen
    events: list[Event] = []
    plan = SweepPlan(st)
    if st.get("phase") in Phase.TERMINAL:
        return plan
    try:
        spec, template = s.parse_sweep(sweep.get("spec"))
    except s.InvalidSweep as err:
        msg = "invalid spec: " + "; ".join(str(p) for p in err.problems[:5])
        st["conditions"] = set_condition(st["conditions"], "Valid", False, SweepReason.INVALID_SPEC, msg, now, gen)
        _phase(st, Phase.FAILED, SweepReason.INVALID_SPEC, msg, now, gen, events, "Warning")
        plan.events = events
        return plan
    st["conditions"] = set_condition(st["conditions"], "Valid", True, SweepReason.VALID, "the spec is valid", now, gen)
    direction = s.direction(spec)
    seed = st.get("seed")
    if not isinstance(seed, int):
        seed = spec.algorithm.seed if spec.algorithm.seed is not None else default_seed(uid, name)
    st.update({"seed": seed, "direction": direction})
    st.setdefault("startTime", rfc3339(now))

    # 1. What the trials' FineTuneJobs say now.
    trials: list[dict[str, Any]] = [dict(t) for t in st.get("trials") or []]
    for t in trials:
        ftj = trials_observed.get(t["name"])
        if ftj is None or not owned_by(ftj, uid) or t["state"] in T.TERMINAL:
            continue
        values = objective_values(ftj, spec.objective.metric)
        fst = ftj.get("status") or {}
        t["values"] = values
        t["value"] = best_of(values, direction)
        t["epochs"] = fst.get("epoch") if isinstance(fst.get("epoch"), int) else len(values)
        t["state"] = observed_state(ftj)
        if t["state"] == T.PRUNED:
            t["epochsSaved"] = fst.get("epochsSaved") if isinstance(fst.get("epochsSaved"), int) else 0

    # 2. The study, and the pruner's verdict on every running trial (fed its per-epoch objective).
    study = build_study(spec, trials, seed, direction)
    for t in trials:
        if t["state"] != T.RUNNING or t.get("pruneRequested") or not t.get("values"):
            continue
        frozen = study.trials[t["index"]]
        if study.pruner.prune(study, frozen):
            t["pruneRequested"] = True
            t["prunedAtEpoch"] = len(t["values"])
            events.append(Event("Normal", SweepReason.TRIAL_PRUNED,
                                f"trial {t['name']} pruned after epoch {len(t['values'])} "
                                f"({spec.objective.metric} {t['values'][-1]:.4g}, {spec.pruning.algorithm} pruner)"))
        rungs = {k: v for k, v in study._storage.get_trial_system_attrs(frozen._trial_id).items()
                 if k.startswith("completed_rung_")}
        if rungs:
            t["rungs"] = rungs
    for t in trials:
        ftj = trials_observed.get(t["name"])
        if t.get("pruneRequested") and t["state"] not in T.TERMINAL and ftj is not None and not stop_requested(ftj):
            plan.stop.append((t["name"], f"pruned by sweep {name} after epoch {t.get('prunedAtEpoch')}: its "
                                         f"{spec.objective.metric} is not promising ({spec.pruning.algorithm} pruner)"))

    # 3. New trials while slots and budget last; parameters recorded before the trial exists.
    limit = spec.budget.max_trials
    if spec.algorithm.name == "grid":
        limit = min(limit, grid_size(spec))
    spent = sum(t.get("epochs") or 0 for t in trials)
    active = sum(1 for t in trials if t["state"] not in T.TERMINAL)

    def budget_left() -> bool:
        return len(trials) < limit and (spec.budget.max_epochs_total is None or spent < spec.budget.max_epochs_total)

    dists = distributions(spec)
    while active < spec.budget.parallel_trials and budget_left():
        index = len(trials)
        study.sampler = sampler_for(spec, seed, index)
        asked = study.ask(dists)
        trial = {"index": index, "name": trial_name(name, index), "params": _to_values(spec, asked.params),
                 "state": T.PENDING, "values": []}
        trials.append(trial)
        active += 1
        events.append(Event("Normal", SweepReason.TRIAL_CREATED,
                            f"trial {trial['name']}: " + ", ".join(f"{k}={v}" for k, v in trial["params"].items())))

    for t in trials:
        if t["state"] not in T.TERMINAL and trials_observed.get(t["name"]) is None:
            plan.create.append(trial_manifest(sweep, spec, template, t))

    # 4. The sweep's own status.
    counts = {state: sum(1 for t in trials if t["state"] == state) for state in T.ALL}
    done = [t for t in trials if t["state"] == T.SUCCEEDED and t.get("value") is not None]
    best = None
    if done:
        best = (max if direction == "max" else min)(done, key=lambda t: t["value"])
    st.update({
        "trials": trials,
        "trialsCreated": len(trials),
        "trialsRunning": counts[T.PENDING] + counts[T.RUNNING],
        "trialsPruned": counts[T.PRUNED],
        "trialsSucceeded": counts[T.SUCCEEDED],
        "trialsFailed": counts[T.FAILED],
        "epochsSpent": spent,
        "epochsSavedByPruning": sum(t.get("epochsSaved") or 0 for t in trials if t["state"] == T.PRUNED),
    })
    if best is not None:
        st.update({"bestTrial": best["name"], "bestValue": best["value"], "bestParams": best["params"]})
    if active == 0 and not budget_left():
        st["completionTime"] = st.get("completionTime") or rfc3339(now)
        if best is not None:
            _phase(st, Phase.SUCCEEDED, SweepReason.BUDGET_SPENT,
                   f"{len(trials)} trials ({counts[T.PRUNED]} pruned, {counts[T.FAILED]} failed); best {best['name']} "
                   f"{spec.objective.metric} {best['value']:.4g} with "
                   + ", ".join(f"{k}={v}" for k, v in best["params"].items()), now, gen, events)
        else:
            _phase(st, Phase.FAILED, SweepReason.NO_TRIAL_SUCCEEDED,
                   f"none of {len(trials)} trials completed ({counts[T.PRUNED]} pruned, {counts[T.FAILED]} failed)",
                   now, gen, events, "Warning")
    else:
        _phase(st, Phase.RUNNING, SweepReason.TRIALS_RUNNING,
               f"{counts[T.PENDING] + counts[T.RUNNING]} trials running, {len(trials)} of {limit} created", now, gen, events)
    plan.events = events
    return plan


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The fields that changed (a merge patch replaces lists whole; the trials list is sent entire)."""
    return {k: v for k, v in new.items() if old.get(k) != v}
