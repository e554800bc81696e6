"""A thin synchronous REST client: plain dicts over a bounded connection pool (kube/transport.py). Every call has a
timeout.

Why not the `kubernetes` package's typed APIs: its generated models validate every response strictly and
cost a model round-trip per call, and merely importing it costs ~70 MiB and ~1.5 s (767 model modules), more
than the rest of the operator together. The reconciler works on plain dicts (what the pure plan produces), so
the operator takes its credentials where kopf's watches take theirs (`load_configuration`: kopf's own
service-account and kubeconfig logins, the same `ConnectionInfo` its aiohttp session is built from) and never
imports the package; a rotated service-account token is re-read on 401. Tests and tools that already hold a
`kubernetes` Configuration (exec plugins, OIDC refresh) pass it instead (`Connection.from_configuration`).

Like client-go's rest client (what controller-runtime uses), every call goes through a client-side
token-bucket rate limit (QPS/burst) and is retried when the server says so: 429 with `Retry-After`
(API Priority and Fairness, or the server's max-in-flight limit), 5xx and timeouts/refused connections
with capped exponential backoff. The pure parts (`TokenBucket`, `retry_delay`) are unit-tested.
"""

from __future__ import annotations

import json
import logging
import platform
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

# orjson for the wire and the cache: a new job's creation encodes and decodes ~30 JSON documents (bodies, answers,
# watch events), and the standard json module was ~22% of the operator's CPU while creating jobs (py-spy --gil
# samples of bench/operator_throughput.py); orjson's encoder is ~15x and its decoder ~2.5x faster (a Job: 32 -> 2 us,
# 21 -> 8.5 us). Hashes that must stay stable across versions (kube/diff.py) keep the json module's formatting.
import orjson

from .. import metrics
from ..api.constants import FIELD_MANAGER
from .transport import HttpPool, Stream, TransportError

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply; JSON is valid YAML
# What the API server's audit log records as each request's userAgent (client-go sends "<binary>/<version>
# (<os>/<arch>)"; since http.client, and now plain sockets, replaced urllib3 the operator sent none at all).
USER_AGENT = f"{FIELD_MANAGER} (python/{platform.python_version()})"
_HEADERS = {"Accept": "application/json", "User-Agent": USER_AGENT}  # on every request and watch

