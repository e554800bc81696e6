"""The operator kill drill (issue 12): SIGKILL the real operator at seeded random moments while jobs move
through their lifecycle, then check that nothing was lost, duplicated or written out of order.

Used by `bench/kill_drill.py` (50 jobs) and `tests/e2e/test_kill_drill.py` (a small CI version). Pods run
the stand-in trainer (operator_fixture.FAKE_TRAINER) through the pod runner, so every job really goes
create -> Job -> pod -> status reports -> terminal phase; the drill itself plays the user (stop, resume,
delete) through the API. `Recorder` keeps every watch event of the FineTuneJobs, Jobs and pods, so the
checks see the whole status history, not only the end state.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.kube.client import KubeClient

from .operator_helpers import FTJ, children, create, ftj, get, patch

# The lifecycle each job is given (job i gets SCENARIOS[i % len]) and the end it must reach.
SCENARIOS = ("run", "early-stop", "user-stop", "suspend-resume", "delete")
EXPECTED = {  # scenario -> (phase, reason); None: the FineTuneJob and its children are gone
    "run": ("Succeeded", "TrainingCompleted"),
    "early-stop": ("Succeeded", "EarlyStopped"),
    "user-stop": ("Succeeded", "StoppedByUser"),
    "suspend-resume": ("Succeeded", "TrainingCompleted"),
    "delete": None,
}
# Phase order: a phase may stay or move right, never left. Pending and Suspended share a rank (a job
# created suspended is Suspended first; a resumed one may be Pending until its pod runs).
RANK = {"Pending": 0, "Suspended": 0, "Running": 1, "Succeeded": 2, "Failed": 2}
TERMINAL = {"Succeeded", "Failed"}


def manifest(name: str, scenario: str, fake_env: Any) -> dict[str, Any]:
    def env(mode: str, losses: str, epoch_seconds: float) -> dict[str, str]:
        # 50 pods asking 10 times a second whether to stop would be most of the API's load: twice a second.
        return {**fake_env(mode, losses, epoch_seconds), "FAKE_POLL_SECONDS": "0.5"}

    if scenario == "run":
        return ftj(name, env=env("obey", "0.5,0.4,0.3", 0.3), hyperparameters={"epochs": 3, "batchSize": 8})
    if scenario == "early-stop":
        # Long enough (60 s) that the operator, even restarting on a loaded machine, decides the stop before the
        # 40 epochs are done: this stand-in trainer, unlike the real one, does not apply the patience rule
        # itself (at 0.75 s per epoch, with restarts taking ~30 s at load 21, one of 50 ran to the end).
        return ftj(name, env=env("obey", "0.5,0.4,0.45,0.47" + ",0.5" * 36, 1.5),
                   hyperparameters={"epochs": 40, "batchSize": 8}, earlyStopping={"patience": 2})
    if scenario == "suspend-resume":
        return ftj(name, suspend=True, env=env("obey", "0.5,0.4", 0.3), hyperparameters={"epochs": 2, "batchSize": 8})
    # user-stop and delete: long runs that only the drill ends
    return ftj(name, env=env("obey", ",".join(["0.5"] * 40), 0.5), hyperparameters={"epochs": 40, "batchSize": 8},
               earlyStopping={"enabled": False})


class Recorder:
    """Every watch event of a few collections, in order, across dropped connections and 410 Gone."""

    def __init__(self, kubeconfig: Path, paths: dict[str, str]):
        config = yaml.safe_load(Path(kubeconfig).read_text())
        self.server = config["clusters"][0]["cluster"]["server"].rstrip("/")
        self.token = config["users"][0]["user"].get("token", "")
        self.events: dict[str, list[tuple[str, dict[str, Any]]]] = {k: [] for k in paths}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(k, p), daemon=True, name=f"record-{k}")
                         for k, p in paths.items()]
        self._ready = {k: threading.Event() for k in paths}

    def start(self) -> Recorder:
        for t in self._threads:
            t.start()
        for e in self._ready.values():
            e.wait(30)
        return self

    def stop(self) -> None:
        self._stop.set()

    def _open(self, path: str, query: str) -> Any:
        req = urllib.request.Request(f"{self.server}{path}?{query}", headers={"Authorization": f"Bearer {self.token}"})
        return urllib.request.urlopen(req, timeout=30)

    def _loop(self, key: str, path: str) -> None:
        rv = ""
        while not self._stop.is_set():
            try:
                if not rv:  # (re-)list: what exists now counts as an event of its own
                    with self._open(path, "") as r:
                        listed = json.loads(r.read())
                    for obj in listed.get("items") or []:
                        self.events[key].append(("LISTED", obj))
                    rv = listed["metadata"]["resourceVersion"]
                    self._ready[key].set()
                with self._open(path, f"watch=true&allowWatchBookmarks=true&timeoutSeconds=20&resourceVersion={rv}") as r:
                    for line in r:
                        if self._stop.is_set():
                            return
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            rv = ""  # 410 Gone: re-list
                            break
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        if event.get("type") != "BOOKMARK":
                            self.events[key].append((event["type"], obj))
            except (OSError, urllib.error.URLError, ValueError):
                time.sleep(0.2)  # the API server is restarting, or the stream broke: resume


def history_violations(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Status history of FineTuneJobs from the watch: phases never go back, terminal phases never change,
    no observedGeneration (the status's or a condition's) exceeds the object's generation."""
    problems: list[str] = []
    last: dict[str, str] = {}
    for type_, obj in events:
        meta = obj.get("metadata") or {}
        name, generation = meta.get("name", "?"), meta.get("generation") or 0
        st = obj.get("status") or {}
        if type_ == "DELETED":
            continue
        if (st.get("observedGeneration") or 0) > generation:
            problems.append(f"{name}: status.observedGeneration {st['observedGeneration']} > generation {generation}")
        for cond in st.get("conditions") or []:
            if (cond.get("observedGeneration") or 0) > generation:
                problems.append(f"{name}: condition {cond.get('type')} observedGeneration "
                                f"{cond['observedGeneration']} > generation {generation}")
        phase = st.get("phase")
        if not phase:
            continue
        before = last.get(name)
        if before in TERMINAL and phase != before:
            problems.append(f"{name}: {before} -> {phase} (a terminal phase changed)")
        elif before is not None and RANK.get(phase, 0) < RANK.get(before, 0):
            problems.append(f"{name}: {before} -> {phase} (phase went backwards)")
        last[name] = phase
    return problems


