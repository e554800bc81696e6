"""The dashboard's and the alerts' PromQL use only metric names the operator and the trainer really
export. Names come from the prometheus-client definitions in the two metrics.py modules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ship_helpers import ALL_FEATURES, CHART, ROOT, of_kind, render

METRIC_MODULES = {
    "finetune_operator_": ROOT / "operator" / "finetune_operator" / "metrics.py",
    "finetune_": ROOT / "trainer_image" / "finetune_trainer" / "metrics.py",  # every other finetune_ name
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class Exported:
    """Metric families by type; counters and histograms are named without their sample suffixes."""

    def __init__(self) -> None:
        self.gauges: set[str] = set()
        self.counters: set[str] = set()
        self.histograms: set[str] = set()

    def series_names(self) -> set[str]:
        """The sample names Prometheus stores, as prometheus-client exposes them."""
        return (self.gauges | {c + "_total" for c in self.counters}
                | {h + s for h in self.histograms for s in HISTOGRAM_SUFFIXES})


def _strip_total(name: str) -> str:
    return name.removesuffix("_total")


def from_code(source: str) -> Exported:
    """Every `finetune_*` string literal in a metrics module is a metric family name; the constructor
    right before it says its type (a helper such as `gauge(...)` counts as a gauge)."""
    out = Exported()
    for m in re.finditer(r'(\w+)\(\s*"(finetune_[a-z0-9_]+)"', source):
        ctor, name = m.group(1), _strip_total(m.group(2))
        {"Counter": out.counters, "Histogram": out.histograms}.get(ctor, out.gauges).add(name)
    return out


def exported() -> dict[str, set[str]]:
    """Series names per metrics module, operator and trainer together."""
    return {f"code: {m.relative_to(ROOT)}": from_code(m.read_text()).series_names() for m in METRIC_MODULES.values()}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left after removing strings, label matchers,
    grouping clauses and label_values()'s label argument."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"label_values\(([^,()]*),[^)]*\)", r"(\1)", expr)
    return set(re.findall(r"(?<![\w:])(finetune_[a-zA-Z0-9_:]*)", expr))


def dashboard_queries() -> list[str]:
    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    queries = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            queries.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            queries.append(q["query"])
        elif var["type"] == "query":
            queries.append(q)
    return queries


def rule_queries() -> list[str]:
    rule = of_kind(render(ALL_FEATURES), "PrometheusRule")[0]
    return [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]


def test_extractor_reads_names_not_labels():
    expr = ('histogram_quantile(0.95, sum by (le, finetune_job) (rate(finetune_operator_reconcile_duration_seconds_bucket'
            '{finetune_job=~"finetune_x"}[5m]))) / on(finetune_job) finetune_train_loss and label_values(finetune_trainer_epoch, finetune_job)')
    assert promql_metric_names(expr) == {
        "finetune_operator_reconcile_duration_seconds_bucket", "finetune_train_loss", "finetune_trainer_epoch"}


def test_code_definitions_are_found():
    names = set().union(*exported().values())
    # A gauge, a counter (exposed with _total) and a histogram (exposed with _bucket) from the contract.
    assert {"finetune_train_loss", "finetune_operator_reconciles_total", "finetune_operator_reconcile_duration_seconds_bucket"} <= names


@pytest.mark.parametrize("where", ["dashboard", "alerts"])
def test_queries_use_only_exported_metrics(where: str):
    queries = dashboard_queries() if where == "dashboard" else rule_queries()
    known = set().union(*exported().values())
    used = set().union(*(promql_metric_names(q) for q in queries))
    assert used, "no metric names found: the extractor is broken"
    unknown = sorted(used - known)
    assert not unknown, f"{where} uses metrics nobody exports: {unknown} (exported, by source: {exported()})"


def test_a_misspelled_metric_is_caught():
    known = set().union(*exported().values())
    assert promql_metric_names("rate(finetune_operator_reconciles[5m])") - known  # counter without _total
    assert promql_metric_names("finetune_training_loss") - known


def test_dashboard_covers_every_trainer_metric():
    """Every trainer gauge is shown somewhere (a new metric without a panel is easy to miss)."""
    module = METRIC_MODULES["finetune_"]
    assert module.exists(), "trainer metrics module missing"
    used = set().union(*(promql_metric_names(q) for q in dashboard_queries()))
    assert from_code(Path(module).read_text()).gauges <= used
