"""The server with a routed primary, in-process: every item names its route, Prometheus counts images per route, the
workbench shows the route (under its unchanged Content-Security-Policy), and `reefcap eval` with no --model scores
what `reefcap serve` answers by default."""

from __future__ import annotations

import json

from server_helpers import copy_model, metric, png_bytes, serve
from test_routing import BLUE, RED, cast_router

from reefcap.models.engines.base import EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.server.page import PAGE, PAGE_CSP
from reefcap.server.pool import ModelPool
from reefcap.server.settings import ServerSettings

CPU = EngineConfig(device="cpu")


def test_items_name_their_route_and_metrics_count_them(varied_model, tiny_model, tmp_path):
    folder = copy_model(varied_model, tmp_path / "adapted-r")
    cast_router().save(folder)
    primary, in_air = TorchCaptionEngine.load(str(folder), CPU), TorchCaptionEngine.load(str(tiny_model), CPU)
    pool = ModelPool(primary, in_air)
    settings = ServerSettings(_env_file=None, feedback_db=tmp_path / "fb.sqlite3", max_wait_ms=20)

    async def scenario(client, app):
        files = [("images", (f"{i}.png", png_bytes(color=c), "image/png")) for i, c in enumerate((BLUE, RED, BLUE))]
        r = await client.post("/v1/captions", files=files)
        assert r.status_code == 200, r.text
        routes = [x["route"] for x in r.json()["results"]]
        assert [(x["domain"], x["model"]) for x in routes] == [
            ("underwater", "adapted-r"),
            ("in_air", "tiny"),
            ("underwater", "adapted-r"),
        ]
        assert [x["model"]["name"] for x in r.json()["results"]] == ["adapted-r", "tiny", "adapted-r"]
        assert all(x["fallback"] == {"used": False, "reason": None} for x in r.json()["results"])
        text = (await client.get("/metrics")).text
        assert metric(text, "reefcap_route_images_total", domain="underwater", model="adapted-r") == 2
        assert metric(text, "reefcap_route_images_total", domain="in_air", model="tiny") == 1
        page = await client.get("/")
        assert "<th>Route</th>" in page.text and 'cell("route")' in page.text
        assert page.headers["content-security-policy"] == PAGE_CSP  # the page's own hashes, nothing inline added

    serve(settings, pool, scenario)
    assert PAGE.count("<script>") == 1 and PAGE.count("<style>") == 1


def test_eval_without_model_scores_the_serving_default(tmp_path):
    """`reefcap eval --data X` with no --model: the server's default primary and fallback, routed."""
    from test_cli import reefcap

    from reefcap.models.data.records import CaptionRecord, write_coco
    from reefcap.models.policy import DEFAULT_FALLBACK, DEFAULT_PRIMARY
    from reefcap.models.reefscenes.probe import probe_set
    from reefcap.server.settings import ServerSettings as Settings

    records = []
    for domain, water in (("underwater", "II"), ("surface", None)):
        for i, (data, refs) in enumerate(probe_set(4, domain=domain)):
            path = tmp_path / f"{domain}{i}.jpg"
            path.write_bytes(data)
            records.append(CaptionRecord(len(records), path, refs, metadata={"water_type": water} if water else {}))
    write_coco(records, tmp_path / "mixed.json")
    out = tmp_path / "eval.json"
    result = reefcap("eval", "--data", str(tmp_path / "mixed.json"), "--no-meteor", "--no-progress", "--out", str(out))
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    defaults = Settings(_env_file=None)
    assert payload["model"] == DEFAULT_PRIMARY == defaults.model and payload["fallback"]["model"] == DEFAULT_FALLBACK
    assert defaults.fallback == DEFAULT_FALLBACK
    routing = payload["routing"]
    assert routing["underwater"]["accuracy"] == 1.0 and routing["in_air"]["accuracy"] == 1.0
    assert routing["in_air"]["models"] == {DEFAULT_FALLBACK: 4}
    assert routing["underwater"]["models"] == {DEFAULT_PRIMARY: 4}