def pod_violations(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Two live (not finished, not terminating) pods for one job index at the same moment."""
    live: dict[tuple[str, str], set[str]] = defaultdict(set)
    problems: list[str] = []
    for type_, pod in events:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        slot = (labels.get("job-name", "?"), (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index", "0"))
        finished = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") or meta.get("deletionTimestamp")
        if type_ == "DELETED" or finished:
            live[slot].discard(meta["name"])
        else:
            live[slot].add(meta["name"])
            if len(live[slot]) > 1:
                problems.append(f"{slot[0]} index {slot[1]}: pods {sorted(live[slot])} live at once")
    return problems


def job_violations(jobs: list[tuple[str, dict[str, Any]]], pods: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Two batch Jobs of one FineTuneJob at the same moment, or more than one that ever ran a pod. (One Job
    replaced by another before any pod started is the operator's re-creation of a never-started Job with a
    new template, e.g. on resume: not a duplicate.)"""
    problems: list[str] = []
    live: dict[str, set[str]] = defaultdict(set)
    for type_, job in jobs:
        meta = job.get("metadata") or {}
        owner = (meta.get("labels") or {}).get("finetune.dev/job-name")
        if not owner:
            continue
        if type_ == "DELETED":
            live[owner].discard(meta["uid"])
        else:
            live[owner].add(meta["uid"])
            if len(live[owner]) > 1:
                problems.append(f"{owner}: {len(live[owner])} Jobs at once")
    ran: dict[str, set[str]] = defaultdict(set)
    for _, pod in pods:
        meta = pod.get("metadata") or {}
        owner = (meta.get("labels") or {}).get("finetune.dev/job-name")
        for ref in meta.get("ownerReferences") or []:
            if ref.get("kind") == "Job" and owner:
                ran[owner].add(ref["uid"])
    problems += [f"{n}: pods of {len(u)} different Jobs" for n, u in sorted(ran.items()) if len(u) > 1]
    return problems


@dataclass
class DrillResult:
    jobs: int
    kills: int
    seconds: float
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    wrong_end: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)
    kill_times: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong_end or self.history)

    def report(self) -> str:
        lines = [f"jobs: {self.jobs}", f"kills: {self.kills} (at {', '.join(f'{t:.1f}' for t in self.kill_times)} s)",
                 f"drill time: {self.seconds:.1f} s"]
        for title, items in (("wrong end state", self.wrong_end), ("status history", self.history)):
            lines += [f"{title}: {len(items)}"] + [f"  {x}" for x in items[:20]]
        lines += [f"lost: {len(self.lost)}"] + [f"  {x}" for x in self.lost[:20]]
        lines += [f"duplicated: {len(self.duplicated)}"] + [f"  {x}" for x in self.duplicated[:20]]
        lines.append(f"jobs lost or duplicated: {len(set(self.lost) | set(self.duplicated))}")
        return "\n".join(lines)


