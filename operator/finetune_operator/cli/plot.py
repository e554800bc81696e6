"""Loss curves as a PNG (matplotlib), with the best epoch and the stop point marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(obj: dict[str, Any], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: always render to a file
    import matplotlib.pyplot as plt

    status = obj.get("status") or {}
    history = status.get("history") or []
    if not history:
        from .errors import CliError

        raise CliError(f"FineTuneJob {obj['metadata']['name']} has no finished epoch yet: nothing to plot")
    epochs = [p["epoch"] for p in history]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key, label, style in (("trainLoss", "train loss", "o-"), ("valLoss", "validation loss", "s-")):
        pts = [(e, p[key]) for e, p in zip(epochs, history, strict=True) if isinstance(p.get(key), int | float)]
        if pts:
            ax.plot([e for e, _ in pts], [v for _, v in pts], style, label=label)
    metric_pts = [(e, p["valMetric"]) for e, p in zip(epochs, history, strict=True) if isinstance(p.get("valMetric"), int | float)]
    if metric_pts:
        ax2 = ax.twinx()
        ax2.plot([e for e, _ in metric_pts], [v for _, v in metric_pts], "^--", color="tab:green",
                 label=status.get("valMetricName") or "validation metric")
        ax2.set_ylabel(status.get("valMetricName") or "validation metric")
        ax2.legend(loc="center right")
    if status.get("bestEpoch") is not None:
        ax.axvline(status["bestEpoch"], color="tab:green", linestyle=":", label=f"best epoch {status['bestEpoch']}")
    if status.get("reason") in ("EarlyStopped", "StoppedByUser") or status.get("stopRequestedTime"):
        ax.axvline(max(epochs), color="tab:red", linestyle="--", label=f"stopped after epoch {max(epochs)}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(f"{obj['metadata']['name']}: {status.get('phase', 'Pending')}"
                 + (f" ({status['reason']})" if status.get("reason") else ""))
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=4, fontsize="small", frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
