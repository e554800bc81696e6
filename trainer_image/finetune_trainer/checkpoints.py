"""Resumable checkpoints under `<output>/checkpoints/`, written so that a half-written one is never used.

`epoch-<N>/` is written after epoch N; `epoch-<N>-batch-<k>/` k batches into epoch N (SIGTERM, or
`checkpointing.intervalMinutes` elapsed). Every rank writes into `.tmp-<name>/`; once all ranks are done
(`wait_for_everyone`, a half-written `optimizer.bin` was seen otherwise) rank 0 writes `trainer_state.json`
(the loop's progress, the batch plan, and the size and SHA-256 of every file) and renames the directory to
`<name>`. A rename is atomic on one file system, so a SIGKILL leaves either the complete checkpoint or a `.tmp-`
directory that no reader looks at. On load, a checkpoint whose files do not have the recorded sizes (truncated
by a full disk, a torn copy) or digests (a flipped block, a same-size overwrite: a weights file with changed
bytes still loads, silently wrong) is skipped and the previous one is used; the skip is logged and counted in
`skipped` so the trainer can report it (result.json `skippedCheckpoints`).

Why not accelerate's `ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=...)`: it writes
straight into the final `checkpoint_<i>` directory (no rename, so a crash mid-save leaves a directory that
looks complete) and it names by save count, not by training position; DeepSpeed's engine saves through
its own `save_checkpoint`. The file layout inside a checkpoint is still accelerate's (`save_state`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

log = logging.getLogger("finetune_trainer")

STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^epoch-(\d+)(?:-batch-(\d+))?$")
RNG_FILE = "rng_state_{rank}.pt"


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def checkpoint_name(epoch: int, batch: int | None = None) -> str:
    return f"epoch-{epoch}" if batch is None else f"epoch-{epoch}-batch-{batch}"


def epoch_dir(output_dir: str, epoch: int, batch: int | None = None) -> str:
    return os.path.join(checkpoints_dir(output_dir), checkpoint_name(epoch, batch))


def tmp_dir(final: str) -> str:
    return os.path.join(os.path.dirname(final), TMP_PREFIX + os.path.basename(final))


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sizes(path: str) -> dict[str, int]:
    """Relative path -> size of every file under `path` (the state file excluded)."""
    sizes = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel != STATE_FILE:
                sizes[rel] = os.path.getsize(full)
    return sizes


def file_digests(path: str) -> dict[str, str]:
    """Relative path -> SHA-256 (hex) of every file under `path` (the state file excluded)."""
    digests = {}
    for rel in file_sizes(path):
        digests[rel] = _sha256(os.path.join(path, rel))
    return digests


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def prepare(final: str) -> str:
    """Rank 0, before any rank writes: an empty temporary directory for the checkpoint `final`."""
    tmp = tmp_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(tmp: str, final: str, state: dict[str, Any]) -> None:
    """Rank 0, after every rank finished writing into `tmp`: record the files, then rename to `final`."""
    for root, _, files in os.walk(tmp):
        for name in files:  # the data must be on disk before the rename makes it visible
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    # Sizes catch truncation cheaply; digests catch same-size damage (read back from the page cache just written).
    write_json_atomic(os.path.join(tmp, STATE_FILE), {**state, "files": file_sizes(tmp), "sha256": file_digests(tmp)})
    if os.path.exists(final):  # the same position saved again (an out-of-memory retry): replace it
        old = tmp_dir(final) + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(os.path.dirname(final))


def verify(path: str, state: dict[str, Any]) -> str | None:
    """Why the checkpoint at `path` cannot be used (None: every recorded file has its recorded size and digest;
    checkpoints written before digests were recorded are checked by size alone)."""
    recorded = state.get("files")
    if not isinstance(recorded, dict) or not recorded:
        return "no file list in trainer_state.json"
    for rel, size in recorded.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} were written"
    digests = state.get("sha256")
    for rel, digest in (digests.items() if isinstance(digests, dict) else ()):
        full = os.path.join(path, rel)
        if os.path.isfile(full) and _sha256(full) != digest:
            return f"{rel} has {os.path.getsize(full)} bytes as written but its SHA-256 differs (corrupt)"
    return None


def complete_checkpoints(output_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, trainer state) of every finished checkpoint, oldest first (by training position)."""
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


def usable_checkpoints(output_dir: str, skipped: list[dict[str, str]] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Complete checkpoints whose files are intact, newest first; a damaged one is logged, appended to `skipped`
    (path and problem) and skipped."""
    usable = []
    for path, state in reversed(complete_checkpoints(output_dir)):
        problem = verify(path, state)
        if problem:
            log.warning("checkpoint %s is damaged (%s); falling back to an older one", path, problem)
            if skipped is not None:
                skipped.append({"path": path, "problem": problem})
            continue
        usable.append((path, state))
    return usable


def latest(output_dir: str) -> tuple[str, dict[str, Any]] | None:
    found = usable_checkpoints(output_dir)
    return found[0] if found else None


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
        if os.path.isdir(path) and (name.startswith(TMP_PREFIX) or not os.path.exists(os.path.join(path, STATE_FILE))):
            shutil.rmtree(path, ignore_errors=True)
            doomed.append(path)
    return doomed


# -- random number generators ------------------------------------------------------------------------------

def rng_state(extra: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG that decides what training does next (dropout, mixup): python, numpy, torch (+CUDA)."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, gen in (extra or {}).items():
        state[f"generator:{name}"] = gen.get_state()
    return state


def set_rng_state(state: dict[str, Any], extra: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (extra or {}).items():
        if f"generator:{name}" in state:
            gen.set_state(state[f"generator:{name}"])


def save_rng(path: str, rank: int, extra: dict[str, torch.Generator] | None = None) -> None:
    os.makedirs(path, exist_ok=True)  # a node whose output directory is not rank 0's (no shared volume)
    torch.save(rng_state(extra), os.path.join(path, RNG_FILE.format(rank=rank)))


def load_rng(path: str, rank: int, extra: dict[str, torch.Generator] | None = None) -> bool:
    file = os.path.join(path, RNG_FILE.format(rank=rank))
    if not os.path.isfile(file):
        return False  # written by an older trainer: accelerate's own random_states_<rank>.pkl was restored
    set_rng_state(torch.load(file, weights_only=False), extra)
    return True
