"""Every hyperparameter reaches the trainer: set it, resolve, find it in ResolvedJob.trainer_config().
Presets resolve to the values docs/presets.md documents; explicit values beat presets; and the
defaults that depend on another choice (sgd, loss per task, LoRA, warm-up steps) apply.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import BaseModel

from finetune_operator.api import FineTuneJobSpec, validate_manifest
from finetune_operator.api import docs as api_docs
from finetune_operator.api.presets import LORA_LEARNING_RATE_FACTOR, PATIENCE, PRESETS
from finetune_operator.api.spec import (
    DistributedSpec,
    EarlyStoppingSpec,
    Hyperparameters,
    LoraSpec,
    LossSpec,
    OptimizerSpec,
    SchedulerSpec,
)

from . import crd_harness as h
from .test_invalid import patched


def job(**spec: Any) -> dict[str, Any]:
    return patched({"spec": spec})


def config(manifest: dict[str, Any]) -> dict[str, Any]:
    return validate_manifest(manifest).trainer_config()


def at(cfg: dict[str, Any], path: str) -> Any:
    node: Any = cfg["spec"]
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<absent>"
        node = node[part]
    return node


def nest(path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    return {head: nest(rest, value) if rest else value}


# (path under spec, explicit value, extra spec fields the value needs to be valid).
# Each value differs from what the default balanced job resolves to, so finding it proves it was applied.
SETTINGS: list[tuple[str, Any, dict[str, Any]]] = [
    ("hyperparameters.epochs", 7, {}),
    ("hyperparameters.batchSize", 24, {}),
    ("hyperparameters.gradientAccumulationSteps", 4, {}),
    ("hyperparameters.learningRate", 3e-4, {}),
    ("hyperparameters.optimizer.name", "adam", {}),
    ("hyperparameters.optimizer.betas", [0.8, 0.95], {}),
    ("hyperparameters.optimizer.eps", 1e-6, {}),
    ("hyperparameters.optimizer.momentum", 0.5, {"hyperparameters": {"optimizer": {"name": "sgd"}}}),
    ("hyperparameters.optimizer.nesterov", True, {"hyperparameters": {"optimizer": {"name": "sgd"}}}),
    ("hyperparameters.weightDecay", 0.2, {}),
    ("hyperparameters.scheduler.name", "onecycle", {}),
    ("hyperparameters.scheduler.warmupRatio", 0.25, {}),
    ("hyperparameters.scheduler.warmupSteps", 50, {}),
    ("hyperparameters.maxGradNorm", 0.5, {}),
    ("hyperparameters.dropout", 0.2, {}),
    ("hyperparameters.loss.name", "focal", {}),
    ("hyperparameters.loss.focalAlpha", 0.5, {"hyperparameters": {"loss": {"name": "focal"}}}),
    ("hyperparameters.loss.focalGamma", 1.5, {"hyperparameters": {"loss": {"name": "focal"}}}),
    ("hyperparameters.loss.temperature", 0.1, {"task": "embedding"}),
    ("hyperparameters.loss.margin", 0.4, {"task": "embedding", "hyperparameters": {"loss": {"name": "triplet"}}}),
    ("hyperparameters.loss.miner", "hard", {"task": "embedding", "hyperparameters": {"loss": {"name": "triplet"}}}),
    ("hyperparameters.labelSmoothing", 0.1, {}),
    ("hyperparameters.mixupAlpha", 0.4, {}),
    ("hyperparameters.headLearningRateMultiplier", 3.0, {}),
    ("hyperparameters.layerwiseLrDecay", 0.8, {}),
    ("hyperparameters.mixedPrecision", "no", {}),
    ("hyperparameters.seed", 7, {}),
    ("lora.enabled", True, {}),
    ("lora.rank", 16, {}),
    ("lora.alpha", 32.0, {}),
    ("lora.dropout", 0.1, {}),
    ("lora.targetModules", ["query", "value"], {}),
    ("earlyStopping.enabled", False, {}),
    ("earlyStopping.metric", "val_accuracy", {}),
    ("earlyStopping.mode", "max", {"earlyStopping": {"metric": "val_f1"}}),
    ("earlyStopping.patience", 5, {}),
    ("earlyStopping.minDelta", 0.01, {}),
    ("earlyStopping.stopGracePeriodSeconds", 60, {}),
    ("distributed.nodes", 2, {}),
    ("distributed.processesPerNode", 4, {}),
    ("distributed.strategy", "deepspeed", {}),
    ("distributed.zeroStage", 3, {"distributed": {"strategy": "deepspeed"}}),
    ("distributed.processGroupTimeoutSeconds", 60, {}),
    ("distributed.maxRestarts", 3, {}),
]
DEFAULT = config(job())


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize(("path", "value", "needs"), SETTINGS, ids=[s[0] for s in SETTINGS])
def test_each_setting_reaches_the_trainer(path, value, needs):
    spec = _deep_merge(needs, nest(path, value))
    manifest = job(**spec)
    assert at(DEFAULT, path) != value, f"{path}={value!r} is already the default; pick another value"
    assert at(config(manifest), path) == value
    # The same manifest is accepted by the CRD too (schema + CEL).
    assert h.validate(manifest).violations == []


def _fields(model: type[BaseModel], prefix: str) -> set[str]:
    return {f"{prefix}.{f.alias or n}" for n, f in model.model_fields.items()}


def test_the_table_covers_every_field():
    wanted = (
        _fields(Hyperparameters, "hyperparameters") - {"hyperparameters.optimizer", "hyperparameters.scheduler", "hyperparameters.loss"}
        | _fields(OptimizerSpec, "hyperparameters.optimizer")
        | _fields(SchedulerSpec, "hyperparameters.scheduler")
        | _fields(LossSpec, "hyperparameters.loss")
        | _fields(LoraSpec, "lora")
        | _fields(EarlyStoppingSpec, "earlyStopping")
        | _fields(DistributedSpec, "distributed")
    )
    covered = {s[0] for s in SETTINGS}
    assert wanted - covered == set(), f"hyperparameters with no row in SETTINGS: {sorted(wanted - covered)}"


# --- presets -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_resolves_to_the_documented_values(preset):
    cfg = config(job(preset=preset))
    documented = api_docs.preset_table()
    assert documented, "empty presets table"
    for path, values in documented.items():
        assert at(cfg, path) == values[preset], f"{preset}: {path}"
    assert at(cfg, "earlyStopping.patience") == PATIENCE[preset]
    assert at(cfg, "hyperparameters.loss") == {"name": "cross-entropy"}
    assert at(cfg, "hyperparameters.batchSize") == "<absent>", "unset batchSize means: find the largest that fits"


def test_the_presets_doc_shows_what_jobs_resolve_to():
    # Parse the committed table back (not the generator's output) and resolve a job per preset.
    text = api_docs.PRESETS_DOC.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Field"))
    presets = re.findall(r"`([^`]+)`", header)[1:]
    assert presets == list(PRESETS)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) >= 15
    resolved = {p: config(job(preset=p)) for p in presets}
    for row in rows:
        cells = [cell.strip().strip("`") for cell in row.strip("|").split("|")]
        path, values = cells[0], [json.loads(v) for v in cells[1:]]
        for preset, value in zip(presets, values, strict=True):
            assert at(resolved[preset], path) == value, f"docs/presets.md says {path}={value} for {preset}"


def test_balanced_is_the_default_preset():
    assert config(job()) == config(job(preset="balanced"))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_explicit_values_beat_every_preset(preset):
    explicit = {
        "epochs": 13,
        "learningRate": 1.5e-3,
        "weightDecay": 0.3,
        "scheduler": {"name": "constant"},
        "labelSmoothing": 0.2,
        "layerwiseLrDecay": 0.7,
        "seed": 1234,
        "mixedPrecision": "no",
    }
    cfg = config(job(preset=preset, hyperparameters=explicit, earlyStopping={"patience": 9}))
    for key, value in explicit.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                assert at(cfg, f"hyperparameters.{key}.{sub}") == v
        else:
            assert at(cfg, f"hyperparameters.{key}") == value
    # Overriding one field of a nested object keeps the preset's other fields.
    assert at(cfg, "hyperparameters.scheduler.warmupRatio") == PRESETS[preset]["scheduler"]["warmupRatio"]
    assert at(cfg, "earlyStopping.patience") == 9


def test_explicit_zero_beats_a_preset_value():
    # 0 is a value, not "unset": max-accuracy's labelSmoothing 0.1 must not come back.
    cfg = config(job(preset="max-accuracy", hyperparameters={"labelSmoothing": 0.0, "weightDecay": 0.0}))
    assert at(cfg, "hyperparameters.labelSmoothing") == 0.0
    assert at(cfg, "hyperparameters.weightDecay") == 0.0


# --- choice-dependent defaults ---------------------------------------------------------------


def test_sgd_gets_sgd_defaults_and_no_adam_coefficients():
    cfg = config(job(hyperparameters={"optimizer": {"name": "sgd"}}))
    assert at(cfg, "hyperparameters.optimizer") == {"name": "sgd", "momentum": 0.9, "nesterov": False}


def test_sgd_explicit_coefficients_win():
    cfg = config(job(hyperparameters={"optimizer": {"name": "sgd", "momentum": 0.0}}))
    assert at(cfg, "hyperparameters.optimizer") == {"name": "sgd", "momentum": 0.0, "nesterov": False}


@pytest.mark.parametrize(
    ("task", "loss", "expected"),
    [
        ("sequence-classification", None, {"name": "cross-entropy"}),
        ("causal-lm", None, {"name": "cross-entropy"}),
        ("embedding", None, {"name": "contrastive", "temperature": 0.05}),
        ("sequence-classification", "focal", {"name": "focal", "focalAlpha": 0.25, "focalGamma": 2.0}),
        ("causal-lm", "focal", {"name": "focal", "focalAlpha": 0.25, "focalGamma": 2.0}),
        ("embedding", "triplet", {"name": "triplet", "margin": 0.2, "miner": "semi-hard"}),
    ],
)
def test_loss_defaults_follow_task_and_loss(task, loss, expected):
    hp = {"loss": {"name": loss}} if loss else {}
    assert at(config(job(task=task, hyperparameters=hp)), "hyperparameters.loss") == expected


@pytest.mark.parametrize("preset", list(PRESETS))
def test_lora_scales_the_preset_learning_rate(preset):
    cfg = config(job(preset=preset, lora={"enabled": True}))
    assert at(cfg, "hyperparameters.learningRate") == pytest.approx(PRESETS[preset]["learningRate"] * LORA_LEARNING_RATE_FACTOR)


def test_lora_keeps_an_explicit_learning_rate():
    cfg = config(job(lora={"enabled": True}, hyperparameters={"learningRate": 1e-5}))
    assert at(cfg, "hyperparameters.learningRate") == 1e-5


def test_warmup_steps_replace_the_preset_ratio():
    cfg = config(job(preset="max-accuracy", hyperparameters={"scheduler": {"warmupSteps": 100}}))
    assert at(cfg, "hyperparameters.scheduler") == {"name": "cosine", "warmupSteps": 100}


def test_embedding_drops_the_presets_label_smoothing():
    assert at(config(job(task="embedding", preset="max-accuracy")), "hyperparameters.labelSmoothing") == 0.0


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val_loss", "min"), ("train_loss", "min"), ("val_accuracy", "max"), ("val_f1", "max")],
)
def test_auto_mode_resolves_from_the_metric(metric, mode):
    assert at(config(job(earlyStopping={"metric": metric})), "earlyStopping.mode") == mode


def test_deepspeed_defaults_to_zero_stage_2_and_ddp_has_none():
    assert at(config(job(distributed={"strategy": "deepspeed"})), "distributed.zeroStage") == 2
    assert at(DEFAULT, "distributed.zeroStage") == "<absent>"


def test_validation_fraction_default_depends_on_validation_source():
    assert at(DEFAULT, "dataset.validationFraction") == 0.1
    cfg = config(job(dataset={"validationSource": "/data/val.jsonl"}))
    assert at(cfg, "dataset.validationFraction") == "<absent>"


# --- the config the trainer parses ------------------------------------------------------------


@pytest.mark.parametrize(("path", "value", "needs"), SETTINGS[::4], ids=[s[0] for s in SETTINGS[::4]])
def test_trainer_config_parses_back_into_the_same_spec(path, value, needs):
    # The trainer rebuilds FineTuneJobSpec from the JSON; strict types must accept what we wrote.
    resolved = validate_manifest(job(**_deep_merge(needs, nest(path, value))))
    raw = json.loads(json.dumps(resolved.trainer_config()))
    assert FineTuneJobSpec.model_validate(raw["spec"]) == resolved.spec


def test_yaml11_exponent_strings_are_numbers():
    # PyYAML reads `learningRate: 5e-5` as the string "5e-5"; kubectl reads a number. Both must work.
    import yaml

    manifest = yaml.safe_load(
        "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: lr}\n"
        "spec:\n  model: {name: m}\n  dataset: {source: d}\n"
        "  hyperparameters: {learningRate: 5e-5, optimizer: {eps: 1e-6, betas: [0.9, 9.99e-1]}}\n"
    )
    assert manifest["spec"]["hyperparameters"]["learningRate"] == "5e-5"  # the trap itself
    cfg = config(manifest)
    assert at(cfg, "hyperparameters.learningRate") == 5e-5
    assert at(cfg, "hyperparameters.optimizer.eps") == 1e-6
