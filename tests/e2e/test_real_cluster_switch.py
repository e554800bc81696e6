"""The fixtures' real-cluster switch: who runs pods (FTJ_E2E_POD_RUNNER) and the read-only pod view used
when the cluster runs them itself."""

from __future__ import annotations

import types
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


class _Item:
    """Just enough of a pytest item for the collection hook."""

    def __init__(self, fixtures, module="test_x", marker=None):
        self.fixturenames, self.markers = list(fixtures), []
        self.module = types.SimpleNamespace(__name__=f"tests.e2e.{module}")
        self._marker = marker

    def get_closest_marker(self, name):
        return self._marker if self._marker is not None and self._marker.name == name else None

    def add_marker(self, marker):
        self.markers.append(marker)


def test_tests_needing_local_pods_are_skipped_at_collection_on_a_real_cluster(monkeypatch):
    from .conftest import pytest_collection_modifyitems

    local = _Item(["pod_runner"], module="test_pod_runner")
    cluster = _Item(["pod_runner", "namespace"])
    no_pods = _Item(["namespace"])
    monkeypatch.setenv("FTJ_E2E_POD_RUNNER", "off")
    monkeypatch.delenv("FTJ_E2E_TRAINER_IMAGE", raising=False)
    pytest_collection_modifyitems(None, [local, cluster, no_pods])
    assert "local pod runner" in local.markers[0].kwargs["reason"]
    assert "FTJ_E2E_TRAINER_IMAGE" in cluster.markers[0].kwargs["reason"] and no_pods.markers == []
    cluster.markers.clear()
    monkeypatch.setenv("FTJ_E2E_TRAINER_IMAGE", "registry.example/finetune-trainer:1")
    pytest_collection_modifyitems(None, [cluster])
    assert cluster.markers == []  # runs against the cluster's own pods
    monkeypatch.setenv("FTJ_E2E_POD_RUNNER", "on")
    pytest_collection_modifyitems(None, [local])
    assert len(local.markers) == 1  # unchanged: with the runner on nothing is skipped


def test_tests_acting_on_the_emulation_are_skipped_at_collection_on_a_real_cluster(monkeypatch):
    from .conftest import pytest_collection_modifyitems

    faults = _Item(["namespace"], marker=pytest.mark.emulation_only("injects faults").mark)
    plain = _Item(["namespace"])
    monkeypatch.delenv("FTJ_E2E_KUBECONFIG", raising=False)
    pytest_collection_modifyitems(None, [faults, plain])
    assert faults.markers == [] == plain.markers  # the emulation: both run
    monkeypatch.setenv("FTJ_E2E_KUBECONFIG", "/path/to/kubeconfig")
    monkeypatch.setenv("FTJ_E2E_POD_RUNNER", "off")
    monkeypatch.setenv("FTJ_E2E_TRAINER_IMAGE", "registry.example/finetune-trainer:1")
    pytest_collection_modifyitems(None, [faults, plain])
    assert [m.kwargs["reason"] for m in faults.markers] == ["needs the emulation: injects faults"]
    assert plain.markers == []
