"""Failures a restarted pod cannot fix: a full disk on save, a dataset that cannot be read.

Each becomes a `FatalError` naming the path and the reason. The trainer exits with the error's own exit code
(finetune_contract.config: EXIT_DISK_FULL, EXIT_DATASET_UNREADABLE), which the Job's podFailurePolicy turns
into an immediate Job failure (no crash loop through spec.backoffLimit), and writes a one-line JSON
termination message (`{"reason": ..., "message": ...}`) to the container's terminationMessagePath, which the
kubelet copies into the pod's status and the operator into the FineTuneJob's status and a Warning Event.

Kept apart from data.py and the save code on purpose: the mapping of OS and parser errors to a user's fix is
the same whatever reads the files.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

from finetune_contract.config import (
    EXIT_DATASET_UNREADABLE,
    EXIT_DISK_FULL,
    EXIT_NOT_RETRYABLE,
    FailureReason,
)

log = logging.getLogger("finetune_trainer")

# Kubernetes' default terminationMessagePath; the pod runner (tests) and local runs point this variable elsewhere.
TERMINATION_MESSAGE_ENV = "FINETUNE_TERMINATION_MESSAGE_PATH"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096  # the kubelet keeps at most 4096 bytes per container
# Fault injection: the next checkpoint save raises the real OSError(ENOSPC) from its write path.
FAULT_DISK_FULL_ENV = "FINETUNE_FAULT_DISK_FULL"
LOW_SPACE_BYTES = 1 << 20  # below this, a failed write is taken for a full disk (torch reports only "file write failed")


class FatalError(RuntimeError):
    exit_code = 1
    reason = ""

    def termination_message(self) -> str:
        return json.dumps({"reason": self.reason, "message": str(self)})


class DiskFull(FatalError):
    exit_code = EXIT_DISK_FULL
    reason = FailureReason.DISK_FULL


class DatasetUnreadable(FatalError):
    exit_code = EXIT_DATASET_UNREADABLE
    reason = FailureReason.DATASET_UNREADABLE


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__  # type: ignore[assignment]


def _free_bytes(path: str) -> int | None:
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe or "/").free
    except OSError:
        return None


def is_disk_full(err: BaseException, path: str) -> bool:
    """ENOSPC (or EDQUOT) anywhere in the chain; safetensors' and torch's own wrappers of it; or a failed write
    on a file system with (almost) no space left."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
    free = _free_bytes(path)
    return free is not None and free < LOW_SPACE_BYTES and isinstance(err, OSError | RuntimeError)


@contextlib.contextmanager
def saving(path: str, what: str, job: str) -> Iterator[None]:
    """Turn a full disk while writing `what` into `path` into DiskFull; anything else propagates unchanged."""
    try:
        yield
    except FatalError:
        raise
    except Exception as err:
        if not is_disk_full(err, path):
            raise
        free = _free_bytes(path)
        raise DiskFull(
            f"job {job}: no space left on device writing {what} to {path}"
            f"{f' ({free} bytes free)' if free is not None else ''}: {type(err).__name__}: {str(err).splitlines()[0][:200]}; "
            "raise spec.output.size (or free space on spec.output.pvc), or lower spec.output.keepCheckpoints"
        ) from err


