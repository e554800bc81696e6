"""The FineTuneSweep API: a hyperparameter search whose trials are FineTuneJobs (issue 14).

Operator-only types: the trainer never sees a sweep, only the trial FineTuneJobs the operator makes from
it, so they live here rather than in the contract. The CRD is generated from them by api/crd.py, like
the FineTuneJob's. Cross-field rules are written once as CEL (enforced at `kubectl apply`) and once in
Python (`sweep_problems`, for the operator and `finetune validate`), as in the FineTuneJob's rules.py.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, WithJsonSchema

from . import constants as c
from .rules import Rule
from .spec import ApiModel, FineTuneJobSpec, ShortStr
from .status import LENIENT, StatusCondition

SWEEP_KIND = "FineTuneSweep"
SWEEP_PLURAL = "finetunesweeps"
SWEEP_SINGULAR = "finetunesweep"
SWEEP_SHORT_NAMES = ["fts"]
SWEEP_CRD_NAME = f"{SWEEP_PLURAL}.{c.GROUP}"
# Trials are named `<sweep>-<index>`; the index has at most 3 digits (maxTrials <= 500), so the trial
# names stay within the FineTuneJob's own name limit.
MAX_SWEEP_NAME_LENGTH = c.MAX_JOB_NAME_LENGTH - 4
MAX_TRIALS = 500
SWEEP_LABEL = f"{c.GROUP}/sweep-name"
TRIAL_INDEX_LABEL = f"{c.GROUP}/trial-index"
TRIAL_PARAMS_ANNOTATION = f"{c.GROUP}/trial-params"
STOP_REASON_ANNOTATION = f"{c.GROUP}/stop-reason"
STOP_MESSAGE_ANNOTATION = f"{c.GROUP}/stop-message"
PRUNED = "Pruned"
# Fields a sweep may not vary: the operator's own controls of a trial.
_NOT_SEARCHABLE = {"stop", "suspend"}

# A choice value is any JSON scalar or list (a learning rate, a preset name, LoRA target modules); it is
# type-checked against the FineTuneJob field it is put into when the operator builds the trial.
AnyValue = Annotated[Any, WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True})]


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        alias = field.alias or name
        path = f"{prefix}{alias}"
        ann = field.annotation
        inner = [a for a in (get_args(ann) or (ann,)) if a is not type(None)]
        sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None and get_origin(ann) is not list:
            out += _leaf_paths(sub, f"{path}.")
        elif not prefix and alias in _NOT_SEARCHABLE:
            continue
        else:
            out.append(path)
    return out


SEARCHABLE_PATHS = _leaf_paths(FineTuneJobSpec)


class ParameterType(StrEnum):
    CHOICE = "choice"
    UNIFORM = "uniform"
    LOG_UNIFORM = "logUniform"
    INT = "int"


class Algorithm(StrEnum):
    GRID = "grid"
    RANDOM = "random"
    TPE = "tpe"


class PrunerName(StrEnum):
    NONE = "none"
    MEDIAN = "median"
    ASHA = "asha"


class ObjectiveMetric(StrEnum):
    VAL_LOSS = "val_loss"
    VAL_ACCURACY = "val_accuracy"
    VAL_F1 = "val_f1"
    VAL_PERPLEXITY = "val_perplexity"
    VAL_RECALL_AT_1 = "val_recall_at_1"


class Direction(StrEnum):
    AUTO = "auto"
    MIN = "min"
    MAX = "max"


class SweepModel(ApiModel):
    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):  # noqa: D105
        schema = super().__get_pydantic_json_schema__(core_schema, handler)
        rules = [r for r in SWEEP_RULES if r.owner == cls.__name__]
        if rules:
            schema["x-kubernetes-validations"] = [r.crd() for r in rules]
        return schema


class SearchParameter(SweepModel):
    """One searched hyperparameter: a FineTuneJob spec field and the values it may take."""

    path: str = Field(
        max_length=256, json_schema_extra={"enum": SEARCHABLE_PATHS},
        description="The FineTuneJob spec field the trials vary, as a dotted path below `spec` "
        "(e.g. `hyperparameters.learningRate`, `lora.rank`); it must name a field of the FineTuneJob spec.",
    )
    type: ParameterType = Field(
        strict=False,
        description="`choice` (one of `values`), `uniform` (a float in [low, high]), `logUniform` (a float in "
        "[low, high], uniform in log space; low > 0) or `int` (an integer in [low, high], every `step`).",
    )
    values: list[AnyValue] | None = Field(
        None, max_length=64, description="The candidates of a `choice` parameter. Unset for the other types."
    )
    low: float | None = Field(None, description="Lower bound (uniform, logUniform, int), inclusive.")
    high: float | None = Field(None, description="Upper bound (uniform, logUniform, int), inclusive; above `low`.")
    step: int | None = Field(None, ge=1, le=1_000_000, description="Spacing of an `int` parameter's values. Unset: 1.")


class Objective(SweepModel):
    """What the sweep optimises: a validation metric the trainer reports for every epoch."""

    metric: ObjectiveMetric = Field(
        strict=False, default=ObjectiveMetric.VAL_LOSS,
        description="Validation metric, measured after every epoch; a trial's value is its best epoch's "
        "(its final model is the best epoch's). Default `val_loss`.",
    )
    direction: Direction = Field(
        strict=False, default=Direction.AUTO,
        description="`min` or `max`; `auto`: max for accuracy/f1/recall, min otherwise. Default `auto`.",
    )


class AlgorithmSpec(SweepModel):
    """How the next trial's parameters are chosen (optuna samplers)."""

    name: Algorithm = Field(
        strict=False, default=Algorithm.RANDOM,
        description="`grid` (every combination of choice/int values, in a shuffled order), `random` or `tpe` "
        "(Bayesian, optuna's TPESampler). Default `random`.",
    )
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1,
        description="Seed of the sampler; one seed gives the same trials. Unset: derived from the sweep's uid; "
        "the seed used is recorded in status.seed.",
    )
    startup_trials: int = Field(
        4, ge=0, le=MAX_TRIALS,
        description="tpe: trials sampled at random before the model of good and bad trials is used. Default 4.",
    )


