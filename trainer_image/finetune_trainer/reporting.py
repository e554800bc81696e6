"""Rank 0's link to its FineTuneJob: status merge patches and stop polling, in a background thread.

Training never waits on the API server: `report()` only merges the patch into a pending dict and
wakes the thread, which sends the newest state (coalescing patches it could not send yet) and
backs off exponentially while the server is unreachable.

Liveness (issue 11): the loop calls `progress()` after every optimizer step, evaluation batch and
checkpoint save (two integer stores under a lock). Every `heartbeat_seconds` the thread sends
`lastHeartbeatTime` and `step`, but only when that counter moved since the last heartbeat, so the
heartbeat's age is exactly "time since the trainer last made progress", which is what the operator's
watchdog and the FineTuneJobStalled alert read. A hung step stops the heartbeat even though this
thread is alive.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

from finetune_contract.constants import GROUP, PLURAL, VERSION, Annotation

log = logging.getLogger("finetune_trainer")

REQUEST_TIMEOUT_SECONDS = 10
MAX_BACKOFF_SECONDS = 60.0


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339_micro() -> str:
    """RFC 3339 with microseconds (metav1.MicroTime's format, as a Lease's renewTime): a heartbeat every few
    seconds read against a timeout of a few seconds must not lose up to a second to truncation."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _load_api(kubeconfig: str | None = None) -> Any | None:
    """A CustomObjectsApi from the in-cluster ServiceAccount, else the kubeconfig; None without credentials.

    The client gets its own Configuration (not the library-wide default) and `kubeconfig` is passed
    explicitly: the library reads $KUBECONFIG once, at import, so a later change would go unnoticed.
    """
    from kubernetes import client, config  # imported here: local runs without a cluster never need it

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        except (config.ConfigException, FileNotFoundError, TypeError):
            return None
    # One quick retry at most: a status patch is retried by the reporter's own backoff anyway.
    configuration.retries = 1
    return client.CustomObjectsApi(client.ApiClient(configuration))


def stall_timeout_in(obj: dict[str, Any], default: float) -> float:
    """spec.watchdog.stallTimeoutSeconds of the FineTuneJob as it is now (it may change after start; the operator's
    watchdog reads it on every pass, so the gauge the alert compares with follows it too)."""
    value = ((obj.get("spec") or {}).get("watchdog") or {}).get("stallTimeoutSeconds")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 else default


def stop_requested_in(obj: dict[str, Any]) -> str | None:
    """Why the FineTuneJob asks the trainer to stop (None: it does not)."""
    if (obj.get("spec") or {}).get("stop") is True:
        return "spec.stop is true"
    if (obj.get("status") or {}).get("stopRequestedTime"):
        return "status.stopRequestedTime is set"
    if ((obj.get("metadata") or {}).get("annotations") or {}).get(Annotation.STOP) == "true":
        return f"annotation {Annotation.STOP} is true"
    return None


