"""Failures a restart cannot fix end the run at once with the path and the reason (issue 12, part 3):
a full disk while saving, a dataset that is missing, unreadable or corrupt."""

from __future__ import annotations

import json

import pytest
from local_train import run

from finetune_contract.config import EXIT_DATASET_UNREADABLE, EXIT_DISK_FULL
from finetune_trainer import failures

HP = {"epochs": 1, "batchSize": 8, "dropout": 0.0}


def test_a_full_disk_on_save_fails_with_the_path_and_no_space_left(manifest, tmp_path, monkeypatch):
    monkeypatch.setenv(failures.FAULT_DISK_FULL_ENV, "1")  # the real OSError(ENOSPC) from the checkpoint's write path
    out = tmp_path / "out"
    with pytest.raises(failures.DiskFull) as info:
        run(manifest(hyperparameters=HP), output_dir=str(out), progress=False)
    message = str(info.value)
    assert "no space left on device writing a checkpoint to " + str(out / "checkpoints" / ".tmp-epoch-1") in message
    assert "No space left on device" in message and "spec.output.size" in message
    assert info.value.exit_code == EXIT_DISK_FULL and info.value.reason == "DiskFull"
    assert json.loads(info.value.termination_message()) == {"reason": "DiskFull", "message": message}


def test_a_real_enospc_from_the_kernel_is_recognised(tmp_path):
    # /dev/full answers every write with ENOSPC, as a full volume does.
    with (pytest.raises(failures.DiskFull, match="no space left on device writing result.json to /dev/full"),
          failures.saving("/dev/full", "result.json", "j"), open("/dev/full", "w") as f):
        f.write("x" * 10000)
        f.flush()
    with pytest.raises(ValueError), failures.saving(str(tmp_path), "result.json", "j"):  # anything else propagates
        raise ValueError("not a disk problem")


def test_the_termination_message_goes_where_the_kubelet_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv(failures.TERMINATION_MESSAGE_ENV, str(path))
    failures.write_termination_message(failures.DiskFull("x" * 10000))
    assert len(path.read_bytes()) == failures.TERMINATION_MESSAGE_LIMIT


@pytest.mark.parametrize("damage", ["missing", "unreadable", "corrupt"])
def test_an_unreadable_dataset_fails_with_the_path_and_the_reason(manifest, tmp_path, damage):
    data = tmp_path / "train.jsonl"
    if damage == "missing":
        expected = "does not exist"
    elif damage == "unreadable":
        # chmod 000 stops everyone but root (tests here may run as root): a directory where the declared jsonl
        # file should be cannot be read by anyone.
        data.mkdir()
        expected = "is not a file of the declared format"
    else:
        data.write_text('{"text": "fine", "label": "a"}\n{"text": "torn\n')
        expected = "is corrupt or not in the declared format"
    m = manifest(hyperparameters=HP)
    m["spec"]["dataset"].update(source=str(data), format="jsonl")
    with pytest.raises(failures.DatasetUnreadable) as info:
        run(m, output_dir=str(tmp_path / "out"), progress=False)
    assert f"spec.dataset.source {data}" in str(info.value) and expected in str(info.value), str(info.value)
    assert info.value.exit_code == EXIT_DATASET_UNREADABLE


def test_permission_denied_names_the_fix():
    err = PermissionError(13, "Permission denied", "/data/train.jsonl")
    message = str(failures.dataset_unreadable(err, "dataset.source", "/data/train.jsonl", "j"))
    assert message.startswith("job j: spec.dataset.source /data/train.jsonl permission denied (the trainer runs as a "
                              "non-root user"), message
    assert "[Errno 13] Permission denied: '/data/train.jsonl'" in message


def test_a_corrupt_validation_source_is_named_as_such(manifest, tiny_data, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("not json\n")
    m = manifest(hyperparameters=HP)
    m["spec"]["dataset"] = {"source": tiny_data, "validationSource": str(val), "maxLength": 32}
    with pytest.raises(failures.DatasetUnreadable, match=f"spec.dataset.validationSource {val} is corrupt"):
        run(m, output_dir=str(tmp_path / "out"), progress=False)


def test_the_rank_that_declared_a_fatal_error_is_the_root_cause_not_the_earliest_peer():
    """A full disk on rank 0 ends its peer's barrier ("Connection closed by peer"); the peer's error file can be
    stamped before the agent notices rank 0's exit (seen in CI: the pod exited 143 and named rank 1, so the Job
    would be retried instead of failed). Without a declared fatal code the earliest failure stays the cause,
    a signal included (an OOM-killed rank's peers fail after it)."""
    from types import SimpleNamespace as Failure

    disk_full = Failure(exitcode=EXIT_DISK_FULL, timestamp=1002)
    peer = Failure(exitcode=-15, timestamp=1001)
    assert failures.root_failure({1: peer, 0: disk_full}) == (0, disk_full)
    oom_killed, collateral = Failure(exitcode=-9, timestamp=1000), Failure(exitcode=1, timestamp=1001)
    assert failures.root_failure({0: collateral, 1: oom_killed}) == (1, oom_killed)
    unreadable, world = Failure(exitcode=EXIT_DATASET_UNREADABLE, timestamp=5), Failure(exitcode=1, timestamp=4)
    assert failures.root_failure({3: world, 2: unreadable}) == (2, unreadable)
    # A rank's own crash and its peer's lost connection, both exit 1, the peer's error stamped first (seen under load).
    crash = Failure(exitcode=1, timestamp=1001, message={"message": "RuntimeError: fault injection: rank 1 fails"})
    lost = Failure(exitcode=1, timestamp=1000, message={"message": "RuntimeError: [../gloo/transport/tcp/pair.cc:553] "
                                                                  "Connection closed by peer [127.0.0.1]:7067"})
    assert failures.root_failure({0: lost, 1: crash}) == (1, crash)
    assert failures.lost_a_peer(lost) and not failures.lost_a_peer(crash)