def inject_disk_full(path: str) -> None:
    """The fault knob: raise what the kernel raises when a write finds the disk full."""
    if os.environ.get(FAULT_DISK_FULL_ENV, "") not in ("", "0"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


try:  # datasets wraps a reader's error (a torn JSON line, a bad parquet footer) in DatasetGenerationError
    from datasets.exceptions import DatasetGenerationError
except ImportError:  # pragma: no cover - the trainer image has datasets
    DatasetGenerationError = OSError  # type: ignore[misc, assignment]

# data.load_splits notes on an error which source it was reading (an exception note, PEP 678)
SOURCE_NOTE = "finetune dataset source: "

DATA_ERRORS = (OSError, ValueError, UnicodeDecodeError, csv.Error, KeyError, TypeError, DatasetGenerationError)


def culprit(ds: Any, err: BaseException) -> tuple[str, str]:
    """(spec field, source) of the dataset source an error is about: the loader's messages and file errors name
    the source (or a path inside it), so the most specific source mentioned wins; else dataset.source."""
    fields = {"split": "dataset.source", "validationSplit": "dataset.validationSource", "testSplit": "dataset.testSource"}
    for e in _chain(err):  # data.load_splits notes which source it was reading
        for note in getattr(e, "__notes__", None) or []:
            if note.startswith(SOURCE_NOTE):
                key, _, source = note[len(SOURCE_NOTE):].partition("=")
                return fields.get(key, "dataset.source"), source
    text = " ".join(f"{e} {getattr(e, 'filename', '') or ''}" for e in _chain(err))
    for field, source in (("dataset.validationSource", ds.validation_source), ("dataset.testSource", ds.test_source)):
        if source and source in text:
            return field, source
    return "dataset.source", ds.source


def dataset_unreadable(err: BaseException, field: str, source: str, job: str) -> DatasetUnreadable:
    """The user's view of why `source` (spec.<field>) cannot be read."""
    root = err
    for inner in _chain(err):  # the reader's own error says more than datasets' wrapper around it
        root = inner
    if isinstance(root, IsADirectoryError | NotADirectoryError) or (
            os.path.isdir(source) and isinstance(root, FileNotFoundError)):
        # datasets answers a directory where a file should be with "Unable to find": the path exists, though
        why = "is not a file of the declared format"
    elif isinstance(root, FileNotFoundError) or "does not exist" in str(err):
        why = "does not exist"
    elif isinstance(root, PermissionError):
        why = "permission denied (the trainer runs as a non-root user: make the files readable by it)"
    elif isinstance(root, OSError):
        why = f"cannot be read ({os.strerror(root.errno) if root.errno else type(err).__name__})"
    else:
        why = "is corrupt or not in the declared format"
    detail = f"{type(root).__name__}: {str(root).splitlines()[0][:300] if str(root) else ''}"
    path = getattr(root, "filename", None)
    where = f" ({path})" if path and str(path) != source else ""
    return DatasetUnreadable(f"job {job}: spec.{field} {source}{where} {why}: {detail}; fix the path or the file "
                             "(and spec.dataset.format), then re-create the job")


def write_termination_message(err: FatalError) -> None:
    write_termination_text(err.termination_message())


def write_termination_text(text: str) -> None:
    path = os.environ.get(TERMINATION_MESSAGE_ENV) or DEFAULT_TERMINATION_MESSAGE_PATH
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text[:TERMINATION_MESSAGE_LIMIT])
    except OSError:
        pass  # outside a pod (no /dev/termination-log): the log line carries the same message


def root_failure(failed: dict[int, Any]) -> tuple[int, Any]:
    """The rank whose failure caused the others', from torch elastic's {rank: ProcessFailure}.

    torch's `get_first_failure()` takes the earliest timestamp, and that is a race: a rank that declared a fatal
    error (full disk, unreadable dataset: its own exit code and termination message) exits, its peers' next
    collective fails ("Connection closed by peer"), and a peer's error file can carry an earlier time than the one
    the agent records when its monitor notices the first exit. The peer was then blamed, with exit 143, and the
    Job's podFailurePolicy retried what it should have failed at once. A rank that exited with a code of
    EXIT_NOT_RETRYABLE decided to stop, so it goes first. The same race blamed a peer for a rank's own crash (exit
    1 both, the peer's "Connection closed by peer" stamped first, seen under CPU load): a rank whose error says a
    peer went away is a consequence, so it goes after the others. Otherwise the earliest, as torch does (a rank
    killed by a signal, the OOM killer's, can be the cause, so signals are not ranked below exits)."""
    return min(failed.items(), key=lambda item: (item[1].exitcode not in EXIT_NOT_RETRYABLE, lost_a_peer(item[1]),
                                                 item[1].timestamp))


# What a rank's error says when the rank itself was fine and a peer of its collective went away (gloo's TCP pair,
# NCCL's watchdog, a socket of the store).
PEER_LOSS_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                     "remote process exited", "communicator was aborted")


def lost_a_peer(failure: Any) -> bool:
    """Whether a torch elastic ProcessFailure's error is a peer's loss rather than this rank's own fault."""
    text = _error_text(failure).lower()
    return any(marker in text for marker in PEER_LOSS_MARKERS)


def _error_text(failure: Any) -> str:
    """A ProcessFailure's error on one line: the exception its worker's `record` wrapper wrote, or nothing."""
    error = getattr(failure, "message", None)
    if isinstance(error, dict):  # the error file's {"message": ..., "extraInfo": {...}}
        error = error.get("message") or ""
    return " ".join(str(error or "").split())


RANK_ERROR_CHARS = 160  # the operator shows a termination message's last 300 characters: keep the rank in them


def rank_failure_message(rank: int, failure: Any, failed_ranks: list[int]) -> str:
    """One line for a torch elastic ProcessFailure: which rank, how it ended, its error (the exception a worker's
    `record` wrapper wrote, or the signal), and that the other ranks were stopped with it."""
    error = _error_text(failure)
    if len(error) > RANK_ERROR_CHARS:
        error = error[: RANK_ERROR_CHARS - 3] + "..."
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    others = [r for r in failed_ranks if r != rank]
    also = f"; ranks {', '.join(map(str, others))} failed after it" if others else ""
    return (f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) failed first, with {how}: {error}"
            f"{also}; every other rank of the pod was stopped")
