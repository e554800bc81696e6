"""The chart's alert rules pass `promtool check rules` and the unit tests in alerts_test.yaml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ship_helpers import ALL_FEATURES, of_kind, render

pytestmark = pytest.mark.prometheus
HERE = Path(__file__).parent


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool missing: install Debian's prometheus package (scripts/setup.sh does)")
    return path


def _write_rules(directory: Path, values: dict | None = None) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rule file."""
    rule = of_kind(render({**ALL_FEATURES, **(values or {})}), "PrometheusRule")[0]
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def test_promtool_check_rules(tmp_path: Path):
    proc = _run("check", "rules", str(_write_rules(tmp_path)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 rules found" in proc.stdout


def test_promtool_unit_tests(tmp_path: Path):
    _write_rules(tmp_path)
    shutil.copy(HERE / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    proc = _run("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unit_tests_notice_a_changed_threshold(tmp_path: Path):
    """The alert tests pin behaviour: a shorter stall window makes a young job fire and they fail."""
    _write_rules(tmp_path, {"prometheusRule": {"enabled": True, "stallMinutes": 10}})
    shutil.copy(HERE / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    proc = _run("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert proc.returncode != 0 and "FineTuneJobStalled" in proc.stdout + proc.stderr
