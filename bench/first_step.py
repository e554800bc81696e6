"""Apply-to-first-step time: the classification example applied through the operator and the pod runner, twice.

The first job runs cold (nothing tokenised yet); the second is the same example under another name, with the
tokenised data in the shared datasets cache (`HF_DATASETS_CACHE` in spec.env, what a cache volume gives jobs)
and the model's files in the page cache. For each job it prints the stages the job's status holds
(`status.timings`: pod start as the operator saw it, then the trainer's setup, data, model load and first
optimizer step) and the total from the FineTuneJob's creationTimestamp to the end of the first optimizer step.
Each job is deleted as soon as its first step is reported (the rest of training is not part of this figure).

The LAST line is the warm total as a fraction of the cold one.

    .venv/bin/python bench/first_step.py                 # against the test API emulation and the pod runner
    BENCH_WORKDIR=/tmp/fs .venv/bin/python bench/first_step.py   # keep the operator's and the pods' logs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import os
import secrets
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "operator")]

from e2e.kubeconfig import AsyncKube  # noqa: E402
from e2e.operator_fixture import OperatorProcess  # noqa: E402
from e2e.pod_runner import PodRunner  # noqa: E402
from operator_throughput import apply_crd, emulator, with_kube  # noqa: E402

FTJ_PATH = "/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"
STAGES = (("podStartSeconds", "pod start"), ("setupSeconds", "setup"), ("dataSeconds", "data + tokenise"),
          ("modelLoadSeconds", "model load"), ("firstStepSeconds", "first step"))


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def one_job(kube: AsyncKube, ns: str, name: str, cache: Path, timeout: float) -> dict:
    manifest = copy.deepcopy(yaml.safe_load((REPO / "examples" / "classification.yaml").read_text()))
    manifest["metadata"] = {"name": name, "namespace": ns}
    spec = manifest["spec"]
    spec["env"] = {**spec.get("env", {}), "HF_DATASETS_CACHE": str(cache)}
    spec["resources"] = {}  # the pod runner does not emulate requests; keep the manifest minimal for it
    spec["hyperparameters"]["epochs"] = 1
    await kube.request("POST", FTJ_PATH.format(ns=ns), body=manifest)
    deadline = time.monotonic() + timeout
    obj: dict = {}
    while time.monotonic() < deadline:
        obj = await kube.request("GET", f"{FTJ_PATH.format(ns=ns)}/{name}")
        status = obj.get("status") or {}
        timings = status.get("timings") or {}
        if timings.get("firstStepTime") and timings.get("podStartSeconds") is not None:
            break
        if status.get("phase") == "Failed":
            raise SystemExit(f"job {name} failed: {status.get('message')}")
        await asyncio.sleep(0.5)
    else:
        raise SystemExit(f"job {name}: no first step within {timeout:.0f} s; status {obj.get('status')}")
    await kube.request("DELETE", f"{FTJ_PATH.format(ns=ns)}/{name}")
    timings = dict(obj["status"]["timings"])
    timings["total"] = (_time(timings["firstStepTime"]) - _time(obj["metadata"]["creationTimestamp"])).total_seconds()
    return timings


def describe(label: str, t: dict) -> str:
    stages = ", ".join(f"{words} {t[key]:.1f} s" for key, words in STAGES if isinstance(t.get(key), int | float))
    return f"{label}: {stages}{' (tokenised cache)' if t.get('dataCached') else ''}; apply to first step {t['total']:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each job may take to its first step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(os.environ.get("BENCH_WORKDIR") or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        kubeconfig = stack.enter_context(emulator(workdir))
        ns = f"bench-first-step-{secrets.token_hex(3)}"

        async def setup(kube: AsyncKube) -> None:
            await apply_crd(kube)
            await kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": ns}})

        asyncio.run(with_kube(kubeconfig, setup))
        # The pods inherit this environment: one OpenMP thread per pod, as the e2e fixtures run them (two threads on
        # shared cores made steps ~10x slower there).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        op = OperatorProcess(kubeconfig, workdir / "operator", FTO_NAMESPACES=ns).start()
        stack.callback(op.stop)
        runner = PodRunner(kubeconfig, workdir / "pods", namespace=ns).start()
        stack.callback(runner.stop)
        cache = workdir / "datasets-cache"
        cold = asyncio.run(with_kube(kubeconfig, one_job, ns, "bbc-cold", cache, args.timeout))
        warm = asyncio.run(with_kube(kubeconfig, one_job, ns, "bbc-warm", cache, args.timeout))
        print(describe("cold", cold))
        print(describe("warm", warm))
        for key, words in STAGES:
            if isinstance(cold.get(key), int | float) and isinstance(warm.get(key), int | float) and cold[key] > 0:
                print(f"  {words}: warm/cold {warm[key] / cold[key]:.2f}")
        print(f"warm/cold apply-to-first-step: {warm['total'] / cold['total']:.2f}")


if __name__ == "__main__":
    main()
