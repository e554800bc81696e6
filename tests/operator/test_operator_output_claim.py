"""A retained output claim of an earlier FineTuneJob of the same name: never mounted, resumed or overwritten
unless the new job asks for it (plan/output_claim.py; the reconcile pass against a recording fake API)."""

from __future__ import annotations

import copy

from ftj_builders import manifest
from test_operator_reconcile import KEY, reconciler

from finetune_operator.api import validate_manifest
from finetune_operator.plan.children import output_pvc
from finetune_operator.plan.output_claim import JOB_UID_ANNOTATION, Verdict, check_claim, refusal_message
from finetune_operator.settings import Settings

UID = "0b6c2e8a-1111-2222-3333-444455556666"  # ftj_builders' job
EARLIER = "9f9f9f9f-aaaa-bbbb-cccc-ddddeeeeffff"


def claim(stamp: str | None = None, created: str = "2026-12-01T10:00:00Z", owner: str | None = None) -> dict:
    meta = {"name": "bbc-news-output", "namespace": "team-a", "uid": "pvc-1", "resourceVersion": "7",
            "creationTimestamp": created,
            "labels": {"finetune.dev/job-name": "bbc-news", "app.kubernetes.io/managed-by": "finetune-operator"},
            "annotations": {"finetune.dev/retain": "true", **({JOB_UID_ANNOTATION: stamp} if stamp else {})}}
    if owner:
        meta["ownerReferences"] = [{"uid": owner, "controller": True}]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta,
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}}}


def test_verdicts():
    job_created = "2026-12-01T12:00:00Z"
    assert check_claim(None, UID, job_created, reuse=False).verdict is Verdict.NEW
    assert check_claim(claim(UID), UID, job_created, reuse=False).verdict is Verdict.OURS
    assert check_claim(claim(owner=UID), UID, job_created, reuse=False).verdict is Verdict.OURS  # retain: false
    earlier = check_claim(claim(EARLIER), UID, job_created, reuse=False)
    assert earlier.verdict is Verdict.EARLIER_JOB and earlier.refused and earlier.earlier_uid == EARLIER
    # A stamp is trusted over the clock: another uid is another job even when its claim looks younger.
    assert check_claim(claim(EARLIER, created="2026-12-01T13:00:00Z"), UID, job_created, reuse=False).refused
    adopted = check_claim(claim(EARLIER), UID, job_created, reuse=True)
    assert adopted.verdict is Verdict.ADOPTED and not adopted.refused
    # Claims made before the stamp existed: older than the job means an earlier job's; made after it, this job's.
    assert check_claim(claim(), UID, job_created, reuse=False).verdict is Verdict.EARLIER_JOB
    assert check_claim(claim(created="2026-12-01T12:00:01Z"), UID, job_created, reuse=False).verdict is Verdict.OURS
    assert check_claim(claim(created="2026-12-01T12:00:00Z"), UID, job_created, reuse=False).verdict is Verdict.OURS
    message = refusal_message("bbc-news-output", "team-a", "bbc-news", earlier)
    assert "team-a/bbc-news-output" in message and EARLIER in message
    assert "kubectl delete pvc -n team-a bbc-news-output" in message and "spec.output.reuseRetainedClaim: true" in message


def test_the_claim_the_operator_creates_carries_the_jobs_uid():
    pvc = output_pvc(validate_manifest(manifest()), Settings())
    assert pvc["metadata"]["annotations"][JOB_UID_ANNOTATION] == UID
    assert "ownerReferences" not in pvc["metadata"]  # retained: the stamp is what ties it to its job


def _sent(api, fragment: str) -> list[tuple[str, str]]:
    return [(m, p) for m, p in api.calls if fragment in p]


def test_an_earlier_jobs_claim_is_never_mounted_until_reuse_is_asked_for():
    r, api = reconciler()
    r.cache.put_child("PersistentVolumeClaim", claim(EARLIER))
    assert r.process(KEY) == "conflict"
    # No training Job (its pod would mount the claim) and no write to the claim, not even of its metadata.
    assert not _sent(api, "/jobs") and not _sent(api, "persistentvolumeclaims")
    assert _sent(api, "/configmaps")  # the rest of the children are there, ready for either fix
    st = r.cache.ftj(KEY)["status"]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "OutputClaimInUse"
    assert "team-a/bbc-news-output" in ready["message"] and "reuseRetainedClaim" in ready["message"]
    events = [c for c in api.calls if c[1].endswith("/events")]
    assert len(events) == 2  # ChildrenCreated-style pass Event and one Warning for the claim
    api.calls.clear()
    assert r.process(KEY) == "conflict"  # the same refusal again: no status write, no new Event, still no Job
    assert api.calls == []

    # The user opts in (a field that may change after the children exist): the Job comes, and the claim now
    # carries this job's uid, so it is this job's from then on.
    ftj = copy.deepcopy(r.cache.ftj(KEY))
    ftj["spec"]["output"] = {**(ftj["spec"].get("output") or {}), "reuseRetainedClaim": True}
    ftj["metadata"]["resourceVersion"] = "9999"  # newer than every answer of the fake API
    ftj["metadata"]["generation"] = 2
    api.ftj = ftj
    r.cache.put_ftj(ftj)
    api.calls.clear()
    r.process(KEY)
    assert _sent(api, "/jobs") and ("PATCH", "/api/v1/namespaces/team-a/persistentvolumeclaims/bbc-news-output") in api.calls
    stamped = r.cache.owned(KEY)[("PersistentVolumeClaim", "bbc-news-output")]
    assert stamped["metadata"]["annotations"][JOB_UID_ANNOTATION] == UID
    st = api.ftj["status"]  # what the pass patched (the cache keeps the hand-made newer version)
    assert not any(c.get("reason") == "OutputClaimInUse" for c in st["conditions"])


def test_deleting_the_earlier_claim_lets_the_job_start_fresh():
    r, api = reconciler()
    old = claim(EARLIER)
    r.cache.put_child("PersistentVolumeClaim", old)
    r.process(KEY)
    r.cache.drop_child("PersistentVolumeClaim", old)
    api.calls.clear()
    r.process(KEY)
    assert ("POST", "/api/v1/namespaces/team-a/persistentvolumeclaims") in api.calls and _sent(api, "/jobs")
