"""status.timings.podStartSeconds (issue 13): the operator measures FineTuneJob created -> first trainer container
running, once, as a merge patch of that one key (the trainer owns the other keys of status.timings)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ftj_builders import manifest

from finetune_operator.plan.conditions import rfc3339
from finetune_operator.plan.status import job_input, observe, status_patch

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
JOB = {"metadata": {"name": "bbc-news-train"}, "spec": {"suspend": False}, "status": {"active": 1}}


def _obj(status):
    obj = manifest()
    obj["metadata"]["creationTimestamp"] = rfc3339(T0)
    obj["status"] = status
    return obj


def _running_pod(started: datetime):
    return {"metadata": {"name": "bbc-news-train-0-abcde"},
            "status": {"phase": "Running", "startTime": rfc3339(started - timedelta(seconds=3)),
                       "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": rfc3339(started)}}}]}}


def test_pod_start_is_created_to_container_running_and_written_once():
    pod = _running_pod(T0 + timedelta(seconds=42))
    status = {"phase": "Pending", "timings": {"dataSeconds": 1.5}}  # a trainer key already there
    new, _ = observe(job_input(_obj(status)), status, JOB, [pod], T0 + timedelta(seconds=50))
    patch = status_patch(status, new)
    # The container's own start, not when the operator happened to look (8 s later).
    assert patch["timings"] == {"podStartSeconds": 42.0}
    merged = {**status, "timings": {**status["timings"], **patch["timings"]}}  # a merge patch keeps dataSeconds
    again, _ = observe(job_input(_obj(merged)), merged, JOB, [pod], T0 + timedelta(seconds=90))
    assert "timings" not in status_patch(merged, again)


def test_no_pod_running_no_timing():
    status = {"phase": "Pending"}
    new, _ = observe(job_input(_obj(status)), status, JOB, [], T0 + timedelta(seconds=5))
    assert "timings" not in status_patch(status, new)
