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


class _Raw(socketserver.BaseRequestHandler):
    """Answers every request with the server's `raw` bytes, as they are (framings http.server does not write)."""

    def handle(self) -> None:
        with self.server.lock:
            self.server.connections += 1
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                more = self.request.recv(65536)
                if not more:
                    return
                data += more
            head, data = data.split(b"\r\n\r\n", 1)
            self.server.heads.append(head.decode())
            self.request.sendall(self.server.raw)
            if self.server.close_after:
                self.request.shutdown(socket.SHUT_RDWR)
                return


@pytest.fixture
def raw_server():
    srv = _Server(("127.0.0.1", 0), _Raw)
    srv.lock, srv.connections, srv.heads, srv.raw, srv.close_after = threading.Lock(), 0, [], b"", False
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_chunked_and_length_answers_keep_the_connection_and_headers_take_any_case(raw_server):
    raw_server.raw = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 3\r\n"
                      b"Transfer-Encoding: chunked\r\nWarning: a\r\nWarning: b\r\n\r\n"
                      b"4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n")
    p = pool(raw_server)
    for _ in range(3):
        answer = p.request("GET", "/api/v1/pods?limit=1", None, {"Accept": "application/json"}, 5, 5)
        assert (answer.status, answer.reason, answer.data) == (429, "Too Many Requests", b'{"a":1}')
        assert answer.headers.get("retry-after") == answer.headers.get("Retry-After") == "3"
        assert answer.headers.get("Warning") == "a, b"
    assert raw_server.connections == 1
    request_line, *headers = raw_server.heads[0].split("\r\n")
    assert request_line == "GET /api/v1/pods?limit=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{raw_server.server_address[1]}" in headers and "Accept: application/json" in headers


def test_an_answer_read_until_close_ends_at_close_and_the_connection_is_not_reused(raw_server):
    raw_server.raw, raw_server.close_after = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"whole\": true}", True
    p = pool(raw_server)
    for _ in range(2):
        answer = p.request("POST", "/x", b"{}", {}, 5, 5)
        assert answer.status == 200 and json.loads(answer.data) == {"whole": True}
    assert raw_server.connections == 2 and "Content-Length: 2" in raw_server.heads[0]


def test_an_answer_cut_short_or_garbled_is_a_transport_error_not_a_short_body(raw_server):
    from finetune_operator.kube.transport import ProtocolError, TransportError

    p = pool(raw_server)
    raw_server.close_after = True
    for raw in (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"cut\":",  # the server died mid-answer
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",  # ... mid-chunk
                b"SSH-2.0-OpenSSH_9.6\r\n\r\n"):  # not HTTP at all
        raw_server.raw = raw
        with pytest.raises(ProtocolError) as info:
            p.request("GET", "/x", None, {}, 5, 5)
        assert isinstance(info.value, TransportError)  # what the client retries


def test_a_header_with_a_line_break_is_refused_before_sending(raw_server):
    p = pool(raw_server)
    with pytest.raises(ValueError, match="line break"):
        p.request("GET", "/x", None, {"Authorization": "Bearer t\r\nX-Injected: 1"}, 5, 5)
    assert raw_server.heads == []


def test_a_watch_line_split_across_chunks_is_one_line(raw_server):
    raw_server.raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"6\r\n{\"n\":0\r\n" b"7\r\n}\n{\"n\":\r\n" b"3\r\n1}\n\r\n" b"0\r\n\r\n")
    stream = pool(raw_server).stream("/watch", {}, 5, 5)
    assert stream.status == 200
    assert [json.loads(line) for line in stream.lines()] == [{"n": 0}, {"n": 1}]  # then the stream's end


def test_tls_with_the_callers_ca_and_the_hostname_checked(tmp_path):
    """The API server's certificate is checked against the kubeconfig's CA and the server's name (the operator
    reaches a real cluster only over TLS), a client certificate is presented when the server asks; a server
    certificate for another name is refused."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def certificate(name: str):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        (tmp_path / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))

    for name in ("localhost", "elsewhere.example", "operator-client"):
        certificate(name)

    class _Tls(_Server):
        def get_request(self):
            sock, addr = super().get_request()
            return self.context.wrap_socket(sock, server_side=True), addr

    def serve(name: str):
        srv = _Tls(("127.0.0.1", 0), _Handler)
        srv.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        srv.context.load_cert_chain(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        srv.lock, srv.connections, srv.sockets, srv.in_flight, srv.most, srv.delay = threading.Lock(), 0, [], 0, 0, 0.0
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv

    client_context = ssl.create_default_context(cafile=str(tmp_path / "localhost.crt"))
    good = serve("localhost")
    try:
        p = HttpPool(f"https://localhost:{good.server_address[1]}", client_context, 2)
        assert [json.loads(p.request("POST", "/x", b"7", {}, 5, 5).data)["echo"] for _ in range(3)] == [7, 7, 7]
        assert good.connections == 1
    finally:
        good.shutdown()
        good.server_close()
    # A kubeconfig's client certificate (kind, kubeadm): the server asks for one and checks it.
    mutual = serve("localhost")
    mutual.context.verify_mode = ssl.CERT_REQUIRED
    mutual.context.load_verify_locations(tmp_path / "operator-client.crt")
    try:
        url = f"https://localhost:{mutual.server_address[1]}"
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            HttpPool(url, client_context, 2).request("POST", "/x", b"1", {}, 5, 5)  # no certificate: refused
        with_cert = ssl.create_default_context(cafile=str(tmp_path / "localhost.crt"))
        with_cert.load_cert_chain(tmp_path / "operator-client.crt", tmp_path / "operator-client.key")
        assert json.loads(HttpPool(url, with_cert, 2).request("POST", "/x", b"8", {}, 5, 5).data)["echo"] == 8
    finally:
        mutual.shutdown()
        mutual.server_close()
    wrong = serve("elsewhere.example")  # trusted by nobody here, and for another name
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            HttpPool(f"https://localhost:{wrong.server_address[1]}", client_context, 2).request("GET", "/x", None, {}, 5, 5)
    finally:
        wrong.shutdown()
        wrong.server_close()


def test_a_send_that_fails_raises_the_socket_error_and_drops_the_connection(raw_server, monkeypatch):
    """The reset arrives while the request is sent (the server closed the kept-alive connection just then): the
    client must see a TransportError to retry, not an error of ours (the answer's reader once did not exist yet)."""
    from finetune_operator.kube.transport import TransportError

    class Reset:
        closed = False

        def sendall(self, data: bytes) -> None:
            raise ConnectionResetError(104, "Connection reset by peer")

        def close(self) -> None:
            self.closed = True

    sock = Reset()
    p = pool(raw_server)
    monkeypatch.setattr(p, "_take", lambda *_: sock)
    with pytest.raises(TransportError) as info:
        p.request("POST", "/x", b"{}", {}, 5, 5)
    assert isinstance(info.value, ConnectionResetError) and sock.closed and not p._idle
