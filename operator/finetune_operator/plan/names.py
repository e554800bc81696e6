"""Deterministic child names and labels of a FineTuneJob."""

from __future__ import annotations

import hashlib

from finetune_contract.config import Paths, Ports

from ..api import constants as c

DNS_LABEL_MAX = 63
# The trainer's side of these is finetune_contract.config (one definition for both images).
MASTER_PORT = Ports.RENDEZVOUS
TRAINER_METRICS_PORT = Ports.METRICS
CONFIG_DIR = Paths.CONFIG_DIR
CONFIG_KEY = Paths.CONFIG_KEY


def child_name(job: str, suffix: str, limit: int = DNS_LABEL_MAX) -> str:
    """`<job>-<suffix>`, cut to `limit` with a hash of the full name so two long names never collide."""
    name = f"{job}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


# The batch Job's pods are named `<batch job>-<index>-<random>` and their hostname is `<batch job>-<index>`,
# so the batch Job's name keeps room for the index (up to 3 digits) and the random part.
def batch_job_name(job: str) -> str:
    return child_name(job, "train", DNS_LABEL_MAX - 10)


def service_name(job: str) -> str:
    return child_name(job, "workers")


def config_map_name(job: str) -> str:
    return child_name(job, "config")


def service_account_name(job: str) -> str:
    return child_name(job, "trainer")


def output_pvc_name(job: str) -> str:
    return child_name(job, "output")


def master_addr(job: str) -> str:
    """Pod 0's DNS name through the headless Service (Indexed Job hostname `<batch job>-0`)."""
    return f"{batch_job_name(job)}-0.{service_name(job)}"


def labels(job: str, component: str) -> dict[str, str]:
    return {
        c.Label.NAME: "finetune-trainer",
        c.Label.INSTANCE: job,
        c.Label.COMPONENT: component,
        c.Label.PART_OF: "finetune-operator",
        c.Label.MANAGED_BY: c.FIELD_MANAGER,
        c.Label.JOB_NAME: job,
    }


def selector(job: str) -> str:
    """Label selector of every child (and pod) of `job`."""
    return f"{c.Label.MANAGED_BY}={c.FIELD_MANAGER},{c.Label.JOB_NAME}={job}"
