"""The API client's rate limit, retries and Retry-After, and the work queue's backoff (pure parts, plus one
round trip through a local HTTP server that answers like API Priority and Fairness)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
import yaml
from kubernetes import client as k8s

from finetune_operator.handlers.workqueue import WorkQueue, backoff_delay
from finetune_operator.kube.client import (
    ApiError,
    Connection,
    KubeClient,
    RetryPolicy,
    ThrottleReport,
    TokenBucket,
    parse_retry_after,
    retry_delay,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_token_bucket_allows_a_burst_then_qps():
    clock = FakeClock()
    bucket = TokenBucket(qps=10, burst=3, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        assert bucket.acquire() == 0
    assert bucket.acquire() == pytest.approx(0.1)  # the 4th waits for one token at 10/s
    assert bucket.acquire() == pytest.approx(0.1)
    clock.now += 10  # idle: the bucket refills to the burst, not beyond
    assert [bucket.acquire() for _ in range(4)] == [0, 0, 0, pytest.approx(0.1)]


def test_token_bucket_off_when_qps_is_zero():
    clock = FakeClock()
    bucket = TokenBucket(qps=0, burst=1, clock=clock, sleep=clock.sleep)
    assert all(bucket.acquire() == 0 for _ in range(100)) and not clock.slept


def test_retry_delay_prefers_retry_after_and_caps_backoff():
    policy = RetryPolicy(attempts=5, base_seconds=0.2, max_seconds=1.0, max_retry_after_seconds=30)
    assert [retry_delay(policy, n, None) for n in (1, 2, 3, 4)] == [0.2, 0.4, 0.8, 1.0]
    assert retry_delay(policy, 1, 7) == 7
    assert retry_delay(policy, 1, 3600) == 30
    assert parse_retry_after("2") == 2 and parse_retry_after(" 1 ") == 1
    assert parse_retry_after(None) is None and parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None


def test_backoff_is_exponential_with_a_cap():
    assert [backoff_delay(n, 0.5, 4) for n in (0, 1, 2, 3, 4, 5, 100)] == [0, 0.5, 1, 2, 4, 4, 4]


class _Server(http.server.ThreadingHTTPServer):
    answers: list[tuple[int, dict[str, str]]]
    seen: list[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        server.seen.append(self.command)
        server.auth = [*getattr(server, "auth", []), self.headers.get("Authorization")]
        server.agents = [*getattr(server, "agents", []), self.headers.get("User-Agent")]
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        code, headers = server.answers.pop(0) if server.answers else (200, {})
        body = json.dumps({"kind": "Status", "code": code, "reason": "TooManyRequests"} if code >= 400
                          else {"kind": "ConfigMap", "metadata": {"name": "x"}}).encode()
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PATCH = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.answers, srv.seen = [], []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _client(server, attempts: int = 5) -> tuple[KubeClient, list[float]]:
    cfg = k8s.Configuration()
    cfg.host = f"http://127.0.0.1:{server.server_address[1]}"
    slept: list[float] = []
    return KubeClient(cfg, timeout=5, retry=RetryPolicy(attempts=attempts), sleep=slept.append), slept


def test_429_retry_after_is_honoured(server):
    server.answers = [(429, {"Retry-After": "3"}), (429, {"Retry-After": "1"})]
    client, slept = _client(server)
    assert client.request("PATCH", "/api/v1/namespaces/a/configmaps/x", body={}, content_type="application/apply-patch+yaml")
    assert slept == [3.0, 1.0] and server.seen == ["PATCH"] * 3
    # Every request names the operator (the API server's audit log shows it as userAgent).
    assert all(agent and agent.startswith("finetune-operator (python/") for agent in server.agents)


def test_5xx_is_retried_with_backoff_and_4xx_is_not(server):
    server.answers = [(503, {}), (500, {})]
    client, slept = _client(server)
    assert client.request("GET", "/api/v1/namespaces/a/configmaps/x")
    assert slept == [0.2, 0.4]
    server.answers = [(422, {})]
    with pytest.raises(ApiError) as info:
        client.request("POST", "/api/v1/namespaces/a/configmaps", body={})
    assert info.value.status == 422 and slept == [0.2, 0.4]


def _throttled() -> tuple[float, float]:
    from finetune_operator import metrics

    return (metrics.REGISTRY.get_sample_value("finetune_operator_api_client_throttled_calls_total"),
            metrics.REGISTRY.get_sample_value("finetune_operator_api_client_throttled_seconds_total"))


def test_waiting_for_the_client_side_rate_limit_is_counted_and_logged(server, caplog):
    """The operator's own limit must never slow it silently: each wait is in the metrics and the log (once per
    30 s, with what happened since), naming the setting to raise; a call that did not wait adds nothing."""
    cfg = k8s.Configuration()
    cfg.host = f"http://127.0.0.1:{server.server_address[1]}"
    slept: list[float] = []
    client = KubeClient(cfg, timeout=5, qps=10, burst=2, sleep=slept.append)
    clock = FakeClock()
    client.limiter = TokenBucket(10, 2, clock=clock, sleep=slept.append)  # sleeping lets no time pass
    client.throttle = ThrottleReport(10, 2, clock=clock)
    calls, seconds = _throttled()
    with caplog.at_level("WARNING", logger="finetune_operator.kube"):
        for _ in range(2):
            client.request("GET", "/api/v1/namespaces/a/configmaps/x")
        assert _throttled() == (calls, seconds) and not caplog.records  # the burst: no wait
        for _ in range(3):  # each waits 0.1 s longer than the last
            client.request("GET", "/api/v1/namespaces/a/configmaps/x")
    assert slept == pytest.approx([0.1, 0.2, 0.3])
    after = _throttled()
    assert after[0] - calls == 3 and after[1] - seconds == pytest.approx(0.6)
    warnings = [r for r in caplog.records if "client-side throttling" in r.getMessage()]
    assert len(warnings) == 1  # the first wait is logged; the next two fall in the same 30 s
    assert "FTO_API_QPS" in warnings[0].getMessage() and warnings[0].calls == 1
    clock.now += 31  # the bucket is full again (2), and the report may speak again
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune_operator.kube"):
        for _ in range(3):
            client.request("GET", "/api/v1/namespaces/a/configmaps/x")
    (warning,) = caplog.records
    # the two held back, and this one
    assert (warning.calls, warning.waited_seconds, warning.longest_seconds) == (3, pytest.approx(0.6), pytest.approx(0.3))


def test_retries_end_with_the_error(server):
    server.answers = [(429, {"Retry-After": "1"})] * 3
    client, slept = _client(server, attempts=3)
    with pytest.raises(ApiError) as info:
        client.request("GET", "/api/v1/namespaces/a/configmaps/x")
    assert info.value.status == 429 and info.value.retry_after == 1 and slept == [1.0, 1.0]


def test_work_queue_dedups_and_never_runs_a_key_twice_at_once():
    clock = FakeClock()
    q = WorkQueue(base_backoff=1, max_backoff=8, clock=clock)
    q.add("a")
    q.add("a")
    q.add("b")
    assert q.get(0) == "a"
    q.add("a")  # while "a" is processed: queued again, handed out only after done()
    assert q.get(0) == "b"
    assert q.get(0) is None
    q.done("a")
    assert q.get(0) == "a"
    q.done("a")
    q.done("b")
    assert q.get(0) is None


def test_work_queue_delays_and_backoff():
    clock = FakeClock()
    q = WorkQueue(base_backoff=1, max_backoff=8, clock=clock)
    assert [q.backoff("a") for _ in range(5)] == [1, 2, 4, 8, 8]
    q.forget("a")
    assert q.backoff("a") == 1
    q.add_after("a", 5)
    q.add_after("a", 9)  # the earlier schedule wins
    assert q.get(0) is None
    clock.now += 5
    assert q.get(0) == "a"
    q.done("a")
    clock.now += 10
    assert q.get(0) is None  # the later schedule was folded into the earlier one


def _kubeconfig(path, server_url: str, token: str):
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server_url}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    return path


def test_the_operator_s_connection_comes_from_kopf_s_kubeconfig_login_and_a_401_reloads_it(server, tmp_path, monkeypatch):
    from finetune_operator.kube.client import load_configuration

    url = f"http://127.0.0.1:{server.server_address[1]}"
    config = _kubeconfig(tmp_path / "kubeconfig", url, "first")
    monkeypatch.setenv("KUBECONFIG", str(config))
    client = KubeClient(load_configuration(4), timeout=5, sleep=lambda s: None)
    assert isinstance(client.connection, Connection) and client.connection.host == url
    assert client.get("/api/v1/namespaces/a/configmaps/x")["metadata"]["name"] == "x"
    _kubeconfig(config, url, "second")  # the token rotates; the server refuses the old one once
    server.answers = [(401, {})]
    assert client.get("/api/v1/namespaces/a/configmaps/x")["metadata"]["name"] == "x"
    assert server.auth == ["Bearer first", "Bearer first", "Bearer second"]
    server.answers = [(401, {})]  # a second 401 within a minute is the server's verdict, not a rotation
    with pytest.raises(ApiError, match="401"):
        client.get("/api/v1/namespaces/a/configmaps/x")


def test_a_kubeconfig_user_without_a_token_or_certificate_is_refused_with_the_fix(tmp_path, monkeypatch):
    from finetune_operator.kube.client import load_configuration

    config = _kubeconfig(tmp_path / "kubeconfig", "https://example.invalid", "")
    data = yaml.safe_load(config.read_text())
    data["users"][0]["user"] = {"exec": {"command": "aws", "args": ["eks", "get-token"], "apiVersion": "client.authentication.k8s.io/v1"}}
    config.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("KUBECONFIG", str(config))
    with pytest.raises(RuntimeError, match="exec plugin or auth provider"):
        load_configuration(4)


def test_the_operator_process_never_imports_the_kubernetes_package_and_optuna_only_for_sweeps():
    """kopf would import kubernetes (767 generated model modules, ~70 MiB) only to recognise its model objects;
    optuna (~17 MiB) is imported by the first sweep pass."""
    import subprocess
    import sys

    code = ("import sys, finetune_operator.__main__; "
            "print(sorted(k for k in sys.modules if k.startswith(('kubernetes', 'optuna')) and sys.modules[k] is not None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

