"""The Python clients and `reefcap caption --server` against a real `reefcap serve` on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from server_helpers import LiveServer

from reefcap.clients.http import AsyncReefcapClient, ReefcapClient, ReefcapHTTPError
from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine

KEY = "client-test-key"


@pytest.fixture(scope="module")
def server(varied_model, tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client-live")
    srv = LiveServer.torch_cpu(tmp, varied_model, tiny_model, num_beams=1, max_wait_ms=30, api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local_captions(varied_model, tiny_model, euvp_images):
    """What each model says for the first images, greedy, computed in this process."""
    out = {}
    for path in (varied_model, tiny_model):
        engine = TorchCaptionEngine.load(str(path), EngineConfig(device="cpu"))
        names = euvp_images[:6]
        captions = engine.caption(names, DecodeOptions.greedy())
        out[path.name] = {str(n): c.caption for n, c in zip(names, captions, strict=True)}
    return out


def test_sync_client_round_trip(server, euvp_images, local_captions):
    with ReefcapClient(server.url, api_key=KEY) as client:
        result = client.caption(euvp_images[0], {"quality": True})
        assert result.caption == local_captions[result.model.name][str(euvp_images[0])]
        assert result.model.name in ("varied", "tiny") and result.fallback["used"] == (result.model.name == "tiny")
        assert result.request_id and result.confidence <= 0 and result.latency_ms > 0
        assert result.quality["uiqm"] is not None and 0 < result.quality["uciqe"] < 1
        with pytest.raises(ReefcapHTTPError) as info:
            client.caption(b"certainly not an image")
        assert 400 <= info.value.status < 500 and info.value.code
        assert client.get("/healthz")


def test_wrong_key_is_refused(server, euvp_images):
    with ReefcapClient(server.url, api_key="wrong") as client, pytest.raises(ReefcapHTTPError) as info:
        client.caption(euvp_images[0])
    assert info.value.status == 401


def test_async_client_many(server, euvp_images, local_captions):
    async def main():
        async with AsyncReefcapClient(server.url, api_key=KEY) as client:
            return await client.caption_many([*euvp_images[:6], b"junk"], concurrency=4)

    results = asyncio.run(main())
    assert isinstance(results[-1], ReefcapHTTPError)
    for path, result in zip(euvp_images[:6], results, strict=False):
        assert result.caption == local_captions[result.model.name][str(path)]


def test_batch_cli_through_the_server_matches_local(server, euvp_images, local_captions, tmp_path):
    out = tmp_path / "via-server.jsonl"
    names = [str(p) for p in euvp_images[:6]]
    cmd = [sys.executable, "-m", "reefcap.cli", "caption", *names, "-o", str(out), "--server", server.url, "--greedy"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={"REEFCAP_API_KEY": KEY, **_env()})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == names
    for r in records:
        assert r["caption"] == local_captions[r["model"]["name"]][r["image"]]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "REEFCAP_API_KEY"}
