"""Text views of a FineTuneJob for the terminal (pure: object in, text out)."""

from __future__ import annotations

import re
from typing import Any

from ..api import constants as c


def _num(x: Any, digits: int = 4) -> str:
    return "-" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


def early_stop_line(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == c.Condition.EARLY_STOP_REQUESTED and cond.get("status") == "True":
            return f"stop requested ({cond.get('reason')}): {cond.get('message')}"
    if status.get("stopReason"):
        return f"stop requested: {status['stopReason']}"
    return "continue (no stop requested)"


def list_table(items: list[dict[str, Any]], all_namespaces: bool = False) -> str:
    header = (["NAMESPACE"] if all_namespaces else []) + ["NAME", "PHASE", "REASON", "EPOCH", "TRAIN-LOSS", "VAL-LOSS", "BEST"]
    rows = [header]
    for obj in items:
        s = obj.get("status") or {}
        epoch = f"{_num(s.get('epoch'))}/{_num(s.get('totalEpochs'))}"
        rows.append(
            ([obj["metadata"].get("namespace", "")] if all_namespaces else [])
            + [obj["metadata"]["name"], s.get("phase") or "Pending", s.get("reason") or "-", epoch,
               _num(s.get("trainLoss")), _num(s.get("valLoss")), _num(s.get("bestMetric"))]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def status_text(obj: dict[str, Any], width: int = 72, curves: bool = True) -> str:
    meta, spec, s = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    metric = (spec.get("earlyStopping") or {}).get("metric", "val_loss")
    lines = [
        f"Name:        {meta.get('namespace', 'default')}/{meta['name']}",
        f"Phase:       {s.get('phase') or 'Pending'}" + (f" ({s['reason']})" if s.get("reason") else ""),
    ]
    if s.get("message"):
        lines.append(f"Message:     {s['message']}")
    lines += [
        f"Epoch:       {_num(s.get('epoch'))}/{_num(s.get('totalEpochs'))}   step {_num(s.get('step'))}",
        f"Loss:        train {_num(s.get('trainLoss'))}   validation {_num(s.get('valLoss'))}",
        f"Metric:      {s.get('valMetricName') or metric} {_num(s.get('valMetric'))}",
        f"Best:        {metric} {_num(s.get('bestMetric'))} at epoch {_num(s.get('bestEpoch'))}",
        f"Batch:       {_num(s.get('batchSize'))} per device x {_num(s.get('gradientAccumulationSteps'))} accumulation",
        f"Early stop:  {early_stop_line(obj)}",
    ]
    if s.get("testMetrics"):
        test = "   ".join(f"{k.removeprefix('test_')} {_num(v)}" for k, v in sorted(s["testMetrics"].items()))
        lines.append(f"Test:        {test}   ({_num(s.get('testExamples'))} held-out examples, best checkpoint of "
                     f"epoch {_num(s.get('testEpoch'))})")
    if s.get("timings"):
        lines.append(f"Timings:     {timings_line(s['timings'], meta.get('creationTimestamp'))}")
    if s.get("epochsSaved"):
        lines.append(f"Saved:       {s['epochsSaved']} epoch(s) not run thanks to early stopping")
    if s.get("jobName"):
        lines.append(f"Job:         {s['jobName']}")
    conds = s.get("conditions") or []
    if conds:
        lines.append("Conditions:")
        for cond in conds:
            lines.append(f"  {cond.get('type')}={cond.get('status')} {cond.get('reason')}: {cond.get('message', '')}".rstrip(": "))
    history = s.get("history") or []
    if curves:
        lines.append("")
        lines.append(loss_curves(history, width=width) if history else "(no epochs finished yet: no loss curves)")
    return "\n".join(lines)


def held_out_line(test: dict[str, Any]) -> str:
    """result.json's `test` as one line: `held-out test (200 examples, best checkpoint of epoch 2): accuracy 0.93, ...`."""
    metrics = test.get("metrics") or {}
    words = ", ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float))
    return f"held-out test ({test.get('examples')} examples, best checkpoint of epoch {test.get('epoch')}): {words}"


TIMING_STAGES = (("podStartSeconds", "pod start"), ("setupSeconds", "setup"), ("dataSeconds", "data"),
                 ("modelLoadSeconds", "model load"), ("firstStepSeconds", "first step"))


def _seconds_between(start: Any, end: Any) -> float | None:
    from datetime import datetime

    try:
        a = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        b = datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (b - a).total_seconds()


def timings_line(t: dict[str, Any], created: str | None = None) -> str:
    """`pod start 4.1 s, setup 2.0 s, data 1.2 s (cached), ...; apply to first step 9.9 s`."""
    parts = []
    for key, label in TIMING_STAGES:
        if isinstance(t.get(key), int | float):
            parts.append(f"{label} {t[key]:.1f} s" + (" (cached)" if key == "dataSeconds" and t.get("dataCached") else ""))
    total = _seconds_between(created, t["firstStepTime"]) if created and t.get("firstStepTime") else None
    return ", ".join(parts) + (f"; apply to first step {total:.1f} s" if total is not None else "")


def loss_curves(history: list[dict[str, Any]], width: int = 72, height: int = 16) -> str:
    """Train and validation loss per epoch, drawn with plotext."""
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")
    epochs = [p["epoch"] for p in history]
    for key, label, marker in (("trainLoss", "train loss", "dot"), ("valLoss", "validation loss", "x")):
        pts = [(e, p[key]) for e, p in zip(epochs, history, strict=True) if isinstance(p.get(key), int | float)]
        if pts:
            plt.plot([e for e, _ in pts], [v for _, v in pts], label=label, marker=marker)
    plt.xlabel("epoch")
    plt.title("loss")
    # plotext emits colour resets even with the clear theme; plain text pipes and logs better.
    return re.sub(r"\x1b\[[0-9;]*m", "", plt.build())