log = logging.getLogger("finetune_operator.kube")


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: str, retry_after: float | None = None):
        self.status, self.reason, self.body, self.retry_after = status, reason, body, retry_after
        try:
            decoded = json.loads(body)
            message = decoded.get("message", body)
            self.api_reason = decoded.get("reason", "")
        except (ValueError, AttributeError):
            message, self.api_reason = body, ""
        super().__init__(f"{status} {reason}: {str(message)[:300]}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.api_reason == "AlreadyExists"

    @property
    def retriable(self) -> bool:
        """What client-go retries: throttling (429) and server-side failures (5xx), never a verdict (4xx)."""
        return self.status == 429 or self.status >= 500


@dataclass
class Connection:
    """Where the API server is and how to authenticate: a pool of connections to it (kube/transport.py: TLS,
    client certificates) and the headers of each call. `reload` re-reads the credentials (a projected
    service-account token rotates)."""

    host: str
    pool: HttpPool
    headers: Callable[[], dict[str, str]]
    reload: Callable[[], Connection] | None = None

    @classmethod
    def from_kopf(cls, info: Any, pool_size: int, reload: Callable[[], Connection] | None = None) -> Connection:
        """From a kopf ConnectionInfo (kopf.login_with_service_account / login_with_kubeconfig)."""
        server = str(info.server).rstrip("/")
        context = info.as_ssl_context() if server.startswith("https") else None
        headers = dict(info.as_http_headers())
        return cls(server, HttpPool(server, context, pool_size), lambda: headers, reload)

    @classmethod
    def from_configuration(cls, cfg: Any, pool_size: int = 4) -> Connection:
        """From a `kubernetes` package Configuration (its exec/OIDC token refresh hook stays in effect)."""
        server = cfg.host.rstrip("/")
        context = None
        if server.startswith("https"):
            context = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
            if not cfg.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if cfg.cert_file:
                context.load_cert_chain(cfg.cert_file, cfg.key_file or None)

        def headers() -> dict[str, str]:
            # The bearer token (refreshed by the configuration's hook); client certificates are in the context.
            return {a["key"]: a["value"] for a in cfg.auth_settings().values() if a.get("in") == "header" and a.get("value")}

        return cls(server, HttpPool(server, context, pool_size), headers)


def load_configuration(pool_size: int) -> Connection:
    """The operator's connection, found as kopf finds its own: the pod's service account, else the kubeconfig
    (KUBECONFIG or ~/.kube/config: token, client certificate or basic auth). Users with only an exec plugin or
    an auth provider (cloud logins on a workstation) get a clear error: kopf's watches could not log in either."""
    import kopf

    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise RuntimeError("no Kubernetes credentials: not in a pod with a service account, and no kubeconfig "
                           "(set KUBECONFIG)")
    if not (info.token or info.username or info.certificate_path or info.certificate_data):
        raise RuntimeError(f"the kubeconfig's user for {info.server} has no token, client certificate or password "
                           "(an exec plugin or auth provider?): give the operator a token, e.g. a service account's")
    return Connection.from_kopf(info, pool_size, reload=lambda: load_configuration(pool_size))


class TokenBucket:
    """client-go's `flowcontrol.NewTokenBucketRateLimiter(qps, burst)`: `burst` calls at once, then `qps` per
    second. Thread-safe; `acquire` blocks (outside the lock) until a token is free. qps <= 0: unlimited."""

    def __init__(self, qps: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.qps, self.burst = float(qps), max(1, int(burst))
        self.clock, self.sleep = clock, sleep
        self._tokens = float(self.burst)
        self._last = clock()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token (possibly one not yet earned); the seconds to wait before using it."""
        if self.qps <= 0:
            return 0.0
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def acquire(self) -> float:
        delay = self.reserve()
        if delay > 0:
            self.sleep(delay)
        return delay


class ThrottleReport:
    """Makes the client-side rate limit visible, as client-go does ("Waited for 1.2s due to client-side
    throttling, not priority and fairness"): every wait is counted in two metrics and logged as a WARNING, at most
    once per `EVERY_SECONDS` with what happened since the last one. Not only long waits (client-go logs from
    50 ms): with 24 threads calling, each wait is ~24/QPS seconds, short, yet they add up; an operator throttled
    by its own default (1000 requests/s before, ~111 new jobs/s) showed no single long wait and looked slow.
    A limit that binds while the server is not asking for less (no 429) is a setting to raise."""

    EVERY_SECONDS = 30.0

    def __init__(self, qps: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.qps, self.burst, self.clock = qps, burst, clock
        self._lock = threading.Lock()
        self._calls, self._waited, self._longest, self._logged = 0, 0.0, 0.0, float("-inf")

    def waited(self, delay: float) -> None:
        metrics.API_THROTTLED_CALLS.inc()
        metrics.API_THROTTLED_SECONDS.inc(delay)
        with self._lock:
            self._calls += 1
            self._waited += delay
            self._longest = max(self._longest, delay)
            now = self.clock()
            if now - self._logged < self.EVERY_SECONDS:
                return
            calls, waited, longest = self._calls, self._waited, self._longest
            self._calls, self._waited, self._longest, self._logged = 0, 0.0, 0.0, now
        log.warning("client-side throttling: %d API calls waited %.2f s in all (at most %.2f s) for the operator's own "
                    "rate limit (%g requests/s, burst %d), not for the API server's Priority and Fairness; if the server "
                    "can take more, raise FTO_API_QPS/FTO_API_BURST (chart: api.qps, api.burst)", calls, waited, longest,
                    self.qps, self.burst, extra={"action": "throttled", "calls": calls,
                                                 "waited_seconds": round(waited, 3),
                                                 "longest_seconds": round(longest, 3)})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one call (client-go retries up to 10 times on Retry-After)."""

    attempts: int = 5
    base_seconds: float = 0.2
    max_seconds: float = 10.0
    max_retry_after_seconds: float = 60.0


def retry_delay(policy: RetryPolicy, attempt: int, retry_after: float | None) -> float:
    """Seconds to wait before retry number `attempt` (1-based): the server's Retry-After when it gave one
    (capped, so a wrong header cannot park a worker for an hour), else exponential backoff, capped."""
    if retry_after is not None and retry_after >= 0:
        return min(retry_after, policy.max_retry_after_seconds)
    return min(policy.base_seconds * 2 ** (attempt - 1), policy.max_seconds)


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (the API server sends an integer); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None


class KubeClient:
    def __init__(self, connection: Connection | Any, timeout: float = 10.0, connect_timeout: float = 5.0, *,
                 qps: float = 0.0, burst: int = 1, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep, pool_size: int | None = None):
        """`connection`: a Connection, or a `kubernetes` Configuration (tests, tools)."""
        if not isinstance(connection, Connection):
            pool_size = pool_size or int(getattr(connection, "connection_pool_maxsize", 0) or 4)
            connection = Connection.from_configuration(connection, pool_size)
        self.connection = connection  # its pool bounds the calls in flight
        self.timeout = (connect_timeout, timeout)
        self.limiter = TokenBucket(qps, burst, sleep=sleep)
        self.throttle = ThrottleReport(qps, burst)
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.calls = 0  # requests sent, retries included (for tests and the benchmark)
        self._reloaded = 0.0

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """One API call, retried on 429/5xx/timeouts; the decoded JSON answer, or ApiError for a status >= 400."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._once(method, path, body, query, content_type)
            except ApiError as err:
                if err.status == 401 and self._reload():
                    continue  # a rotated token: the same call with the new one (not counted as a retry)
                if not err.retriable or attempt >= self.retry.attempts:
                    raise
                delay = retry_delay(self.retry, attempt, err.retry_after)
                why = str(err)
            except TransportError as err:  # timeouts, resets, refused connections, TLS failures
                if attempt >= self.retry.attempts:
                    raise ApiError(503, "Unavailable", f"{method} {path}: {err}") from err
                delay = retry_delay(self.retry, attempt, None)
                why = f"{type(err).__name__}: {err}"
            log.debug("retrying %s %s in %.2f s (attempt %d): %s", method, path, delay, attempt, why)
            self.sleep(delay)

    def _once(self, method: str, path: str, body: Any, query: dict[str, str] | None,
              content_type: str) -> dict[str, Any] | None:
        params = dict(query or {})
        if method in ("POST", "PATCH", "PUT"):
            params.setdefault("fieldManager", FIELD_MANAGER)
        conn = self.connection
        target = path + ("?" + urlencode(params) if params else "")
        headers = {**_HEADERS, "Content-Type": content_type, **conn.headers()}
        data_out = body if body is None or isinstance(body, bytes) else (
            body.encode() if isinstance(body, str) else orjson.dumps(body))
        self._admit()
        answer = conn.pool.request(method, target, data_out, headers, self.timeout[0], self.timeout[1])
        data = answer.data
        if answer.status >= 400:
            raise ApiError(answer.status, answer.reason, data.decode(errors="replace") if data else "",
                           parse_retry_after(answer.headers.get("Retry-After")))
        return orjson.loads(data) if data else None

    def _admit(self) -> None:
        """Wait for a token of the client-side rate limit (a wait is reported), then count the request."""
        waited = self.limiter.acquire()
        if waited:
            self.throttle.waited(waited)
        self.calls += 1

    def _reload(self) -> bool:
        """Re-read the credentials after a 401, at most once a minute (a wrong token stays a 401)."""
        if self.connection.reload is None or time.monotonic() - self._reloaded < 60:
            return False
        self._reloaded = time.monotonic()
        try:
            fresh = self.connection.reload()
        except Exception as err:  # noqa: BLE001 - the 401 is the error to report
            log.warning("could not re-read the API credentials after a 401: %s", err)
            return False
        old, self.connection = self.connection, fresh
        old.pool.close()
        return True

    def get(self, path: str, query: dict[str, str] | None = None) -> dict[str, Any] | None:
        """GET, or None when the object does not exist."""
        try:
            return self.request("GET", path, query=query)
        except ApiError as err:
            if err.not_found:
                return None
            raise

    def watch(self, path: str, query: dict[str, str], read_timeout: float) -> WatchStream:
        """Open a watch (`?watch=true`) on a connection of its own (held for minutes, it must not take one from
        the reconcile's writes). Rate-limited like every call; an error answer raises ApiError (a 401 re-reads
        the credentials first, for the caller's next attempt)."""
        conn = self.connection
        target = path + "?" + urlencode({**query, "watch": "true"})
        self._admit()
        stream = conn.pool.stream(target, {**_HEADERS, **conn.headers()}, self.timeout[0], read_timeout)
        if stream.status >= 400:
            data = stream.read()
            stream.close()
            if stream.status == 401:
                self._reload()
            raise ApiError(stream.status, stream.reason, data.decode(errors="replace") if data else "",
                           parse_retry_after(stream.headers.get("Retry-After")))
        return WatchStream(stream)

    def close(self) -> None:
        self.connection.pool.close()


class WatchStream:
    """One open watch: `events()` yields its decoded events (one JSON object per line) until the server ends
    the stream; `close()` from another thread ends a blocked read at once (it shuts the socket down)."""

    def __init__(self, stream: Stream):
        self.stream = stream

    def events(self):
        for line in self.stream.lines():
            if line.strip():
                yield orjson.loads(line)

    def close(self) -> None:
        self.stream.close()


def collection_path(api_version: str, plural: str, namespace: str | None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{base}/namespaces/{quote(namespace)}/{plural}" if namespace else f"{base}/{plural}"


def object_path(api_version: str, plural: str, namespace: str | None, name: str) -> str:
    return f"{collection_path(api_version, plural, namespace)}/{quote(name)}"
