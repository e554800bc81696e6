"""A test fixture that plays the Job controller and the kubelet for batch/v1 Jobs, through the HTTP API only.

Nothing executes pods in the API emulation (nor in a bare kube-apiserver), so this runner does it:
it watches Jobs, creates their Pods (ownerReferences to the Job, Indexed naming/labels/annotations,
hostname + subdomain), runs every container's command+args as a local process with the pod's
environment, and writes Pod and Job status back, as the real controllers do (Kubernetes 1.31+ conditions).
It only speaks the Kubernetes HTTP API (`kubeconfig.AsyncKube`), so the same tests run against a real
API server that has no controller-manager or nodes of its own.

How a pod is emulated on one machine (documented deviations from a real kubelet):
- mounts: each volume becomes a local directory (configMap/secret: a temp dir with the keys as files;
  emptyDir: a temp dir; persistentVolumeClaim: `<workdir>/pvc/<namespace>/<claim>`, kept across pods so
  data survives restarts; hostPath: the path itself). Processes cannot see a container's mount paths,
  so every occurrence of a mount path in env values, command, args and workingDir is rewritten to the
  local directory (longest mount path first);
- networking: all pods share 127.0.0.1. Pod DNS names `<job>-<index>.<subdomain>[.<ns>[.svc[.cluster.local]]]`
  in env values and args become 127.0.0.1; `MASTER_PORT` gets one free local port per Job and
  `FINETUNE_METRICS_PORT` one per pod (recorded in the pod annotation `e2e.finetune.dev/metrics-port`),
  so several "pods" can listen at once;
- the process inherits the test process's environment (PATH gets this interpreter's bin directory first,
  so `python` and console scripts of the venv resolve), then the pod's env on top, plus KUBECONFIG
  pointing at the same API and HOSTNAME;
- re-creation after a pod failure waits `backoff_seconds` (default 0; the real controller waits 10 s
  doubling to 6 min, far too slow for tests);
- a Job deleted through the API also stops its pods (a real cluster would orphan them when no
  propagationPolicy is given): the runner never leaves processes behind;
- OOMKilled: `oom_kill(pod)` ends a pod as the kernel's OOM killer would (SIGKILL, reason OOMKilled);
  memory limits themselves are not enforced;
- disruptions: `disrupt(pod)` gives the pod the DisruptionTarget condition the control plane adds on preemption,
  eviction or node loss, then kills it;
- podFailurePolicy (Job controller): a failed pod is matched against the rules in order (exit codes of its
  terminated containers, its conditions): FailJob fails the Job (reason PodFailurePolicy, the controller's
  message), Ignore replaces the pod without counting it towards backoffLimit (nor in status.failed), Count and
  no match count it; replacements start only after the pod finished (podReplacementPolicy Failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from .kubeconfig import AsyncKube, KubeApiError

logger = logging.getLogger("e2e.pod_runner")

JsonObj = dict[str, Any]
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
METRICS_PORT_ANNOTATION = "e2e.finetune.dev/metrics-port"
RUNNER_LABEL = "e2e.finetune.dev/runner"
NODE_NAME = "e2e-node"
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it. A container's processes all die with it, but torch elastic starts each
    worker in a session of its own (subprocess_handler: start_new_session), so signalling the pod's process group
    alone leaves the workers of a "killed" pod training on."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """`sig` to the process group of `pid` and to every process below it (what ending a container does)."""
    tree = process_tree(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for member in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, sig)


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined variables are substituted, `$$` escapes, others stay."""
    return _VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


@dataclasses.dataclass
class PodRun:
    """One pod the runner created and executes."""

    namespace: str
    name: str
    job: str
    index: int | None
    log_path: Path
    metrics_port: int
    grace_seconds: int
    processes: list[asyncio.subprocess.Process] = dataclasses.field(default_factory=list)
    phase: str = "Pending"
    exit_code: int | None = None
    reason: str = ""
    deleting: bool = False  # the pod object is being deleted (or gone)
    stopped_by_runner: bool = False  # suspend/job end: not counted as a failure
    forced_reason: str | None = None  # fail_pod/oom_kill: the reason to report
    disruption: JsonObj | None = None  # disrupt(): the DisruptionTarget condition the pod ends with
    gone: bool = False  # the Pod object no longer exists
    task: asyncio.Task[None] | None = None
    scratch: Path | None = None


@dataclasses.dataclass
class JobRun:
    namespace: str
    name: str
    uid: str
    body: JsonObj
    master_port: int
    pods: dict[str, PodRun] = dataclasses.field(default_factory=dict)
    failed: int = 0
    succeeded: int = 0
    succeeded_indexes: set[int] = dataclasses.field(default_factory=set)
    finished: bool = False
    deleted: bool = False
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    timer: asyncio.TimerHandle | None = None
    next_create_at: float = 0.0
    fail_job: tuple[str, str] | None = None  # a podFailurePolicy FailJob rule matched: (reason, message)
    ignored_failures: int = 0  # failed pods a podFailurePolicy Ignore rule kept off the failure count


