"""Patience-based early stopping as a pure function of the epoch history.

The operator calls it on every status change (and records the decision in status); the
trainer calls the same function when it cannot reach the API, so the rule is one rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .constants import Reason

# Where each early-stopping metric lives in a status history point (camelCase, as in status.history).
_HISTORY_KEY = {"val_loss": "valLoss", "train_loss": "trainLoss"}


@dataclass(frozen=True)
class Settings:
    metric: str = "val_loss"
    mode: str = "min"  # resolved: "min" or "max"
    patience: int = 2
    min_delta: float = 0.0
    enabled: bool = True
    total_epochs: int | None = None

    @classmethod
    def from_spec(cls, spec: Any) -> Settings:
        """From a resolved FineTuneJobSpec (mode and patience already filled)."""
        es = spec.early_stopping
        return cls(
            metric=str(es.metric),
            mode=str(es.mode),
            patience=int(es.patience),
            min_delta=float(es.min_delta),
            enabled=bool(es.enabled),
            total_epochs=spec.hyperparameters.epochs,
        )


@dataclass(frozen=True)
class Decision:
    action: str  # "continue", "stop" (graceful, outcome succeeded) or "fail"
    reason: str  # CamelCase, from api.constants.Reason ("" when continuing)
    message: str
    best_epoch: int | None = None
    best_value: float | None = None
    epochs_without_improvement: int = 0

    @property
    def stop(self) -> bool:
        return self.action == "stop"

    @property
    def fail(self) -> bool:
        return self.action == "fail"


def metric_value(point: dict[str, Any], metric: str) -> float | None:
    key = _HISTORY_KEY.get(metric, "valMetric")
    value = point.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _improved(value: float, best: float, mode: str, min_delta: float) -> bool:
    if mode == "auto":
        raise ValueError("early stopping mode must be resolved to min or max")
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def decide(history: list[dict[str, Any]], settings: Settings) -> Decision:
    """Continue, stop (patience exhausted) or fail (NaN loss, metric never reported)."""
    points = sorted((p for p in history if isinstance(p.get("epoch"), int)), key=lambda p: p["epoch"])
    for p in points:
        for key, name in (("trainLoss", "train loss"), ("valLoss", "validation loss")):
            v = p.get(key)
            if isinstance(v, float) and not math.isfinite(v):
                return Decision(
                    "fail",
                    Reason.NAN_LOSS,
                    f"{name} became {v} at epoch {p['epoch']}: training diverged; lower learningRate, "
                    "enable maxGradNorm, or use bf16 instead of fp16",
                )
    if not settings.enabled or not points:
        return Decision("continue", "", "early stopping disabled" if not settings.enabled else "no epoch finished yet")

    best_epoch: int | None = None
    best: float | None = None
    since = 0
    for p in points:
        v = metric_value(p, settings.metric)
        if v is None or not math.isfinite(v):
            since += 1 if best is not None else 0
            continue
        if best is None or _improved(v, best, settings.mode, settings.min_delta):
            best, best_epoch, since = v, p["epoch"], 0
        else:
            since += 1

    if best is None:
        # Give the trainer one epoch beyond patience to start reporting before calling it a misconfiguration.
        if len(points) > settings.patience:
            return Decision(
                "fail",
                Reason.METRIC_MISSING,
                f"earlyStopping.metric {settings.metric} was never reported in {len(points)} epochs; "
                "pick a metric this task reports or disable early stopping",
            )
        return Decision("continue", "", f"waiting for {settings.metric}")

    last_epoch = points[-1]["epoch"]
    if settings.total_epochs is not None and last_epoch >= settings.total_epochs:
        return Decision("continue", "", "all epochs ran", best_epoch, best, since)
    # As in Keras and HF Trainer: stop after `patience` epochs without improvement (0 behaves like 1).
    if since >= max(1, settings.patience):
        verb = "decreased" if settings.mode == "min" else "increased"
        return Decision(
            "stop",
            Reason.PATIENCE_EXHAUSTED,
            f"{settings.metric} has not {verb} by more than {_fmt(settings.min_delta)} for {since} epoch"
            f"{'s' if since != 1 else ''} (patience {settings.patience}); best {_fmt(best)} at epoch {best_epoch}",
            best_epoch,
            best,
            since,
        )
    return Decision(
        "continue",
        "",
        f"{settings.metric} best {_fmt(best)} at epoch {best_epoch}; {since} epoch(s) without improvement "
        f"(patience {settings.patience})",
        best_epoch,
        best,
        since,
    )
