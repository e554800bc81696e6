"""The trainer keeps its metrics up until Prometheus has scraped the final values, and only if someone scrapes."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from finetune_trainer.metrics import TrainerMetrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _wait_for_ticks(m: TrainerMetrics, n: int) -> None:
    deadline = time.monotonic() + 5
    while len(m.scrapes.times) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(m.scrapes.times) == n


def test_nobody_scraping_means_no_wait():
    m = TrainerMetrics("j", "ns")
    m.serve(_free_port(), addr="127.0.0.1")
    start = time.monotonic()
    assert m.linger(30) is False and time.monotonic() - start < 1


def test_waits_for_the_next_scrape_then_returns():
    m = TrainerMetrics("j", "ns")
    port = _free_port()
    m.serve(port, addr="127.0.0.1")
    for _ in range(3):  # a scraper every 0.3 s
        _scrape(port)
        time.sleep(0.3)
    m.epoch.set(7)  # the final value, set just before the process would exit
    seen: list[str] = []
    scraper = threading.Timer(0.3, lambda: seen.append(_scrape(port)))
    scraper.start()
    assert m.linger(30) is True
    scraper.join(5)  # linger returns once the answer is written; the client may still be reading it
    assert 'finetune_trainer_epoch{finetune_job="j",namespace="ns"} 7.0' in seen[0]


def test_a_scraper_that_went_away_bounds_the_wait():
    m = TrainerMetrics("j", "ns")
    port = _free_port()
    m.serve(port, addr="127.0.0.1")
    _scrape(port)
    time.sleep(0.2)
    _scrape(port)
    _wait_for_ticks(m, 2)  # the server ticks after its write; the client may have read the answer first
    start = time.monotonic()
    assert m.linger(30) is False
    assert time.monotonic() - start < 5  # about two scrape intervals, not the 30 s maximum


def test_a_scrape_counts_only_once_its_answer_is_written(monkeypatch):
    """The clock ticks after the body went out, not when the registry was collected: the process exits as
    soon as linger() returns, and an answer still being produced would be lost with it."""
    m = TrainerMetrics("j", "ns")
    port = _free_port()
    m.serve(port, addr="127.0.0.1")
    original = m.registry.collect
    collected = threading.Event()

    def slow_collect():
        yield from original()
        collected.set()
        time.sleep(0.5)  # the answer is collected but not yet written

    monkeypatch.setattr(m.registry, "collect", slow_collect)
    scraper = threading.Thread(target=_scrape, args=(port,))
    scraper.start()
    assert collected.wait(5)
    assert not m.scrapes.times  # collected, not delivered: no tick yet
    scraper.join(5)
    # The client may have read the whole answer a moment before the server's close(): the tick follows the write.
    deadline = time.monotonic() + 5
    while not m.scrapes.times and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(m.scrapes.times) == 1


def test_a_scrape_that_began_before_the_final_values_does_not_count(monkeypatch):
    """A scrape collected before linger() was called, still being written when it starts, does not carry the
    final values: linger() must wait for the next one (here none comes, so it gives up)."""
    m = TrainerMetrics("j", "ns")
    port = _free_port()
    m.serve(port, addr="127.0.0.1")
    _scrape(port)
    original = m.registry.collect
    collected = threading.Event()

    def slow_collect():
        yield from original()
        collected.set()
        time.sleep(0.5)  # collected with the old values; written after linger() began

    monkeypatch.setattr(m.registry, "collect", slow_collect)
    scraper = threading.Thread(target=_scrape, args=(port,))
    scraper.start()
    assert collected.wait(5)
    m.epoch.set(7)  # the final value, after that scrape was collected
    assert m.linger(2) is False
    scraper.join(5)
