"""Issue 13 (B): deadlines and batch sizes follow the primary's measured cost, so a slow but healthy model is
never mistaken for a failing one. The blip-base-shape check (224 M parameters, ONNX fp32, defaults, no
fallback) is marked slow: `make test-slow`."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import pytest
import torch
from server_helpers import LiveServer, metric

from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.server.app import create_app
from reefcap.server.pool import CostModel, ModelPool
from reefcap.server.settings import ServerSettings

CPU = EngineConfig(device="cpu")


def test_cost_model_budgets():
    cost, opts = CostModel(slack=4), DecodeOptions.greedy(max_length=20)
    assert cost.budget(20.0, 16, opts) == 20.0 and cost.batch_cap(16, 10.0, opts) == 16  # unmeasured: as set
    cost.observe(2, opts, 3.0)  # 1.5 s per image: a blip-base-shape on one slow core
    assert cost.expected_s(16, opts) == pytest.approx(24.0)
    assert cost.budget(20.0, 16, opts) == pytest.approx(96.0)  # 4 x the expected 24 s, not the 20 s floor
    assert cost.budget(20.0, 1, opts) == 20.0
    assert cost.batch_cap(16, 10.0, opts) == 6
    assert cost.expected_s(1, DecodeOptions(num_beams=3, max_length=40)) == pytest.approx(1.5 * 6)


def test_the_request_deadline_counts_the_batches_ahead_and_the_lanes_running_them():
    cost, opts = CostModel(slack=2), DecodeOptions.greedy(max_length=20)
    assert cost.queue_budget(30.0, 40, opts, max_batch=16) == 30.0  # unmeasured: the configured deadline
    cost.observe(16, opts, 1.6)  # 0.1 s an image
    # 40 images ahead in batches of 16: three batches (16, 16, 8), each round as long as a full batch.
    assert cost.queue_budget(0.0, 40, opts, max_batch=16) == pytest.approx(2 * 3 * 1.6)
    assert cost.queue_budget(0.0, 40, opts, max_batch=16, workers=2) == pytest.approx(2 * 2 * 1.6)
    assert cost.queue_budget(0.0, 5, opts, max_batch=16) == pytest.approx(2 * 0.5)  # one small batch
    assert cost.queue_budget(10.0, 5, opts, max_batch=16) == 10.0  # never under the floor


def test_a_slow_but_healthy_primary_is_not_timed_out_once_measured(tiny_model, varied_model, euvp_images, tmp_path):
    options = {"num_beams": 1, "max_length": 40}
    body = {
        "images": [{"data": base64.b64encode(p.read_bytes()).decode()} for p in euvp_images[:8]],
        "options": options,
    }
    engines = [TorchCaptionEngine.load(str(m), CPU) for m in (tiny_model, varied_model)]

    def run(pool: ModelPool, **kw) -> httpx.Response:
        s = ServerSettings(
            _env_file=None, feedback_db=tmp_path / "fb.sqlite3", inference_threads=torch.get_num_threads(), **kw
        )

        async def main():
            app = create_app(s, pool)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
                    return await client.post("/v1/captions", json=body)

        return asyncio.run(main())

    # Unmeasured, a batch of 8 overruns the fixed 20 ms primary timeout: the fallback answers it.
    r = run(ModelPool(*engines, primary_timeout_s=0.02))
    assert {x["fallback"]["reason"] for x in r.json()["results"]} == {"primary_timeout"}, r.text
    # Measured at start, the batch gets slack x its expected time: the primary answers, within the request's
    # deadline too (50 ms configured, stretched to the measured work).
    pool = ModelPool(*engines, primary_timeout_s=0.02)
    assert pool.warm_up(DecodeOptions.greedy(max_length=40)) > 0
    r = run(pool, request_timeout_s=0.05)
    assert r.status_code == 200, r.text
    assert {x["fallback"]["reason"] for x in r.json()["results"]} == {None}, r.text


@pytest.mark.slow
def test_blip_base_shape_answers_24_concurrent_requests_with_defaults(tmp_path, euvp_images):
    from reefcap.bench.cli import bench_model
    from reefcap.models.export.onnx import cached_export

    model = bench_model("blip-base-shape")  # as `make bench` makes it: random weights, 224 M parameters
    cached_export(model, "fp32")  # exported here once (minutes), so the server's start only loads it
    env = {"REEFCAP_MODEL": model, "REEFCAP_FALLBACK": "", "REEFCAP_FEEDBACK_DB": str(tmp_path / "fb.sqlite3")}
    srv = LiveServer(env, tmp_path / "server.log")
    try:
        images = [p.read_bytes() for p in euvp_images[:24]]
        images += images[: 24 - len(images)]

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=900) as client:
                return await asyncio.gather(*(client.post("/v1/image-to-text", content=b) for b in images))

        start = time.monotonic()
        responses = asyncio.run(burst())
        took = time.monotonic() - start
        statuses = [r.status_code for r in responses]
        text = srv.metrics()
        batches = metric(text, "reefcap_batch_size_images_count")
        print(f"24 concurrent requests: {took:.1f} s, {batches:.0f} batches, statuses {set(statuses)}")
        bad = [r.text for r in responses if r.status_code != 200][:3]
        assert statuses == [200] * 24, (bad, srv.log_path.read_text()[-2000:])
    finally:
        srv.stop()
