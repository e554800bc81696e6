"""kube/transport.py: the operator's keep-alive connection pool, against a real HTTP/1.1 server on loopback."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from finetune_operator.kube.transport import HttpPool


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked answers

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1
            self.server.sockets.append(self.request)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.in_flight += 1
            self.server.most = max(self.server.most, self.server.in_flight)
        time.sleep(self.server.delay)
        with self.server.lock:
            self.server.in_flight -= 1
        data = json.dumps({"echo": json.loads(body or b"null"), "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # a watch: chunked lines, then the stream stays open
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(3):
            line = json.dumps({"type": "ADDED", "n": i}).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        time.sleep(30)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.lock, srv.connections, srv.sockets, srv.in_flight, srv.most, srv.delay = threading.Lock(), 0, [], 0, 0, 0.0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def pool(server, size: int = 4) -> HttpPool:
    return HttpPool(f"http://127.0.0.1:{server.server_address[1]}", None, size)


def post(p: HttpPool, body) -> dict:
    answer = p.request("POST", "/x?a=1", json.dumps(body).encode(), {"Content-Type": "application/json"}, 5, 5)
    assert answer.status == 200
    return json.loads(answer.data)


def test_requests_reuse_one_kept_alive_connection(server):
    p = pool(server)
    assert [post(p, i)["echo"] for i in range(20)] == list(range(20))
    assert post(p, None)["path"] == "/x?a=1"
    assert server.connections == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_not_failed(server):
    p = pool(server)
    post(p, 1)
    for sock in server.sockets:  # the server (or a load balancer) ends the idle keep-alive connection
        sock.shutdown(socket.SHUT_RDWR)
    time.sleep(0.1)
    assert post(p, 2)["echo"] == 2
    assert server.connections == 2


def test_no_more_requests_in_flight_than_the_pool_size(server):
    server.delay = 0.1
    p = pool(server, size=2)
    threads = [threading.Thread(target=post, args=(p, i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.most == 2 and server.connections == 2


def test_a_stream_is_read_line_by_line_and_close_ends_a_blocked_read(server):
    p = pool(server)
    stream = p.stream("/watch", {}, 5, 60)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(stream.lines()))
    reader.start()
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [json.loads(line)["n"] for line in got] == [0, 1, 2]
    began = time.monotonic()
    stream.close()  # the server still holds the stream open
    reader.join(5)
    assert not reader.is_alive() and time.monotonic() - began < 2
