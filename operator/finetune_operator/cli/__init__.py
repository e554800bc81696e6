"""`finetune` (also `kubectl finetune`): run locally, watch, plot, stop and validate FineTuneJobs."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..api import InvalidFineTuneJob, validate_manifest
from ..api.presets import PRESETS, describe
from .cluster import Cluster
from .errors import CliError

EMBEDDED_DEFAULT = "classification.yaml"
# libyaml's loader when PyYAML was built with it (same YAML 1.1 resolution, ~10x faster), else the pure one.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(path: str | None) -> dict[str, Any]:
    if path is None:
        text = resources.files("finetune_operator.examples_embedded").joinpath(EMBEDDED_DEFAULT).read_text()
    else:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise CliError(f"cannot read {path}: {err.strerror}") from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=_SAFE_LOADER) if d]
    except yaml.YAMLError as err:
        raise CliError(f"{path}: not valid YAML: {err}") from None
    if len(docs) != 1:
        raise CliError(f"{path}: expected one FineTuneJob document, found {len(docs)}")
    return docs[0]


def cmd_validate(args: argparse.Namespace) -> int:
    obj = _load(args.file)
    try:
        job = validate_manifest(obj)
    except InvalidFineTuneJob as err:
        print(f"{args.file}: {len(err.problems)} problem(s):")
        for p in err.problems:
            print(f"  - {p}")
        return 1
    print(f"{args.file}: valid FineTuneJob {job.name} (preset {job.spec.preset})")
    if args.show_resolved:
        print(yaml.safe_dump(job.trainer_config(), sort_keys=False))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    obj = _load(args.file)
    try:
        job = validate_manifest(obj)
    except InvalidFineTuneJob as err:
        print(f"{args.file or 'embedded default'}: {len(err.problems)} problem(s):", file=sys.stderr)
        for p in err.problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    from .local import run  # the trainer runs as its own process: no torch in the CLI

    result = run(job, args.output, processes=args.processes, progress=not args.no_progress)
    best = result.get("bestMetric")
    best_text = f"{best:.4f}" if isinstance(best, int | float) else "-"
    print(f"outcome: {result.get('outcome')}; best {result.get('metric')} {best_text} at epoch {result.get('bestEpoch')}; "
          f"final model: {result.get('modelPath') or args.output}")
    test = result.get("test")
    if test:
        from .render import held_out_line

        print(held_out_line(test))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .render import list_table

    cluster = Cluster.connect(args.kubeconfig, args.context, args.namespace)
    items = cluster.list(args.all_namespaces)
    if not items:
        print("no FineTuneJobs" + ("" if args.all_namespaces else f" in namespace {cluster.namespace}"))
        return 0
    print(list_table(items, args.all_namespaces))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .render import status_text

    obj = Cluster.connect(args.kubeconfig, args.context, args.namespace).get(args.name)
    if args.output == "json":
        print(json.dumps(obj.get("status") or {}, indent=2))
    else:
        print(status_text(obj, curves=not args.no_curves))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_curves

    obj = Cluster.connect(args.kubeconfig, args.context, args.namespace).get(args.name)
    print(f"wrote {plot_curves(obj, args.output)}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    cluster = Cluster.connect(args.kubeconfig, args.context, args.namespace)
    obj = cluster.get(args.name)
    phase = (obj.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        raise CliError(f"FineTuneJob {args.name} already finished ({phase}): nothing to stop")
    cluster.request_stop(args.name)
    print(f"stop requested for {cluster.namespace}/{args.name}: the trainer keeps the best checkpoint and exits "
          "at the next step; watch with `finetune status " + args.name + "`")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    if args.name not in PRESETS:
        raise CliError(f"unknown preset {args.name!r}: choose one of {', '.join(PRESETS)}")
    d = describe(args.name)
    print(f"preset {args.name}\n\n{d['why']}\n\nsets (only where the manifest leaves a field unset):")
    print(yaml.safe_dump({"hyperparameters": d["hyperparameters"], "earlyStopping": {"patience": d["earlyStoppingPatience"]}},
                         sort_keys=False).rstrip())
    print("\nwhen to pick which: fast for quick experiments and smoke tests; balanced (the default) for most jobs; "
          "max-accuracy when compute is cheap compared with quality.")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def cluster_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
        sp.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
        sp.add_argument("--context", help="kubeconfig context")

    sp = sub.add_parser("run", help="fine-tune locally from a manifest (default: the embedded example)")
    sp.add_argument("file", nargs="?", help="FineTuneJob YAML; omit for the embedded MiniLM/BBC News example")
    sp.add_argument("-o", "--output", default="out/run", help="output directory (default out/run)")
    sp.add_argument("--processes", type=int, help="processes on this machine (default: from the manifest)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.add_argument("--debug", action="store_true", help="kept for compatibility: the trainer's own log shows the traceback")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("validate", help="validate a manifest and print every problem")
    sp.add_argument("file")
    sp.add_argument("--show-resolved", action="store_true", help="print the resolved trainer config")
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("list", help="FineTuneJobs with phase, epoch, losses and best metric")
    cluster_args(sp)
    sp.add_argument("-A", "--all-namespaces", action="store_true")
    sp.set_defaults(fn=cmd_list)

    sp = sub.add_parser("status", help="one job: phase, epoch, losses, best, early-stop decision and loss curves")
    cluster_args(sp)
    sp.add_argument("name")
    sp.add_argument("-o", "--output", choices=["text", "json"], default="text")
    sp.add_argument("--no-curves", action="store_true")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("plot", help="loss curves as a PNG")
    cluster_args(sp)
    sp.add_argument("name")
    sp.add_argument("-o", "--output", default="curves.png")
    sp.set_defaults(fn=cmd_plot)

    sp = sub.add_parser("stop", help="request a graceful stop (keeps the best checkpoint)")
    cluster_args(sp)
    sp.add_argument("name")
    sp.set_defaults(fn=cmd_stop)

    from .sweep import add_commands as add_sweep_commands

    add_sweep_commands(sub, cluster_args)

    sp = sub.add_parser("explain", help="explain a preset: what it sets and when to pick it")
    sp.add_argument("topic", choices=["preset"])
    sp.add_argument("name", help="fast, balanced or max-accuracy")
    sp.set_defaults(fn=cmd_explain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
