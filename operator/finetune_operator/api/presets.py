"""Presets: the hyperparameter wisdom, written down once.

A preset fills every hyperparameter the user left unset; an explicit value always wins.
Values are keyed by API (camelCase) names because they are merged into the manifest's own
`hyperparameters` before validation, so the result is checked by the same types.
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "epochs": 2,
        "gradientAccumulationSteps": 1,
        "learningRate": 1e-4,
        "optimizer": {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8},
        "weightDecay": 0.0,
        "scheduler": {"name": "linear", "warmupRatio": 0.06},
        "maxGradNorm": 1.0,
        "labelSmoothing": 0.0,
        "mixupAlpha": 0.0,
        "headLearningRateMultiplier": 10.0,
        "layerwiseLrDecay": 1.0,
        "mixedPrecision": "bf16",
        "seed": 42,
    },
    "balanced": {
        "epochs": 3,
        "gradientAccumulationSteps": 1,
        "learningRate": 5e-5,
        "optimizer": {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8},
        "weightDecay": 0.01,
        "scheduler": {"name": "linear", "warmupRatio": 0.1},
        "maxGradNorm": 1.0,
        "labelSmoothing": 0.0,
        "mixupAlpha": 0.0,
        "headLearningRateMultiplier": 10.0,
        "layerwiseLrDecay": 1.0,
        "mixedPrecision": "bf16",
        "seed": 42,
    },
    "max-accuracy": {
        "epochs": 10,
        "gradientAccumulationSteps": 1,
        "learningRate": 2e-5,
        "optimizer": {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8},
        "weightDecay": 0.05,
        "scheduler": {"name": "cosine", "warmupRatio": 0.1},
        "maxGradNorm": 1.0,
        "labelSmoothing": 0.1,
        "mixupAlpha": 0.0,
        "headLearningRateMultiplier": 10.0,
        "layerwiseLrDecay": 0.9,
        "mixedPrecision": "bf16",
        "seed": 42,
    },
}

# Early-stopping patience per preset: fast gives up quickly, max-accuracy waits out plateaus.
PATIENCE = {"fast": 1, "balanced": 2, "max-accuracy": 3}

# Defaults that depend on another choice rather than on the preset.
LOSS_DEFAULTS = {
    "cross-entropy": {},
    "focal": {"focalAlpha": 0.25, "focalGamma": 2.0},
    "contrastive": {"temperature": 0.05},
    "triplet": {"margin": 0.2, "miner": "semi-hard"},
}
SGD_DEFAULTS = {"momentum": 0.9, "nesterov": False}
LORA_LEARNING_RATE_FACTOR = 4.0  # adapters start at zero and want a larger step than full fine-tuning

WHY = {
    "fast": (
        "Quick experiments and smoke tests: 2 epochs at a high learning rate (1e-4), no weight decay, "
        "short warm-up, patience 1. Tells you in minutes whether data and model are wired right; "
        "expect a few points less accuracy than balanced."
    ),
    "balanced": (
        "The default: 3 epochs, learning rate 5e-5 with 10% linear warm-up and decay, weight decay 0.01, "
        "a 10x faster head, patience 2. The usual BERT-style recipe that gets most of the achievable quality "
        "at a modest cost."
    ),
    "max-accuracy": (
        "When compute is cheap compared with quality: up to 10 epochs at 2e-5 with cosine decay, weight decay 0.05, "
        "label smoothing 0.1, layer-wise learning-rate decay 0.9 (lower layers change less), patience 3. "
        "Early stopping ends it once validation stops improving."
    ),
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is not None:
            out[key] = copy.deepcopy(value)
    return out


def resolve_hyperparameters(preset: str, task: str, user: dict[str, Any], lora_enabled: bool) -> dict[str, Any]:
    """Preset values, overridden by the user's explicit ones, plus choice-dependent defaults."""
    base = copy.deepcopy(PRESETS[preset])
    if lora_enabled:
        base["learningRate"] = base["learningRate"] * LORA_LEARNING_RATE_FACTOR
    if task == "embedding":
        base["labelSmoothing"] = 0.0
    user_optimizer = (user.get("optimizer") or {}).get("name")
    if user_optimizer == "sgd":
        # Adam coefficients make no sense for sgd; its own defaults replace them.
        base["optimizer"] = {"name": "sgd", **SGD_DEFAULTS}
    user_loss = (user.get("loss") or {}).get("name")
    loss = user_loss or ("contrastive" if task == "embedding" else "cross-entropy")
    base["loss"] = {"name": loss, **LOSS_DEFAULTS[loss]}
    merged = _merge(base, user)
    scheduler = (user.get("scheduler") or {})
    if scheduler.get("warmupSteps") is not None and scheduler.get("warmupRatio") is None:
        merged["scheduler"].pop("warmupRatio", None)  # the user chose steps; the preset's ratio must not add to it
    return merged


def describe(preset: str) -> dict[str, Any]:
    return {"preset": preset, "why": WHY[preset], "hyperparameters": PRESETS[preset], "earlyStoppingPatience": PATIENCE[preset]}