class PodRunner:
    """Plays the Job controller + kubelet for Jobs in `namespace` (None: all) matching `label_selector`.

    Thread-safe façade: the runner lives on its own event loop in a background thread; the knobs
    (`fail_pod`, `kill`, `oom_kill`, `logs`, ...) may be called from test code.
    """

    def __init__(self, kubeconfig: Path, workdir: Path, *, namespace: str | None = None,
                 label_selector: str | None = None, backoff_seconds: float = 0.0) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.workdir = Path(workdir)
        self.namespace = namespace
        self.label_selector = label_selector
        self.backoff_seconds = backoff_seconds
        self.runner_id = os.urandom(4).hex()
        self.jobs: dict[tuple[str, str], JobRun] = {}
        self.pods: dict[tuple[str, str], PodRun] = {}
        self.errors: list[str] = []  # runner failures, shown in test failure messages
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pod-runner", daemon=True)
        self._kube: AsyncKube | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> PodRunner:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        self._call(self._start())
        self._started = True
        return self

    def stop(self) -> None:
        """Kill every process (SIGTERM, then SIGKILL), stop watching. Idempotent."""
        if not self._started:
            return
        self._started = False
        try:
            self._call(self._stop(), timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            # Last resort: whatever survived (a process group that ignored SIGTERM) is killed.
            for pod in self.pods.values():
                for proc in pod.processes:
                    kill_tree(proc.pid)

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self._kube = AsyncKube(self.kubeconfig)
        ns_path = f"/namespaces/{self.namespace}" if self.namespace else ""
        job_params = {"labelSelector": self.label_selector} if self.label_selector else {}
        ready_jobs, ready_pods = asyncio.Event(), asyncio.Event()
        self._tasks.append(asyncio.create_task(self._watch_loop(
            f"/apis/batch/v1{ns_path}/jobs", job_params, self._on_job, ready_jobs)))
        self._tasks.append(asyncio.create_task(self._watch_loop(
            f"/api/v1{ns_path}/pods", {"labelSelector": f"{RUNNER_LABEL}={self.runner_id}"}, self._on_pod,
            ready_pods)))
        await asyncio.wait_for(asyncio.gather(ready_jobs.wait(), ready_pods.wait()), 30)

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for job in self.jobs.values():
            if job.timer:
                job.timer.cancel()
        await asyncio.gather(*(self._terminate(pod, grace=2) for pod in self.pods.values()),
                             return_exceptions=True)
        for pod in self.pods.values():
            if pod.task:
                pod.task.cancel()
        if self._kube:
            await self._kube.close()

    async def _watch_loop(self, path: str, params: dict[str, str], handler: Callable[[str, JsonObj], None],
                          ready: asyncio.Event) -> None:
        assert self._kube is not None
        while True:
            try:
                listing = await self._kube.request("GET", path, params=params)
                assert listing is not None
                for item in listing.get("items", []):
                    handler("ADDED", item)
                ready.set()
                params2 = dict(params)
                async for type_, obj in self._kube.watch_from(path, params2, listing["metadata"]["resourceVersion"]):
                    handler(type_, obj)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep watching; show the failure in test messages
                self._error(f"watch {path} failed: {exc!r}")
                await asyncio.sleep(0.5)

    def _error(self, text: str) -> None:
        logger.error("pod runner error: %s", text)
        self.errors.append(text)

    # -- Jobs ----------------------------------------------------------------------------------------------

    def _on_job(self, type_: str, job: JsonObj) -> None:
        meta = job["metadata"]
        key = (meta["namespace"], meta["name"])
        run = self.jobs.get(key)
        if run is not None and run.uid != meta["uid"]:  # a new Job with the old name
            run.deleted = True
            self._spawn(self._stop_job_pods(run, delete=True))
            run = None
        if type_ == "DELETED":
            if run is not None:
                run.deleted = True
                logger.info("job deleted job=%s/%s; stopping its pods", *key)
                self._spawn(self._stop_job_pods(run, delete=True))
                del self.jobs[key]
            return
        if run is None:
            run = JobRun(meta["namespace"], meta["name"], meta["uid"], job, master_port=free_port())
            self.jobs[key] = run
            for cond in (job.get("status") or {}).get("conditions") or []:
                if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
                    run.finished = True  # finished before we started: leave it alone
        run.body = job
        self._kick(run)

    def _kick(self, run: JobRun) -> None:
        self._spawn(self._reconcile(run))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, KubeApiError) and exc.status == 404:
                return  # the object went away meanwhile: the next event reconciles again
            self._error(f"task failed: {exc!r}")

    async def _reconcile(self, run: JobRun) -> None:
        async with run.lock:
            if run.deleted or run.finished:
                return
            await self._reconcile_locked(run)

    async def _reconcile_locked(self, run: JobRun) -> None:
        spec = run.body.get("spec") or {}
        status = dict(run.body.get("status") or {})
        conditions = [dict(c) for c in status.get("conditions") or []]
        loop = asyncio.get_running_loop()
        live = [p for p in run.pods.values() if p.phase in ("Pending", "Running") and not p.gone]

        if spec.get("suspend"):
            for pod in live:
                pod.stopped_by_runner = True
                self._spawn(self._terminate_and_delete(pod))
            _set_condition(conditions, "Suspended", "True", "JobSuspended", "Job suspended")
            await self._write_job_status(run, status, conditions, active=0, start_time=None, keep_start=False)
            return
        if any(c["type"] == "Suspended" and c["status"] == "True" for c in conditions):
            _set_condition(conditions, "Suspended", "False", "JobResumed", "Job resumed")

        start_time = status.get("startTime") or _now()
        indexed = spec.get("completionMode") == "Indexed"
        completions = spec.get("completions")
        parallelism = spec.get("parallelism", 1)
        backoff_limit = spec.get("backoffLimit", 6)

        # Terminal decisions first: success criteria, failure budget, deadline.
        done = (len(run.succeeded_indexes) >= completions) if indexed else (
            completions is not None and run.succeeded >= completions or
            completions is None and run.succeeded > 0 and not live)
        failure: tuple[str, str] | None = None
        if not done and run.fail_job is not None:
            failure = run.fail_job
        elif not done and run.failed > backoff_limit:
            failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        deadline = spec.get("activeDeadlineSeconds")
        if not done and failure is None and deadline is not None:
            started = datetime.datetime.strptime(start_time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
            remaining = deadline - (datetime.datetime.now(datetime.UTC) - started).total_seconds()
            if remaining <= 0:
                failure = ("DeadlineExceeded", "Job was active longer than specified deadline")
            elif run.timer is None:
                run.timer = loop.call_later(remaining + 0.05, self._kick, run)

        if done or failure:
            for pod in live:
                pod.stopped_by_runner = True
                await self._terminate_and_delete(pod)
            if done:
                _set_condition(conditions, "SuccessCriteriaMet", "True", "CompletionsReached",
                               "Reached expected number of succeeded pods")
                _set_condition(conditions, "Complete", "True", "CompletionsReached",
                               "Reached expected number of succeeded pods")
            else:
                assert failure is not None
                _set_condition(conditions, "FailureTarget", "True", *failure)
                _set_condition(conditions, "Failed", "True", *failure)
            run.finished = True
            if run.timer:
                run.timer.cancel()
            await self._write_job_status(run, status, conditions, active=0, start_time=start_time,
                                         completion_time=_now() if done else None)
            logger.info("job finished job=%s/%s outcome=%s", run.namespace, run.name,
                        "Complete" if done else failure[0])  # type: ignore[index]
            ttl = spec.get("ttlSecondsAfterFinished")
            if ttl is not None:  # the TTL-after-finished controller
                loop.call_later(ttl, self._spawn_delete_job, run)
            return

        # Create the missing pods, within parallelism (and after the failure back-off).
        if loop.time() < run.next_create_at:
            loop.call_later(run.next_create_at - loop.time(), self._kick, run)
        else:
            if indexed:
                busy = {p.index for p in live} | run.succeeded_indexes
                wanted = [i for i in range(completions) if i not in busy][: max(0, parallelism - len(live))]
            else:
                remaining = (completions - run.succeeded if completions is not None else parallelism) - len(live)
                wanted = [None] * max(0, min(parallelism - len(live), remaining))
            for index in wanted:
                pod = await self._create_pod(run, index)
                live.append(pod)
        await self._write_job_status(run, status, conditions, active=len(live), start_time=start_time)

    def _spawn_delete_job(self, run: JobRun) -> None:
        assert self._kube is not None
        self._spawn(self._kube.request("DELETE", f"/apis/batch/v1/namespaces/{run.namespace}/jobs/{run.name}",
                                       body={"propagationPolicy": "Background"}, ok_missing=True))

    async def _write_job_status(self, run: JobRun, old: JsonObj, conditions: list[JsonObj], *, active: int,
                                start_time: str | None, keep_start: bool = True,
                                completion_time: str | None = None) -> None:
        assert self._kube is not None
        indexed = (run.body.get("spec") or {}).get("completionMode") == "Indexed"
        live = [p for p in run.pods.values() if p.phase in ("Pending", "Running") and not p.gone]
        new: JsonObj = {
            "active": active or None,
            "ready": sum(1 for p in live if p.phase == "Running") if active else 0,
            "succeeded": run.succeeded or None,
            "failed": run.failed or None,
            "terminating": 0,
            "startTime": start_time if (start_time or not keep_start) else old.get("startTime"),
            "conditions": conditions or None,
        }
        if indexed:
            new["completedIndexes"] = _format_indexes(run.succeeded_indexes) or None
        if completion_time:
            new["completionTime"] = completion_time
        patch = {k: v for k, v in new.items() if old.get(k) != v}
        if not patch:
            return
        result = await self._kube.request(
            "PATCH", f"/apis/batch/v1/namespaces/{run.namespace}/jobs/{run.name}/status",
            body={"status": patch}, content_type="application/merge-patch+json", ok_missing=True)
        if result is not None:
            run.body = result

    async def _stop_job_pods(self, run: JobRun, delete: bool) -> None:
        for pod in list(run.pods.values()):
            pod.stopped_by_runner = True
            if delete:
                await self._terminate_and_delete(pod)
            else:
                await self._terminate(pod)

    # -- Pods ----------------------------------------------------------------------------------------------

    async def _create_pod(self, run: JobRun, index: int | None) -> PodRun:
        assert self._kube is not None
        job = run.body
        template = json.loads(json.dumps((job.get("spec") or {}).get("template") or {}))
        meta = template.setdefault("metadata", {})
        spec = template.setdefault("spec", {})
        labels = meta.setdefault("labels", {})
        annotations = meta.setdefault("annotations", {})
        labels[RUNNER_LABEL] = self.runner_id
        metrics_port = free_port()
        annotations[METRICS_PORT_ANNOTATION] = str(metrics_port)
        if index is not None:
            labels[INDEX_KEY] = str(index)
            annotations[INDEX_KEY] = str(index)
            spec["hostname"] = f"{run.name}-{index}"
            for container in spec.get("containers") or []:
                # The real Job controller injects the index this way (downward API from the annotation).
                container.setdefault("env", []).insert(0, {"name": "JOB_COMPLETION_INDEX", "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_KEY}']"}}})
        meta["generateName"] = f"{run.name}-{index}-" if index is not None else f"{run.name}-"
        meta["namespace"] = run.namespace
        meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": run.name, "uid": run.uid,
                                    "controller": True, "blockOwnerDeletion": True}]
        spec["nodeName"] = NODE_NAME  # "scheduled" onto our emulated node: deletion becomes graceful
        body = {"apiVersion": "v1", "kind": "Pod", **template}
        created = await self._kube.request("POST", f"/api/v1/namespaces/{run.namespace}/pods", body=body)
        assert created is not None
        name = created["metadata"]["name"]
        log_dir = self.workdir / "logs" / run.namespace
        log_dir.mkdir(parents=True, exist_ok=True)
        pod = PodRun(run.namespace, name, run.name, index, log_dir / f"{name}.log", metrics_port,
                     grace_seconds=int(created["spec"].get("terminationGracePeriodSeconds", 30)))
        run.pods[name] = pod
        self.pods[(run.namespace, name)] = pod
        logger.info("pod created job=%s/%s pod=%s index=%s", run.namespace, run.name, name, index)
        pod.task = asyncio.get_running_loop().create_task(self._run_pod(run, pod, created))
        pod.task.add_done_callback(self._task_done)
        return pod

    async def _run_pod(self, run: JobRun, pod: PodRun, body: JsonObj) -> None:
        """The kubelet: volumes, env, processes, status. Ends with a terminal phase (or the pod gone)."""
        assert self._kube is not None
        spec = body["spec"]
        pod.scratch = Path(tempfile.mkdtemp(prefix=f"{pod.name}-", dir=self.workdir))
        started = _now()
        try:
            volumes = await self._materialise_volumes(pod, spec)
            launches = []
            for container in spec.get("initContainers") or []:
                launches.append(await self._container_argv(run, pod, body, container, volumes))
            mains = [await self._container_argv(run, pod, body, c, volumes) for c in spec.get("containers") or []]
        except Exception as exc:
            await self._finish_pod(run, pod, body, started, [], 128, "CreateContainerConfigError", str(exc))
            return
        with pod.log_path.open("ab") as log:
            for argv, env, cwd, name in launches:  # init containers, one after another
                code = await self._exec(pod, argv, env, cwd, log)
                if code != 0:
                    await self._finish_pod(run, pod, body, started, [(name, code)], code,
                                           pod.forced_reason or "Error", f"init container {name} failed")
                    return
            if pod.deleting or pod.stopped_by_runner:
                return
            await self._patch_pod_status(pod, {
                "phase": "Running", "startTime": started, "podIP": "127.0.0.1", "hostIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "conditions": [{"type": t, "status": "True", "lastTransitionTime": started}
                               for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
                "containerStatuses": [_container_status(c["name"], running=started)
                                      for c in spec.get("containers") or []],
            })
            pod.phase = "Running"
            self._kick(run)  # ready count
            codes = await asyncio.gather(*(self._exec(pod, argv, env, cwd, log) for argv, env, cwd, _ in mains))
        results = [(name, code) for (_, _, _, name), code in zip(mains, codes, strict=True)]
        worst = next((code for _, code in results if code != 0), 0)
        await self._finish_pod(run, pod, body, started, results, worst, pod.forced_reason, "")

    async def _exec(self, pod: PodRun, argv: list[str], env: dict[str, str], cwd: str, log: Any) -> int:
        if pod.deleting or pod.stopped_by_runner:
            return 137
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=cwd, stdout=log, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # its own process group: torchrun's workers die with it
            )
        except OSError as exc:
            log.write(f"[pod-runner] cannot start {argv!r}: {exc}\n".encode())
            log.flush()
            pod.forced_reason = pod.forced_reason or "StartError"
            return 128
        pod.processes.append(proc)
        code = await proc.wait()
        return 128 - code if code < 0 else code  # killed by signal N: 128+N, as container runtimes report

    async def _finish_pod(self, run: JobRun, pod: PodRun, body: JsonObj, started: str,
                          results: list[tuple[str, int]], code: int, reason: str | None, message: str) -> None:
        pod.exit_code = code
        pod.phase = "Succeeded" if code == 0 and not pod.forced_reason else "Failed"
        if pod.stopped_by_runner or pod.deleting:
            pod.phase = "Failed" if code != 0 else pod.phase
        pod.reason = reason or ("Completed" if code == 0 else "Error")
        finished = _now()
        statuses = [_container_status(name, started=started, finished=finished, exit_code=c,
                                      reason=(pod.forced_reason or ("Completed" if c == 0 else "Error")))
                    for name, c in results] or [
            _container_status(c["name"], started=started, finished=finished, exit_code=code, reason=pod.reason)
            for c in body["spec"].get("containers") or []]
        status: JsonObj = {"phase": pod.phase, "containerStatuses": statuses,
                           "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": finished,
                                           "reason": "PodCompleted"}] + ([pod.disruption] if pod.disruption else [])}
        if pod.phase == "Failed" and pod.reason in ("OOMKilled", "DeadlineExceeded"):
            status["reason"] = pod.reason
        if message:
            status["message"] = message
        logger.info("pod finished job=%s/%s pod=%s phase=%s exitCode=%s reason=%s", pod.namespace, pod.job,
                    pod.name, pod.phase, code, pod.reason)
        # Count the pod before the first await: a reconcile running during the status write must not see it
        # neither live nor counted (it would start an extra pod for a completion that is already done).
        # Job accounting: a success completes its index; a failure counts towards backoffLimit unless the
        # runner itself stopped the pod (suspend, job finished or deleted).
        # (A pod the runner stopped for a suspend exits however it likes, often 0 after a checkpoint: it
        # counts neither as a success nor a failure, so a resumed Job runs that index again.)
        if pod.stopped_by_runner:
            pass
        elif pod.phase == "Succeeded":
            run.succeeded += 1
            if pod.index is not None:
                run.succeeded_indexes.add(pod.index)
        else:
            action, message = _pod_failure_action((run.body.get("spec") or {}).get("podFailurePolicy"), pod, status)
            if action == "FailJob":
                run.failed += 1
                run.fail_job = run.fail_job or ("PodFailurePolicy", message)
            elif action == "Ignore":
                run.ignored_failures += 1  # a replacement pod, and the failure is not counted (nor backed off)
            else:
                run.failed += 1
                run.next_create_at = asyncio.get_running_loop().time() + self.backoff_seconds
            if message:
                logger.info("pod failure policy job=%s/%s pod=%s action=%s: %s", pod.namespace, pod.job, pod.name,
                            action, message)
        if not pod.gone:
            await self._patch_pod_status(pod, status)
        if pod.deleting and not pod.gone:
            await self._delete_pod_object(pod)
        if pod.scratch:
            shutil.rmtree(pod.scratch, ignore_errors=True)
        self._kick(run)

    async def _patch_pod_status(self, pod: PodRun, status: JsonObj) -> None:
        assert self._kube is not None
        result = await self._kube.request("PATCH", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status",
                                          body={"status": status}, content_type="application/merge-patch+json",
                                          ok_missing=True)
        if result is None:
            pod.gone = True

    async def _delete_pod_object(self, pod: PodRun) -> None:
        assert self._kube is not None
        await self._kube.request("DELETE", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}",
                                 body={"gracePeriodSeconds": 0}, ok_missing=True)
        pod.gone = True

    async def _terminate(self, pod: PodRun, grace: float | None = None) -> None:
        """SIGTERM the pod's process groups, SIGKILL after the grace period (as the kubelet does)."""
        grace = pod.grace_seconds if grace is None else grace
        alive = [p for p in pod.processes if p.returncode is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        if alive:
            try:
                await asyncio.wait_for(asyncio.gather(*(p.wait() for p in alive)), grace)
            except TimeoutError:
                for proc in alive:
                    kill_tree(proc.pid)
                await asyncio.gather(*(p.wait() for p in alive))
        if pod.task and not pod.task.done():
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(pod.task), 10)

    async def _terminate_and_delete(self, pod: PodRun) -> None:
        pod.deleting = True
        await self._terminate(pod)
        if not pod.gone:
            await self._delete_pod_object(pod)

    def _on_pod(self, type_: str, obj: JsonObj) -> None:
        meta = obj["metadata"]
        pod = self.pods.get((meta["namespace"], meta["name"]))
        if pod is None:
            return
        if type_ == "DELETED":
            # Gone without a graceful period (gracePeriodSeconds=0, or its Job/namespace collected).
            pod.gone = pod.deleting = True
            if pod.phase in ("Pending", "Running"):
                for proc in pod.processes:
                    if proc.returncode is None:
                        kill_tree(proc.pid)
            return
        if meta.get("deletionTimestamp") and not pod.deleting:
            # Graceful deletion requested through the API: stop the containers, then remove the object.
            pod.deleting = True
            pod.grace_seconds = int(meta.get("deletionGracePeriodSeconds", pod.grace_seconds))
            self._spawn(self._terminate_and_delete(pod))

    # -- volumes and environment ---------------------------------------------------------------------------

    async def _materialise_volumes(self, pod: PodRun, spec: JsonObj) -> dict[str, Path]:
        assert self._kube is not None and pod.scratch is not None
        out: dict[str, Path] = {}
        for volume in spec.get("volumes") or []:
            name = volume["name"]
            if "configMap" in volume or "secret" in volume:
                is_cm = "configMap" in volume
                src = volume["configMap"] if is_cm else volume["secret"]
                ref = src.get("name") if is_cm else src.get("secretName")
                kind = "configmaps" if is_cm else "secrets"
                obj = await self._kube.request("GET", f"/api/v1/namespaces/{pod.namespace}/{kind}/{ref}",
                                               ok_missing=True)
                if obj is None and not src.get("optional"):
                    raise RuntimeError(f'{kind[:-1]} "{ref}" not found for volume {name}')
                data = _volume_data(obj or {}, is_cm)
                directory = pod.scratch / "volumes" / name
                directory.mkdir(parents=True, exist_ok=True)
                items = src.get("items")
                for key, value in data.items():
                    targets = [i["path"] for i in items if i["key"] == key] if items else [key]
                    for target in targets:
                        (directory / target).parent.mkdir(parents=True, exist_ok=True)
                        (directory / target).write_bytes(value)
                out[name] = directory
            elif "emptyDir" in volume:
                out[name] = pod.scratch / "volumes" / name
                out[name].mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                out[name] = self.workdir / "pvc" / pod.namespace / claim
                out[name].mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:
                out[name] = Path(volume["hostPath"]["path"])
            else:  # projected/downwardAPI/...: an empty directory, enough for processes that do not read it
                out[name] = pod.scratch / "volumes" / name
                out[name].mkdir(parents=True, exist_ok=True)
        return out

    async def _container_argv(self, run: JobRun, pod: PodRun, body: JsonObj, container: JsonObj,
                              volumes: dict[str, Path]) -> tuple[list[str], dict[str, str], str, str]:
        assert self._kube is not None and pod.scratch is not None
        mounts: list[tuple[str, str]] = []
        for mount in container.get("volumeMounts") or []:
            local = volumes.get(mount["name"])
            if local is None:
                raise RuntimeError(f"volumeMount {mount['name']} names no volume")
            if mount.get("subPath"):
                local = local / mount["subPath"]
            mounts.append((mount["mountPath"].rstrip("/") or "/", str(local)))
        mounts.sort(key=lambda m: len(m[0]), reverse=True)
        spec = body["spec"]
        hosts = _pod_dns_pattern(run.name, spec.get("subdomain"), pod.namespace)

        def localise(text: str) -> str:
            for mount_path, local in mounts:
                text = re.sub(re.escape(mount_path) + r"(?=/|$|[\s:;,=\"'])", lambda _m, x=local: x, text)
            if hosts is not None:
                text = hosts.sub("127.0.0.1", text)
            return text

        pod_env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            kind = "configmaps" if "configMapRef" in source else "secrets"
            obj = await self._kube.request("GET", f"/api/v1/namespaces/{pod.namespace}/{kind}/{ref.get('name')}",
                                           ok_missing=True)
            for key, value in _volume_data(obj or {}, kind == "configmaps").items():
                pod_env[source.get("prefix", "") + key] = value.decode()
        for item in container.get("env") or []:
            if "valueFrom" in item:
                value = await self._env_from(pod, body, item["valueFrom"])
                if value is None:
                    continue
            else:
                value = expand_vars(str(item.get("value", "")), pod_env)
            pod_env[item["name"]] = value
        if "MASTER_PORT" in pod_env:
            pod_env["MASTER_PORT"] = str(run.master_port)
        if "FINETUNE_METRICS_PORT" in pod_env:
            pod_env["FINETUNE_METRICS_PORT"] = str(pod.metrics_port)
        pod_env = {k: localise(v) for k, v in pod_env.items()}

        argv = [localise(expand_vars(a, pod_env)) for a in (container.get("command") or []) +
                (container.get("args") or [])]
        if not argv:
            raise RuntimeError(f"container {container['name']} has no command: images do not exist here")
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "PYTEST_CURRENT_TEST")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(pod_env)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["HOSTNAME"] = spec.get("hostname") or pod.name
        cwd = localise(container["workingDir"]) if container.get("workingDir") else str(pod.scratch)
        Path(cwd).mkdir(parents=True, exist_ok=True)
        return argv, env, cwd, container["name"]

    async def _env_from(self, pod: PodRun, body: JsonObj, source: JsonObj) -> str | None:
        assert self._kube is not None
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            meta = body["metadata"]
            if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
                return (meta.get(m.group(1)) or {}).get(m.group(2), "")
            simple = {"metadata.name": meta["name"], "metadata.namespace": pod.namespace,
                      "metadata.uid": meta.get("uid", ""), "spec.nodeName": NODE_NAME,
                      "spec.serviceAccountName": body["spec"].get("serviceAccountName", "default"),
                      "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1", "status.podIPs": "127.0.0.1"}
            if path not in simple:
                raise RuntimeError(f"unsupported fieldRef {path}")
            return simple[path]
        for key, kind, is_cm in (("configMapKeyRef", "configmaps", True), ("secretKeyRef", "secrets", False)):
            if key in source:
                ref = source[key]
                obj = await self._kube.request("GET", f"/api/v1/namespaces/{pod.namespace}/{kind}/{ref['name']}",
                                               ok_missing=True)
                data = _volume_data(obj or {}, is_cm)
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise RuntimeError(f"{kind[:-1]} {ref['name']} has no key {ref['key']}")
                return data[ref["key"]].decode()
        if "resourceFieldRef" in source:
            return "0"  # limits are not emulated
        raise RuntimeError(f"unsupported env valueFrom {source}")

    # -- knobs for tests -----------------------------------------------------------------------------------

    def _find(self, name: str, namespace: str | None = None) -> PodRun:
        for (ns, pod_name), pod in self.pods.items():
            if pod_name == name and (namespace is None or ns == namespace):
                return pod
        raise KeyError(f"pod {name!r} is not run by this runner (known: {sorted(n for _, n in self.pods)})")

    def kill(self, name: str, sig: int = signal.SIGKILL, namespace: str | None = None) -> None:
        """Send `sig` to the pod's process groups (SIGKILL: to every process of the pod, as when its container or node
        is gone); the pod ends however its processes react."""
        pod = self._find(name, namespace)

        def send() -> None:
            for proc in pod.processes:
                if proc.returncode is None:
                    if sig == signal.SIGKILL:
                        kill_tree(proc.pid)  # the container is gone: every process in it
                    else:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(proc.pid, sig)  # the kubelet signals the container's main process

        self._loop.call_soon_threadsafe(send)

    def fail_pod(self, name: str, namespace: str | None = None, reason: str = "Error") -> None:
        """Simulate losing the pod: SIGKILL its processes and report it Failed with `reason`."""
        pod = self._find(name, namespace)
        pod.forced_reason = reason
        self.kill(name, signal.SIGKILL, namespace)

    def disrupt(self, name: str, namespace: str | None = None, reason: str = "PreemptionByScheduler",
                sig: int = signal.SIGKILL) -> None:
        """End the pod as a disruption does (preemption, node drain, eviction, lost node): the pod gets the
        `DisruptionTarget` condition (status True, `reason`) that the real control plane adds before it stops the
        pod, then `sig` (SIGKILL: a node that is gone; SIGTERM: a graceful eviction)."""
        pod = self._find(name, namespace)
        pod.disruption = {"type": "DisruptionTarget", "status": "True", "reason": reason, "lastTransitionTime": _now(),
                          "message": {"PreemptionByScheduler": "default-scheduler: preempting to accommodate a higher "
                                      "priority pod", "EvictionByEvictionAPI": "Eviction API: evicting",
                                      "DeletionByTaintManager": "Taint manager: deleting due to NoExecute taint"}
                          .get(reason, reason)}
        self.kill(name, sig, namespace)

    def oom_kill(self, name: str, namespace: str | None = None) -> None:
        """End the pod as the kernel's OOM killer would: SIGKILL, exit code 137, reason OOMKilled."""
        self.fail_pod(name, namespace, reason="OOMKilled")

    def pod_names(self, job: str | None = None, include_gone: bool = False) -> list[str]:
        """Names of the pods this runner created (for `job`), in creation order; by default only those whose
        Pod object still exists."""
        return [p.name for p in list(self.pods.values())
                if (job is None or p.job == job) and (include_gone or not p.gone)]

    def logs(self, name: str, namespace: str | None = None) -> str:
        pod = self._find(name, namespace)
        return pod.log_path.read_text(errors="replace") if pod.log_path.exists() else ""

    def describe(self, tail: int = 40) -> str:
        """Every pod's phase, exit code and last log lines, plus runner errors: for assertion messages."""
        lines = [f"pod runner {self.runner_id} ({len(self.pods)} pods)"]
        for pod in list(self.pods.values()):
            lines.append(f"--- {pod.namespace}/{pod.name} phase={pod.phase} exit={pod.exit_code} reason={pod.reason}")
            if pod.log_path.exists():
                lines.extend(pod.log_path.read_text(errors="replace").splitlines()[-tail:])
        lines.extend(f"runner error: {e}" for e in self.errors)
        return "\n".join(lines)


