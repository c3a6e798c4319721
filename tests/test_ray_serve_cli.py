"""Issue 24: `reefcap serve --ray`, the one documented command, as a real subprocess on a local Ray it starts:
ready, answering a caption with the plain server's result shape, and stopped by SIGTERM with exit status 0."""

from __future__ import annotations

import signal

import httpx
import pytest
from server_helpers import LiveServer, png_bytes

pytestmark = [pytest.mark.heavy, pytest.mark.slow]  # a local Ray per test: 20-50 s each on 2 vCPUs
pytest.importorskip("ray.serve")


def _stopped(srv: LiveServer) -> int:
    srv.proc.send_signal(signal.SIGTERM)
    try:
        return srv.proc.wait(120)  # Serve's controller takes up to 30 s to stop on 2 vCPUs
    finally:
        srv.stop()


def test_serve_ray_answers_and_stops_on_sigterm(tiny_model, tmp_path):
    srv = LiveServer.torch_cpu(tmp_path, tiny_model, "", ray="true", replicas=1, max_replicas=1)
    try:
        files = [("images", ("a.png", png_bytes(), "image/png"))]
        r = httpx.post(srv.url + "/v1/captions", files=files, timeout=60)
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["caption"] and result["model"]["version"] and result["fallback"]["used"] is False
        assert httpx.get(srv.url + "/readyz", timeout=10).json()["primary"]["version"] == result["model"]["version"]
    finally:
        code = _stopped(srv)
    assert code == 0, srv.log_path.read_text()[-2000:]
