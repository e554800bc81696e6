"""CLI commands that need no cluster, and the views shared with the cluster commands."""

from __future__ import annotations

import struct
from pathlib import Path

import yaml

from finetune_operator.cli import main
from finetune_operator.cli.plot import plot_curves
from finetune_operator.cli.render import list_table, status_text

from .objects import early_stopped, failed, running

ROOT = Path(__file__).resolve().parents[2]


def test_validate_good_example(capsys):
    assert main(["validate", str(ROOT / "examples" / "classification.yaml")]) == 0
    assert "valid FineTuneJob" in capsys.readouterr().out


def test_validate_reports_every_problem(tmp_path, capsys):
    bad = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"},
           "spec": {"model": {"name": "m"}, "dataset": {"source": "d"}, "preset": "slow",
                    "hyperparameters": {"learningrate": 0.1, "epochs": 0}}}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    assert main(["validate", str(f)]) == 1
    out = capsys.readouterr().out
    assert "3 problem(s)" in out
    assert "spec.preset" in out and "spec.hyperparameters.epochs" in out
    assert "did you mean 'learningRate'" in out


def test_validate_unreadable_file_is_one_line(capsys):
    assert main(["validate", "/nonexistent.yaml"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read /nonexistent.yaml")


def test_explain_each_preset(capsys):
    for name, epochs in (("fast", 2), ("balanced", 3), ("max-accuracy", 10)):
        assert main(["explain", "preset", name]) == 0
        out = capsys.readouterr().out
        assert f"epochs: {epochs}" in out and "when to pick which" in out
    assert main(["explain", "preset", "slow"]) == 1
    assert "unknown preset 'slow'" in capsys.readouterr().err


def test_status_views():
    text = status_text(running())
    assert "Phase:       Running (PodsRunning)" in text and "Epoch:       2/10" in text
    assert "continue (no stop requested)" in text and "train loss" in text  # curve legend
    text = status_text(early_stopped())
    assert "Succeeded (EarlyStopped)" in text and "PatienceExhausted" in text and "best 0.95 at epoch 3" in text
    assert "5 epoch(s) not run" in text
    text = status_text(failed())
    assert "Failed (OOMKilled)" in text and "raise resources.limits.memory" in text
    assert "no epochs finished yet" in text


def test_list_table():
    table = list_table([running(), early_stopped(), failed()]).splitlines()
    assert table[0].split() == ["NAME", "PHASE", "REASON", "EPOCH", "TRAIN-LOSS", "VAL-LOSS", "BEST"]
    assert table[2].split()[:4] == ["bbc-stopped", "Succeeded", "EarlyStopped", "5/10"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_png_has_curves(tmp_path):
    from PIL import Image

    out = plot_curves(early_stopped(), tmp_path / "curves.png")
    assert _png_size(out) == (800, 450)
    import numpy as np

    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    # The plot area must hold coloured curve pixels, not only white background and black axes.
    colours = {tuple(px) for px in pixels if len(set(px.tolist())) > 1}
    assert len(colours) > 50


def test_plot_without_history_is_a_clear_error():
    import pytest

    from finetune_operator.cli.cluster import CliError

    with pytest.raises(CliError, match="no finished epoch"):
        plot_curves(failed(), "/tmp/never.png")


def test_run_with_a_missing_model_is_one_clear_line(tmp_path, capsys):
    manifest = yaml.safe_load((ROOT / "examples" / "classification.yaml").read_text())
    manifest["spec"]["model"]["name"] = str(tmp_path / "no-such-model")
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(manifest))
    assert main(["run", str(f), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: training failed:") and "no-such-model" in err[-1]