def _pod_failure_action(policy: JsonObj | None, pod: PodRun, status: JsonObj) -> tuple[str, str]:
    """The Job controller's podFailurePolicy match for a failed pod: (action, message); ("Count", "") when no rule
    matches. Rules in order, the first match wins; onExitCodes looks at the terminated containers' non-zero exit
    codes (containerName: only that container), onPodConditions at the pod's conditions; an unknown action is
    skipped, as the API documents. Messages are the controller's (pkg/controller/job/pod_failure_policy.go)."""
    if not policy:
        return "Count", ""
    conditions = status.get("conditions") or []
    for i, rule in enumerate(policy.get("rules") or []):
        action = rule.get("action")
        if action not in ("Count", "FailJob", "Ignore"):
            continue  # FailIndex needs backoffLimitPerIndex, which no Job here sets
        codes = rule.get("onExitCodes")
        if codes is not None:
            for cs in status.get("containerStatuses") or []:
                if codes.get("containerName") not in (None, cs["name"]):
                    continue
                code = ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")
                if code in (None, 0):
                    continue
                inside = code in (codes.get("values") or [])
                if inside == (codes.get("operator") == "In"):
                    return action, (f"Container {cs['name']} for pod {pod.namespace}/{pod.name} failed with exit code "
                                    f"{code} matching {action} rule at index {i}")
        for pattern in rule.get("onPodConditions") or []:
            for cond in conditions:
                if cond.get("type") == pattern.get("type") and cond.get("status") == pattern.get("status", "True"):
                    return action, (f"Pod {pod.namespace}/{pod.name} has condition {cond['type']} matching {action} rule "
                                    f"at index {i}")
    return "Count", ""