class StatusReporter:
    def __init__(
        self,
        job: str,
        namespace: str,
        *,
        enabled: bool = True,
        poll_seconds: float = 5.0,
        stop_file: str | None = None,
        api: Any | None = None,
        kubeconfig: str | None = None,
        heartbeat_seconds: float = 30.0,
        on_heartbeat: Any | None = None,
        on_job: Any | None = None,
    ):
        self.job = job
        self.heartbeat_seconds = max(0.05, heartbeat_seconds)
        self.on_heartbeat = on_heartbeat  # called from this thread with (unix time, step) at each heartbeat
        self.on_job = on_job  # called from this thread with the FineTuneJob at each successful poll
        self._ticks = 0  # progress events published by the loop (steps, evaluation batches, saves)
        self._step = 0
        self._ticks_sent = 0
        self.heartbeats_sent = 0
        self.namespace = namespace
        self.poll_seconds = max(0.05, poll_seconds)
        self.stop_file = stop_file
        self._api = api if api is not None else (_load_api(kubeconfig) if enabled else None)
        self._pending: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._stop = threading.Event()
        self.stop_reason: str | None = None
        self.reachable: bool | None = None if self._api is not None else False
        self.patches_sent = 0
        self._thread = threading.Thread(target=self._run, name=f"status-{job}", daemon=True)
        if self._api is None and enabled:
            log.info("job %s: no Kubernetes credentials; status reporting off, early stopping decided locally", job)

    @property
    def connected(self) -> bool:
        return self._api is not None and self.reachable is not False

    def start(self) -> StatusReporter:
        self._thread.start()
        return self

    def report(self, patch: dict[str, Any]) -> None:
        """Queue a status merge patch; returns at once."""
        with self._lock:
            self._pending.update(copy.deepcopy(patch))
        self._wake.set()

    def progress(self, step: int) -> None:
        """The loop made progress (a step, an evaluation batch, a checkpoint save); never blocks on I/O."""
        with self._lock:
            self._ticks += 1
            self._step = step

    def _heartbeat(self) -> None:
        with self._lock:
            ticks, step = self._ticks, self._step
        if ticks == self._ticks_sent:
            return  # no progress since the last heartbeat: say nothing, so the heartbeat ages
        self._ticks_sent = ticks
        self.heartbeats_sent += 1
        if self.on_heartbeat is not None:
            self.on_heartbeat(time.time(), step)
        self.report({"lastHeartbeatTime": now_rfc3339_micro(), "step": step})

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def close(self, timeout: float = REQUEST_TIMEOUT_SECONDS) -> None:
        """Send what is pending (bounded by `timeout`) and end the thread."""
        self._closing.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- background thread -------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.0
        next_poll = 0.0
        next_beat = time.monotonic() + self.heartbeat_seconds
        while True:
            wait = min(backoff or self.poll_seconds, max(0.0, next_beat - time.monotonic()))
            self._wake.wait(timeout=wait)
            self._wake.clear()
            closing = self._closing.is_set()
            if time.monotonic() >= next_beat:
                self._heartbeat()
                next_beat = time.monotonic() + self.heartbeat_seconds
            ok = self._flush()
            if time.monotonic() >= next_poll and not closing:
                ok = self._poll_stop() and ok
                next_poll = time.monotonic() + self.poll_seconds
            backoff = 0.0 if ok else min(MAX_BACKOFF_SECONDS, max(1.0, backoff * 2))
            if closing:
                return

    def _flush(self) -> bool:
        with self._lock:
            patch, self._pending = self._pending, {}
        if not patch or self._api is None:
            return True
        try:
            self._api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.job, {"status": patch},
                _request_timeout=REQUEST_TIMEOUT_SECONDS, _content_type="application/merge-patch+json",
            )
        except Exception as err:  # any failure: keep the newest state and retry later
            with self._lock:
                self._pending = {**patch, **self._pending}
            if self.reachable is not False:
                log.warning("job %s: status patch failed (%s); retrying with backoff", self.job, _short(err))
            self.reachable = False
            return False
        self.patches_sent += 1
        self.reachable = True
        return True

    def _poll_stop(self) -> bool:
        if self.stop_file and os.path.exists(self.stop_file):
            self._request_stop(f"stop file {self.stop_file} exists")
        if self._api is None:
            return True
        try:
            obj = self._api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.job, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
        except Exception as err:
            if self.reachable is not False:
                log.warning("job %s: reading the FineTuneJob failed (%s); retrying with backoff", self.job, _short(err))
            self.reachable = False
            return False
        self.reachable = True
        if self.on_job is not None:
            self.on_job(obj or {})
        reason = stop_requested_in(obj or {})
        if reason:
            self._request_stop(reason)
        return True

    def _request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self.stop_reason = reason
            log.info("job %s: stop requested (%s)", self.job, reason)
            self._stop.set()


def _short(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}"
    return text.splitlines()[0][:200]
