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


# -- `finetune run` starts the trainer as its own process ---------------------------------------------------------

FAKE_TRAINER = r"""
import json, os, sys
cfg = json.load(open(os.environ["FINETUNE_CONFIG"]))
assert cfg["kind"] == "TrainerConfig" and cfg["schemaVersion"], cfg
out = os.environ["FINETUNE_OUTPUT_DIR"]
seen = {k: os.environ.get(k) for k in ("FINETUNE_JOB_NAME", "FINETUNE_NPROC_PER_NODE", "FINETUNE_WORLD_SIZE",
                                       "FINETUNE_STATUS", "MASTER_ADDR", "RANK")}
json.dump({"outcome": "completed", "metric": "val_accuracy", "bestMetric": 0.9, "bestEpoch": 1, "env": seen,
           "history": [{"epoch": 1, "trainLoss": 1.0, "valLoss": 0.5, "valMetric": 0.9, "learningRate": 1e-5}],
           "modelPath": os.path.join(out, "best")}, open(os.path.join(out, "result.json"), "w"))
"""


def test_run_imports_no_torch_and_starts_the_trainer_command(tmp_path):
    import json
    import os
    import subprocess
    import sys

    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    probe = (
        "import sys\n"
        "from finetune_operator.cli import main\n"
        f"code = main(['run', {str(ROOT / 'examples' / 'classification.yaml')!r}, '-o', {str(tmp_path / 'out')!r}, '--processes', '2'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'accelerate', 'finetune_trainer'))\n"
        "print('HEAVY', heavy)\n"
        "raise SystemExit(code)\n"
    )
    env = {**os.environ, "FINETUNE_TRAINER_COMMAND": f"{sys.executable} {fake}", "RANK": "5"}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout  # the CLI path never imported torch or the trainer
    assert "outcome: completed; best val_accuracy 0.9000 at epoch 1" in proc.stdout
    assert "    1      1.0000      0.5000" in proc.stdout  # the loss table
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["env"] == {"FINETUNE_JOB_NAME": "bbc-news", "FINETUNE_NPROC_PER_NODE": "2",
                             "FINETUNE_WORLD_SIZE": "2", "FINETUNE_STATUS": "off", "MASTER_ADDR": "127.0.0.1",
                             "RANK": None}  # a stray RANK would make the launcher think it is a worker


def test_run_without_a_trainer_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    import importlib.util

    from finetune_operator.cli import local

    real = importlib.util.find_spec
    monkeypatch.setattr(local.importlib.util, "find_spec", lambda name, *a: None if name == "finetune_trainer" else real(name, *a))
    monkeypatch.delenv("FINETUNE_TRAINER_COMMAND", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no finetune-trainer on it
    assert main(["run", str(ROOT / "examples" / "classification.yaml"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the trainer, which is not installed here" in err[0] and "FINETUNE_TRAINER_COMMAND" in err[0]


def test_run_reports_a_trainer_that_cannot_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FINETUNE_TRAINER_COMMAND", str(tmp_path / "no-such-trainer"))
    assert main(["run", str(ROOT / "examples" / "classification.yaml"), "-o", str(tmp_path / "out")]) == 1
    assert "error: cannot start the trainer" in capsys.readouterr().err


SLOW_TRAINER = r"""
import os, signal, sys, time
def stop(*_):
    open(os.path.join(os.environ["FINETUNE_OUTPUT_DIR"], "got-sigterm"), "w").close()
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(os.environ["FINETUNE_OUTPUT_DIR"], "started"), "w").close()
time.sleep(60)
"""


def test_sigterm_for_the_cli_reaches_the_trainer(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    fake = tmp_path / "slow_trainer.py"
    fake.write_text(SLOW_TRAINER)
    out = tmp_path / "out"
    env = {**os.environ, "FINETUNE_TRAINER_COMMAND": f"{sys.executable} {fake}"}
    cli = subprocess.Popen([sys.executable, "-c", "from finetune_operator.cli import main; raise SystemExit(main("
                            f"['run', {str(ROOT / 'examples' / 'classification.yaml')!r}, '-o', {str(out)!r}]))"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "started").exists() and time.monotonic() < deadline and cli.poll() is None:
        time.sleep(0.1)
    assert (out / "started").exists(), cli.communicate()
    cli.send_signal(signal.SIGTERM)
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 1 and (out / "got-sigterm").exists()
    assert "training was interrupted; a checkpoint is in" in err