def _volume_data(obj: JsonObj, is_configmap: bool) -> dict[str, bytes]:
    import base64

    if is_configmap:
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out
    out = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    out.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
    return out


def _pod_dns_pattern(job: str, subdomain: str | None, namespace: str) -> re.Pattern[str] | None:
    if not subdomain:
        return None
    suffix = rf"(?:\.{re.escape(namespace)}(?:\.svc(?:\.cluster\.local)?)?)?"
    return re.compile(rf"\b{re.escape(job)}-\d+\.{re.escape(subdomain)}{suffix}(?![\w-])")


def _container_status(name: str, *, running: str | None = None, started: str | None = None,
                      finished: str | None = None, exit_code: int | None = None, reason: str = "") -> JsonObj:
    status: JsonObj = {"name": name, "image": "local-process", "imageID": "", "restartCount": 0,
                       "ready": running is not None, "started": running is not None}
    if running is not None:
        status["state"] = {"running": {"startedAt": running}}
    else:
        status["state"] = {"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": started,
                                          "finishedAt": finished}}
    return status


def _set_condition(conditions: list[JsonObj], type_: str, status: str, reason: str, message: str) -> None:
    now = _now()
    for cond in conditions:
        if cond["type"] == type_:
            if (cond.get("status"), cond.get("reason"), cond.get("message")) != (status, reason, message):
                if cond.get("status") != status:
                    cond["lastTransitionTime"] = now
                cond.update(status=status, reason=reason, message=message, lastProbeTime=now)
            return
    conditions.append({"type": type_, "status": status, "reason": reason, "message": message,
                       "lastProbeTime": now, "lastTransitionTime": now})


def _format_indexes(indexes: set[int]) -> str:
    """`0-2,4`: the Job status' compressed index list."""
    out, ordered = [], sorted(indexes)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)
