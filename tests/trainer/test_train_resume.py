"""Preemption and resume in one process: SIGTERM mid-epoch checkpoints at the next step boundary,
and the resumed run ends with exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import load_weights
from local_train import run

HP = {"dropout": 0.0, "epochs": 2, "batchSize": 4}


def test_sigterm_checkpoints_mid_epoch_and_resume_matches_uninterrupted(manifest, tmp_path, monkeypatch):
    m = manifest(hyperparameters=HP)
    reference = run(m, output_dir=str(tmp_path / "ref"), progress=False)

    out = str(tmp_path / "preempted")
    monkeypatch.setenv("FINETUNE_FAULT_SIGTERM_AT_STEP", "23")  # epoch 2, 5 batches in (18 batches per epoch)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(m, output_dir=out, progress=False)
    monkeypatch.delenv("FINETUNE_FAULT_SIGTERM_AT_STEP")
    mid = os.path.join(out, "checkpoints", "epoch-2-batch-5")
    with open(os.path.join(mid, "trainer_state.json")) as f:
        state = json.load(f)
    assert state["globalStep"] == 23 and state["epochsCompleted"] == 1 and state["batchInEpoch"] == 5

    resumed = run(m, output_dir=out, progress=False)
    assert resumed["resumedFrom"].endswith("epoch-2-batch-5")
    assert resumed["globalStep"] == reference["globalStep"] == 36
    a, b = load_weights(str(tmp_path / "ref")), load_weights(out)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert resumed["history"][-1]["trainLoss"] == pytest.approx(reference["history"][-1]["trainLoss"], rel=1e-5)
    # the mid-epoch checkpoint is dropped once a later epoch checkpoint exists
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["epoch-1", "epoch-2"]


def test_stop_file_stops_gracefully_and_keeps_a_model(manifest, tmp_path):
    stop = tmp_path / "STOP"
    stop.write_text("")
    result = run(manifest(hyperparameters=HP), output_dir=str(tmp_path / "out"), progress=False,
                 env={"FINETUNE_STOP_FILE": str(stop), "FINETUNE_STOP_POLL_SECONDS": "0.05"})
    assert result["outcome"] == "stopped" and result["globalStep"] < result["totalSteps"]
    assert os.path.exists(tmp_path / "out" / "best" / "model.safetensors")
