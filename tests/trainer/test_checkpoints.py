"""Checkpoint files: written in a temporary directory and renamed when complete; damaged ones are skipped."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from finetune_trainer import checkpoints as ckpt


def _save(out: str, epoch: int, step: int, batch: int | None = None, payload: bytes = b"weights") -> str:
    final = ckpt.epoch_dir(out, epoch, batch)
    tmp = ckpt.prepare(final)
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(payload)
    ckpt.commit(tmp, final, {"globalStep": step, "epochsCompleted": epoch if batch is None else epoch - 1,
                             "batchInEpoch": batch or 0})
    return final


def test_a_checkpoint_appears_only_when_complete(tmp_path):
    out = str(tmp_path)
    final = ckpt.epoch_dir(out, 1)
    tmp = ckpt.prepare(final)
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(b"half-written")
    # Killed here: the reader sees nothing, not a half-written checkpoint.
    assert ckpt.complete_checkpoints(out) == [] and ckpt.latest(out) is None
    _save(out, 1, 10)
    path, state = ckpt.latest(out)
    assert path == final and state["files"] == {"model.safetensors": len(b"weights")}
    assert sorted(os.listdir(ckpt.checkpoints_dir(out))) == ["epoch-1"]  # the temporary directory was renamed


def test_a_truncated_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog):
    out = str(tmp_path)
    _save(out, 1, 10)
    newest = _save(out, 2, 20, payload=b"weights of epoch 2")
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:
        f.truncate(4)
    with caplog.at_level("WARNING", logger="finetune_trainer"):
        path, state = ckpt.latest(out)
    assert path.endswith("epoch-1") and state["globalStep"] == 10
    assert "epoch-2 is damaged (model.safetensors has 4 bytes, 18 were written)" in caplog.text
    os.remove(os.path.join(newest, "model.safetensors"))
    assert ckpt.verify(newest, {"files": {"model.safetensors": 18}}) == "model.safetensors is missing"
    assert ckpt.verify(newest, {}) == "no file list in trainer_state.json"


def test_same_size_corruption_is_caught_by_the_digest(tmp_path, caplog):
    out = str(tmp_path)
    _save(out, 1, 10)
    newest = _save(out, 2, 20, payload=b"weights of epoch 2")
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:
        f.write(b"W")  # same size, one byte changed
    with caplog.at_level("WARNING", logger="finetune_trainer"):
        skipped: list = []
        assert ckpt.usable_checkpoints(out, skipped)[0][0].endswith("epoch-1")
    assert skipped == [{"path": newest, "problem": "model.safetensors has 18 bytes as written but its SHA-256 differs (corrupt)"}]
    assert "epoch-2 is damaged" in caplog.text and "SHA-256 differs" in caplog.text
    state = ckpt.complete_checkpoints(out)[-1][1]
    del state["sha256"]  # a checkpoint written before digests were recorded: checked by size alone
    assert ckpt.verify(newest, state) is None


def test_saving_the_same_position_again_replaces_it_and_prune_drops_leftovers(tmp_path):
    out = str(tmp_path)
    _save(out, 1, 10)
    _save(out, 2, 15, batch=5)
    _save(out, 2, 15, batch=5, payload=b"again")  # an out-of-memory retry saves the same position again
    assert ckpt.latest(out)[1]["files"]["model.safetensors"] == len(b"again")
    os.makedirs(os.path.join(ckpt.checkpoints_dir(out), ".tmp-epoch-3"))
    _save(out, 2, 20)
    ckpt.prune(out, keep=1)
    assert sorted(os.listdir(ckpt.checkpoints_dir(out))) == ["epoch-2"]


def test_rng_state_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.save_rng(str(tmp_path), 0, {"mixup": gen})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=gen)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    other = torch.Generator().manual_seed(9)
    assert ckpt.load_rng(str(tmp_path), 0, {"mixup": other})
    assert (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=other))) == expected
    assert not ckpt.load_rng(str(tmp_path), 1)  # no file for that rank (an older checkpoint): nothing restored