class Budget(SweepModel):
    """How much the sweep may run."""

    max_trials: int = Field(10, ge=1, le=MAX_TRIALS, description="Trials in total (at most the grid's size for grid). Default 10.")
    parallel_trials: int = Field(
        2, ge=1, le=64, description="Trials running at once; a new one starts when one finishes. Default 2."
    )
    max_epochs_total: int | None = Field(
        None, ge=1, le=1_000_000,
        description="Start no new trial once the trials together have run this many epochs (running ones "
        "finish). Unset: no limit.",
    )


class PruningSpec(SweepModel):
    """Stopping unpromising trials early (optuna pruners), fed with each trial's per-epoch objective."""

    algorithm: PrunerName = Field(
        strict=False, default=PrunerName.NONE,
        description="`none`, `median` (stop a trial whose value at an epoch is worse than the median of the "
        "completed trials at that epoch) or `asha` (asynchronous successive halving: at epochs minEpochs x "
        "reductionFactor^k keep the best 1/reductionFactor). Default `none`.",
    )
    startup_trials: int = Field(
        2, ge=0, le=MAX_TRIALS, description="median: trials that must complete before any trial is pruned. Default 2."
    )
    warmup_epochs: int = Field(
        0, ge=0, le=1000, description="median: epochs every trial runs before it may be pruned. Default 0."
    )
    min_epochs: int = Field(1, ge=1, le=1000, description="asha: epochs before the first rung. Default 1.")
    reduction_factor: int = Field(3, ge=2, le=100, description="asha: 1/reductionFactor of the trials go on at each rung. Default 3.")


class TrialTemplate(SweepModel):
    """The FineTuneJob every trial is made from."""

    spec: FineTuneJobSpec = Field(description="A FineTuneJob spec; each trial sets the searched fields on a copy.")


class FineTuneSweepSpec(SweepModel):
    """A hyperparameter search: trials are FineTuneJobs made from the template."""

    template: TrialTemplate = Field(description="The trials' FineTuneJob.")
    search_space: list[SearchParameter] = Field(min_length=1, max_length=16, description="The searched fields.")
    objective: Objective = Field(default_factory=Objective, description="The metric to optimise.")
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec, description="How trials are chosen.")
    budget: Budget = Field(default_factory=Budget, description="Trials in total and at once.")
    pruning: PruningSpec = Field(default_factory=PruningSpec, description="Early stopping of unpromising trials.")


# -- status ---------------------------------------------------------------------------------------------

