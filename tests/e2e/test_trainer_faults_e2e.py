"""Trainer faults and secrets through the operator, with the real trainer on a tiny model (issue 12, parts 3-4).

1. A pod SIGKILLed mid-epoch comes back (the Job's backoff; the pod runner plays the Job controller) and the
   new pod resumes from the last checkpoint on the job's PVC, finishing with every step run once. The job takes
   a hub token only from a Secret (`secretEnv` and `envFrom`); the same token is also in the environment of the
   operator and the pods. Afterwards every output the project produces is searched for the token, raw and
   base64-encoded: the FineTuneJob and its status, Events, every child and pod object, the operator's and the
   trainers' logs, the operator's and the trainer's /metrics, every file on the output volume (result.json,
   checkpoints' trainer_state.json, the model), and the CLI's output (`finetune status`, `list`, `validate`,
   `run`). Zero occurrences.
2. A full disk on save and a dataset that does not exist fail their jobs after the first pod (podFailurePolicy),
   with the reason and the path in the status and a Warning Event.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from trainer.tiny_models import build_tiny_bert, write_tiny_data

from finetune_operator.cli import main as cli_main

from .operator_helpers import audit, condition, create, events_with, get, items, kube_client, status
from .pod_runner import METRICS_PORT_ANNOTATION, service_account_token

pytest_plugins = ["e2e.operator_fixture"]
pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.local_pods("reads the tiny model, data and PVC output from local directories")]

TOKEN = "hf_" + secrets.token_hex(20)  # shaped like a Hugging Face token (the CRD would refuse it in spec.env)
SECRET = "hub-credentials"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-faults")
    return {"model": build_tiny_bert(root), "data": write_tiny_data(root / "train.jsonl")}


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> str:
    """The token in this process's environment, so the operator and every pod inherit it (requested before them)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("PLANTED_SECRET_VALUE", TOKEN)
    return TOKEN


def _manifest(name: str, tiny: dict[str, str], **spec: object) -> dict:
    body = {
        "model": {"name": tiny["model"]},
        "dataset": {"source": tiny["data"], "maxLength": 32, "validationFraction": 0.25},
        "preset": "fast",
        "hyperparameters": {"epochs": 2, "batchSize": 8, "learningRate": 1e-3, "mixedPrecision": "no", "dropout": 0.0},
        "earlyStopping": {"enabled": False},
        "output": {"pvc": f"{name}-out", "keepCheckpoints": 3},
        "env": {"OMP_NUM_THREADS": "1", "FINETUNE_STOP_POLL_SECONDS": "0.2", "FINETUNE_METRICS_LINGER_SECONDS": "0"},
    }
    for key, value in spec.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}


