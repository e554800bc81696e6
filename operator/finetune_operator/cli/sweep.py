"""`finetune sweep status NAME` and `finetune sweep plot NAME -o sweep.png` (issue 14).

Both read only the FineTuneSweep: its status holds every trial's parameters, state and per-epoch
objective, so neither needs the trials' FineTuneJobs (nor the rights to read them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..api import constants as c
from ..api import sweep as s
from .cluster import REQUEST_TIMEOUT, Cluster
from .errors import CliError


def get_sweep(cluster: Cluster, name: str) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    try:
        return cluster.api.get_namespaced_custom_object(c.GROUP, c.VERSION, cluster.namespace, s.SWEEP_PLURAL, name,
                                                        _request_timeout=REQUEST_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - API and network errors: worded below like every CLI error
        if isinstance(err, ApiException) and err.status == 404:
            body = err.body or ""
            if "the server could not find the requested resource" in body or "page not found" in body.lower():
                raise CliError(f"the FineTuneSweep CRD ({s.SWEEP_CRD_NAME}) is not installed in this cluster: "
                               "install the chart or kubectl apply -f crds/") from None
            raise CliError(f"no FineTuneSweep {name} in namespace {cluster.namespace}") from None

        failure = err

    def again(**_: Any) -> None:
        raise failure

    return cluster._call("get", name, again)  # the CLI's one-line messages for the other failures


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, int | float) and not isinstance(x, bool) else "-"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_num(v) if isinstance(v, float) else v}" for k, v in params.items())


def status_text(obj: dict[str, Any]) -> str:
    st = obj.get("status") or {}
    spec = obj.get("spec") or {}
    metric = (spec.get("objective") or {}).get("metric", "val_loss")
    name = obj["metadata"]["name"]
    lines = [
        f"FineTuneSweep {obj['metadata'].get('namespace', '')}/{name}: {st.get('phase', 'Pending')}"
        + (f" ({st['reason']})" if st.get("reason") else ""),
    ]
    if st.get("message"):
        lines.append(f"  {st['message']}")
    algo = spec.get("algorithm") or {}
    pruning = (spec.get("pruning") or {}).get("algorithm", "none")
    lines.append(f"  objective {metric} ({st.get('direction', '?')}), algorithm {algo.get('name', 'random')} "
                 f"seed {st.get('seed', '-')}, pruning {pruning}")
    lines.append(f"  trials {st.get('trialsCreated', 0)} created, {st.get('trialsRunning', 0)} running, "
                 f"{st.get('trialsPruned', 0)} pruned, {st.get('trialsFailed', 0)} failed; epochs spent "
                 f"{st.get('epochsSpent', 0)}, saved by pruning {st.get('epochsSavedByPruning', 0)}")
    if st.get("bestTrial"):
        lines.append(f"  best so far: {st['bestTrial']} {metric} {_num(st.get('bestValue'))} "
                     f"({_params(st.get('bestParams') or {})})")
    trials = st.get("trials") or []
    if trials:
        rows = [("TRIAL", "STATE", "EPOCHS", metric.upper(), "PARAMETERS")]
        for t in trials:
            mark = " *" if t.get("name") == st.get("bestTrial") else ""
            state = t.get("state", "")
            if t.get("pruneRequested") and state not in ("Pruned", "Succeeded", "Failed"):
                state += " (pruning)"
            rows.append((t.get("name", "") + mark, state, str(t.get("epochs") or 0), _num(t.get("value")),
                         _params(t.get("params") or {})))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines.append("")
        lines += ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    return "\n".join(lines)


def plot_sweep(obj: dict[str, Any], out: str | Path) -> Path:
    """Left: each trial's objective (its best epoch's), pruned trials marked at their last value. Right: the
    per-epoch objective of every trial, the best trial's curve drawn bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    st = obj.get("status") or {}
    trials = [t for t in st.get("trials") or [] if t.get("values")]
    if not trials:
        raise CliError(f"FineTuneSweep {obj['metadata']['name']} has no trial with a finished epoch yet: nothing to plot")
    metric = ((obj.get("spec") or {}).get("objective") or {}).get("metric", "val_loss")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    styles = {"Succeeded": ("o", "tab:blue"), "Pruned": ("x", "tab:red"), "Failed": ("s", "tab:gray")}
    for state, (marker, color) in styles.items():
        pts = [(t["index"], t["value"] if state != "Pruned" else t["values"][-1]) for t in trials
               if t.get("state") == state and (t.get("value") is not None)]
        if pts:
            left.scatter([i for i, _ in pts], [v for _, v in pts], marker=marker, color=color,
                         label=state.lower() if state != "Pruned" else "pruned (last epoch)")
    running = [(t["index"], t["values"][-1]) for t in trials if t.get("state") in ("Pending", "Running")]
    if running:
        left.scatter([i for i, _ in running], [v for _, v in running], marker="^", color="tab:orange", label="running")
    best = next((t for t in trials if t.get("name") == st.get("bestTrial")), None)
    if best is not None:
        left.scatter([best["index"]], [best["value"]], s=160, facecolors="none", edgecolors="tab:green",
                     label=f"best: {best['name']}")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("trial")
    left.set_ylabel(metric)
    left.set_title("objective per trial")
    left.legend(fontsize="small")
    left.grid(alpha=0.3)
    for t in trials:
        epochs = list(range(1, len(t["values"]) + 1))
        if best is not None and t is best:
            continue
        right.plot(epochs, t["values"], "x--" if t.get("state") == "Pruned" else "-",
                   color="tab:red" if t.get("state") == "Pruned" else "tab:gray", alpha=0.6, linewidth=1)
    if best is not None:
        right.plot(range(1, len(best["values"]) + 1), best["values"], "o-", color="tab:green", linewidth=2.5,
                   label=f"best {best['name']} ({_params(best.get('params') or {})})")
        right.legend(fontsize="small")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("epoch")
    right.set_ylabel(metric)
    right.set_title("per-epoch objective (pruned dashed red)")
    right.grid(alpha=0.3)
    fig.suptitle(f"{obj['metadata']['name']}: {st.get('phase', 'Pending')}"
                 f"; epochs spent {st.get('epochsSpent', 0)}, saved {st.get('epochsSavedByPruning', 0)}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def cmd_sweep_status(args: argparse.Namespace) -> int:
    obj = get_sweep(Cluster.connect(args.kubeconfig, args.context, args.namespace), args.name)
    print(json.dumps(obj.get("status") or {}, indent=2) if args.output == "json" else status_text(obj))
    return 0


def cmd_sweep_plot(args: argparse.Namespace) -> int:
    obj = get_sweep(Cluster.connect(args.kubeconfig, args.context, args.namespace), args.name)
    print(f"wrote {plot_sweep(obj, args.output)}")
    return 0


def add_commands(sub: Any, cluster_args: Any) -> None:
    sp = sub.add_parser("sweep", help="FineTuneSweeps: trials table, best so far, plots")
    sweep_sub = sp.add_subparsers(dest="sweep_command", required=True)
    st = sweep_sub.add_parser("status", help="one sweep: trials (parameters, state, epochs, objective), best so far")
    cluster_args(st)
    st.add_argument("name")
    st.add_argument("-o", "--output", choices=["text", "json"], default="text")
    st.set_defaults(fn=cmd_sweep_status)
    pl = sweep_sub.add_parser("plot", help="objective per trial (pruned marked) and the best trial's curve, as a PNG")
    cluster_args(pl)
    pl.add_argument("name")
    pl.add_argument("-o", "--output", default="sweep.png")
    pl.set_defaults(fn=cmd_sweep_plot)
