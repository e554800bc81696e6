"""The names in finetune_contract.config are the ones both sides use: the operator's pod env, ports and paths,
and the trainer's metrics."""

from __future__ import annotations

from finetune_contract.config import Env, Metric, Paths, Ports
from finetune_operator.api.validation import validate_manifest
from finetune_operator.plan import names
from finetune_operator.plan.children import desired_children
from finetune_operator.settings import Settings
from finetune_trainer.config import Runtime
from finetune_trainer.metrics import TrainerMetrics

MANIFEST = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "names", "uid": "u"},
            "spec": {"model": {"name": "m", "pvc": "models"}, "dataset": {"source": "d", "pvc": "data"}}}


def test_the_operator_sets_exactly_the_contract_env_ports_and_paths():
    job = next(c for c in desired_children(validate_manifest(MANIFEST), Settings()) if c["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    assert set(env) == set(Env.OPERATOR_SET)
    # The rendezvous id comes from the pod itself (downward API): the uid the Job controller labels its pods with.
    assert "fieldRef" in next(e for e in container["env"] if e["name"] == Env.RDZV_ID)["valueFrom"]
    assert env[Env.CONFIG] == Paths.CONFIG_FILE and env[Env.MASTER_PORT] == str(Ports.RENDEZVOUS)
    assert {p["containerPort"] for p in container["ports"]} == {Ports.RENDEZVOUS, Ports.METRICS}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {Paths.CONFIG_DIR, Paths.MODEL_PVC_MOUNT, Paths.DATA_PVC_MOUNT, Paths.OUTPUT_DIR} <= mounts
    assert (names.CONFIG_DIR, names.CONFIG_KEY) == (Paths.CONFIG_DIR, Paths.CONFIG_KEY)
    # ... and the trainer reads them.
    rt = Runtime.from_env(env)
    assert (rt.config_path, rt.output_dir, rt.job_name, rt.master_port, rt.metrics_port) == (
        Paths.CONFIG_FILE, Paths.OUTPUT_DIR, "names", Ports.RENDEZVOUS, Ports.METRICS)


def test_the_trainer_exports_the_contract_metric_names():
    metrics = TrainerMetrics("names", "default")
    exported = {m.name for m in metrics.registry.collect()}
    # prometheus_client reports a counter's family without its `_total` suffix.
    contract = {v.removesuffix("_total") for k, v in vars(Metric).items() if k.isupper() and isinstance(v, str)}
    assert exported == contract
    assert set(Metric.LABELS) == {"finetune_job", "namespace"}
