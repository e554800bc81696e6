"""The kill drill, small enough for CI: 10 jobs through every lifecycle, the operator SIGKILLed 3 times.

The 50-job version is `bench/kill_drill.py`; both run tests/e2e/drill.py. Fails when a job is lost or
duplicated, ends in the wrong phase, or its status history (recorded from the watch) goes backwards or
claims an observedGeneration beyond the generation.
"""

from __future__ import annotations

import pytest

from .drill import run_drill
from .operator_helpers import kube_client

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # 127 s wall measured on the shared 2 cores at load ~14


def test_kill_drill_loses_and_duplicates_nothing(kube, operator, pod_runner, namespace, fake_trainer_env):
    c = kube_client(kube.kubeconfig)
    try:
        result = run_drill(c, kube.kubeconfig, namespace, operator, fake_trainer_env, jobs=10, max_kills=3, seed=12,
                           kill_gap=(1.0, 3.0), timeout=240)
    finally:
        c.close()
    print(result.report())
    assert result.kills == 3, result.report()
    assert result.ok, result.report()
