"""How the server app is wired: errors mapped by type, one Metrics object from the pool to the app."""

from __future__ import annotations

import asyncio

import httpx
from server_helpers import metric

from reefcap.models.engines.base import EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.models.errors import InvalidOptionsError
from reefcap.server.app import create_app
from reefcap.server.metrics import Metrics
from reefcap.server.pool import ModelPool
from reefcap.server.settings import ServerSettings


def _get(app, *paths: str) -> list[httpx.Response]:
    async def main():
        # raise_app_exceptions=False: Starlette re-raises a 500's exception after answering (for the server's
        # log); the client still gets the answer, which is what is checked here.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://reefcap.test") as client:
            return [await client.get(p) for p in paths]

    return asyncio.run(main())


def test_bare_value_error_is_a_500_with_json_and_typed_options_error_a_422(tmp_path):
    app = create_app(ServerSettings(_env_file=None, feedback_db=tmp_path / "fb.sqlite3"))

    async def bug():
        raise ValueError("a bug of ours, not the client's request")

    async def bad_options():
        raise InvalidOptionsError("num_beams must be at most 16")

    app.add_api_route("/bug", bug)
    app.add_api_route("/bad-options", bad_options)
    bug_answer, options_answer = _get(app, "/bug", "/bad-options")
    assert bug_answer.status_code == 500
    assert bug_answer.json() == {"error": {"code": "internal_error", "message": "internal error (ValueError)"}}
    assert options_answer.status_code == 422
    assert options_answer.json()["error"] == {"code": "invalid_options", "message": "num_beams must be at most 16"}


def test_app_reports_to_the_pools_metrics(tiny_model, tmp_path):
    engine = TorchCaptionEngine.load(str(tiny_model), EngineConfig(device="cpu"))
    metrics = Metrics()
    pool = ModelPool(engine, None, metrics)
    app = create_app(ServerSettings(_env_file=None, feedback_db=tmp_path / "fb.sqlite3"), pool)
    assert app.state.metrics is metrics and pool.metrics is metrics
    (text,) = _get(app, "/metrics")
    assert metric(text.text, "reefcap_model_info", role="primary", backend="torch") == 1
    assert f'name="{engine.describe().name}"' in text.text

    bare = ModelPool(engine, None)  # built without metrics: the app gives it its own
    app = create_app(ServerSettings(_env_file=None, feedback_db=tmp_path / "fb2.sqlite3"), bare)
    assert bare.metrics is app.state.metrics is not None
