"""How long each stage from process start to the first optimizer step took (issue 13: apply-to-first-step time).

Stages, each measured from the end of the previous one: `setup` (process start to the data stage: interpreter,
imports, the process group), `data` (read, split and tokenise, or read the tokenised cache), `modelLoad` (the
weights into memory), `firstStep` (optimizer, batch plan, resume, and the first optimizer step itself). The
operator adds `podStartSeconds` (FineTuneJob created to the trainer container running) to the same status object.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

START_ENV = "FINETUNE_PROCESS_START_TIME"  # the container process's start (Unix time), passed to torchrun workers


def process_start_time(pid: str = "self") -> float | None:
    """When this process started (Unix time), from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class StageClock:
    """Marks stage ends on the wall clock (the stages are seconds to minutes long; wall time is what users wait)."""

    def __init__(self, start: float):
        self.start = start
        self._last = start
        self._stages: dict[str, float] = {}
        self.first_step_time: str | None = None

    @classmethod
    def from_env(cls) -> StageClock:
        env = os.environ.get(START_ENV)
        start = float(env) if env else process_start_time()
        now = time.time()
        # A start in the future or hours back (a clock step, a reused pid namespace) says nothing: start now.
        return cls(start if start is not None and 0 <= now - start < 3600 else now)

    def mark(self, stage: str) -> float:
        now = time.time()
        self._stages[stage] = max(0.0, now - self._last)
        self._last = now
        if stage == "firstStep":
            self.first_step_time = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return self._stages[stage]

    def has(self, stage: str) -> bool:
        return stage in self._stages

    def seconds(self) -> dict[str, float]:
        return dict(self._stages)

    def status(self) -> dict[str, float | str]:
        """status.timings' trainer-owned fields: `<stage>Seconds`, and `firstStepTime` once the first step is done."""
        out: dict[str, float | str] = {f"{k}Seconds": round(v, 3) for k, v in self._stages.items()}
        if self.first_step_time:
            out["firstStepTime"] = self.first_step_time
        return out
