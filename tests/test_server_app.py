"""The caption server in-process (httpx ASGITransport) on real tiny BLIP engines, SQLite and pycocoevalcap."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
import torch
from PIL import Image
from server_helpers import (
    corrupt_copy,
    metric,
    metric_or_zero,
    png_bytes,
    serve,
)

from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.factory import TinyConfig
from reefcap.models.metrics import degenerate_reason
from reefcap.models.quality import uciqe, uiqm
from reefcap.server.app import build_pool
from reefcap.server.metrics import Metrics
from reefcap.server.pool import ModelPool
from reefcap.server.settings import ServerSettings

CPU = EngineConfig(device="cpu")

SHORT = TinyConfig(max_positions=16)


def settings(tmp_path, **kw) -> ServerSettings:
    kw.setdefault("feedback_db", tmp_path / "feedback.sqlite3")
    kw.setdefault("max_wait_ms", 20)
    # build_pool sets torch's thread count process-wide; keep the test process's own setting.
    kw.setdefault("inference_threads", torch.get_num_threads())
    return ServerSettings(_env_file=None, **kw)


def test_captions_multipart_json_and_image_to_text(engines, euvp_images, tmp_path):
    pool = ModelPool(engines["varied"], None)  # no fallback: every caption is the primary's, even degenerate ones
    data = [p.read_bytes() for p in euvp_images[:3]]

    async def scenario(client, app):
        r = await client.post(
            "/v1/captions",
            files=[("images", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(data)],
            data={"options": json.dumps({"quality": True})},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert r.headers["x-request-id"] == body["request_id"]
        assert [x["index"] for x in body["results"]] == [0, 1, 2]
        expected = engines["varied"].caption(data, DecodeOptions.greedy())
        assert [x["caption"] for x in body["results"]] == [c.caption for c in expected]
        first = body["results"][0]
        assert first["model"]["name"] == "varied-m" and first["fallback"] == {"used": False, "reason": None}
        assert first["confidence"] <= 0 and first["latency_ms"] > 0
        # Measured on the 256 px photo reduced 2x (the server's bounded-cost copy), rounded to 4 decimals.
        half = Image.open(euvp_images[0]).convert("RGB").reduce(2)
        assert first["quality"] == {"uiqm": round(uiqm(half), 4), "uciqe": round(uciqe(half), 4)}

        j = await client.post("/v1/captions", json={"images": [{"data": base64.b64encode(data[1]).decode()}]})
        assert j.status_code == 200 and j.json()["results"][0]["caption"] == expected[1].caption
        assert j.json()["results"][0]["quality"] is None  # not asked for

        h = await client.post("/v1/image-to-text", content=data[2])  # no content type: sniffed
        assert h.json() == [{"generated_text": expected[2].caption}]

        m = (await client.get("/v1/models")).json()["models"]
        assert [x["role"] for x in m] == ["primary"] and m[0]["metrics"]["underwater"]["CIDEr"] == 0.5
        text = (await client.get("/metrics")).text
        assert metric(text, "reefcap_caption_quality_score", model="varied-m", metric="CIDEr", source="manifest") == 0.5
        assert metric(text, "reefcap_http_requests_total", endpoint="/v1/captions", status="200") == 2
        assert metric(text, "reefcap_images_captioned_total", model="varied-m") == 5
        # The 3 images that asked, and of the 2 that did not the first (the sample starts full, 1/16 after).
        assert metric(text, "reefcap_input_uiqm_score_count") == 4

    serve(settings(tmp_path), pool, scenario)


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, format="PNG")  # ~80 MP of zeros compresses to a few KB
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"not an image at all", "headers": {"content-type": "application/octet-stream"}}, 400, None),
        ({"files": [("images", ("x.jpg", b"\xff\xd8\xff\xe0garbage", "image/jpeg"))]}, 400, "not_an_image"),
        ({"json": {"images": [{"data": "!!!not base64"}]}}, 400, "invalid_base64"),
        ({"json": {"images": [{"url": "http://example.com/a.jpg"}]}}, 400, "urls_not_supported"),
        ({"json": {"images": []}}, 400, "no_images"),
        ({"json": {"imgs": []}}, 422, "invalid_request"),
        ({"json": {"images": [{"data": "aGk="}], "options": {"num_beams": 99}}}, 422, "invalid_options"),
        ({"content": b"{broken", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ],
)
def test_bad_requests_get_json_errors(engines, tmp_path, kwargs, status, code):
    pool = ModelPool(engines["tiny"], None)

    async def scenario(client, app):
        path = "/v1/image-to-text" if "content" in kwargs and code is None else "/v1/captions"
        r = await client.post(path, **kwargs)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["message"] and err["code"] == (code or "not_an_image")

    serve(settings(tmp_path), pool, scenario)


def test_limits_bomb_format_size_count_and_api_key(engines, tmp_path):
    pool = ModelPool(engines["tiny"], None)
    s = settings(tmp_path, api_key="s3cret", formats="PNG", max_request_bytes=200_000, max_images_per_request=2)
    auth = {"Authorization": "Bearer s3cret"}
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32)).save(jpeg, format="JPEG")

    async def scenario(client, app):
        assert (await client.get("/healthz")).status_code == 200  # public
        assert (await client.get("/metrics")).status_code == 200
        r = await client.post("/v1/image-to-text", content=png_bytes())
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await client.post("/v1/image-to-text", content=png_bytes(), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert (await client.post("/v1/image-to-text", content=png_bytes(), headers=auth)).status_code == 200
        r = await client.post("/v1/image-to-text", content=_bomb_png(), headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
        r = await client.post("/v1/image-to-text", content=jpeg.getvalue(), headers=auth)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_format"
        r = await client.post("/v1/image-to-text", content=b"\0" * 300_000, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        files = [("images", (f"{i}.png", png_bytes(), "image/png")) for i in range(3)]
        r = await client.post("/v1/captions", files=files, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"
        assert (await client.get("/nope", headers=auth)).json()["error"]["code"] == "not_found"
        text = (await client.get("/metrics")).text
        assert metric(text, "reefcap_http_requests_total", endpoint="/v1/image-to-text", status="401") == 2
        assert metric_or_zero(text, "reefcap_http_requests_total", status="500") == 0

    serve(s, pool, scenario)


def test_degenerate_reason():
    assert degenerate_reason("") == "empty"
    assert degenerate_reason("coral coral coral") == "repetition"
    assert degenerate_reason("a fish on a fish on a fish on the reef") == "repetition"
    assert degenerate_reason("a turtle swimming over a coral reef") is None
    assert degenerate_reason("fish and more fish near fish") is None


def test_fallback_reasons_and_circuit_breaker(engines, euvp_images, tmp_path):
    data = euvp_images[0].read_bytes()

    async def collapsed(client, app):
        r = (await client.post("/v1/image-to-text", content=data)).status_code
        body = (await client.post("/v1/captions", files=[("images", ("a.jpg", data, "image/jpeg"))])).json()
        res = body["results"][0]
        assert r == 200 and res["fallback"] == {"used": True, "reason": "degenerate_repetition"}
        assert res["model"]["name"] == "varied-m" and "coral coral coral" not in res["caption"]
        text = (await client.get("/metrics")).text
        assert metric(text, "reefcap_fallbacks_total", reason="degenerate_repetition") == 2

    serve(settings(tmp_path), ModelPool(engines["collapsed"], engines["varied"]), collapsed)

    async def raising(client, app):
        reasons = []
        for _ in range(4):
            r = await client.post("/v1/captions", files=[("images", ("a.jpg", data, "image/jpeg"))])
            assert r.status_code == 200, r.text
            reasons.append(r.json()["results"][0]["fallback"]["reason"])
        assert reasons == ["primary_error", "primary_error", "circuit_open", "circuit_open"]
        ready = (await client.get("/readyz")).json()
        assert ready["circuit_open"] is True
        text = (await client.get("/metrics")).text
        assert metric(text, "reefcap_fallbacks_total", reason="primary_error") == 2
        assert metric(text, "reefcap_circuit_open") == 1

    pool = ModelPool(engines["short"], engines["tiny"], breaker_failures=2, breaker_reset_s=60)
    serve(settings(tmp_path / "b"), pool, raising)

    async def overrun(client, app):
        r = await client.post("/v1/captions", files=[("images", ("a.jpg", data, "image/jpeg"))])
        assert r.json()["results"][0]["fallback"]["reason"] == "primary_timeout"

    pool = ModelPool(engines["varied"], engines["tiny"], primary_timeout_s=0.001)
    serve(settings(tmp_path / "c"), pool, overrun)

    async def half_open(client, app):
        async def reason():
            r = await client.post("/v1/image-to-text", content=data)
            assert r.status_code == 200
            text = (await client.get("/metrics")).text
            # circuit_open has no series until the breaker first opens: absent counts as 0 here
            return {
                k: metric_or_zero(text, "reefcap_fallbacks_total", reason=k) for k in ("primary_error", "circuit_open")
            }

        assert await reason() == {"primary_error": 1, "circuit_open": 0}
        assert await reason() == {"primary_error": 2, "circuit_open": 0}  # opens the breaker
        assert await reason() == {"primary_error": 2, "circuit_open": 1}
        await asyncio.sleep(0.6)  # past breaker_reset_s: one batch tries the primary again, fails, reopens
        assert await reason() == {"primary_error": 3, "circuit_open": 1}
        assert await reason() == {"primary_error": 3, "circuit_open": 2}

    pool = ModelPool(engines["short"], engines["tiny"], breaker_failures=2, breaker_reset_s=0.5)
    serve(settings(tmp_path / "d"), pool, half_open)


def test_corrupt_primary_at_start_serves_fallback(tiny_model, tmp_path):
    bad = corrupt_copy(tiny_model, tmp_path / "broken")
    s = settings(tmp_path, model=str(bad), fallback=str(tiny_model), backend="torch", device="cpu")
    pool = build_pool(s, Metrics())
    assert pool.primary is None and "broken" in pool.primary_error

    async def scenario(client, app):
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["serving"] == "fallback"
        r = await client.post("/v1/image-to-text", content=png_bytes())
        assert r.status_code == 200
        res = (await client.post("/v1/captions", files=[("images", ("a.png", png_bytes(), "image/png"))])).json()
        assert res["results"][0]["fallback"] == {"used": True, "reason": "primary_unavailable"}

    serve(s, pool, scenario)


def test_deadline_504_cors_off_by_default_and_on_when_set(engines, tmp_path):
    pool = ModelPool(engines["tiny"], None)

    async def deadline(client, app):
        r = await client.post("/v1/image-to-text", content=png_bytes())
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        r = await client.options("/v1/captions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        text = (await client.get("/metrics")).text
        assert metric(text, "reefcap_dropped_images_total", reason="deadline") == 1

    # The lone image waits up to 2 s for company; its deadline is 0.2 s.
    serve(settings(tmp_path, request_timeout_s=0.2, max_wait_ms=2000), pool, deadline)

    async def cors(client, app):
        headers = {"Origin": "http://ok.example", "Access-Control-Request-Method": "POST"}
        r = await client.options("/v1/captions", headers=headers)
        assert r.headers["access-control-allow-origin"] == "http://ok.example"

    serve(settings(tmp_path / "c", cors_origins="http://ok.example"), ModelPool(engines["tiny"], None), cors)


def test_multipart_options_and_export_without_database(engines, tmp_path, capsys):
    from reefcap.cli import main

    pool = ModelPool(engines["varied"], None)

    async def scenario(client, app):
        files = [("images", ("a.png", png_bytes(), "image/png"))]
        r = await client.post("/v1/captions", files=files, data={"options": json.dumps({"max_length": 7})})
        assert r.status_code == 200 and r.json()["results"][0]["tokens"] <= 3  # 7 minus the 4 prompt tokens
        r = await client.post("/v1/captions", files=files, data={"options": json.dumps({"beams": 2})})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"

    serve(settings(tmp_path), pool, scenario)
    assert main(["feedback", "export", "--db", str(tmp_path / "none.sqlite3"), "--out", str(tmp_path / "o")]) == 2
    assert "no feedback database" in capsys.readouterr().err


def test_quality_is_measured_when_asked_and_sampled_otherwise(engines, euvp_images, tmp_path):
    """UIQM/UCIQE are computed for a request that asks (options.quality) and for quality_sample_rate of the
    other images; the histograms count exactly those."""
    pool = ModelPool(engines["varied"], None)
    data = euvp_images[0].read_bytes()

    async def scenario(client, app):
        for _ in range(8):  # rate 1/4: images 1 and 5 of these 8 are measured
            r = await client.post("/v1/captions", files=[("images", ("a.jpg", data, "image/jpeg"))])
            assert r.status_code == 200 and r.json()["results"][0]["quality"] is None
        asked = await client.post(
            "/v1/captions",
            files=[("images", ("a.jpg", data, "image/jpeg"))],
            data={"options": json.dumps({"quality": True, "max_length": 12})},
        )
        assert asked.status_code == 200, asked.text
        half = Image.open(euvp_images[0]).convert("RGB").reduce(2)
        assert asked.json()["results"][0]["quality"] == {"uiqm": round(uiqm(half), 4), "uciqe": round(uciqe(half), 4)}
        bad = await client.post("/v1/captions", json={"images": [{"data": "aGk="}], "options": {"quality": "maybe"}})
        assert bad.status_code == 422 and "quality" in bad.json()["error"]["message"]
        text = (await client.get("/metrics")).text
        assert metric(text, "reefcap_input_uiqm_score_count") == 3
        assert metric(text, "reefcap_input_uciqe_score_count") == 3

    serve(settings(tmp_path, quality_sample_rate=0.25), pool, scenario)


@pytest.mark.parametrize("cap", [0.5, 0])
def test_the_quality_sample_is_capped_per_second(engines, euvp_images, tmp_path, cap):
    """Under load the sampled measurements stop at quality_samples_per_s (a bucket of one second's worth); a
    request that asks is always measured; with no cap the rate alone decides."""
    import time

    pool = ModelPool(engines["varied"], None)
    data = euvp_images[0].read_bytes()

    async def burst(client, n: int) -> float:
        start = time.monotonic()
        for _ in range(n):
            assert (await client.post("/v1/image-to-text", content=data)).status_code == 200
        return time.monotonic() - start

    async def capped(client, app):
        took = await burst(client, 12)
        measured = metric((await client.get("/metrics")).text, "reefcap_input_uiqm_score_count")
        assert 1 <= measured <= 2 + took * cap, (measured, took)  # one to start with, then `cap` a second
        asked = await client.post(
            "/v1/captions", files=[("images", ("a.jpg", data))], data={"options": '{"quality": true}'}
        )
        assert asked.json()["results"][0]["quality"]["uiqm"] is not None
        assert metric((await client.get("/metrics")).text, "reefcap_input_uiqm_score_count") == measured + 1

    async def uncapped(client, app):
        await burst(client, 12)
        assert metric((await client.get("/metrics")).text, "reefcap_input_uiqm_score_count") == 12

    if cap:
        serve(settings(tmp_path, quality_sample_rate=1.0, quality_samples_per_s=cap), pool, capped)
    else:
        serve(settings(tmp_path, quality_sample_rate=1.0, quality_samples_per_s=0), pool, uncapped)


def test_small_uploads_decode_on_the_loop_and_large_ones_on_the_threads(engines, euvp_images, tmp_path):
    """A handoff to a decoding thread and back costs more CPU than decoding a small photo (INLINE_PIXELS): those
    decode on the event loop; a request with more pixels, or one measured for quality, uses the threads.
    Either way the answers, and the errors, are the same."""
    from reefcap.server.service import INLINE_PIXELS

    pool = ModelPool(engines["varied"], None)
    small = euvp_images[0].read_bytes()  # 256 x 256
    assert 256 * 256 <= INLINE_PIXELS < 5 * 256 * 256
    expected = engines["varied"].caption([small], DecodeOptions.greedy())[0].caption
    handed = []

    async def scenario(client, app):
        decoder = app.state.runtime.service.decoder
        submit = decoder.submit
        decoder.submit = lambda fn, *args: handed.append(fn.__name__) or submit(fn, *args)
        r = await client.post("/v1/image-to-text", content=small)  # the first image is measured for /metrics
        assert r.json() == [{"generated_text": expected}] and handed == ["finish_upload"]
        for _ in range(3):
            r = await client.post("/v1/image-to-text", content=small)
            assert r.json() == [{"generated_text": expected}]
        r = await client.post("/v1/captions", files=[("images", (f"{i}.jpg", small, "image/jpeg")) for i in range(4)])
        assert [x["caption"] for x in r.json()["results"]] == [expected] * 4
        bad = await client.post("/v1/image-to-text", content=small[: len(small) // 2])
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "truncated_image", bad.text
        assert len(handed) == 1
        r = await client.post("/v1/captions", files=[("images", (f"{i}.jpg", small, "image/jpeg")) for i in range(5)])
        assert [x["caption"] for x in r.json()["results"]] == [expected] * 5
        assert len(handed) == 6
        bad = await client.post("/v1/captions", files=[("images", (f"{i}.jpg", small[:3000])) for i in range(5)])
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "truncated_image", bad.text
        asked = await client.post(
            "/v1/captions", files=[("images", ("a.jpg", small))], data={"options": '{"quality": true}'}
        )
        assert asked.json()["results"][0]["quality"]["uiqm"] is not None and len(handed) == 12

    serve(settings(tmp_path, quality_sample_rate=0), pool, scenario)