class TrialStatus(ApiModel):
    """One trial as the sweep recorded it: enough to rebuild the optuna study after a restart."""

    model_config = LENIENT

    index: int = Field(description="Trial number (0-based); the FineTuneJob is `<sweep>-<index>`.")
    name: ShortStr = Field(description="The trial's FineTuneJob.")
    params: dict[str, AnyValue] = Field(default_factory=dict, description="Searched values, by path.")
    state: ShortStr = Field(description="Pending, Running, Succeeded, Pruned or Failed.")
    values: list[float] = Field(default_factory=list, max_length=1000, description="The objective after each epoch.")
    value: float | None = Field(None, description="The trial's objective: its best epoch's.")
    epochs: int | None = Field(None, description="Epochs run.")
    epochs_saved: int | None = Field(None, description="Epochs not run because the trial was pruned.")
    prune_requested: bool | None = Field(None, description="The pruner rejected the trial; it is being stopped.")
    pruned_at_epoch: int | None = Field(None, description="The epoch after which the pruner rejected it.")
    rungs: dict[str, float] = Field(default_factory=dict, description="asha: the value recorded at each rung (optuna's).")


class FineTuneSweepStatus(ApiModel):
    """Observed state of the sweep, written by the operator only."""

    model_config = LENIENT

    observed_generation: int | None = None
    phase: ShortStr | None = Field(None, description="Pending, Running, Succeeded or Failed.")
    reason: ShortStr | None = None
    message: str | None = Field(None, max_length=32768)
    conditions: list[StatusCondition] = Field(default_factory=list, max_length=32)
    seed: int | None = Field(None, description="The sampler's seed (spec.algorithm.seed or the one derived).")
    direction: ShortStr | None = Field(None, description="`min` or `max`: the objective's resolved direction.")
    trials: list[TrialStatus] = Field(default_factory=list, max_length=MAX_TRIALS)
    trials_created: int | None = None
    trials_running: int | None = None
    trials_pruned: int | None = None
    trials_succeeded: int | None = None
    trials_failed: int | None = None
    best_trial: ShortStr | None = Field(None, description="The FineTuneJob of the best completed trial.")
    best_value: float | None = None
    best_params: dict[str, AnyValue] = Field(default_factory=dict)
    epochs_spent: int | None = Field(None, description="Epochs run by all trials together.")
    epochs_saved_by_pruning: int | None = Field(None, description="Epochs pruned trials did not run.")
    start_time: ShortStr | None = None
    completion_time: ShortStr | None = None


# -- cross-field rules -----------------------------------------------------------------------------------

def _bounded(p: Any) -> bool:
    return p.type == "choice" or (p.low is not None and p.high is not None and p.low < p.high)


SWEEP_RULES: list[Rule] = [
    Rule("SearchParameter", "self.type != 'choice' || (has(self.values) && size(self.values) > 0)",
         "a choice parameter needs values: list its candidates", ".values",
         lambda p: p.type != "choice" or bool(p.values)),
    Rule("SearchParameter", "self.type == 'choice' || !has(self.values)",
         "values apply only to type choice: remove them, or use low/high", ".values",
         lambda p: p.type == "choice" or p.values is None),
    Rule("SearchParameter", "self.type == 'choice' || (has(self.low) && has(self.high) && self.low < self.high)",
         "uniform, logUniform and int parameters need low < high: set both bounds", ".high", _bounded),
    Rule("SearchParameter", "self.type != 'choice' || (!has(self.low) && !has(self.high))",
         "low and high do not apply to type choice: remove them, or list values", ".low",
         lambda p: p.type != "choice" or (p.low is None and p.high is None)),
    Rule("SearchParameter", "self.type != 'logUniform' || !has(self.low) || self.low > 0.0",
         "a logUniform parameter needs low > 0", ".low",
         lambda p: p.type != "logUniform" or p.low is None or p.low > 0),
    Rule("SearchParameter", "!has(self.step) || self.type == 'int'",
         "step applies only to type int: remove it", ".step", lambda p: p.step is None or p.type == "int"),
    Rule("FineTuneSweepSpec",
         "self.algorithm.name != 'grid' || self.searchSpace.all(p, p.type == 'choice' || p.type == 'int')",
         "grid search needs every parameter to be choice or int: use algorithm random or tpe for uniform/logUniform",
         ".searchSpace",
         lambda s: s.algorithm.name != "grid" or all(p.type in ("choice", "int") for p in s.search_space)),
    Rule("FineTuneSweepSpec", "self.searchSpace.all(p, self.searchSpace.exists_one(q, q.path == p.path))",
         "each path may be searched once: merge the parameters with the same path", ".searchSpace",
         lambda s: len({p.path for p in s.search_space}) == len(s.search_space)),
    Rule("Budget", "self.parallelTrials <= self.maxTrials",
         "parallelTrials must be at most maxTrials", ".parallelTrials",
         lambda b: b.parallel_trials <= b.max_trials),
]

