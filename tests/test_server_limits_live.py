"""Issue 13 (B): slow and huge clients against `reefcap serve` as a real uvicorn subprocess on 127.0.0.1, and
the drain at a fractional deadline. One server for the module (short timeouts so each test takes seconds);
the drain test stops it, so it runs last."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import httpx
import pytest
from server_helpers import LiveServer, png_bytes

READ_TIMEOUT_S = 1.0
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits-live")
    srv = LiveServer.torch_cpu(
        tmp,
        tiny_model,
        "",  # no fallback
        read_timeout_s=READ_TIMEOUT_S,
        keep_alive_s=1,
        max_connections=24,
        max_large_bodies=1,
        drain_timeout_s=0.5,
        max_batch_size=1,
        max_request_cost=100_000,
    )
    yield srv
    srv.stop()


def _connect(srv: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    sock.settimeout(0.05)
    return sock


def _peek(sock: socket.socket) -> bytes:
    """What the server has sent on ``sock`` so far, left unread; b"" while it is silent."""
    try:
        return sock.recv(65536, socket.MSG_PEEK)
    except (TimeoutError, OSError):
        return b""


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (EOF or reset); False while it is open and silent."""
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_trickling_request_heads_are_closed_and_connections_capped(server):
    # 130 connections trickling a request head one byte every 0.3 s: before, all stayed open for good. Past five
    # times max_connections (120) a connection is answered 503 at once, so descriptors stay bounded.
    socks = [_connect(server) for _ in range(130)]
    head = b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    time.sleep(0.5)
    early = [_peek(s) for s in socks]
    answered = [a for a in early if a.startswith(b"HTTP/1.1 503")]
    assert len(answered) >= 10 and all(b"retry-after: 1" in a.lower() and b'"overloaded"' in a for a in answered)
    assert len(answered) + sum(a == b"" for a in early) == len(socks), "some other answer came"
    start = time.monotonic()
    for i in range(len(head)):
        for s in socks:
            with contextlib.suppress(OSError):  # already closed by the server
                s.send(head[i : i + 1])
        time.sleep(0.3)
        if all(_closed(s) for s in socks) or time.monotonic() - start > 4 * READ_TIMEOUT_S:
            break
    elapsed = time.monotonic() - start
    assert all(_closed(s) for s in socks), "a trickling connection was still open"
    assert elapsed < 4 * READ_TIMEOUT_S
    for s in socks:
        s.close()
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200  # the server still serves


def test_a_huge_request_head_is_cut_off(server):
    # Before, uvicorn's default parser (httptools) took megabytes of header lines into memory.
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sent = 0
    with contextlib.suppress(OSError):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for i in range(2000):
            sock.sendall(b"X-Big-%d: " % i + b"a" * 1000 + b"\r\n")
            sent += 1000
        sock.sendall(b"\r\n")
    answer = b""
    with contextlib.suppress(OSError):
        answer = sock.recv(100)
    sock.close()
    assert sent < 2_000_000 or not answer.startswith(b"HTTP/1.1 200"), "a 2 MB request head was served"
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


def test_a_body_that_does_not_arrive_in_time_gets_a_json_408(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    sock.sendall(b"Content-Length: 1000\r\n\r\n" + b'{"images": [')
    start = time.monotonic()
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    assert time.monotonic() - start < 3 * READ_TIMEOUT_S
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:200]
    assert json.loads(body)["error"]["code"] == "body_timeout"


def test_large_bodies_in_flight_are_bounded(server):
    # One 2 MB JSON body arriving slowly holds the only large-body slot; a second one is refused at once
    # with a JSON 503 instead of adding its whole body to memory.
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    slow.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    slow.sendall(b"Content-Length: 2000000\r\n\r\n" + b'{"images": [' + b" " * 1000)
    time.sleep(0.2)
    r = httpx.post(server.url + "/v1/captions", content=b"[" + b" " * 1_500_000 + b"]", headers=JSON, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
    assert "Retry-After" in r.headers
    slow.close()
    time.sleep(READ_TIMEOUT_S + 0.5)  # the slot frees when the slow body times out
    r = httpx.post(server.url + "/v1/captions", content=b"[" + b" " * 1_500_000 + b"]", headers=JSON, timeout=10)
    assert r.status_code == 422, r.text  # parsed now: a list is not a captions body


def test_sigterm_drains_at_a_fractional_deadline_and_answers_queued_requests_with_json_503(server):
    # Ten requests of about a second of decoding each queue behind one another (batches of one); the drain
    # deadline is 0.5 s. Before: int(0.5) or None made uvicorn wait for all of them (and plain-text 500s
    # whenever the deadline was shorter than the queued work).
    options = json.dumps({"num_beams": 16, "max_length": 64, "min_length": 64})
    files = [("images", ("a.png", png_bytes(), "image/png")), ("options", (None, options))]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = [asyncio.ensure_future(client.post("/v1/captions", files=files)) for _ in range(10)]
            await asyncio.sleep(1.0)  # all queued, the first batches running
            stopped = time.monotonic()
            server.proc.send_signal(15)
            responses = await asyncio.gather(*tasks, return_exceptions=True)
            return responses, time.monotonic() - stopped

    responses, took = asyncio.run(main())
    statuses = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    refused = [r for r in responses if isinstance(r, httpx.Response) and r.status_code == 503]
    assert refused and all(r.json()["error"]["code"] == "shutting_down" for r in refused), statuses
    assert took < 5, f"drain took {took:.1f} s for a 0.5 s deadline"
    assert server.proc.wait(10) in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown


def test_quiet_gc_freezes_the_loaded_heap_and_collects_rarely():
    import gc

    from reefcap.server.limits import GC_THRESHOLDS, quiet_gc

    before = gc.get_threshold()
    try:
        quiet_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 1000  # this test process has pytest, numpy, PIL... loaded
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
