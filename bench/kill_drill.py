"""Kill drill (issue 12): SIGKILL the real operator at seeded random moments while 50 FineTuneJobs go through
create, run, early stop, user stop, suspend/resume and delete, then check that nothing was lost or duplicated.

    .venv/bin/python bench/kill_drill.py [--jobs 50] [--kills 10] [--seed 12]

Everything is local: the API emulation (tests/e2e/emulator.py) as its own process, the pod runner
(tests/e2e/pod_runner.py) running the stand-in trainer as each pod, and `python -m finetune_operator`,
killed with SIGKILL and restarted. The drill and its checks are tests/e2e/drill.py (the CI version is
tests/e2e/test_kill_drill.py): no job lost, no job with duplicate children, two Jobs or two live pods per
index; every job in the phase its scenario must reach; the status history from the watch never going
back a phase, never claiming an observedGeneration beyond the generation.

Prints the kills, the jobs, what went wrong if anything, and last `jobs lost or duplicated: N` (must be 0;
the exit status is 1 otherwise).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "operator"), str(REPO / "contract")]

from e2e.conftest import _start_emulator, apply_crds  # noqa: E402
from e2e.drill import run_drill  # noqa: E402
from e2e.kubeconfig import api_clients  # noqa: E402
from e2e.operator_fixture import OperatorProcess, fake_trainer  # noqa: E402
from e2e.operator_helpers import kube_client  # noqa: E402
from e2e.pod_runner import PodRunner  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--kills", type=int, default=10, help="most SIGKILLs (fewer if every job ends first)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "contract"), str(REPO / "operator"),
                                                str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="kill-drill-") as tmp:
        work = Path(tmp)
        emulator, url = _start_emulator(work)
        runner = operator = client = None
        try:
            kubeconfig = work / "kubeconfig.yaml"
            api = api_clients(kubeconfig)
            apply_crds(api)
            namespace = f"drill-{secrets.token_hex(3)}"
            api.core.create_namespace({"metadata": {"name": namespace}})  # type: ignore[attr-defined]
            api.close()
            runner = PodRunner(kubeconfig, work / "pods", namespace=namespace).start()
            operator = OperatorProcess(kubeconfig, work / "operator").start(timeout=120)
            client = kube_client(kubeconfig)
            print(f"API emulation {url}; {args.jobs} jobs, up to {args.kills} kills, seed {args.seed}", flush=True)
            started = time.monotonic()
            result = run_drill(client, kubeconfig, namespace, operator, fake_trainer(work / "fakebin"), jobs=args.jobs,
                               max_kills=args.kills, seed=args.seed, timeout=args.timeout,
                               log=lambda m: print(m, flush=True))
            print(f"wall time {time.monotonic() - started:.1f} s")
            print(result.report())
            return 0 if result.ok else 1
        finally:
            if client:
                client.close()
            if operator:
                operator.stop()
            if runner:
                runner.stop()
            emulator.terminate()
            emulator.wait(10)


if __name__ == "__main__":
    raise SystemExit(main())
