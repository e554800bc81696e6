"""The children of a FineTuneJob: shape, the contract with the trainer, and schema validity."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
from ftj_builders import manifest, resolved

from finetune_operator.api.validation import validate_manifest
from finetune_operator.plan import names
from finetune_operator.plan.children import desired_children

K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def by_kind(children):
    return {c["kind"]: c for c in children}


def env_of(job):
    return {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}


CASES = {
    "1x1": {},
    "2x4-gpu": {"distributed": {"nodes": 2, "processesPerNode": 4}, "resources": {"gpu": True}},
    "deepspeed": {"distributed": {"nodes": 2, "processesPerNode": 2, "strategy": "deepspeed", "zeroStage": 3}},
    "lora": {"lora": {"enabled": True, "rank": 16}},
    "suspend": {"suspend": True},
    "pvcs-scheduling": {
        "model": {"name": "/models/bert", "pvc": "models"},
        "dataset": {"source": "/data/train.jsonl", "pvc": "data"},
        "output": {"pvc": "out", "path": "/output/run1"},
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "high",
        "activeDeadlineSeconds": 3600,
        "ttlSecondsAfterFinished": 600,
        "env": {"HF_HUB_OFFLINE": "1"},
    },
    "own-service-account": {"serviceAccountName": "shared-trainer"},
    "ephemeral-upload": {"output": {"ephemeral": True, "uri": "s3://models/bbc", "credentialsSecret": "s3-creds"}},
    "pvc-not-retained": {"output": {"retain": False, "size": "100Gi", "storageClassName": "fast-rwx"},
                         "distributed": {"nodes": 2}},
    "hub-private-cached": {"model": {"name": "acme/private-llm", "revision": "0123456789abcdef0123456789abcdef01234567",
                                     "tokenSecret": {"name": "hf-token"}, "cachePvc": "hf-cache"},
                           "distributed": {"nodes": 2, "strategy": "fsdp"}},
    "qlora": {"task": "causal-lm", "model": {"name": "acme/llm", "quantization": "4bit"}, "lora": {"enabled": True},
              "resources": {"gpu": True}, "sft": {"packing": True}},
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_child_validates_strictly(case, version, settings):
    for child in desired_children(resolved(**CASES[case]), settings):
        kubernetes_validate.validate(child, version, strict=True)


def test_validation_would_catch_an_unknown_field(settings):
    # Guards the test above: strict validation must reject what the API server would drop.
    job = by_kind(desired_children(resolved(), settings))["Job"]
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.30.0", strict=True)


def test_single_node_job(settings):
    children = desired_children(resolved(), settings)
    assert [c["kind"] for c in children] == ["ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "ConfigMap",
                                             "Service", "Job"]
    job = by_kind(children)["Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 1
    assert spec["suspend"] is False and spec["backoffLimit"] == 3
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["finetune-trainer"]
    assert container["image"] == "registry.example/finetune-trainer:1.0"
    assert "resources" not in container  # no GPU, no requests given
    env = env_of(job)
    assert env == {
        "FINETUNE_CONFIG": "/etc/finetune/config.json",
        "FINETUNE_OUTPUT_DIR": "/output",
        "FINETUNE_JOB_NAME": "bbc-news",
        "FINETUNE_JOB_NAMESPACE": "team-a",
        "FINETUNE_NNODES": "1",
        "FINETUNE_NPROC_PER_NODE": "1",
        "MASTER_ADDR": "bbc-news-train-0.bbc-news-workers",
        "MASTER_PORT": "29500",
        "FINETUNE_METRICS_PORT": "9400",
    }
    assert pod["subdomain"] == by_kind(children)["Service"]["metadata"]["name"]
    assert pod["serviceAccountName"] == by_kind(children)["ServiceAccount"]["metadata"]["name"]
    assert pod["restartPolicy"] == "Never"


def test_two_nodes_four_gpus(settings):
    job = by_kind(desired_children(resolved(distributed={"nodes": 2, "processesPerNode": 4}, resources={"gpu": True}), settings))["Job"]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    res = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "4"
    env = env_of(job)
    assert (env["FINETUNE_NNODES"], env["FINETUNE_NPROC_PER_NODE"]) == ("2", "4")


def test_config_map_carries_the_resolved_trainer_config(settings):
    job = resolved(distributed={"nodes": 2, "processesPerNode": 2, "strategy": "deepspeed"}, lora={"enabled": True})
    cm = by_kind(desired_children(job, settings))["ConfigMap"]
    config = json.loads(cm["data"]["config.json"])
    assert config == json.loads(json.dumps(job.trainer_config()))
    assert config["spec"]["distributed"]["zeroStage"] == 2  # resolved default for deepspeed
    assert config["spec"]["lora"]["enabled"] is True
    assert config["spec"]["hyperparameters"]["learningRate"] == pytest.approx(2e-4)  # LoRA factor x balanced 5e-5
    # The pod template names the config it was built for, so a restarted pod never runs with a different one unseen.
    pod_hash = by_kind(desired_children(job, settings))["Job"]["spec"]["template"]["metadata"]["annotations"]
    assert pod_hash["finetune.dev/config-hash"] == cm["metadata"]["annotations"]["finetune.dev/config-hash"]


def test_suspend_follows_spec_or_enforced_stop(settings):
    assert by_kind(desired_children(resolved(suspend=True), settings))["Job"]["spec"]["suspend"] is True
    assert by_kind(desired_children(resolved(), settings, enforced_stop=True))["Job"]["spec"]["suspend"] is True
    assert by_kind(desired_children(resolved(), settings))["Job"]["spec"]["suspend"] is False


def test_trainer_role_allows_only_its_own_job(settings):
    role = by_kind(desired_children(resolved(), settings))["Role"]
    rules = {(tuple(r["resources"]), tuple(r["resourceNames"]), tuple(sorted(r["verbs"]))) for r in role["rules"]}
    assert rules == {
        (("finetunejobs",), ("bbc-news",), ("get", "watch")),
        (("finetunejobs/status",), ("bbc-news",), ("patch",)),
    }
    assert all(r["apiGroups"] == ["finetune.dev"] for r in role["rules"])
    binding = by_kind(desired_children(resolved(), settings))["RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": role["metadata"]["name"], "namespace": "team-a"}]


def test_own_service_account_skips_rbac(settings):
    children = desired_children(resolved(serviceAccountName="shared-trainer"), settings)
    assert [c["kind"] for c in children] == ["PersistentVolumeClaim", "ConfigMap", "Service", "Job"]
    assert by_kind(children)["Job"]["spec"]["template"]["spec"]["serviceAccountName"] == "shared-trainer"


def test_restricted_pod_security(settings):
    pod = by_kind(desired_children(resolved(), settings))["Job"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}


def test_volumes_and_scheduling(settings):
    children = desired_children(resolved(**CASES["pvcs-scheduling"]), settings)
    job = by_kind(children)["Job"]
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "out"}
    assert mounts["output"]["mountPath"] == "/output/run1" == env_of(job)["FINETUNE_OUTPUT_DIR"]
    assert volumes["model"]["persistentVolumeClaim"]["readOnly"] and mounts["model"]["readOnly"]
    assert volumes["data"]["persistentVolumeClaim"]["readOnly"] and mounts["data"]["readOnly"]
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"} and mounts["shm"]["mountPath"] == "/dev/shm"
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["priorityClassName"] == "high"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert job["spec"]["activeDeadlineSeconds"] == 3600 and job["spec"]["ttlSecondsAfterFinished"] == 600
    assert env_of(job)["HF_HUB_OFFLINE"] == "1"
    assert "PersistentVolumeClaim" not in by_kind(children)  # the user's claim is used, none is created


def _pod(children):
    return by_kind(children)["Job"]["spec"]["template"]["spec"]


def test_output_is_a_retained_claim_by_default(settings):
    children = desired_children(resolved(), settings)
    pvc = by_kind(children)["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "bbc-news-output" == names.output_pvc_name("bbc-news")
    # Retained: no ownerReference, so deleting the FineTuneJob (garbage collection) leaves the model.
    assert "ownerReferences" not in pvc["metadata"]
    # The creating job's uid: a re-created job of the same name tells the claim is not its own (plan/output_claim.py).
    assert pvc["metadata"]["annotations"] == {"finetune.dev/retain": "true", "finetune.dev/job-uid": resolved().uid}
    assert pvc["metadata"]["labels"]["finetune.dev/job-name"] == "bbc-news"  # how `kubectl delete pvc -l` finds it
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}}
    volumes = {v["name"]: v for v in _pod(children)["volumes"]}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "bbc-news-output"}
    assert not any("emptyDir" in v for n, v in volumes.items() if n != "shm")


def test_output_claim_size_and_class_from_spec_then_settings(settings):
    import dataclasses

    pvc = by_kind(desired_children(resolved(**CASES["pvc-not-retained"]), settings))["PersistentVolumeClaim"]
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == "0b6c2e8a-1111-2222-3333-444455556666"  # retain: false
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi" and pvc["spec"]["storageClassName"] == "fast-rwx"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # two nodes write to it
    chart = dataclasses.replace(settings, output_pvc_size="75Gi", output_storage_class="standard-rwo")
    pvc = by_kind(desired_children(resolved(), chart))["PersistentVolumeClaim"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "75Gi" and pvc["spec"]["storageClassName"] == "standard-rwo"


def test_ephemeral_output_and_object_store_credentials(settings):
    children = desired_children(resolved(**CASES["ephemeral-upload"]), settings)
    assert "PersistentVolumeClaim" not in by_kind(children)
    pod = _pod(children)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["output"] == {"name": "output", "emptyDir": {}}
    container = pod["containers"][0]
    # Credentials reach the trainer from the Secret only: env (envFrom) and files, never through spec or ConfigMap.
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert volumes["output-credentials"]["secret"] == {"secretName": "s3-creds"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["output-credentials"] == {"name": "output-credentials", "mountPath": "/var/run/secrets/finetune/output",
                                            "readOnly": True}
    config = json.loads(by_kind(children)["ConfigMap"]["data"]["config.json"])
    assert config["spec"]["output"]["uri"] == "s3://models/bbc" and config["spec"]["output"]["credentialsSecret"] == "s3-creds"


def test_termination_grace_period_is_rendered(settings):
    assert _pod(desired_children(resolved(), settings))["terminationGracePeriodSeconds"] == 600
    assert _pod(desired_children(resolved(terminationGracePeriodSeconds=1800), settings))["terminationGracePeriodSeconds"] == 1800


def test_config_map_names_its_schema_version(settings):
    from finetune_contract.config import SCHEMA_VERSION

    config = json.loads(by_kind(desired_children(resolved(), settings))["ConfigMap"]["data"]["config.json"])
    assert config["schemaVersion"] == SCHEMA_VERSION and config["kind"] == "TrainerConfig"


def test_user_env_cannot_override_the_trainer_contract(settings):
    job = by_kind(desired_children(resolved(env={"MASTER_PORT": "1", "EXTRA": "x"}), settings))["Job"]
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "MASTER_PORT"] == [{"name": "MASTER_PORT", "value": "29500"}]
    assert {"name": "EXTRA", "value": "x"} in env


def test_ownership_labels_and_deterministic_names(settings):
    a = desired_children(resolved(), settings)
    b = desired_children(resolved(), settings)
    assert a == b
    for child in a:
        meta = child["metadata"]
        if child["kind"] == "PersistentVolumeClaim":
            continue  # retained on purpose (test_output_is_a_retained_claim_by_default)
        assert meta["ownerReferences"] == [{
            "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "bbc-news",
            "uid": "0b6c2e8a-1111-2222-3333-444455556666", "controller": True, "blockOwnerDeletion": True,
        }]
        assert meta["labels"]["app.kubernetes.io/instance"] == "bbc-news"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "finetune-operator"
        assert meta["namespace"] == "team-a"


def test_long_names_stay_dns_labels():
    long = "j" * 50  # the API's maximum FineTuneJob name length
    for fn in (names.service_name, names.config_map_name, names.service_account_name):
        assert len(fn(long)) <= 63
    # pod hostnames are `<batch job>-<index>`: room for 3 digits of index plus the pod's random suffix
    assert len(names.batch_job_name(long)) <= 53
    assert names.child_name("x" * 70, "config") != names.child_name("x" * 69 + "y", "config")
    assert len(names.child_name("x" * 70, "config")) == 63


def test_cpu_threads_follow_the_cpu_limit(settings):
    from finetune_operator.plan.children import cpu_threads_per_process

    assert [cpu_threads_per_process(q, 1) for q in ("2", "1500m", 4, "250m", None, "lots")] == [2, 1, 4, 1, None, None]
    assert cpu_threads_per_process("8", 4) == 2

    def pod_env(**resources):
        return env_of(by_kind(desired_children(resolved(resources=resources), settings))["Job"])

    assert pod_env(limits={"cpu": "3"})["OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in pod_env()


def test_hub_token_comes_from_the_secret_never_the_spec(settings):
    children = desired_children(resolved(**CASES["hub-private-cached"]), settings)
    env = _pod(children)["containers"][0]["env"]
    token = [e for e in env if e["name"] == "HF_TOKEN"]
    # The kubelet resolves it: only the Secret's name and key appear in the pod, nothing in the ConfigMap.
    assert token == [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}}]
    config = by_kind(children)["ConfigMap"]["data"]["config.json"]
    assert json.loads(config)["spec"]["model"]["tokenSecret"] == {"name": "hf-token"}
    # A user variable of the same name cannot replace the secret's value.
    env = _pod(desired_children(resolved(**CASES["hub-private-cached"], env={"HF_TOKEN": "hf_leaked"}), settings))[
        "containers"][0]["env"]
    assert [e for e in env if e["name"] == "HF_TOKEN"] == token
    # Without tokenSecret there is no HF_TOKEN at all.
    assert "HF_TOKEN" not in env_of(by_kind(desired_children(resolved(), settings))["Job"])


def test_model_cache_claim_is_shared_and_is_hf_home(settings):
    import dataclasses

    def cache(job_settings, name="bbc-news", **spec):
        obj = manifest(**spec)
        obj["metadata"]["name"] = name
        pod = _pod(desired_children(validate_manifest(obj), job_settings))
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        return volumes.get("model-cache"), mounts.get("model-cache"), env.get("HF_HOME")

    assert cache(settings) == (None, None, None)  # no claim named anywhere: no cache
    volume, mount, home = cache(settings, **CASES["hub-private-cached"])
    assert volume == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}
    assert mount == {"name": "model-cache", "mountPath": "/cache/huggingface"} and home == "/cache/huggingface"
    chart = dataclasses.replace(settings, model_cache_pvc="team-cache")
    # Two jobs of the chart's default share one claim (the second finds the first one's download).
    for name in ("first", "second"):
        volume, _, home = cache(chart, name=name)
        assert volume["persistentVolumeClaim"]["claimName"] == "team-cache" and home == "/cache/huggingface"
    assert cache(chart, model={"name": "x", "cachePvc": "mine"})[0]["persistentVolumeClaim"]["claimName"] == "mine"
