"""The operator's Prometheus metrics (names per docs/contracts.md); one module, low-cardinality labels."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .api.constants import Phase

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "finetune_operator_reconciles", "Reconcile passes by result (ok, changed, invalid, error).", ["result"], registry=REGISTRY
)
RECONCILE_DURATION = Histogram(
    "finetune_operator_reconcile_duration_seconds",
    "Wall time of one reconcile pass, API calls included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
JOBS = Gauge("finetune_operator_jobs", "FineTuneJobs this operator knows, by phase.", ["phase"], registry=REGISTRY)
EARLY_STOPS = Counter(
    "finetune_operator_early_stops", "Stop requests recorded, by reason (PatienceExhausted, UserRequested, ...).",
    ["reason"], registry=REGISTRY,
)
STALLED = Counter("finetune_operator_stalled_jobs", "Jobs failed by the stall watchdog.", registry=REGISTRY)
GROUP_RESTARTS = Counter(
    "finetune_operator_group_restarts",
    "Group restarts of multi-node jobs (a training pod failed or was disrupted and every rank resumed from the last "
    "checkpoint), by cause: OOMKilled, Disrupted (not charged to backoffLimit), Evicted, Error.",
    ["reason"], registry=REGISTRY,
)
ENFORCED = Counter(
    "finetune_operator_stops_enforced", "Stops the operator enforced by suspending a Job after the grace period.",
    registry=REGISTRY,
)
POD_START = Histogram(
    "finetune_operator_pod_start_seconds",
    "FineTuneJob created to its first trainer container running (children, scheduling, image pull, container start).",
    buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)

API_THROTTLED_CALLS = Counter(
    "finetune_operator_api_client_throttled_calls",
    "API calls that waited for the operator's own client-side rate limit (FTO_API_QPS/FTO_API_BURST).",
    registry=REGISTRY,
)
API_THROTTLED_SECONDS = Counter(
    "finetune_operator_api_client_throttled_seconds",
    "Seconds API calls waited for the operator's own client-side rate limit, summed over calls.",
    registry=REGISTRY,
)


class PhaseTracker:
    """Keeps `finetune_operator_jobs{phase}` equal to the phases last written, per job."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        self._counts: dict[str, int] = dict.fromkeys(Phase.ALL, 0)
        self._lock = threading.Lock()
        for phase in Phase.ALL:
            JOBS.labels(phase=phase).set(0)

    def set(self, key: tuple[str, str], phase: str | None) -> None:
        # Counted incrementally: every pass calls this, and recounting all jobs made a pass O(jobs).
        with self._lock:
            old = self._phases.pop(key, None) if phase is None else self._phases.get(key)
            if old == phase:
                return
            if phase is not None:
                self._phases[key] = phase
                self._counts[phase] = self._counts.get(phase, 0) + 1
                JOBS.labels(phase=phase).set(self._counts[phase])
            if old is not None:
                self._counts[old] -= 1
                JOBS.labels(phase=old).set(self._counts[old])


PHASES = PhaseTracker()


def serve(port: int) -> None:
    if port:
        start_http_server(port, registry=REGISTRY)


# -- FineTuneSweeps (issue 14) ------------------------------------------------------------------------------

SWEEP_TRIAL_STATES = ("Pending", "Running", "Succeeded", "Pruned", "Failed")
SWEEP_TRIALS_GAUGE = Gauge(
    "finetune_operator_sweep_trials", "Trials of all FineTuneSweeps this operator knows, by state "
    "(Pending, Running, Succeeded, Pruned, Failed).", ["state"], registry=REGISTRY,
)


class SweepTrialTracker:
    """Keeps `finetune_operator_sweep_trials{state}` equal to the trial states last planned, per sweep."""

    def __init__(self) -> None:
        self._trials: dict[tuple[str, str], list[str]] = {}
        self._lock = threading.Lock()
        for state in SWEEP_TRIAL_STATES:
            SWEEP_TRIALS_GAUGE.labels(state=state).set(0)

    def set(self, key: tuple[str, str], trials: list[dict] | None) -> None:
        with self._lock:
            if trials is None:
                self._trials.pop(key, None)
            else:
                self._trials[key] = [str(t.get("state")) for t in trials]
            counts = dict.fromkeys(SWEEP_TRIAL_STATES, 0)
            for states in self._trials.values():
                for st in states:
                    counts[st] = counts.get(st, 0) + 1
            for st, n in counts.items():
                SWEEP_TRIALS_GAUGE.labels(state=st).set(n)


SWEEP_TRIALS = SweepTrialTracker()
