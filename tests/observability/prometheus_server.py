"""A real Prometheus (Debian's binary) on 127.0.0.1 for tests: scrape given targets, query back."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """`targets`: scrape job -> fixed addresses. `discovered`: scrape jobs whose targets the test sets later
    with `set_targets` (file-based service discovery: Prometheus re-reads the file when it changes, the way
    it follows pods coming and going in a cluster)."""

    def __init__(self, workdir: Path, targets: dict[str, list[str]] | None = None, interval: str = "1s",
                 discovered: tuple[str, ...] = ()):
        self.binary = shutil.which("prometheus")
        if self.binary is None:
            raise RuntimeError("prometheus is not installed: run scripts/setup.sh (Debian package 'prometheus')")
        self.workdir = workdir
        self.port = free_port()
        self.sd_dir = workdir / "sd"
        self.sd_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {"job_name": name, "static_configs": [{"targets": addrs}]} for name, addrs in (targets or {}).items()
            ] + [
                {"job_name": name, "file_sd_configs": [{"files": [str(self.sd_dir / f"{name}.json")], "refresh_interval": "1s"}]}
                for name in discovered
            ],
        }
        for name in discovered:
            self.set_targets(name, [])
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def set_targets(self, job: str, addrs: list[str], labels: dict[str, str] | None = None) -> None:
        """Replace the targets of a `discovered` scrape job (written atomically: Prometheus never reads half a file)."""
        path = self.sd_dir / f"{job}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": addrs, "labels": labels or {}}] if addrs else []))
        tmp.replace(path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"prometheus did not become ready: {(self.workdir / 'prometheus.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def query(self, promql: str) -> list[dict]:
        q = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def query_range(self, promql: str, seconds: float, step: str = "1s", end: float | None = None) -> list[dict]:
        end = time.time() if end is None else end
        q = urllib.parse.urlencode({"query": promql, "start": end - seconds, "end": end, "step": step})
        with urllib.request.urlopen(f"{self.url}/api/v1/query_range?{q}", timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, predicate=lambda result: bool(result), timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.5)
        raise AssertionError(f"{promql}: condition not met within {timeout}s; last result {result}")

    def targets_up(self) -> dict[str, str]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as r:
            body = json.load(r)
        return {t["scrapeUrl"]: t["health"] for t in body["data"]["activeTargets"]}
