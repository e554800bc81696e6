"""Validate a FineTuneJob manifest and resolve it into the config the trainer receives.

Every problem is reported (not only the first), each as "<field path>: <what is wrong and
what is allowed>", so a user fixes a manifest in one round.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from finetune_contract.config import trainer_config

from ..jsonbytes import equality_key, indented_sorted
from . import constants as c
from .presets import PATIENCE, resolve_hyperparameters
from .rules import MAX_METRICS, NAME_MAX_LENGTH, NAME_PATTERN, ROOT_RULES, RULES, credential_problems
from .spec import FineTuneJobSpec, Hyperparameters


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidFineTuneJob(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


@dataclass(frozen=True)
class ResolvedJob:
    name: str
    namespace: str
    uid: str | None
    spec: FineTuneJobSpec  # every hyperparameter filled
    user_spec: FineTuneJobSpec | None = None  # as written (validated, not resolved): what a refused change compares

    def trainer_config(self) -> dict[str, Any]:
        """What the trainer reads (the ConfigMap's config.json and `finetune run`): finetune_contract.config's
        TrainerConfig, with this contract's schemaVersion."""
        return trainer_config(self.name, self.namespace, self.spec)

    # Computed once per resolved job and kept with it (cached_property writes the instance's __dict__, which a
    # frozen dataclass allows): every reconcile pass of a job compares them, and building them through pydantic
    # was most of a pass's CPU (profile of bench/operator_throughput.py --profile). Both are read-only.
    @functools.cached_property
    def config_json(self) -> str:
        """trainer_config() as the ConfigMap's text (sorted keys, so its hash is stable; the json module's bytes,
        through orjson where they are the same: jsonbytes.py)."""
        return indented_sorted(self.trainer_config())

    @functools.cached_property
    def fixed_values(self) -> dict[str, Any]:
        """immutable_values() of the spec as the user wrote it (what a refused change compares)."""
        return immutable_values(self.user_spec or self.spec)


def _model_for(path: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    model: Any = root
    for part in path:
        if isinstance(part, int) or model is None:
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        ann = field.annotation
        model = None
        for cand in (ann, *get_args(ann), *(a for x in get_args(ann) for a in get_args(x))):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
            if get_origin(cand) is list:
                inner = get_args(cand)[0]
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
                    break
    return model


def _pydantic_problems(err: ValidationError, prefix: str, root: type[BaseModel]) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join([prefix, *(f"[{p}]" if isinstance(p, int) else str(p) for p in loc)]).replace(".[", "[")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = _model_for(loc[:-1], root)
            known = sorted((f.alias or n) for n, f in parent.model_fields.items()) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            msg = "unknown field" + (f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(known)}")
        elif e["type"] == "missing":
            parent = _model_for(loc[:-1], root)
            field = next((f for n, f in (parent.model_fields.items() if parent else ()) if (f.alias or n) == loc[-1]), None)
            msg = "required field is missing" + (f": {field.description}" if field and field.description else "")
        elif "input" in e and e["type"] not in ("model_type", "dict_type"):
            msg = f"{msg} (got {json.dumps(e['input'], default=str)})"
        problems.append(Problem(path, msg))
    return problems


@functools.cache
def _field_names(model: type[BaseModel]) -> tuple[tuple[str, str], ...]:
    return tuple((name, field.alias or name) for name, field in model.model_fields.items())


def _walk(obj: BaseModel, path: str):
    """Yield (api model, path) for every nested API object. Only objects and lists are descended into (a call
    per scalar field made this walk ~3% of the operator's CPU while creating jobs)."""
    yield obj, path
    for name, alias in _field_names(type(obj)):
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            yield from _walk(value, f"{path}.{alias}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _walk(item, f"{path}.{alias}[{i}]")


@functools.cache
def _rules_of(owner: str) -> tuple[Any, ...]:
    """The rules of one API type, in RULES's order (every nested object of a spec used to scan all of them)."""
    return tuple(rule for rule in RULES if rule.owner == owner)


def rule_problems(spec: FineTuneJobSpec, prefix: str = "spec") -> list[Problem]:
    problems = []
    for obj, path in _walk(spec, prefix):
        for rule in _rules_of(type(obj).__name__):
            if not rule.ok(obj):
                problems.append(Problem(path + rule.field, rule.message))
    # The checks CEL cannot afford (rules.credential_problems says why), naming the variable.
    problems += [Problem(prefix + field, message) for field, message in credential_problems(spec)]
    return problems


def _without_nulls(value: Any) -> Any:
    """`key: null` dropped from every object, as the API server does before defaulting: kubectl sends a
    null for an empty YAML value (`epochs:`), and the CRD declares no field nullable, so null means unset.
    A null list item stays (the server refuses it too)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def parse_spec(raw: Any, prefix: str = "spec") -> FineTuneJobSpec:
    if not isinstance(raw, dict):
        raise InvalidFineTuneJob([Problem(prefix, "must be an object with at least model and dataset")])
    try:
        spec = FineTuneJobSpec.model_validate(_without_nulls(raw))
    except ValidationError as err:
        raise InvalidFineTuneJob(_pydantic_problems(err, prefix, FineTuneJobSpec)) from None
    problems = rule_problems(spec, prefix)
    if problems:
        raise InvalidFineTuneJob(problems)
    return spec


def resolve_spec(spec: FineTuneJobSpec) -> FineTuneJobSpec:
    """Fill every unset hyperparameter from the preset; explicit values win."""
    user = spec.hyperparameters.model_dump(by_alias=True, exclude_none=True, mode="json")
    merged = resolve_hyperparameters(spec.preset, spec.task, user, spec.lora.enabled)
    try:
        hp = Hyperparameters.model_validate(merged)
    except ValidationError as err:
        raise InvalidFineTuneJob(_pydantic_problems(err, "spec.hyperparameters", Hyperparameters)) from None
    es = spec.early_stopping
    mode = es.mode if es.mode != "auto" else ("max" if es.metric in MAX_METRICS else "min")
    patience = es.patience if es.patience is not None else PATIENCE[spec.preset]
    ds = spec.dataset
    fraction = ds.validation_fraction if ds.validation_fraction is not None else (None if ds.validation_source else 0.1)
    zero = spec.distributed.zero_stage
    if spec.distributed.strategy == "deepspeed" and zero is None:
        zero = 2
    resolved = spec.model_copy(
        update={
            "hyperparameters": hp,
            "early_stopping": es.model_copy(update={"mode": mode, "patience": patience}),
            "dataset": ds.model_copy(update={"validation_fraction": fraction}),
            "distributed": spec.distributed.model_copy(update={"zero_stage": zero}),
        }
    )
    problems = rule_problems(resolved)
    if problems:
        raise InvalidFineTuneJob(problems)
    return resolved


TOP_LEVEL_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")


def validate_manifest(obj: Any) -> ResolvedJob:
    """A whole FineTuneJob object (dict from YAML or the API) -> resolved job, or InvalidFineTuneJob."""
    if not isinstance(obj, dict):
        raise InvalidFineTuneJob([Problem("(document)", "must be a YAML mapping describing a FineTuneJob")])
    problems = []
    if obj.get("apiVersion") != c.API_VERSION:
        problems.append(Problem("apiVersion", f"must be {c.API_VERSION} (got {obj.get('apiVersion')!r})"))
    if obj.get("kind") != c.KIND:
        problems.append(Problem("kind", f"must be {c.KIND} (got {obj.get('kind')!r})"))
    # kubectl validates strictly by default (since 1.27): an unknown top-level field is an error there too.
    for key in obj:
        if key not in TOP_LEVEL_FIELDS:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_FIELDS, n=1, cutoff=0.6)
            problems.append(Problem(str(key), "unknown field" + (f"; did you mean '{close[0]}'?" if close
                                                              else f"; allowed: {', '.join(TOP_LEVEL_FIELDS)}")))
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        problems.append(Problem("metadata.name", "required: a lowercase name such as bbc-news-classifier"))
    else:
        # The same checks as the CRD's root CEL rules (rules.ROOT_RULES), message for message.
        if len(name) > NAME_MAX_LENGTH:
            problems.append(Problem("metadata.name", ROOT_RULES[0]["message"].removeprefix("metadata.name ")))
        if not re.fullmatch(NAME_PATTERN, name):
            problems.append(Problem("metadata.name", ROOT_RULES[1]["message"].removeprefix("metadata.name ") + f" (got {name!r})"))
    spec = None
    try:
        spec = parse_spec(obj.get("spec"))
    except InvalidFineTuneJob as err:
        problems.extend(err.problems)
    if problems:
        raise InvalidFineTuneJob(problems)
    return ResolvedJob(name=name, namespace=meta.get("namespace") or "default", uid=meta.get("uid"),
                       spec=resolve_spec(spec), user_spec=spec)


# -- fields fixed after start ---------------------------------------------------------------------------------
# The running trainer read its config once (and a restarted pod restores the optimizer state), and a batch/v1
# Job's pod template cannot change, so every spec field is fixed once the job's children exist, except these,
# whose new value takes effect on the running job. Anything added to the spec is fixed unless listed here.
MUTABLE_AFTER_START: dict[str, str] = {
    "suspend": "the operator suspends or resumes the training Job; a resumed job continues from its last checkpoint",
    "stop": "requests a graceful stop, which the trainer and the operator both honour",
    "earlyStopping.stopGracePeriodSeconds": "the operator enforces it; the trainer does not read it",
    "watchdog.stallTimeoutSeconds": "the operator's stall watchdog reads it on every pass",
    "output.reuseRetainedClaim": "the operator reads it before it creates the training Job (an earlier job's claim waits for it)",
}


def _alias(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    return field.alias or name


def immutable_groups() -> list[str]:
    """Spec paths (camelCase, under `spec.`) compared after start: each top-level field, and for object-valued
    ones each of their fields (so a refusal names `hyperparameters.learningRate`, not `hyperparameters`)."""
    return [path for path, _, _ in _groups()]


@functools.cache
def _groups() -> tuple[tuple[str, tuple[str, ...], bytes], ...]:
    """(group path, the attribute names leading to it, its default's `_canonical`) per fixed group. Fixed
    by the types, so computed once: every reconcile pass that checks for refused changes walks them."""
    out = []
    for name, field in FineTuneJobSpec.model_fields.items():
        top = _alias(FineTuneJobSpec, name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += [(f"{top}.{_alias(ann, sub)}", (name, sub), _canonical(_as_json(
                ann.model_fields[sub].get_default(call_default_factory=True)))) for sub in ann.model_fields]
        else:
            out.append((top, (name,), _canonical(_as_json(field.get_default(call_default_factory=True)))))
    return tuple(g for g in out if g[0] not in MUTABLE_AFTER_START)


def _as_json(x: Any) -> Any:
    if isinstance(x, BaseModel):
        return x.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(x, list):
        return [_as_json(i) for i in x]
    return x.value if hasattr(x, "value") and not isinstance(x, int | float | str) else x


def _canonical(value: Any) -> bytes:
    # Compared with the defaults' in this process only: json.dumps with keyword arguments builds an encoder per
    # call, ~80 calls per new job, ~4% of the operator's CPU while creating jobs (py-spy --gil).
    return equality_key(value)


def immutable_values(spec: FineTuneJobSpec) -> dict[str, Any]:
    """{group path: value} of the fixed-after-start groups whose value is not the field's default.

    Defaults are left out so that an operator upgrade that adds a field (with a default) does not make every
    running job look changed."""
    out = {}
    for path, attrs, default in _groups():
        obj: Any = spec
        for attr in attrs:
            obj = getattr(obj, attr)
        value = _as_json(obj)
        if _canonical(value) != default:
            out[path] = value
    return out


# Release 0.1.0 fixed only these, with status.specHash = immutable_hash(resolved spec) + per-field digests;
# kept to read the fingerprints of jobs started before an upgrade.
LEGACY_IMMUTABLE_FIELDS = ("model", "task", "dataset", "distributed")


def immutable_hash(spec: FineTuneJobSpec) -> str:
    data = {k: getattr(spec, k).model_dump(mode="json") if hasattr(getattr(spec, k), "model_dump") else getattr(spec, k)
            for k in LEGACY_IMMUTABLE_FIELDS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
