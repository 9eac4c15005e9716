"""Slow and half-open clients against the real uvicorn server (the same uvicorn.Config that
`saq-deploy serve` runs, in a thread) over real loopback sockets: they are cut after the stated
deadlines with a 408, they never starve the probes, keep-alive reuse still works, and SIGTERM-style
shutdown is not held up by them."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest

from tests.serve.conftest import make_served

pytest.importorskip("fastapi", reason="serving tests need the 'serve' extra (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx")

GEN = {"label": 3, "n": 1, "seed": 1, "steps": 2}


@contextlib.contextmanager
def live_server(served, **config):
    """uvicorn on an already-bound 127.0.0.1 socket (no port race); yields (base URL, port, server)."""
    import uvicorn

    from saq_deploy.serve import ServeConfig, create_app
    from saq_deploy.serve.server import uvicorn_config

    cfg = ServeConfig(**config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(create_app(served, cfg), cfg, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", port, server, thread
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def connect(port: int, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if data:
        s.sendall(data)
    return s


def read_until_eof(s: socket.socket, timeout: float = 20) -> bytes:
    """Everything the server sends until it closes; socket.timeout if it never does."""
    s.settimeout(timeout)
    chunks = []
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            break
        if not b:
            break
        chunks.append(b)
    return b"".join(chunks)


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.slow
def test_half_open_connections_are_cut_and_never_block_the_probes():
    served, _ = make_served("class")
    # max_in_flight far below the number of held sockets: they must not count against it
    with live_server(served, header_timeout_s=1.0, max_in_flight=8) as (base, port, _, _t):
        partial = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Le"
        held = [connect(port, partial if i % 2 else b"") for i in range(200)]
        with httpx.Client(base_url=base, timeout=10) as c:
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").status_code == 200
            r = c.post("/v1/generate", json=GEN)
            assert r.status_code == 200 and len(r.json()["images"]) == 1
        for s in held:  # every one is answered 408 and closed (a socket.timeout here fails the test)
            status, body = status_and_body(read_until_eof(s))
            assert status == 408 and body == {"error": "request headers not received within 1 s"}
            s.close()
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200


@pytest.mark.slow
def test_slow_body_trickle_is_cut():
    served, eps = make_served("class")
    with live_server(served, header_timeout_s=30.0, body_timeout_s=1.0) as (base, port, _, _t):
        s = connect(port, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{")
        s.settimeout(0.25)
        sent, raw = 1, b""
        while sent < 1000:  # one byte every 0.25 s would take 250 s to finish
            try:
                s.sendall(b" ")
                sent += 1
                raw = s.recv(65536)
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        raw += read_until_eof(s)
        s.close()
        assert sent < 1000
        status, body = status_and_body(raw)
        assert status == 408 and body == {"error": "request body not received within 1 s"}
        assert eps.calls == 0
        r = httpx.post(f"{base}/v1/generate", json=GEN, timeout=30)
        assert r.status_code == 200 and len(r.json()["images"]) == 1


@pytest.mark.slow
def test_keep_alive_reuse_survives_idle_gaps_longer_than_the_header_deadline():
    served, _ = make_served("class")
    with live_server(served, header_timeout_s=0.5, body_timeout_s=0.5) as (_, port, _s, _t):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
        local = conn.sock.getsockname()
        for method, path, body in (("POST", "/v1/generate", json.dumps(GEN)), ("GET", "/readyz", None)):
            time.sleep(1.0)  # idle between requests: uvicorn's keep-alive (65 s), not the deadline
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200, r.read()
            r.read()
            assert conn.sock is not None and conn.sock.getsockname() == local  # the same connection
        # the next request on this connection starts but never finishes its headers: cut
        conn.sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        status, body = status_and_body(read_until_eof(conn.sock))
        assert status == 408 and "headers not received within 0.5 s" in body["error"]
        conn.close()


@pytest.mark.slow
def test_shutdown_is_not_held_up_by_slow_clients():
    served, _ = make_served("class")
    with live_server(served, header_timeout_s=120.0, body_timeout_s=1.5) as (base, port, server, thread):
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        half_open = [connect(port, b"GET /healthz HTTP/1.1\r\n") for _ in range(50)]
        uploading = connect(port, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 500\r\n\r\n{")
        time.sleep(0.3)
        server.should_exit = True  # what SIGTERM sets
        # the half-open sockets are closed by the shutdown at once (no 408: they were not
        # timed out); the upload is cut by its body deadline, well inside the 65 s drain time
        for s in half_open:
            assert read_until_eof(s) == b""
            s.close()
        status, body = status_and_body(read_until_eof(uploading))
        assert status == 408 and "body not received within 1.5 s" in body["error"]
        thread.join(30)
        assert not thread.is_alive()


@pytest.mark.slow
def test_in_flight_limit_refuses_work_but_not_probes():
    served, eps = make_served("class", hold=True)
    with live_server(served, max_in_flight=2, queue_size=8) as (base, _, _s, _t):
        results: list = []
        # different step counts: not batchable, so one runs (held) and the other waits in the queue
        workers = [threading.Thread(target=lambda i=i: results.append(
            httpx.post(f"{base}/v1/generate", json={**GEN, "steps": 2 + i}, timeout=60))) for i in range(2)]
        for w in workers:
            w.start()
        assert eps.entered.wait(30)
        deadline = time.monotonic() + 30
        # wait (on the exempt probe) until the second request is queued behind the held first
        while httpx.get(f"{base}/readyz", timeout=10).json()["queue_depth"] < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        r = httpx.post(f"{base}/v1/generate", json=GEN, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "2 requests in flight" in r.json()["error"]
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
        eps.release.set()
        for w in workers:
            w.join(60)
        assert sorted(x.status_code for x in results) == [200, 200]
        assert httpx.post(f"{base}/v1/generate", json=GEN, timeout=30).status_code == 200


@pytest.mark.slow
def test_unparsable_http_gets_a_json_400():
    served, _ = make_served("class")
    with live_server(served) as (base, port, _s, _t):
        # a header that keeps growing past h11's 16 KiB buffer is refused before it ends
        for raw in (b"NOT-HTTP\r\n\r\n", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000):
            s = connect(port, raw)
            status, body = status_and_body(read_until_eof(s))
            s.close()
            assert status == 400 and body["error"].startswith("invalid HTTP request"), body
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200


@pytest.mark.slow
def test_early_413_reaches_a_client_that_is_still_uploading():
    """The server answers 413 after 4 KiB of a 4 MiB chunked upload (more than the socket buffers
    hold) on a connection that must close: it lingers (FIN, discard the rest) instead of
    resetting a client that is still sending."""
    served, eps = make_served("class")
    piece = b" " * 8192
    upload = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(b"2000\r\n" + piece + b"\r\n" for _ in range(512))
              + b"0\r\n\r\n")
    with live_server(served, max_body_bytes=4096) as (base, port, _s, _t):
        for _ in range(5):
            # like urllib or requests: send the whole body, then read; a reset while sending is
            # where such clients fail without ever seeing the answer
            s = connect(port)
            s.sendall(upload)
            status, body = status_and_body(read_until_eof(s))
            s.close()
            assert status == 413 and "4096-byte limit" in body["error"]
        assert eps.calls == 0
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
