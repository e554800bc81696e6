"""What the operator creates for a FineTuneJob: one function, `desired_children`, pure.

Children (owned by the FineTuneJob, so deleting it removes them through garbage collection):
ConfigMap (the resolved trainer config), headless Service (rendezvous DNS), Indexed batch/v1 Job
(one pod per node), and unless spec.serviceAccountName is set a ServiceAccount + Role + RoleBinding
that let the trainer read its own FineTuneJob and patch its status. Unless spec.output names a claim
or asks for an emptyDir, also a PersistentVolumeClaim `<job>-output` for the model, checkpoints and
result.json; with spec.output.retain (the default) it has no ownerReference, so it outlives the job.
"""

from __future__ import annotations

import hashlib
from typing import Any

from finetune_contract.config import EXIT_NOT_RETRYABLE, Env, Paths

from ..api import constants as c
from ..api.validation import ResolvedJob
from ..settings import Settings
from . import names
from .output_claim import JOB_UID_ANNOTATION

# Order matters only for readability of `kubectl get`: RBAC before the pods that use it, Job last.
KIND_ORDER = ("ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "ConfigMap", "Service", "Job")
RETAIN_ANNOTATION = f"{c.GROUP}/retain"  # on a kept output claim: why it has no ownerReference
TRAINER_CONTAINER = "trainer"
JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"  # the Job controller's label on its pods (Kubernetes >= 1.27)

# Pod Security Standard "restricted": non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp.
# https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted
TRAINER_UID = 1000
POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": TRAINER_UID,
    "runAsGroup": TRAINER_UID,
    "fsGroup": TRAINER_UID,  # emptyDir/PVC output stays writable for the non-root user
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def owner_reference(job: ResolvedJob) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": job.name,
        "uid": job.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(job: ResolvedJob, name: str, component: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": job.namespace,
        "labels": names.labels(job.name, component),
        "ownerReferences": [owner_reference(job)],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def creates_output_pvc(job: ResolvedJob) -> bool:
    out = job.spec.output
    return not out.pvc and not out.ephemeral


def output_claim_name(job: ResolvedJob) -> str | None:
    """The claim mounted at spec.output.path: the user's, ours, or None (emptyDir)."""
    if job.spec.output.pvc:
        return job.spec.output.pvc
    return names.output_pvc_name(job.name) if creates_output_pvc(job) else None


def output_pvc(job: ResolvedJob, settings: Settings) -> dict[str, Any]:
    """The job's output claim. Retained (the default): no ownerReference, so garbage collection leaves it when the
    FineTuneJob is deleted; stamped with the job's uid, so a re-created job of the same name resumes from its
    checkpoints only when it asks to (plan/output_claim.py)."""
    out = job.spec.output
    meta = _meta(job, names.output_pvc_name(job.name), "output")
    annotations = {JOB_UID_ANNOTATION: job.uid} if job.uid else {}  # whose output it holds (plan/output_claim.py)
    if out.retain:
        del meta["ownerReferences"]
        annotations[RETAIN_ANNOTATION] = "true"
    if annotations:
        meta["annotations"] = annotations
    spec: dict[str, Any] = {
        # Every node's rank 0 writes shards and checkpoints there, so more than one node needs ReadWriteMany.
        "accessModes": ["ReadWriteMany" if job.spec.distributed.nodes > 1 else "ReadWriteOnce"],
        "resources": {"requests": {"storage": out.size or settings.output_pvc_size}},
    }
    storage_class = out.storage_class_name or settings.output_storage_class
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def config_json(job: ResolvedJob) -> str:
    return job.config_json  # kept with the resolved job: every pass builds the ConfigMap and the pod template


def config_hash(job: ResolvedJob) -> str:
    return hashlib.sha256(config_json(job).encode()).hexdigest()[:16]


def config_map(job: ResolvedJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, names.config_map_name(job.name), "config", {c.Annotation.CONFIG_HASH: config_hash(job)}),
        "data": {names.CONFIG_KEY: config_json(job)},
    }


def headless_service(job: ResolvedJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, names.service_name(job.name), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            # Rendezvous happens before any pod is Ready (there is no readiness probe), so publish them at once.
            "publishNotReadyAddresses": True,
            "selector": {c.Label.JOB_NAME: job.name, c.Label.COMPONENT: "trainer"},
            "ports": [{"name": "rendezvous", "port": names.MASTER_PORT, "targetPort": names.MASTER_PORT, "protocol": "TCP"}],
        },
    }


def rbac(job: ResolvedJob) -> list[dict[str, Any]]:
    name = names.service_account_name(job.name)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(job, name, "rbac")},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(job, name, "rbac"),
            # Exactly what the trainer needs: read (poll/watch for stop requests) its own job, patch its status.
            "rules": [
                {"apiGroups": [c.GROUP], "resources": [c.PLURAL], "resourceNames": [job.name], "verbs": ["get", "watch"]},
                {"apiGroups": [c.GROUP], "resources": [f"{c.PLURAL}/status"], "resourceNames": [job.name], "verbs": ["patch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(job, name, "rbac"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": job.namespace}],
        },
    ]


