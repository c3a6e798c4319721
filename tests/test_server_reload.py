"""The caption server in-process, continued: feedback and rolling scores, reloads through the quality gate,
readiness while models load, the Grafana dashboard's metrics (the engines fixture is in conftest.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
from PIL import Image
from server_helpers import _samples, collapsed_model, copy_model, metric, metric_or_zero, png_bytes, serve
from test_server_app import CPU, settings

from reefcap.models.engines.base import DecodeOptions
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.server.app import build_pool, create_app
from reefcap.server.metrics import Metrics
from reefcap.server.pool import ModelPool


def test_feedback_rolling_scores_and_export(engines, euvp_images, tmp_path):
    from reefcap.models.data.datasets import load_dataset
    from reefcap.models.metrics import tokenize
    from reefcap.server.cli import register  # noqa: F401 - the export command is exercised below via main()

    s = settings(tmp_path)
    pool = ModelPool(engines["varied"], None)

    async def scenario(client, app):
        served = []
        for p in euvp_images[:8]:
            body = (
                await client.post("/v1/captions", files=[("images", (p.name, p.read_bytes(), "image/jpeg"))])
            ).json()
            served.append((body["request_id"], body["results"][0]["caption"], p))
        # BLEU-4 needs four words: the first caption that long gets itself as reference, two others unrelated ones.
        # Words as the rolling scorer counts them (PTB tokens; punctuation is dropped).
        served = sorted(served, key=lambda s: len(tokenize(s[1]).split()) < 4)[:3]
        assert len(tokenize(served[0][1]).split()) >= 4, served
        r = await client.post("/v1/feedback", json={"request_id": served[0][0], "references": [served[0][1]]})
        assert r.status_code == 200, r.text
        perfect = r.json()["rolling"]
        assert perfect["images"] == 1 and perfect["references"] == 1 and perfect["Bleu_4"] > 0.5
        assert "CIDEr" not in perfect  # degenerate over one image (its idf is 0): not reported below ten
        for rid, _, _ in served[1:]:
            refs = ["a green sea turtle swimming over a coral reef", "a turtle above the reef"]
            r = await client.post("/v1/feedback", json={"request_id": rid, "references": refs})
            assert r.status_code == 200, r.text
        last = r.json()["rolling"]
        assert last["images"] == 3 and last["references"] == 5 and "CIDEr" not in last
        text = (await client.get("/metrics")).text
        mixed = metric(text, "reefcap_caption_quality_score", model="varied-m", metric="Bleu_4", source="feedback")
        assert 0 <= mixed < perfect["Bleu_4"] and mixed == last["Bleu_4"]
        assert not _samples(text, "reefcap_caption_quality_score", {"metric": "CIDEr", "source": "feedback"})
        r = await client.post("/v1/feedback", json={"request_id": "nope", "references": ["x"]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_request"
        r = await client.post("/v1/feedback", json={"request_id": served[0][0], "references": []})
        assert r.status_code == 422
        return served

    served = serve(s, pool, scenario)
    from reefcap.cli import main

    out = tmp_path / "export"
    assert main(["feedback", "export", "--db", str(s.feedback_db), "--out", str(out)]) == 0
    doc = json.loads((out / "captions.json").read_text())
    assert len(doc["images"]) == 3 and len(doc["annotations"]) == 5
    records = load_dataset(out / "captions.json")  # the training pipeline's own loader reads it back
    assert len(records) == 3 and records[0].captions == (served[0][1],)
    assert Image.open(records[0].path).size == Image.open(served[0][2]).size


def test_reload_quality_gate(engines, tiny_model, euvp_images, tmp_path):
    """The gate measures both models on the gate set: a copy of the serving model passes (equal numbers), a
    collapsed model is refused whatever its manifest claims, and so are models without trustworthy hashes."""
    from server_helpers import write_manifest

    from reefcap.models.data.records import CaptionRecord, write_coco

    root = tmp_path / "models"
    # A gate set the serving model does well on: its own captions are among the references.
    said = engines["tiny"].caption(euvp_images[:8], DecodeOptions.greedy())
    refs = [
        CaptionRecord(i, p, (c.caption, "a reef")) for i, (p, c) in enumerate(zip(euvp_images[:8], said, strict=True))
    ]
    write_coco(refs, tmp_path / "gate" / "gate.json")
    claims = {"underwater": {"CIDEr": 9.9, "Bleu_4": 0.9, "repetition_rate": 0.0}}
    copy_model(tiny_model, root / "same", {"underwater": {"CIDEr": 0.6, "Bleu_4": 0.2}})
    looping = collapsed_model(tiny_model, root / "looping")
    write_manifest(looping, {"metrics": claims})  # honest hashes, dishonest numbers
    copy_model(tiny_model, root / "bare")
    swapped = copy_model(tiny_model, root / "swapped", claims)
    (swapped / "model.safetensors").write_bytes((looping / "model.safetensors").read_bytes())
    pool = ModelPool(engines["tiny"], None)
    gate_set = tmp_path / "gate" / "gate.json"
    s = settings(tmp_path, backend="torch", device="cpu", admin_key="adm", models_dir=root, gate_set=gate_set)
    admin = {"Authorization": "Bearer adm"}

    async def scenario(client, app):
        refusals = {}
        for candidate in ("looping", "bare", "swapped"):  # reload takes names, resolved inside models_dir
            r = await client.post("/v1/admin/reload", json={"model": candidate}, headers=admin)
            assert r.status_code == 409 and r.json()["error"]["code"] == "quality_gate", r.text
            refusals[candidate] = r.json()["error"]["message"]
        assert "repetition_rate" in refusals["looping"] and "(collapse)" in refusals["looping"]
        # (CIDEr is 0 for both here: the fresh tiny model says one thing for every image, so its words carry no idf.)
        assert "Bleu_4: 0.0000 vs serving" in refusals["looping"] and "below by more than 0.02" in refusals["looping"]
        assert "no manifest.json" in refusals["bare"]
        assert "model.safetensors: SHA-256 differs" in refusals["swapped"]
        assert "COCO file" in refusals["looping"] and "gate.json" in refusals["looping"]
        r = await client.post("/v1/admin/reload", json={"model": "missing"}, headers=admin)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"
        r = await client.post("/v1/admin/reload", json={"model": "same"}, headers=admin)
        assert r.status_code == 200 and r.json()["primary"]["name"] == "same", r.text
        gate = r.json()["gate"]
        verdicts = {v["metric"]: v for v in gate["verdicts"]}
        assert gate["accepted"] and gate["images"] == 8 and not gate["reasons"]
        assert verdicts["CIDEr"]["candidate"] == verdicts["CIDEr"]["serving"] and verdicts["CIDEr"]["passed"]
        assert verdicts["repetition_rate"]["direction"] == "lower" and verdicts["distinct_2"]["direction"] == "neutral"
        res = (await client.post("/v1/image-to-text", content=png_bytes())).status_code
        assert res == 200
        assert (await client.get("/readyz")).json()["primary"]["name"] == "same"
        text = (await client.get("/metrics")).text
        assert metric(text, "reefcap_reloads_total", result="rejected") == 3
        assert metric(text, "reefcap_caption_quality_score", model="same", metric="CIDEr") == 0.6
        # The replaced primary's manifest scores are withdrawn (its series removed), not left at their last value.
        assert metric_or_zero(text, "reefcap_caption_quality_score", model="tiny", metric="CIDEr") == 0

    serve(s, pool, scenario)


def test_readyz_is_503_until_models_load(tiny_model, tmp_path):
    s = settings(tmp_path, model=str(tiny_model), fallback=None, backend="torch", device="cpu")

    async def main():
        app = create_app(s)  # no pool: models load in the background after startup
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                first = await client.get("/readyz")
                assert (await client.get("/healthz")).status_code == 200
                for _ in range(300):
                    r = await client.get("/readyz")
                    if r.status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                return first, r

    first, last = asyncio.run(main())
    assert first.status_code == 503 and first.json()["ready"] is False
    assert last.status_code == 200 and last.json()["serving"] == "primary"


def test_grafana_dashboard_uses_only_exported_metrics():
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "deploy/grafana/reefcap-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count|total)$", "", n) for e in exprs for n in re.findall(r"reefcap_\w+", e)}
    exported = {m.name for m in Metrics().registry.collect()}
    assert used and used <= exported, used - exported


def test_new_version_in_the_model_folder_is_hot_reloaded(tiny_model, euvp_images, tmp_path):
    from server_helpers import write_manifest

    from reefcap.models.data.records import CaptionRecord, write_coco

    write_coco([CaptionRecord(i, p, ("a reef",)) for i, p in enumerate(euvp_images[:4])], tmp_path / "gate.json")
    folder = copy_model(tiny_model, tmp_path / "watched", {"underwater": {"CIDEr": 0.5}})
    s = settings(tmp_path, model=str(folder), fallback=None, backend="torch", device="cpu", reload_poll_s=0.1)
    s.gate_set = tmp_path / "gate.json"
    pool = build_pool(s, Metrics())

    async def scenario(client, app):
        await asyncio.sleep(0.3)
        # A hand-edited manifest: numbers without the hashes that tie them to these weights.
        (folder / "manifest.json").write_text(json.dumps({"metrics": {"underwater": {"CIDEr": 0.4}}}))
        for _ in range(100):
            await asyncio.sleep(0.1)
            if metric_or_zero((await client.get("/metrics")).text, "reefcap_reloads_total", result="rejected") == 1:
                break
        write_manifest(folder, {"metrics": {"underwater": {"CIDEr": 0.6}}})  # a new version, as train writes it
        for _ in range(100):
            await asyncio.sleep(0.1)
            text = (await client.get("/metrics")).text
            if metric_or_zero(text, "reefcap_reloads_total", result="swapped") == 1:
                break
        assert metric(text, "reefcap_reloads_total", result="rejected") == 1
        assert metric(text, "reefcap_caption_quality_score", model="watched", metric="CIDEr") == 0.6
        assert (await client.post("/v1/image-to-text", content=png_bytes())).status_code == 200

    serve(s, pool, scenario)


def test_manifest_of_an_export_folder_points_to_its_checkpoint(varied_model, tmp_path):
    from reefcap.server.pool import evaluation_manifest

    checkpoint = copy_model(varied_model, tmp_path / "ckpt", {"underwater": {"CIDEr": 0.9}})
    export = copy_model(varied_model, tmp_path / "export")
    (export / "manifest.json").write_text(json.dumps({"precision": "fp32", "source": {"path": str(checkpoint)}}))
    engine = TorchCaptionEngine.load(str(export), CPU)
    assert evaluation_manifest(engine.describe().source)["metrics"] == {"underwater": {"CIDEr": 0.9}}
