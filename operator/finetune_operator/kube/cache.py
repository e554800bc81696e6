"""An informer-style store: the FineTuneJobs, their children and pods as the watches delivered them.

Why: a reconcile that GETs the FineTuneJob, its Job and LISTs its pods costs ~3 requests per pass (65-104
requests per running job per minute were measured on a real server); controller-runtime's informers
serve those reads from watch-fed caches, so steady state costs only the open watches. Every FineTuneJob and
every labelled child and pod is streamed into this store (handlers/cache_feed.py: from the Reflectors of
handlers/watches.py, or kopf's watches with peering); our own writes are stored with the answer the server
gave (write-through), so the next pass compares against what the server holds without waiting for the echo.

Objects are kept without `metadata.managedFields` (often half of an object's size and never read here).
Thread-safe: the watch threads (or kopf's event loop) write, the reconcile workers read snapshots.
"""

from __future__ import annotations

import threading
from typing import Any

import orjson

from ..api import constants as c

JobKey = tuple[str, str]  # (namespace, FineTuneJob name)
ChildKey = tuple[str, str]  # (kind, name)


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
FTJ_WRITE = ("FineTuneJob", "")  # `writing`'s (kind, name) for a job's own status write


def _slim(obj: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
    """What the reconcile reads, without what it never does: `managedFields` (often half an object),
    kubectl's last-applied annotation (a second copy of the object), and a pod's spec (only its metadata
    and status are read). Measured: RSS with 1,000 running jobs fell from 191 MiB (full objects)."""
    meta = obj.get("metadata") or {}
    ann = meta.get("annotations") or {}
    if "managedFields" in meta or LAST_APPLIED in ann:
        meta = {k: v for k, v in meta.items() if k != "managedFields"}
        if LAST_APPLIED in ann:
            meta["annotations"] = {k: v for k, v in ann.items() if k != LAST_APPLIED}
        obj = {**obj, "metadata": meta}
    if kind == "Pod" and "spec" in obj:
        obj = {k: v for k, v in obj.items() if k != "spec"}
    return obj


def _rv(obj: dict[str, Any] | None) -> int | None:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return None


class _Stored:
    """One cached object as compact JSON: ~5x smaller than the decoded dicts (measured: RSS of an operator
    with 1,000 running jobs), decoded only when a pass reads it (~0.1 ms per object; passes are rare in
    steady state). resourceVersion and uid stay readable for the freshness checks."""

    __slots__ = ("data", "rv", "uid")

    def __init__(self, obj: dict[str, Any]) -> None:
        self.rv = _rv(obj)
        self.uid = (obj.get("metadata") or {}).get("uid")
        # Copied into a bytes object of its own size: orjson's output buffer is over-allocated, and kept as it is
        # it cost 34 MiB more RSS with 1,000 jobs cached (82 -> 116 MiB, bench/operator_throughput.py); the copy
        # keeps the 81-82 MiB of the json module's encoding at orjson's speed.
        self.data = bytes(memoryview(orjson.dumps(obj)))

    def get(self) -> dict[str, Any]:
        return orjson.loads(self.data)


def _replaces(new: dict[str, Any], old: _Stored | None) -> bool:
    """Whether `new` may replace `old`. resourceVersions are opaque to clients in general, but every server
    we know (etcd revisions) makes them increasing integers; comparing them keeps a late watch event from
    overwriting the answer of our own, newer write. Unreadable versions always replace."""
    a = _rv(new)
    return old is None or a is None or old.rv is None or a >= old.rv


def _same(new: dict[str, Any], old: _Stored | None) -> bool:
    return old is not None and old.rv is not None and old.rv == _rv(new)


class Cache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ftjs: dict[JobKey, _Stored] = {}
        self._owned: dict[JobKey, dict[ChildKey, _Stored]] = {}
        # Objects whose write (ours) is in flight -> the resourceVersion of its answer, once stored (see `writing`).
        self._writing: dict[tuple[JobKey, ChildKey], int | None] = {}

    # -- FineTuneJobs -----------------------------------------------------------------------------------

    def put_ftj(self, obj: dict[str, Any], answer: bool = False) -> bool:
        """Store a FineTuneJob; False when this or a newer version is already stored (nothing new: the
        watch echo of our own status write, whose answer was stored when we made it). `answer`: the answer to
        our status write in flight (see `writing`)."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        stored = _Stored(_slim(obj))
        with self._lock:
            if answer:
                self._answered(key, FTJ_WRITE, obj)
            old = self._ftjs.get(key)
            if not _replaces(obj, old):
                return False
            self._ftjs[key] = stored
            return not _same(obj, old) and (key, FTJ_WRITE) not in self._writing

    def drop_ftj(self, key: JobKey) -> None:
        with self._lock:
            self._ftjs.pop(key, None)

    def ftj(self, key: JobKey) -> dict[str, Any] | None:
        with self._lock:
            stored = self._ftjs.get(key)
        return stored.get() if stored is not None else None

    def ftj_keys(self) -> list[JobKey]:
        with self._lock:
            return list(self._ftjs)

    # -- children and pods, by the job label -----------------------------------------------------------

    @staticmethod
    def job_of(obj: dict[str, Any]) -> JobKey | None:
        meta = obj.get("metadata") or {}
        job = (meta.get("labels") or {}).get(c.Label.JOB_NAME)
        return (meta.get("namespace") or "", job) if job else None

    def put_child(self, kind: str, obj: dict[str, Any], job: JobKey | None = None, answer: bool = False) -> JobKey | None:
        """Store a child (or pod) under its job label; the job's key, or None for an unlabelled object and
        for a version already stored (the watch echo of our own write: nothing new to reconcile)."""
        job = job or self.job_of(obj)
        if job is None:
            return None
        key = (kind, (obj.get("metadata") or {}).get("name") or "")
        with self._lock:
            if answer:
                self._answered(job, key, obj)
            old = (self._owned.get(job) or {}).get(key)
        if not _replaces(obj, old) or _same(obj, old):
            return None  # older, or the version stored (the echo of our write): not even encoded again
        stored = _Stored(_slim(obj, kind))
        with self._lock:
            owned = self._owned.setdefault(job, {})
            old = owned.get(key)
            if not _replaces(obj, old):
                return None
            owned[key] = stored
            if _same(obj, old) or (job, key) in self._writing:
                return None
        return job

    def writing(self, job: JobKey, kind: str, name: str) -> None:
        """Our write of this child is in flight. Its watch event can arrive before the write's answer (separate
        connections); stored then, it would otherwise queue the job for a pass that only finds its own write
        (measured: one extra pass per new job, ~3 ms each). The answer is stored with `answer=True`; `written`
        ends it. A job's own status write is `writing(job, *FTJ_WRITE)`: the FineTuneJob's watch event races
        its answer the same way."""
        with self._lock:
            self._writing[(job, (kind, name))] = None

    def _answered(self, job: JobKey, key: ChildKey, obj: dict[str, Any]) -> None:
        if (job, key) in self._writing:
            self._writing[(job, key)] = _rv(obj)

    def written(self, job: JobKey, kind: str, name: str) -> bool:
        """The write ended. True when the cache holds a newer version than the write's answer: someone else's
        change arrived meanwhile, and its event queued nothing, so the caller must give the job another pass.
        False without an answer (the write failed: the caller retries anyway)."""
        with self._lock:
            rv = self._writing.pop((job, (kind, name)), None)
            stored = self._ftjs.get(job) if (kind, name) == FTJ_WRITE else (self._owned.get(job) or {}).get((kind, name))
        return stored is not None and stored.rv is not None and rv is not None and stored.rv > rv

    def drop_child(self, kind: str, obj: dict[str, Any], job: JobKey | None = None) -> JobKey | None:
        job = job or self.job_of(obj)
        if job is None:
            return None
        name = (obj.get("metadata") or {}).get("name") or ""
        with self._lock:
            owned = self._owned.get(job)
            if owned is not None:
                stored = owned.get((kind, name))
                # A DELETED event for an older incarnation must not drop a newer object of the same name.
                if stored is not None and stored.uid in (None, (obj.get("metadata") or {}).get("uid")):
                    owned.pop((kind, name), None)
                if not owned:
                    self._owned.pop(job, None)
        return job

    # -- a fresh listing (client-go's Replace) ---------------------------------------------------------

    def replace(self, kind: str, namespace: str | None, present: set[tuple[str, str]],
                list_rv: str | None) -> set[JobKey]:
        """A complete LIST of `kind` (in `namespace`, or everywhere when None) answered at `list_rv`: what the
        cache holds of that kind and scope but the listing lacks was deleted while no watch was open (a
        watch that ended with 410 Gone resumes by re-listing, and the DELETED events in between are never
        sent). Those are dropped, like client-go's Replace does; the keys of the jobs concerned are returned
        so they get a pass (a deleted child comes back, a deleted FineTuneJob is forgotten). What is newer
        than the listing (our own write, stored after the server answered the list) stays.
        `present`: the (namespace, name) of every listed object. `kind` "FineTuneJob" replaces the
        FineTuneJobs themselves."""
        try:
            floor = int(list_rv) if list_rv is not None else None
        except ValueError:
            floor = None

        def gone(ns: str, name: str, stored: _Stored) -> bool:
            if namespace is not None and ns != namespace or (ns, name) in present:
                return False
            return floor is None or stored.rv is None or stored.rv <= floor

        touched: set[JobKey] = set()
        with self._lock:
            if kind == "FineTuneJob":
                for key, stored in list(self._ftjs.items()):
                    if gone(key[0], key[1], stored):
                        del self._ftjs[key]
                        touched.add(key)
                return touched
            for job, owned in list(self._owned.items()):
                for (k, name), stored in list(owned.items()):
                    if k == kind and gone(job[0], name, stored):
                        del owned[(k, name)]
                        touched.add(job)
                if not owned:
                    del self._owned[job]
        return touched

    def owned(self, job: JobKey) -> dict[ChildKey, dict[str, Any]]:
        """A snapshot: freshly decoded objects the caller may keep."""
        with self._lock:
            items = list((self._owned.get(job) or {}).items())
        return {k: v.get() for k, v in items}

    def sizes(self) -> tuple[int, int]:
        with self._lock:
            return len(self._ftjs), sum(len(v) for v in self._owned.values())


class SweepStore:
    """The FineTuneSweeps as kopf's watch delivered them (issue 14), with the same freshness rules as the
    FineTuneJobs above; the trials are FineTuneJobs and live in the `Cache`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sweeps: dict[JobKey, _Stored] = {}

    def put(self, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        stored = _Stored(_slim(obj))
        with self._lock:
            old = self._sweeps.get(key)
            if not _replaces(obj, old):
                return False
            self._sweeps[key] = stored
            return not _same(obj, old)

    def drop(self, key: JobKey) -> None:
        with self._lock:
            self._sweeps.pop(key, None)

    def get(self, key: JobKey) -> dict[str, Any] | None:
        with self._lock:
            stored = self._sweeps.get(key)
        return stored.get() if stored is not None else None
