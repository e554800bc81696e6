"""Keep-alive HTTP/1.1 connections to the one API server the operator talks to: plain sockets (TLS through the
caller's SSLContext) and httptools, the llhttp-based parser uvicorn uses, for the answers.

Why not urllib3 (the kubernetes package's transport, used here first): on top of the http.client it wraps, it
cost ~0.3 ms of CPU per request, and a new job costs 9 requests; the operator's CPU per job is what limits how
fast it creates jobs. Why not http.client (used here next): of what remained, about a third of the operator's
CPU while creating jobs was http.client's request and answer handling, a fifth of that its email-package header
parsing (py-spy --gil samples of bench/operator_throughput.py; bench/api_client_cost.py compares the three).
The operator talks to one host, retries in its own loop (kube/client.py) and never follows redirects or proxies
(kopf's logins, whose credentials it shares, support no proxies either), so it needs none of what those add.

What this keeps from urllib3: a bounded pool (at most `size` requests in flight, idle connections reused LIFO),
a connection the server closed while idle is noticed before it is reused (urllib3's is_connection_dropped), TLS
with the caller's SSLContext (CA, client certificate, hostname check), separate connect and read timeouts. The
answer's framing (Content-Length, chunked, read-until-close) and keep-alive are httptools' decisions, not ours.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


class ProtocolError(Exception):
    """The server broke HTTP/1.1: an answer cut short, or bytes that are no answer."""


# What a failed exchange raises (socket errors, timeouts and TLS errors are OSErrors).
TransportError = (ProtocolError, OSError)

READ_SIZE = 65536


class Headers(dict):
    """An answer's headers, names lower-cased; `get` takes any case. Repeated headers are joined with ", "."""

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)


@dataclass
class Answer:
    status: int
    reason: str
    headers: Headers
    data: bytes


class _Reading:
    """httptools' callbacks for one answer: what arrived of it so far."""

    __slots__ = ("parser", "code", "reason", "headers", "body", "headers_done", "complete", "keep_alive")

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.code, self.reason = 0, ""
        self.headers = Headers()
        self.body: list[bytes] = []
        self.headers_done = self.complete = self.keep_alive = False

    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.code = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        # Asked here: after the message the parser is reset for the next one and forgets.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True

    def done(self) -> None:
        self.parser = None  # parser and callbacks refer to each other: no garbage cycle per request

    def feed(self, data: bytes) -> None:
        if not data:
            if self.headers_done and "content-length" not in self.headers and \
                    "chunked" not in self.headers.get("transfer-encoding", "").lower():
                self.complete = True  # read until the server closes: this is the end, and no keep-alive
                return
            raise ProtocolError("the server closed the connection before the answer was complete")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            raise ProtocolError(f"not an HTTP/1.1 answer: {err}") from err

    def take_body(self) -> bytes:
        body = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body = []
        return body


def _dropped(sock: socket.socket) -> bool:
    """An idle connection the server closed (or sent something on): readable without a request means EOF."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


class HttpPool:
    def __init__(self, url: str, ssl_context: ssl.SSLContext | None, size: int):
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        default_port = 443 if self.https else 80
        self.host, self.port = parts.hostname or "localhost", parts.port or default_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        self.prefix = parts.path.rstrip("/")  # a server URL with a path (a proxy's) keeps it
        self.ssl_context = ssl_context if ssl_context is not None or not self.https else ssl.create_default_context()
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max(1, size))
        self._closed = False

    def _connect(self, connect_timeout: float, read_timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.https:
                assert self.ssl_context is not None
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(read_timeout)
        except BaseException:
            _close(sock)
            raise
        return sock

    def _take(self, connect_timeout: float, read_timeout: float) -> socket.socket:
        while True:
            with self._lock:
                sock = self._idle.pop() if self._idle else None
            if sock is None:
                return self._connect(connect_timeout, read_timeout)
            if not _dropped(sock):
                sock.settimeout(read_timeout)
                return sock
            _close(sock)

    def _head(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        if any("\n" in line or "\r" in line for line in lines):
            raise ValueError("a request line or header carries a line break")  # no header injection
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str],
                connect_timeout: float, read_timeout: float) -> Answer:
        """One exchange on a pooled connection; raises one of TransportError when it fails."""
        out = self._head(method, path, headers, body) + (body or b"")
        with self._slots:
            return self._exchange(out, connect_timeout, read_timeout)

    def _exchange(self, out: bytes, connect_timeout: float, read_timeout: float) -> Answer:
        sock = self._take(connect_timeout, read_timeout)
        reading = _Reading()
        try:
            sock.sendall(out)
            while not reading.complete:
                reading.feed(sock.recv(READ_SIZE))
        except BaseException:
            _close(sock)
            raise
        finally:
            reading.done()
        if not reading.keep_alive:
            _close(sock)
        else:
            with self._lock:
                if self._closed:
                    _close(sock)
                else:
                    self._idle.append(sock)
        return Answer(reading.code, reading.reason, reading.headers, reading.take_body())

    def stream(self, path: str, headers: dict[str, str], connect_timeout: float, read_timeout: float) -> Stream:
        """A GET whose answer is read as it arrives (a watch), on a connection of its own (never pooled: it is
        held for minutes and then closed). Returns once the answer's headers are in."""
        sock = self._connect(connect_timeout, read_timeout)
        reading = _Reading()
        try:
            sock.sendall(self._head("GET", path, headers, None))
            while not reading.headers_done:
                reading.feed(sock.recv(READ_SIZE))
        except BaseException:
            _close(sock)
            raise
        return Stream(sock, reading)

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            _close(sock)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.clear()


class Stream:
    """An answer read as it arrives, line by line (httptools decodes the chunked encoding); `close()` from another
    thread ends a blocked read at once (shutting the socket down)."""

    def __init__(self, sock: socket.socket, reading: _Reading):
        self.sock, self._reading = sock, reading
        self.status, self.reason, self.headers = reading.code, reading.reason, reading.headers
        self._closed = False

    def _more(self) -> bool:
        """Read what the server sent next; False once the answer is complete or we closed the stream."""
        if self._reading.complete:
            return False
        try:
            data = self.sock.recv(READ_SIZE)
        except (OSError, ValueError):
            if self._closed:
                return False  # closed by us, from another thread
            raise
        if not data and self._closed:
            return False
        self._reading.feed(data)  # an end without the last chunk raises ProtocolError: the connection broke
        return True

    def read(self) -> bytes:
        """The whole (rest of the) answer: an error's body."""
        while self._more():
            pass
        return self._reading.take_body()

    def lines(self):
        partial = b""
        while True:
            if self._reading.body:
                data = partial + self._reading.take_body()
                *complete, partial = data.split(b"\n")
                for line in complete:
                    yield line + b"\n"
            if not self._more():
                if partial and not self._closed:
                    yield partial  # the answer ended without a newline
                return

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):  # already closed by the server
            self.sock.shutdown(socket.SHUT_RDWR)
        _close(self.sock)
        if self._reading.complete:
            self._reading.done()  # else the reading thread may still be inside the parser; the GC breaks the cycle
