"""The operator's settings: read from the environment once, in this one place (STYLE rule 6).

Every field says why it exists, its unit and its default. Names and defaults of the `FTO_*`
variables are part of docs/contracts.md (the Helm chart sets them).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()
    """FTO_NAMESPACES: namespaces to watch (comma list). Empty: cluster-wide (kopf `-A`)."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """FTO_TRAINER_IMAGE: image for jobs that leave spec.image unset."""

    image_pull_policy: str = "IfNotPresent"
    """FTO_IMAGE_PULL_POLICY: pull policy of the trainer container. Default IfNotPresent."""

    log_format: str = "text"
    """FTO_LOG_FORMAT: `json` (one JSON object per line, for log collectors) or `text`. Default text."""

    log_level: str = "INFO"
    """FTO_LOG_LEVEL: Python logging level name. Default INFO."""

    metrics_port: int = 8080
    """FTO_METRICS_PORT: Prometheus metrics port; 0 disables the exporter. Default 8080."""

    health_port: int = 8081
    """FTO_HEALTH_PORT: kopf liveness endpoint port (`/healthz`); 0 disables it. Default 8081."""

    peering: str = ""
    """FTO_PEERING: kopf peering object name for several replicas; empty: standalone (one replica)."""

    peering_priority: int = 0
    """FTO_PEERING_PRIORITY: this replica's kopf peering priority (the highest active replica works, the
    others stand by). Default: derived from the pod's hostname, so replicas never tie: kopf pauses
    every replica when two peers share a priority."""

    peering_lifetime_seconds: int = 60
    """FTO_PEERING_LIFETIME_SECONDS: how long a replica's peering record counts as alive without a keep-alive
    (kopf's peering lifetime; replicas renew it 5-10 s before it expires). A standby replica takes over at
    most this long after the active one dies, so it bounds the fail-over time. Default 60 (kopf's)."""

    resync_seconds: float = 10.0
    """FTO_RESYNC_SECONDS: the longest a job whose clock matters (a pending stop's grace period, the stall
    watchdog of a running job) waits between passes that no watch event triggered (seconds). Such passes
    read the watch cache and send nothing unless something is due. Jobs without a clock (pending,
    suspended, finished) are visited only on events. Default 10; tests lower it."""

    memory_trim_seconds: float = 30.0
    """FTO_MEMORY_TRIM_SECONDS: every this many seconds in which reconcile passes ran, return the memory they freed
    to the operating system (one garbage collection and glibc's malloc_trim; finetune_operator/memory.py).
    0 turns it off. Default 30."""

    api_timeout_seconds: float = 10.0
    """FTO_API_TIMEOUT_SECONDS: read timeout of every API call the operator makes itself (seconds).
    Default 10: a reconcile must never hang on a slow API server."""

    api_connect_timeout_seconds: float = 5.0
    """FTO_API_CONNECT_TIMEOUT_SECONDS: TCP connect timeout of every API call (seconds). Default 5."""

    api_pool_size: int = 16
    """FTO_API_POOL_SIZE: connections kept per client (ours and kopf's). Default 16: an unbounded kopf pool
    opened ~275 connections with 200 jobs at once and used 75% more memory for no throughput gain."""

    workers: int = 8
    """FTO_WORKERS: threads running reconcile passes (each job is in at most one pass at a time). Default 8."""

    apply_concurrency: int = 16
    """FTO_APPLY_CONCURRENCY: child writes in flight at once, across all jobs (one job's children are applied
    concurrently). Default 16, the size of the connection pool, so writes never wait for a connection."""

    api_qps: float = 5000.0
    """FTO_API_QPS: client-side rate limit of our own API calls (requests/s, token bucket like client-go's
    QPS; 0 disables it). A safety net against a runaway (a write loop over many jobs), never a throttle of normal
    work: steady state sends ~0 requests and creating a job 9 (7 children, 1 status, 1 Event), and the operator
    creates ~175 jobs/s on 2 cores, ~1,600 requests/s (bench/operator_throughput.py with FTO_API_QPS=0 against the
    test API emulation). The default 1000 capped creation at ~111 jobs/s, the operator waiting on its own bucket
    with CPU to spare. The API server protects itself through Priority and Fairness (429 + Retry-After, which we
    honour); controller-runtime now turns its client-side limit off by default on SIG API Machinery's advice.
    Every wait is counted (`finetune_operator_api_client_throttled_*`) and logged. Default 5000."""

    api_burst: int = 10000
    """FTO_API_BURST: requests allowed at once above FTO_API_QPS (token bucket size). Default 10000 (the
    creation of ~1,000 jobs at once)."""

    api_retries: int = 5
    """FTO_API_RETRIES: attempts of one API call on 429 (waiting the server's Retry-After), 5xx and
    timeouts (exponential backoff from 0.2 s, capped at 10 s) before the pass fails. Default 5."""

    retry_base_seconds: float = 0.5
    """FTO_RETRY_BASE_SECONDS: first delay before a failed pass is retried; doubled per consecutive failure
    of that job (seconds). Default 0.5."""

    retry_max_seconds: float = 300.0
    """FTO_RETRY_MAX_SECONDS: cap of that backoff: a job that keeps failing is retried at least this often,
    never dropped (seconds). Default 300, like controller-runtime's 1000 s cap but sooner."""

    watch_server_timeout_seconds: int = 300
    """FTO_WATCH_SERVER_TIMEOUT_SECONDS: the API server closes a watch after this long and kopf re-lists,
    so a silently broken watch heals itself (seconds). Default 300."""

    output_pvc_size: str = "20Gi"
    """FTO_OUTPUT_PVC_SIZE: size of the output PersistentVolumeClaim created for a job that sets neither
    spec.output.pvc nor spec.output.size (a Kubernetes quantity). Default 20Gi (chart `output.defaultSize`)."""

    output_storage_class: str = ""
    """FTO_OUTPUT_STORAGE_CLASS: StorageClass of those claims when spec.output.storageClassName is unset; empty:
    the cluster's default StorageClass (chart `output.storageClassName`)."""

    model_cache_pvc: str = ""
    """FTO_MODEL_CACHE_PVC: PersistentVolumeClaim mounted as the Hugging Face cache (HF_HOME) of every job that leaves
    spec.model.cachePvc unset, so jobs of the same base model download it once; empty: no shared cache
    (chart `modelCache.claimName`)."""

    extra: Mapping[str, str] = field(default_factory=dict)
    """Unused variables with the FTO_ prefix (reported at start-up so a typo does not go unnoticed)."""

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


_KNOWN = {
    "FTO_NAMESPACES", "FTO_TRAINER_IMAGE", "FTO_IMAGE_PULL_POLICY", "FTO_LOG_FORMAT", "FTO_LOG_LEVEL",
    "FTO_METRICS_PORT", "FTO_HEALTH_PORT", "FTO_PEERING", "FTO_PEERING_PRIORITY", "FTO_PEERING_LIFETIME_SECONDS", "FTO_RESYNC_SECONDS", "FTO_MEMORY_TRIM_SECONDS", "FTO_API_TIMEOUT_SECONDS",
    "FTO_API_CONNECT_TIMEOUT_SECONDS", "FTO_API_POOL_SIZE", "FTO_WORKERS", "FTO_WATCH_SERVER_TIMEOUT_SECONDS",
    "FTO_APPLY_CONCURRENCY", "FTO_API_QPS", "FTO_API_BURST", "FTO_API_RETRIES", "FTO_RETRY_BASE_SECONDS",
    "FTO_RETRY_MAX_SECONDS",
    "FTO_OUTPUT_PVC_SIZE", "FTO_OUTPUT_STORAGE_CLASS", "FTO_MODEL_CACHE_PVC",
}


def _hostname_priority(env: Mapping[str, str]) -> int:
    host = env.get("HOSTNAME") or socket.gethostname()
    return int(hashlib.sha256(host.encode()).hexdigest()[:7], 16)  # stable per pod, < 2**28


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    d = Settings()

    def num(name: str, default, kind=float):
        raw = env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
        if value < 0:
            raise ValueError(f"{name}={raw!r} must not be negative")
        return value

    log_format = env.get("FTO_LOG_FORMAT", d.log_format).strip().lower() or d.log_format
    if log_format not in ("json", "text"):
        raise ValueError(f"FTO_LOG_FORMAT={log_format!r} must be json or text")
    return Settings(
        namespaces=tuple(n.strip() for n in env.get("FTO_NAMESPACES", "").split(",") if n.strip()),
        trainer_image=env.get("FTO_TRAINER_IMAGE", "").strip() or d.trainer_image,
        image_pull_policy=env.get("FTO_IMAGE_PULL_POLICY", "").strip() or d.image_pull_policy,
        log_format=log_format,
        log_level=env.get("FTO_LOG_LEVEL", "").strip().upper() or d.log_level,
        metrics_port=num("FTO_METRICS_PORT", d.metrics_port, int),
        health_port=num("FTO_HEALTH_PORT", d.health_port, int),
        peering=env.get("FTO_PEERING", "").strip(),
        peering_priority=num("FTO_PEERING_PRIORITY", _hostname_priority(env), int),
        peering_lifetime_seconds=max(2, num("FTO_PEERING_LIFETIME_SECONDS", d.peering_lifetime_seconds, int)),
        resync_seconds=max(0.2, num("FTO_RESYNC_SECONDS", d.resync_seconds)),
        memory_trim_seconds=num("FTO_MEMORY_TRIM_SECONDS", d.memory_trim_seconds),
        api_timeout_seconds=max(0.5, num("FTO_API_TIMEOUT_SECONDS", d.api_timeout_seconds)),
        api_connect_timeout_seconds=max(0.5, num("FTO_API_CONNECT_TIMEOUT_SECONDS", d.api_connect_timeout_seconds)),
        api_pool_size=max(1, num("FTO_API_POOL_SIZE", d.api_pool_size, int)),
        workers=max(1, num("FTO_WORKERS", d.workers, int)),
        apply_concurrency=max(1, num("FTO_APPLY_CONCURRENCY", d.apply_concurrency, int)),
        api_qps=num("FTO_API_QPS", d.api_qps),
        api_burst=max(1, num("FTO_API_BURST", d.api_burst, int)),
        api_retries=max(1, num("FTO_API_RETRIES", d.api_retries, int)),
        retry_base_seconds=max(0.01, num("FTO_RETRY_BASE_SECONDS", d.retry_base_seconds)),
        retry_max_seconds=max(0.01, num("FTO_RETRY_MAX_SECONDS", d.retry_max_seconds)),
        watch_server_timeout_seconds=max(10, num("FTO_WATCH_SERVER_TIMEOUT_SECONDS", d.watch_server_timeout_seconds, int)),
        output_pvc_size=env.get("FTO_OUTPUT_PVC_SIZE", "").strip() or d.output_pvc_size,
        output_storage_class=env.get("FTO_OUTPUT_STORAGE_CLASS", "").strip(),
        model_cache_pvc=env.get("FTO_MODEL_CACHE_PVC", "").strip(),
        extra={k: v for k, v in env.items() if k.startswith("FTO_") and k not in _KNOWN},
    )
