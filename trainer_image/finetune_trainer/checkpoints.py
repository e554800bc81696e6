"""Resumable checkpoints under `<output>/checkpoints/`.

`epoch-<N>/` is written after epoch N; `epoch-<N>-batch-<k>/` when SIGTERM arrived k batches
into epoch N. A checkpoint counts only once its `trainer_state.json` exists: that file is written
last, after every rank has finished writing (a half-written `optimizer.bin` was seen otherwise).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^epoch-(\d+)(?:-batch-(\d+))?$")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def epoch_dir(output_dir: str, epoch: int, batch: int | None = None) -> str:
    name = f"epoch-{epoch}" if batch is None else f"epoch-{epoch}-batch-{batch}"
    return os.path.join(checkpoints_dir(output_dir), name)


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_complete(path: str, state: dict[str, Any]) -> None:
    write_json_atomic(os.path.join(path, STATE_FILE), state)


def complete_checkpoints(output_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, trainer state) of every finished checkpoint, oldest first (by optimizer step)."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        state_path = os.path.join(path, STATE_FILE)
        if _NAME.match(name) and os.path.isfile(state_path):
            try:
                with open(state_path, encoding="utf-8") as f:
                    state = json.load(f)
            except (OSError, ValueError):
                continue  # a torn write: ignore this checkpoint, an older one still works
            found.append((path, state))
    found.sort(key=lambda item: (item[1].get("globalStep", 0), item[1].get("epochsCompleted", 0), item[1].get("batchInEpoch", 0)))
    return found


def latest(output_dir: str) -> tuple[str, dict[str, Any]] | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def prune(output_dir: str, keep: int) -> list[str]:
    """Keep the newest `keep` epoch checkpoints; drop mid-epoch ones older than the newest checkpoint."""
    found = complete_checkpoints(output_dir)
    if not found:
        return []
    newest = found[-1][0]
    epoch_ckpts = [p for p, s in found if s.get("batchInEpoch", 0) == 0]
    doomed = [p for p in epoch_ckpts[:-keep]] if keep > 0 else []
    doomed += [p for p, s in found if s.get("batchInEpoch", 0) and p != newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    # Unfinished directories (a crash mid-save) would otherwise accumulate.
    root = checkpoints_dir(output_dir)
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, STATE_FILE)):
            shutil.rmtree(path, ignore_errors=True)
            doomed.append(path)
    return doomed
