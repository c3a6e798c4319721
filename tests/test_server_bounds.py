"""Issue 13 (B): bounds on what one request may ask, checked against the loaded models, and fault accounting.

In-process (httpx ASGITransport) on real tiny BLIP engines (64 text positions), real SQLite. Each test here
failed on the server before these bounds: a 500 (or a 503 blamed on the model), or an opened circuit breaker.
"""

from __future__ import annotations

import base64
import json

import pytest
import torch
from server_helpers import metric, metric_or_zero, png_bytes, serve

from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.models.errors import InvalidOptionsError
from reefcap.models.policy import CaptionPolicy
from reefcap.server.pool import ModelPool
from reefcap.server.settings import ServerSettings

CPU = EngineConfig(device="cpu")
B64 = base64.b64encode(png_bytes()).decode()


@pytest.fixture(scope="module")
def engines(varied_model, tiny_model):
    return {
        "varied": TorchCaptionEngine.load(str(varied_model), CPU),
        "tiny": TorchCaptionEngine.load(str(tiny_model), CPU),
    }


def settings(tmp_path, **kw) -> ServerSettings:
    kw.setdefault("feedback_db", tmp_path / "feedback.sqlite3")
    kw.setdefault("max_wait_ms", 5)
    kw.setdefault("inference_threads", torch.get_num_threads())
    return ServerSettings(_env_file=None, **kw)


def caption_body(options: dict, images: int = 1) -> dict:
    return {"images": [{"data": B64}] * images, "options": options}


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_length": 65}, "64 text positions"),
        ({"max_length": 512, "min_length": 300}, "64 text positions"),
        ({"prompt": " ".join(["reef"] * 80)[:200], "max_length": 30}, "prompt takes"),
    ],
)
def test_decoding_lengths_past_the_models_positions_are_a_422_naming_the_limit(engines, tmp_path, options, named):
    pool = ModelPool(engines["tiny"], engines["varied"])  # both 64 positions

    async def scenario(client, app):
        r = await client.post("/v1/captions", json=caption_body(options))
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_options" and named in err["message"], err
        # The longest length the models hold is served.
        ok = await client.post("/v1/captions", json=caption_body({"max_length": 64, "num_beams": 1}))
        assert ok.status_code == 200, ok.text
        assert ok.json()["results"][0]["fallback"]["used"] is False

    serve(settings(tmp_path), pool, scenario)


def test_a_requests_bad_options_never_open_the_breaker_nor_move_traffic(engines, tmp_path):
    pool = ModelPool(engines["varied"], engines["tiny"], breaker_failures=2, breaker_reset_s=60)

    async def scenario(client, app):
        for _ in range(8):  # four times what opens the breaker on model faults
            r = await client.post("/v1/captions", json=caption_body({"max_length": 100, "min_length": 80}))
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_options", r.text
            r = await client.post("/v1/captions", json=caption_body({"prompt": "a " * 99}))
            assert r.status_code == 422, r.text
        r = await client.post("/v1/captions", json=caption_body({}))
        assert r.status_code == 200 and r.json()["results"][0]["fallback"] == {"used": False, "reason": None}
        assert (await client.get("/readyz")).json()["circuit_open"] is False
        text = (await client.get("/metrics")).text
        assert metric(text, "reefcap_circuit_open") == 0
        for reason in ("primary_error", "circuit_open"):
            assert metric_or_zero(text, "reefcap_fallbacks_total", reason=reason) == 0

    serve(settings(tmp_path), pool, scenario)


def test_policy_refuses_bad_options_before_any_model_runs(engines, euvp_images):
    policy = CaptionPolicy(engines["varied"], engines["tiny"])
    image = policy.decode(euvp_images[0])
    for _ in range(10):
        with pytest.raises(InvalidOptionsError, match="64 text positions"):
            policy.caption([image], DecodeOptions.greedy(max_length=80))
    assert not policy.circuit_open and not policy.counts
    assert policy.caption([image], DecodeOptions.greedy())[0].fallback_reason in (None, "degenerate_repetition")


def test_request_cost_budget_is_a_422_naming_the_limit(engines, tmp_path):
    pool = ModelPool(engines["tiny"], None)

    async def scenario(client, app):
        # The expensive request (16 images x 16 beams x 64 tokens) against the default budget.
        r = await client.post("/v1/captions", json=caption_body({"num_beams": 16, "max_length": 64}, images=16))
        assert r.status_code == 422 and "2048" in r.json()["error"]["message"], r.text
        assert "REEFCAP_MAX_REQUEST_COST" in r.json()["error"]["message"]
        files = [("images", (f"{i}.png", png_bytes(), "image/png")) for i in range(16)]
        r = await client.post("/v1/captions", files=files)  # 16 x 1 x 20 = 320: the defaults always fit
        assert r.status_code == 200, r.text

    serve(settings(tmp_path), pool, scenario)

    async def small(client, app):
        assert (await client.post("/v1/captions", json=caption_body({}, images=2))).status_code == 200  # 40
        r = await client.post("/v1/image-to-text", content=png_bytes())
        assert r.status_code == 200
        r = await client.post("/v1/captions", json=caption_body({}, images=3))  # 60 > 50
        assert r.status_code == 422 and "limit of 50" in r.json()["error"]["message"], r.text

    serve(settings(tmp_path / "b", max_request_cost=50), ModelPool(engines["tiny"], None), small)


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_deeply_nested_json_is_a_400_not_a_recursion_error(engines, tmp_path):
    pool = ModelPool(engines["tiny"], None)
    deep_options = json.dumps(caption_body({})).encode().replace(b'"options": {}', b'"options": ' + _nested(40))
    legit_text = json.dumps({"images": [{"data": B64}], "options": {"prompt": "[[[[" * 40}}).encode()

    async def scenario(client, app):
        ctype = {"content-type": "application/json"}
        for path in ("/v1/captions", "/v1/image-to-text"):
            r = await client.post(path, content=_nested(200_000), headers=ctype)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
        r = await client.post("/v1/captions", content=deep_options, headers=ctype)
        assert r.status_code == 400 and "deeper than 32" in r.json()["error"]["message"], r.text
        r = await client.post("/v1/feedback", content=_nested(200_000), headers=ctype)
        assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
        files = {"images": ("a.png", png_bytes(), "image/png"), "options": (None, _nested(100_000))}
        r = await client.post("/v1/captions", files=files)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
        # Brackets inside strings are not nesting: a prompt full of them is judged on its own merits.
        r = await client.post("/v1/captions", content=legit_text, headers=ctype)
        assert r.status_code == 422 and "prompt" in r.text, r.text

    serve(settings(tmp_path), pool, scenario)


def test_feedback_index_past_sqlite_integers_is_a_422(engines, tmp_path):
    pool = ModelPool(engines["tiny"], None)

    async def scenario(client, app):
        served = (await client.post("/v1/captions", json=caption_body({}))).json()["request_id"]
        for index in (2**63, 2**64 + 5, 2**31):
            r = await client.post("/v1/feedback", json={"request_id": served, "index": index, "references": ["a"]})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
        r = await client.post("/v1/feedback", json={"request_id": served, "index": 0, "references": ["a fish"]})
        assert r.status_code == 200, r.text

    serve(settings(tmp_path), pool, scenario)
