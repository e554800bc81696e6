"""The fixtures' real-cluster switch: who runs pods (FTJ_E2E_POD_RUNNER) and the read-only pod view used
when the cluster runs them itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import ClusterPods, KubeTarget, pod_runner_enabled

pytestmark = pytest.mark.e2e

EMULATED = KubeTarget(Path("kubeconfig"), "http://127.0.0.1:1", emulated=True)
REAL = KubeTarget(Path("kubeconfig"), "https://cluster:6443", emulated=False)


@pytest.mark.parametrize(("mode", "emulated_on", "real_on"), [
    (None, True, False), ("auto", True, False), ("on", True, True), ("off", False, False), (" OFF ", False, False),
])
def test_pod_runner_mode(monkeypatch, mode, emulated_on, real_on):
    if mode is None:
        monkeypatch.delenv("FTJ_E2E_POD_RUNNER", raising=False)
    else:
        monkeypatch.setenv("FTJ_E2E_POD_RUNNER", mode)
    assert (pod_runner_enabled(EMULATED), pod_runner_enabled(REAL)) == (emulated_on, real_on)


def test_pod_runner_mode_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("FTJ_E2E_POD_RUNNER", "sometimes")
    with pytest.raises(pytest.UsageError, match="auto, on, off"):
        pod_runner_enabled(EMULATED)


def test_cluster_pods_view_describes_pods_without_logs(api, namespace):
    """With the runner off, failure messages show the cluster's pods; a pod without logs must not break that."""
    api.core.create_namespaced_pod(namespace, {  # type: ignore[attr-defined]
        "metadata": {"name": "trainer-0", "labels": {"job-name": "demo-train"}},
        "spec": {"containers": [{"name": "trainer", "image": "finetune-trainer:dev"}]},
    })
    api.core.patch_namespaced_pod_status("trainer-0", namespace, {"status": {  # type: ignore[attr-defined]
        "phase": "Failed",
        "containerStatuses": [{"name": "trainer", "image": "finetune-trainer:dev", "imageID": "", "ready": False,
                               "restartCount": 0, "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}],
    }})
    view = ClusterPods(api, namespace)
    assert view.pod_names("demo-train") == ["trainer-0"] and view.pod_names("other") == []
    text = view.describe()
    assert "--- trainer-0 phase=Failed trainer=terminated:OOMKilled exit=137" in text
