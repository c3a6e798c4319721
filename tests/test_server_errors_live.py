"""How errors leave a real uvicorn server on loopback: a 500 is JSON with X-Request-ID and the keep-alive
connection stays usable (the server's choice, README "Errors"), checked with one raw keep-alive socket."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import png_bytes

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def faulty(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faulty")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below
    cmd = [sys.executable, str(HERE / "faulty_server.py"), str(tiny_model), str(port), str(tmp / "fb.sqlite3")]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("server not ready: " + (tmp / "server.log").read_text()[-2000:])
        yield port, tmp / "server.log"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed) from ``sock``; raises ConnectionError if the server hung up."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed by the server after {len(data)} bytes")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        body += chunk
    return status, headers, body[:length]


def _request(method: str, path: str, body: bytes = b"", ctype: str = "application/octet-stream") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def test_a_500_is_json_with_request_id_and_keeps_the_connection(faulty):
    port, log = faulty
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sequence = [
            (_request("GET", "/v1/bug"), 500),
            (_request("GET", "/healthz"), 200),
            (_request("POST", "/v1/bug", b"x" * 1_000_000), 500),  # an unread 1 MB body must not poison the next
            (_request("POST", "/v1/image-to-text", png_bytes(), "image/png"), 200),
            (_request("GET", "/v1/captions"), 405),
            (_request("POST", "/v1/captions", b"{", "application/json"), 400),
            (_request("GET", "/v1/bug"), 500),
            (_request("GET", "/readyz"), 200),
        ]
        for raw, expected in sequence:
            sock.sendall(raw)
            status, headers, body = _read_response(sock)
            assert status == expected, (raw[:40], status, body)
            assert headers.get("connection", "").lower() != "close", headers
            assert len(headers["x-request-id"]) == 32
            if status >= 400:
                error = json.loads(body)["error"]
                assert set(error) == {"code", "message"}
            if status == 500:
                assert error["code"] == "internal_error" and "ZeroDivisionError" in error["message"]
                assert headers["content-type"] == "application/json"
                request_id = headers["x-request-id"]
    # The log names the request that failed, so a client's X-Request-ID leads to its traceback.
    text = log.read_text()
    assert request_id in text and "ZeroDivisionError" in text