def run_drill(client: KubeClient, kubeconfig: Path, namespace: str, operator: Any, env: Any, *, jobs: int,
              max_kills: int, seed: int, kill_gap: tuple[float, float] = (1.0, 4.0), timeout: float = 300.0,
              log: Any = print) -> DrillResult:
    """Create `jobs` FineTuneJobs, play the user, SIGKILL + restart `operator` up to `max_kills` times at
    seeded random moments while any job is unfinished, wait for every job's end, then check."""
    rng = random.Random(seed)
    ftjs = FTJ.format(ns=namespace)
    recorder = Recorder(kubeconfig, {"ftj": ftjs, "jobs": f"/apis/batch/v1/namespaces/{namespace}/jobs",
                                     "pods": f"/api/v1/namespaces/{namespace}/pods"}).start()
    names = {f"drill-{i:03d}": SCENARIOS[i % len(SCENARIOS)] for i in range(jobs)}
    resume_at = {n: rng.uniform(0.5, 3.0) for n, s in names.items() if s == "suspend-resume"}
    delete_at = {n: rng.uniform(2.0, 10.0) for n, s in names.items() if s == "delete"}
    started = time.monotonic()
    result = DrillResult(jobs=jobs, kills=0, seconds=0.0)
    done: set[str] = set()
    acted: set[str] = set()
    stop_driving = threading.Event()

    def drive() -> None:
        """The user: stop, resume and delete jobs when they reach the point their scenario names."""
        while not stop_driving.is_set():
            for name, scenario in names.items():
                if name in done:
                    continue
                try:
                    act(name, scenario)
                except Exception as err:  # noqa: BLE001 - a transient API error: next round
                    log(f"drill user: {name}: {err!r}")
            time.sleep(0.2)

    def act(name: str, scenario: str) -> None:
        obj = get(client, namespace, name)
        st = obj.get("status") or {}
        if scenario == "delete":
            if not obj:
                done.add(name)
            elif name not in acted and time.monotonic() - started > delete_at[name]:
                client.request("DELETE", f"{ftjs}/{name}")
                acted.add(name)
            return
        if st.get("phase") in TERMINAL:
            done.add(name)
        elif scenario == "user-stop" and (st.get("epoch") or 0) >= 1 and name not in acted:
            patch(client, namespace, name, {"spec": {"stop": True}})
            acted.add(name)
        elif (scenario == "suspend-resume" and st.get("phase") == "Suspended" and name not in acted
              and time.monotonic() - started > resume_at[name]):
            patch(client, namespace, name, {"spec": {"suspend": False}})
            acted.add(name)

    for name, scenario in names.items():
        create(client, namespace, manifest(name, scenario, env))
    driver = threading.Thread(target=drive, daemon=True, name="drill-user")
    driver.start()
    deadline = started + timeout
    next_kill = started + rng.uniform(*kill_gap)
    while len(done) < len(names) and time.monotonic() < deadline:
        if result.kills < max_kills and time.monotonic() >= next_kill:
            operator.kill()
            result.kills += 1
            result.kill_times.append(time.monotonic() - started)
            log(f"kill {result.kills} at {result.kill_times[-1]:.1f} s, {len(done)}/{len(names)} jobs done")
            time.sleep(rng.uniform(0.0, 1.0))  # down for a moment, like a pod being rescheduled
            operator.start(timeout=120)
            next_kill = time.monotonic() + rng.uniform(*kill_gap)
        time.sleep(0.1)
    stop_driving.set()
    driver.join(5)
    result.seconds = time.monotonic() - started
    time.sleep(1.0)  # the last watch events
    recorder.stop()

    for name, scenario in names.items():
        obj = get(client, namespace, name)
        kids = children(client, namespace, name)
        want = EXPECTED[scenario]
        if want is None:
            if obj or any(kids.values()):
                result.wrong_end.append(f"{name} ({scenario}): {'still there' if obj else 'deleted'}, children left "
                                        f"{ {k: len(v) for k, v in kids.items() if v} }")
            continue
        if not obj:
            result.lost.append(f"{name} ({scenario}): the FineTuneJob is gone")
            continue
        st = obj.get("status") or {}
        if (st.get("phase"), st.get("reason")) != want:
            result.wrong_end.append(f"{name} ({scenario}): {st.get('phase')}/{st.get('reason')}, expected {want[0]}/{want[1]}")
        for kind, objs in kids.items():
            if len(objs) != 1:
                (result.lost if not objs else result.duplicated).append(f"{name}: {len(objs)} {kind}")
    result.duplicated += job_violations(recorder.events["jobs"], recorder.events["pods"])
    result.duplicated += pod_violations(recorder.events["pods"])
    result.history = history_violations(recorder.events["ftj"])
    return result