def _scrape(port: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return r.read().decode()


SEARCHED: list[str] = []  # every output searched, for the printed summary (docs/reliability.md)


def _leaks(where: str, text: str | bytes) -> list[str]:
    SEARCHED.append(where)
    data = text.encode() if isinstance(text, str) else text
    forms = {"raw": TOKEN.encode(), "base64": base64.b64encode(TOKEN.encode())}
    return [f"{where} ({form})" for form, needle in forms.items() if needle in data]


def test_a_killed_pod_resumes_from_its_checkpoint_and_no_planted_token_leaks(
    planted, kube, operator, pod_runner, namespace, wait_for, tiny, tmp_path, capsys,
):
    c = kube_client(kube.kubeconfig)
    name = "resume-tiny"
    c.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "type": "Opaque",
        "data": {"token": base64.b64encode(TOKEN.encode()).decode(), "WANDB_API_KEY": base64.b64encode(TOKEN.encode()).decode()}})
    manifest = _manifest(name, tiny, secretEnv={"HF_TOKEN": {"name": SECRET, "key": "token"}},
                         envFrom=[{"secretRef": {"name": SECRET}}],
                         # 0.25 s per step: an epoch (9 steps) lasts long enough to be killed in the middle of.
                         env={"FINETUNE_FAULT_SLOW_STEP_SECONDS": "0.25"})
    create(c, namespace, manifest)
    out = pod_runner.workdir / "pvc" / namespace / f"{name}-out"
    wait_for(lambda: (out / "checkpoints" / "epoch-1" / "trainer_state.json").exists(), timeout=180,
             what="the first epoch's checkpoint", interval=0.05)
    first = pod_runner.pod_names(f"{name}-train")[0]
    environ = Path(f"/proc/{pod_runner.pods[(namespace, first)].processes[0].pid}/environ").read_bytes().split(b"\0")
    assert f"HF_TOKEN={TOKEN}".encode() in environ and f"WANDB_API_KEY={TOKEN}".encode() in environ  # from the Secret
    pod_runner.kill(first, signal.SIGKILL)

    # The Job's backoff starts a second pod; scrape its trainer's metrics while it trains.
    wait_for(lambda: len(pod_runner.pod_names(f"{name}-train", include_gone=True)) == 2, timeout=60, what="a second pod")
    second = pod_runner.pod_names(f"{name}-train", include_gone=True)[1]
    port = get_pod_annotation(c, namespace, second)
    trainer_metrics = wait_for(lambda: _try_scrape(port), timeout=120, what="the resumed trainer's /metrics", interval=0.2)
    st = wait_for(lambda: (s := status(c, namespace, name)).get("phase") in ("Succeeded", "Failed") and s,
                  timeout=240, what="a finished job", interval=0.5)
    assert (st["phase"], st["reason"]) == ("Succeeded", "TrainingCompleted"), st.get("message")
    pods = [pod_runner.pods[(namespace, p)] for p in (first, second)]
    assert [(p.phase, p.exit_code) for p in pods] == [("Failed", 137), ("Succeeded", 0)], pod_runner.describe()
    result = json.loads((out / "result.json").read_text())
    assert result["resumedFrom"].endswith("epoch-1") and result["resumedAtStep"] == 9, result["resumedFrom"]
    assert result["globalStep"] == result["totalSteps"] == 18 and result["epochsRun"] == 2
    assert st["resumedFrom"] == result["resumedFrom"] and not st.get("checkpointWarning")
    assert [h["epoch"] for h in result["history"]] == [1, 2]

    # --- least privilege: every call the two trainers made, under their ServiceAccount's token (the pod runner gives
    # pods their own), is one the job's Role grants, on this job only.
    calls = audit(kube.kubeconfig, service_account_token(namespace, f"{name}-trainer"))
    granted = {("finetunejobs", "get"), ("finetunejobs", "watch"), ("finetunejobs/status", "patch")}
    assert {(e["resource"], e["verb"]) for e in calls} == {("finetunejobs", "get"), ("finetunejobs/status", "patch")}, calls
    assert all((e["apiGroup"], e["namespace"], e["name"]) == ("finetune.dev", namespace, name) and
               (e["resource"], e["verb"]) in granted for e in calls), calls
    role = c.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/{name}-trainer")
    assert {(r["resources"][0], v, tuple(r["resourceNames"])) for r in role["rules"] for v in r["verbs"]} == {
        (res, verb, (name,)) for res, verb in granted}

    # --- every output, searched for the token (the Secret itself holds it: the search can see it)
    assert _leaks("Secret", json.dumps(c.get(f"/api/v1/namespaces/{namespace}/secrets/{SECRET}"))) == ["Secret (base64)"]
    SEARCHED.clear()
    leaks: list[str] = []
    leaks += _leaks("FineTuneJob and status", json.dumps(get(c, namespace, name)))
    leaks += _leaks("Events", json.dumps(items(c, f"/api/v1/namespaces/{namespace}/events")))
    for kind in ("configmaps", "services", "serviceaccounts", "pods", "persistentvolumeclaims"):
        leaks += _leaks(kind, json.dumps(items(c, f"/api/v1/namespaces/{namespace}/{kind}")))
    leaks += _leaks("jobs", json.dumps(items(c, f"/apis/batch/v1/namespaces/{namespace}/jobs")))
    for kind in ("roles", "rolebindings"):
        leaks += _leaks(kind, json.dumps(items(c, f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/{kind}")))
    leaks += _leaks("operator log", operator.logs())
    leaks += _leaks("operator /metrics", operator.metrics())
    leaks += _leaks("trainer /metrics", trainer_metrics)
    for pod in (first, second):
        leaks += _leaks(f"trainer log {pod}", pod_runner.logs(pod))
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.name == "trainer_state.json" for f in files) and (out / "result.json") in files
    for f in files:
        leaks += _leaks(f"output file {f.relative_to(out)}", f.read_bytes())

    # The CLI: status and list against the API, validate on the manifest, and a local run of it.
    capsys.readouterr()
    for args in (["status", name], ["status", name, "-o", "json"], ["list"]):
        assert cli_main([*args, "--kubeconfig", str(kube.kubeconfig), "-n", namespace]) == 0
        printed = capsys.readouterr()
        assert name in printed.out
        leaks += _leaks(f"finetune {' '.join(args)}", printed.out + printed.err)
    file = tmp_path / "job.yaml"
    local = _manifest("local-tiny", tiny, hyperparameters={"epochs": 1}, secretEnv={"HF_TOKEN": {"name": SECRET, "key": "token"}})
    local["spec"]["output"] = {"ephemeral": True}
    file.write_text(yaml.safe_dump(local))
    assert cli_main(["validate", str(file)]) == 0
    printed = capsys.readouterr()
    leaks += _leaks("finetune validate", printed.out + printed.err)
    run_out = tmp_path / "local-run"
    proc = subprocess.run([str(Path(sys.executable).parent / "finetune"), "run", str(file), "-o", str(run_out), "--no-progress"],
                          capture_output=True, env={**os.environ, "FINETUNE_METRICS_LINGER_SECONDS": "0"}, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    leaks += _leaks("finetune run output", proc.stdout + proc.stderr)
    for f in (p for p in run_out.rglob("*") if p.is_file()):
        leaks += _leaks(f"finetune run file {f.relative_to(run_out)}", f.read_bytes())
    output_files = sum(w.startswith(("output file", "finetune run file")) for w in SEARCHED)
    print(json.dumps({"outputsSearched": len(SEARCHED), "ofWhichFiles": output_files, "leaks": len(leaks),
                      "pods": [(p.phase, p.exit_code) for p in pods], "resumedFrom": os.path.basename(result["resumedFrom"]),
                      "resumedAtStep": result["resumedAtStep"], "globalStep": result["globalStep"]}))
    assert leaks == [], leaks
    c.close()


def get_pod_annotation(c, namespace: str, pod: str) -> str:
    return c.get(f"/api/v1/namespaces/{namespace}/pods/{pod}")["metadata"]["annotations"][METRICS_PORT_ANNOTATION]


def _try_scrape(port: str) -> str | None:
    try:
        text = _scrape(port)
    except OSError:
        return None
    return text if "finetune_trainer_step" in text else None


def test_a_full_disk_and_a_missing_dataset_fail_at_once_naming_the_path(kube, operator, pod_runner, namespace, wait_for, tiny):
    c = kube_client(kube.kubeconfig)
    missing = "/nonexistent/finetune-e2e/train.jsonl"
    create(c, namespace, _manifest("disk-full", tiny, backoffLimit=3, env={"FINETUNE_FAULT_DISK_FULL": "1"},
                                   hyperparameters={"epochs": 1}))
    create(c, namespace, _manifest("no-data", tiny, backoffLimit=3, dataset={"source": missing}))
    done = {}
    for name in ("disk-full", "no-data"):
        done[name] = wait_for(lambda n=name: (s := status(c, namespace, n)).get("phase") in ("Succeeded", "Failed") and s,
                              timeout=240, what=f"{name} finished", interval=0.5)
    full, nodata = done["disk-full"], done["no-data"]
    out = pod_runner.workdir / "pvc" / namespace / "disk-full-out"
    assert (full["phase"], full["reason"]) == ("Failed", "DiskFull"), full.get("message")
    assert f"no space left on device writing a checkpoint to {out}/checkpoints/.tmp-epoch-1" in full["message"]
    assert "No space left on device" in full["message"] and "spec.output.size" in full["message"]
    assert (nodata["phase"], nodata["reason"]) == ("Failed", "DatasetUnreadable"), nodata.get("message")
    assert f"spec.dataset.source {missing}" in nodata["message"] and "does not exist" in nodata["message"]
    for name, st in done.items():
        assert condition(st, "Failed")["reason"] == st["reason"]
        warnings = [e for e in events_with(c, namespace, name, wait_for, st["reason"]) if e["reason"] == st["reason"]]
        assert warnings and warnings[0]["type"] == "Warning" and st["message"] in warnings[0]["message"]
        # One pod, not backoffLimit + 1: the podFailurePolicy failed the Job at the first exit code 4/5.
        pods = [pod_runner.pods[(namespace, p)] for p in pod_runner.pod_names(f"{name}-train", include_gone=True)]
        assert [p.exit_code for p in pods] == [4 if name == "disk-full" else 5], pod_runner.describe()
    c.close()