def cpu_threads_per_process(cpu: int | str | None, processes: int) -> int | None:
    """Whole CPUs per training process from a Kubernetes CPU quantity ("2", "1500m", 4); None if unknown."""
    if cpu is None:
        return None
    text = str(cpu).strip()
    try:
        cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None
    return max(1, int(cores // max(1, processes)))


def model_cache_claim(job: ResolvedJob, settings: Settings) -> str | None:
    """The claim mounted as the Hugging Face cache (HF_HOME): the job's, else the chart's default, else none."""
    return job.spec.model.cache_pvc or settings.model_cache_pvc or None


def trainer_env(job: ResolvedJob, settings: Settings) -> list[dict[str, Any]]:
    spec = job.spec
    env = {
        Env.CONFIG: Paths.CONFIG_FILE,
        Env.OUTPUT_DIR: spec.output.path,
        Env.JOB_NAME: job.name,
        Env.JOB_NAMESPACE: job.namespace,
        Env.NNODES: str(spec.distributed.nodes),
        Env.NPROC_PER_NODE: str(spec.distributed.processes_per_node),
        Env.MASTER_ADDR: names.master_addr(job.name),
        Env.MASTER_PORT: str(names.MASTER_PORT),
        Env.METRICS_PORT: str(names.TRAINER_METRICS_PORT),
    }
    threads = cpu_threads_per_process(spec.resources.limits.get("cpu") or spec.resources.requests.get("cpu"),
                                      spec.distributed.processes_per_node)
    if threads and "OMP_NUM_THREADS" not in spec.env:
        # torch sizes its thread pools from the node's cores, not the pod's CPU limit: on a shared node that
        # oversubscribes the cores and a descheduled thread stalls every step (measured 10x slower).
        env["OMP_NUM_THREADS"] = str(threads)
    if model_cache_claim(job, settings):
        env[Env.HF_HOME] = Paths.MODEL_CACHE_MOUNT
    # The user's extra variables come first so ours (the contract with the trainer) cannot be overridden by accident.
    reserved = set(env) | {Env.RDZV_ID} | ({Env.HF_TOKEN} if spec.model.token_secret else set())
    out = [{"name": k, "value": literal(v)} for k, v in sorted(spec.env.items()) if k not in reserved]
    # Credentials by reference only: the kubelet reads the Secret; its value never passes through this operator.
    out += [{"name": k, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            for k, ref in sorted(spec.secret_env.items()) if k not in reserved]
    out += [{"name": k, "value": literal(v)} for k, v in env.items()]
    # The elastic rendezvous id: the batch Job's uid, so a re-created Job never joins an old Job's rendezvous.
    out.append({"name": Env.RDZV_ID, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{JOB_UID_LABEL}']"}}})
    if spec.model.token_secret:
        # The kubelet reads the Secret: the token never passes through the spec, the ConfigMap or the operator.
        ref = spec.model.token_secret
        out.append({"name": Env.HF_TOKEN, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return out


def literal(value: str) -> str:
    """`value` escaped so the kubelet passes it through as written: it expands `$(VAR)` in env values
    (and command/args), and `$$` is its escape for `$`, so doubling every `$` is exactly the inverse.
    https://kubernetes.io/docs/tasks/inject-data-application/define-interdependent-environment-variables/"""
    return value.replace("$", "$$")


def _resources(job: ResolvedJob) -> dict[str, Any]:
    r = job.spec.resources
    requests = {k: str(v) for k, v in r.requests.items()}
    limits = {k: str(v) for k, v in r.limits.items()}
    if r.gpu:
        # Extended resources cannot be overcommitted: Kubernetes requires requests == limits for them.
        n = str(job.spec.distributed.processes_per_node)
        requests[r.gpu_resource_name] = n
        limits[r.gpu_resource_name] = n
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _volumes(job: ResolvedJob, settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spec = job.spec
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": names.config_map_name(job.name)}}]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": names.CONFIG_DIR, "readOnly": True}]
    claim = output_claim_name(job)
    if claim:
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": claim}})
    else:  # spec.output.ephemeral: asked for; the OutputEphemeral condition warns that nothing survives the pod
        volumes.append({"name": "output", "emptyDir": {}})
    mounts.append({"name": "output", "mountPath": spec.output.path})
    if spec.output.credentials_secret:
        volumes.append({"name": "output-credentials", "secret": {"secretName": spec.output.credentials_secret}})
        mounts.append({"name": "output-credentials", "mountPath": Paths.OUTPUT_SECRET_MOUNT, "readOnly": True})
    if spec.model.pvc:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": spec.model.pvc, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": Paths.MODEL_PVC_MOUNT, "readOnly": True})
    if spec.dataset.pvc:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": spec.dataset.pvc, "readOnly": True}})
        mounts.append({"name": "data", "mountPath": Paths.DATA_PVC_MOUNT, "readOnly": True})
    cache = model_cache_claim(job, settings)
    if cache:
        # Shared by jobs and written by them (the first job of a model downloads it): not read-only.
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": cache}})
        mounts.append({"name": "model-cache", "mountPath": Paths.MODEL_CACHE_MOUNT})
    if spec.resources.shm_size:
        # Containers get a 64 MiB /dev/shm by default; data-loader workers and NCCL need more.
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    return volumes, mounts


def pod_template(job: ResolvedJob, settings: Settings) -> dict[str, Any]:
    spec = job.spec
    volumes, mounts = _volumes(job, settings)
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        # The launcher: trains in-process for world size 1, else runs torchrun with an elastic rendezvous hosted by
        # the pod of JOB_COMPLETION_INDEX 0 (docs/contracts.md, docs/multi-node.md).
        "command": ["finetune-trainer"],
        "env": trainer_env(job, settings),
        "ports": [
            {"name": "metrics", "containerPort": names.TRAINER_METRICS_PORT, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": names.MASTER_PORT, "protocol": "TCP"},
        ],
        "volumeMounts": mounts,
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        # The trainer writes {"reason", "message"} for failures a restart cannot fix (a full disk, an unreadable
        # dataset) to the default terminationMessagePath; any other crash shows the log's tail instead.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    # spec.envFrom (tokens for private models and data), then the object-store (and hub token) credentials
    # (boto/s3fs, gcsfs and huggingface_hub read their standard variables); the values never pass through the spec,
    # the ConfigMap or the operator. The API refuses two different credential Secrets (their keys would collide).
    # The explicit env above wins over all of them (Kubernetes' precedence), so the contract's variables stay ours.
    env_from = [{"secretRef": {"name": source.secret_ref.name}} for source in spec.env_from]
    secrets = dict.fromkeys(s for s in (spec.output.credentials_secret, spec.dataset.credentials_secret) if s)
    env_from += [{"secretRef": {"name": name}} for name in secrets]
    if env_from:
        container["envFrom"] = env_from
    resources = _resources(job)
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        # After SIGTERM the trainer writes a checkpoint; a sharded save needs far more than Kubernetes' 30 s.
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        # Indexed Job pods get hostname `<batch job>-<index>`; with this subdomain they resolve through the Service.
        "subdomain": names.service_name(job.name),
        "serviceAccountName": spec.service_account_name or names.service_account_name(job.name),
        "automountServiceAccountToken": True,  # the trainer reports progress with this token
        "enableServiceLinks": False,
        "securityContext": POD_SECURITY_CONTEXT,
        "containers": [container],
        "volumes": volumes,
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    labels = names.labels(job.name, "trainer")
    return {"metadata": {"labels": labels, "annotations": {c.Annotation.CONFIG_HASH: config_hash(job)}}, "spec": pod}


def pod_failure_policy() -> dict[str, Any]:
    """How the Job controller counts a failed training pod (rules in order; the first that matches decides).

    - exit codes no restart can fix (a world other than the job's, a config this trainer cannot read): FailJob, so
      the job fails at once with the reason instead of burning backoffLimit on identical failures;
    - a pod with the DisruptionTarget condition (preemption, node drain, eviction, taint manager, pod GC of a lost
      node): Ignore, so infrastructure is not charged to spec.backoffLimit; the replacement rejoins the group;
    - anything else (the job's own code: a crash, an OOM kill, exit 143 after SIGTERM without a disruption) is
      counted against spec.backoffLimit, the Job controller's default when no rule matches.
    https://kubernetes.io/docs/concepts/workloads/controllers/job/#pod-failure-policy
    """
    return {"rules": [
        {"action": "FailJob",
         "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": sorted(EXIT_NOT_RETRYABLE)}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def batch_job(job: ResolvedJob, settings: Settings, *, enforced_stop: bool = False) -> dict[str, Any]:
    spec = job.spec
    nodes = spec.distributed.nodes
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": spec.backoff_limit,
        # podFailurePolicy needs restartPolicy Never (the template's) and, as the API server defaults it,
        # podReplacementPolicy Failed: a replacement starts only once the lost pod is fully terminated, so two
        # pods of one index never race for its rendezvous rank.
        "podFailurePolicy": pod_failure_policy(),
        "podReplacementPolicy": "Failed",
        # Kueue-style queueing and our own stop enforcement both work through suspend.
        "suspend": bool(spec.suspend or enforced_stop),
        "template": pod_template(job, settings),
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(job, names.batch_job_name(job.name), "trainer"),
        "spec": job_spec,
    }


def desired_children(job: ResolvedJob, settings: Settings, *, enforced_stop: bool = False) -> list[dict[str, Any]]:
    """Every child the FineTuneJob should have, in creation order.

    `enforced_stop`: the operator stopped the job itself (grace period over, stall, NaN loss), so the
    Job stays suspended whatever spec.suspend says.
    """
    children = []
    if not job.spec.service_account_name:
        children += rbac(job)
    if creates_output_pvc(job):
        children.append(output_pvc(job, settings))
    children += [config_map(job), headless_service(job), batch_job(job, settings, enforced_stop=enforced_stop)]
    return children