SWEEP_RULE_PATHS = {"SearchParameter": "spec.searchSpace[]", "FineTuneSweepSpec": "spec", "Budget": "spec.budget"}
SWEEP_ROOT_RULES = [
    {"rule": f"self.metadata.name.size() <= {MAX_SWEEP_NAME_LENGTH}",
     "message": f"metadata.name must be at most {MAX_SWEEP_NAME_LENGTH} characters (trials are named <sweep>-<index>)",
     "fieldPath": ".metadata.name"},
]


# -- Python validation -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepProblem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidSweep(ValueError):
    def __init__(self, problems: list[SweepProblem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def _loc(loc: tuple, prefix: str) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def direction(spec: FineTuneSweepSpec) -> str:
    if spec.objective.direction != "auto":
        return spec.objective.direction
    return "max" if spec.objective.metric in ("val_accuracy", "val_f1", "val_recall_at_1") else "min"


def grid_values(p: SearchParameter) -> list[Any]:
    if p.type == "choice":
        return list(p.values or [])
    step = p.step or 1
    return list(range(int(p.low), int(p.high) + 1, step))  # type: ignore[arg-type]


def set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    node = spec
    *parents, leaf = path.split(".")
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[leaf] = copy.deepcopy(value)


def trial_spec(spec: FineTuneSweepSpec, raw_template: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The trial FineTuneJob's spec: the template as written, the searched values set, and the objective
    reported as the trial's validation metric (status.valMetric follows earlyStopping.metric)."""
    out = copy.deepcopy(raw_template)
    for path, value in params.items():
        set_path(out, path, value)
    if spec.objective.metric != "val_loss":
        es = out.setdefault("earlyStopping", {})
        es["metric"] = spec.objective.metric
    return out


def sweep_problems(spec: FineTuneSweepSpec, raw_template: dict[str, Any]) -> list[SweepProblem]:
    """The rules (as CEL in the CRD) plus what CEL cannot see: every candidate value fits its field."""
    from .validation import InvalidFineTuneJob, validate_manifest

    problems: list[SweepProblem] = []
    for rule in SWEEP_RULES:
        targets = spec.search_space if rule.owner == "SearchParameter" else [spec.budget] if rule.owner == "Budget" else [spec]
        for i, target in enumerate(targets):
            if not rule.ok(target):
                where = f"spec.searchSpace[{i}]" if rule.owner == "SearchParameter" else SWEEP_RULE_PATHS[rule.owner]
                problems.append(SweepProblem(where + rule.field, rule.message))
    if problems:
        return problems
    for i, p in enumerate(spec.search_space):
        if p.path not in SEARCHABLE_PATHS:
            problems.append(SweepProblem(f"spec.searchSpace[{i}].path", f"{p.path!r} is not a FineTuneJob spec field"))
            continue
        if p.type == "int" and (p.low != math.floor(p.low) or p.high != math.floor(p.high)):  # type: ignore[arg-type]
            problems.append(SweepProblem(f"spec.searchSpace[{i}].low", "an int parameter needs integer bounds"))
            continue
        candidates = ([(f"values[{j}]", v) for j, v in enumerate(p.values or [])] if p.type == "choice"
                      else [("low", int(p.low) if p.type == "int" else p.low),  # type: ignore[arg-type]
                            ("high", int(p.high) if p.type == "int" else p.high)])  # type: ignore[arg-type]
        for where, value in candidates:
            manifest = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "trial"},
                        "spec": trial_spec(spec, raw_template, {p.path: value})}
            try:
                validate_manifest(manifest)
            except InvalidFineTuneJob as err:
                detail = "; ".join(f"{q.path}: {q.message}" for q in err.problems[:2])
                problems.append(SweepProblem(f"spec.searchSpace[{i}].{where}",
                                             f"{value!r} does not fit {p.path} ({detail})"))
    return problems


def parse_sweep(raw: Any) -> tuple[FineTuneSweepSpec, dict[str, Any]]:
    """The typed spec and the template as written (trials copy it as written, so the API server's and the
    presets' defaults apply to each trial as to any FineTuneJob); InvalidSweep names every bad field."""
    raw = raw or {}
    try:
        spec = FineTuneSweepSpec.model_validate(raw)
    except ValidationError as err:
        raise InvalidSweep([SweepProblem(_loc(e["loc"], "spec"), e["msg"]) for e in err.errors()]) from None
    template = copy.deepcopy(((raw.get("template") or {}).get("spec")) or {})
    problems = sweep_problems(spec, template)
    if problems:
        raise InvalidSweep(problems)
    return spec, template
