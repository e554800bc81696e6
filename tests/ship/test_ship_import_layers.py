"""The layering contracts of pyproject.toml's [tool.importlinter] hold (STYLE rule 15), run here so that they are
part of the README's test command; and a violation would be caught (the contracts can fail)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ship_helpers import ROOT

PACKAGE_DIRS = {"finetune_contract": "contract", "finetune_operator": "operator", "finetune_trainer": "trainer_image"}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # Analyse the packages under `root`, whatever is installed: PYTHONPATH names them first.
    path = os.pathsep.join(str(root / d) for d in PACKAGE_DIRS.values())
    env = {**os.environ, "PYTHONPATH": path + os.pathsep + os.environ.get("PYTHONPATH", "")}
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 6 kept, 0 broken." in proc.stdout


def test_a_trainer_that_imports_the_operator_breaks_the_contract(tmp_path):
    for package, folder in PACKAGE_DIRS.items():
        shutil.copytree(ROOT / folder / package, tmp_path / folder / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    paths = tmp_path / "trainer_image" / "finetune_trainer" / "paths.py"
    paths.write_text(paths.read_text() + "\nfrom finetune_operator.api import validate_manifest  # noqa: E402,F401\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "The trainer imports only the contract, never the operator BROKEN" in proc.stdout
    assert "finetune_trainer.paths -> finetune_operator.api" in proc.stdout
