"""Whose is the retained output claim? Pure: the claim as the cache holds it and the job -> a verdict.

A retained `<job>-output` claim (spec.output.retain, the default) has no ownerReference, so it outlives its
FineTuneJob. A FineTuneJob deleted and re-created under the same name finds it, and its trainer would resume
from the earlier job's checkpoints (of another model, other data) and write over its model. So the operator
stamps each claim it creates with the creating job's uid (`finetune.dev/job-uid`); a job with another uid
gets the claim only when it asks for it (`spec.output.reuseRetainedClaim: true`: it resumes from the earlier
job's checkpoints, and from then on the claim carries its uid). Otherwise no pod mounts the claim: the job
waits with condition Ready=False reason OutputClaimInUse and a Warning Event that name the claim and both
fixes, and proceeds as soon as the claim is deleted (a watch event starts the pass).

A claim made by an operator before the stamp existed has none: it is this job's when it was not created
before the job (a job's own claim is created after it), else an earlier job's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from ..api import constants as c
from .conditions import parse_time

JOB_UID_ANNOTATION = f"{c.GROUP}/job-uid"  # on the output claim: the uid of the FineTuneJob that created it


class Verdict(enum.Enum):
    NEW = "new"  # no claim yet: the operator creates it, stamped with this job's uid
    OURS = "ours"  # this job's claim (its uid, or an unstamped claim made after the job)
    ADOPTED = "adopted"  # an earlier job's claim that this job asked to reuse (spec.output.reuseRetainedClaim)
    EARLIER_JOB = "earlier-job"  # an earlier job's claim, not asked for: nothing mounts it


@dataclass(frozen=True)
class ClaimCheck:
    verdict: Verdict
    earlier_uid: str | None = None  # the uid the claim carries, when it is another job's

    @property
    def refused(self) -> bool:
        return self.verdict is Verdict.EARLIER_JOB


def check_claim(claim: dict[str, Any] | None, job_uid: str | None, job_created: str | None, *,
                reuse: bool) -> ClaimCheck:
    """The verdict on the observed output claim of a job that uses the operator's claim."""
    if claim is None:
        return ClaimCheck(Verdict.NEW)
    meta = claim.get("metadata") or {}
    if not job_uid:
        return ClaimCheck(Verdict.OURS)  # nothing to tell jobs apart by (only jobs built in tests lack a uid)
    stamp = (meta.get("annotations") or {}).get(JOB_UID_ANNOTATION)
    if stamp == job_uid or any(r.get("uid") == job_uid for r in meta.get("ownerReferences") or []):
        return ClaimCheck(Verdict.OURS)
    if not stamp and not _created_before(meta.get("creationTimestamp"), job_created):
        return ClaimCheck(Verdict.OURS)  # an unstamped claim made after this job: made for it
    return ClaimCheck(Verdict.ADOPTED if reuse else Verdict.EARLIER_JOB, stamp or None)


def _created_before(claim_created: str | None, job_created: str | None) -> bool:
    a, b = parse_time(claim_created), parse_time(job_created)
    return a is not None and b is not None and a < b


def refusal_message(claim_name: str, namespace: str, job_name: str, check: ClaimCheck) -> str:
    """Names the claim, whose it is, and both fixes (condition message and Event)."""
    whose = f"uid {check.earlier_uid}" if check.earlier_uid else "created before this one"
    return (f"PersistentVolumeClaim {namespace}/{claim_name} holds the output of an earlier FineTuneJob named {job_name} "
            f"({whose}): its checkpoints and model are not this job's, so no pod mounts it. Delete it to start fresh "
            f"(kubectl delete pvc -n {namespace} {claim_name}; its model is lost), or set "
            "spec.output.reuseRetainedClaim: true to resume from its checkpoints and write over its model")
