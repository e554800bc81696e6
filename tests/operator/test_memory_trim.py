"""The operator returns freed memory to the OS every interval in which passes ran, and does nothing otherwise."""

from __future__ import annotations

from finetune_operator.memory import MemoryTrimmer, _malloc_trim


def test_trims_once_per_interval_with_work_and_never_without():
    passes = [0]
    calls = []
    t = MemoryTrimmer(lambda: passes[0], trim=lambda: calls.append(1) or 1)
    passes[0] = 5
    assert t.check() is True and calls == [1]
    assert t.check() is False  # no pass since: nothing to give back
    passes[0] = 6  # running jobs' watchdog passes: still worth a trim each interval
    assert t.check() is True and len(calls) == 2 and t.trims == 2


def test_glibc_trim_is_found_and_runs():
    # The CI and the trainer image are glibc: a missing symbol here would silently disable the trim.
    trim = _malloc_trim()
    assert trim is not None
    assert trim() in (0, 1)


def test_without_malloc_trim_it_stays_off():
    t = MemoryTrimmer(lambda: 1, trim=None)
    t.trim = None
    assert t.check() is False
