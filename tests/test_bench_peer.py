"""make bench-server's LitServe peer really captions with the checkpoint, and the side-by-side driver runs.

Needs the ``bench`` extra (litserve), which ``make test-slow`` and ``make bench-server`` install; slow because
each test starts real servers (LitServe's processes, ``reefcap serve``) on loopback.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from reefcap.bench import vs as bench_vs
from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.models.registry import zoo_models

pytestmark = pytest.mark.slow
MODEL = "reefscenes-tiny-damf"


@pytest.fixture(autouse=True)
def _litserve():
    pytest.importorskip("litserve", reason="the bench extra (make test-slow installs it)")


def test_peer_answers_the_checkpoints_greedy_captions(euvp_images):
    """The peer's captions are the checkpoint's own (PyTorch, greedy, max length 20, prompt stripped), so the
    bench compares reefcap with a server that does the same work, not with one that answers anything."""
    path = str(zoo_models()[MODEL])
    expected = TorchCaptionEngine.load(path, EngineConfig(device="cpu")).caption(
        euvp_images[:4], DecodeOptions(num_beams=1, max_length=20)
    )
    proc, port = bench_vs.start_peer(path, 20, threads=1)
    try:
        got = []
        for image in euvp_images[:4]:
            body = {"image": base64.b64encode(image.read_bytes()).decode()}
            r = httpx.post(f"http://127.0.0.1:{port}/predict", json=body, timeout=60)
            assert r.status_code == 200, r.text
            got.append(r.json()["caption"])
        # A 4xx for a body that is not an image would be nicer, but that is LitServe's behaviour, not ours.
        assert httpx.post(f"http://127.0.0.1:{port}/predict", json={"image": "aGk="}, timeout=60).status_code >= 400
    finally:
        bench_vs.stop(proc)
    assert got == [c.caption for c in expected]
    assert len(set(got)) >= 3, "captions must differ by photo or the comparison proves nothing"


def test_quick_side_by_side_run(tmp_path, capsys):
    """``make bench-server BENCH_SERVER_ARGS=--quick``: reefcap, reefcap with two workers and the peer at 1, 8
    and 32 connections, every reefcap request answered 200, the table and the JSON written."""
    out = tmp_path / "bench.json"
    assert bench_vs.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = next(iter(result["results"].values()))
    assert sorted((r["server"], r["concurrency"]) for r in rows) == sorted(
        (s, c) for s in ("reefcap", "reefcap x2", "litserve") for c in (1, 8, 32)
    )
    for r in rows:
        assert r["goodput"] > 0 and r["client_cpu_ms_per_req"] > 0 and r["server_cpu_ms_per_req"] > 0
        assert r["server"] == "litserve" or r["errors"] == 0
    printed = capsys.readouterr().out
    assert "ratio = goodput / LitServe goodput" in printed and "ratio x2" in printed


def test_quick_routing_run(tmp_path, capsys):
    """``python -m reefcap.bench.routing --quick`` (the second half of ``make bench-server``): the serving default
    routed against itself unrouted, side by side on the all-underwater photos, every request answered."""
    from reefcap.bench import routing as bench_routing

    out = tmp_path / "bench-routing.json"
    assert bench_routing.main(["--quick", "--out", str(out)]) == 0
    routing = json.loads(out.read_text())["rows"]
    assert sorted((r["server"], r["concurrency"]) for r in routing) == sorted(
        (s, c) for s in ("routed", "unrouted") for c in (1, 8, 32)
    )
    assert all(r["errors"] == 0 and r["goodput"] > 0 for r in routing)
    printed = capsys.readouterr().out
    assert "router alone:" in printed and "23/23 photos routed underwater" in printed
