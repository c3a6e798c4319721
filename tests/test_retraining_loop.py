"""The retraining loop, closed with the project's own commands on loopback (issue 14's "done when"):

serve -> `reefcap caption --server` -> `reefcap feedback post` -> `reefcap feedback export` -> `reefcap adapt
--server` -> the adapted model serves; then the gate refuses a model whose manifest claims better numbers
than its weights give. The served primary is an untrained BLIP (it scores 0 on the gate set); `adapt` starts
from one pretrained for a few seconds on the same kind of images, so the adapted model is truly better on the
gate set (held-out images of the same shapes), and the gate measures that itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from server_helpers import LiveServer, write_manifest
from synthetic_captions import all_captions, make_dataset

from reefcap.cli import main
from reefcap.models.data.datasets import load_dataset
from reefcap.models.errors import ReefcapError

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(240)]
KEY, ADMIN = "loop-key", "loop-admin-key"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from reefcap.models.factory import TinyConfig, init_tiny

    root = tmp_path_factory.mktemp("loop")
    field = make_dataset(root / "field", n=16)  # the user's images (their captions play the user's references)
    gate = make_dataset(root / "gate", n=8, seed=1)  # held-out images of the same kind: the gate set
    cfg = TinyConfig(image_size=32, vision_hidden=64, text_hidden=64, vision_layers=2, text_layers=2, vocab_size=300)
    untrained = init_tiny(root / "untrained", all_captions(field), cfg)
    args = ["--model", str(untrained), "--data", str(field), "--out", str(root / "pre"), "--batch-size", "4"]
    assert (
        main(["train", "--recipe", "pretrain", *args, "--epochs-scale", "0.15", "--no-progress", "--no-manifest"]) == 0
    )
    return {"root": root, "field": field, "gate": gate, "untrained": untrained, "pretrained": root / "pre" / "best"}


def test_serve_caption_feedback_export_adapt_reload(world, tmp_path, capsys):
    env = {"REEFCAP_MODEL": str(world["untrained"]), "REEFCAP_FALLBACK": str(world["untrained"])}
    env |= {"REEFCAP_BACKEND": "torch", "REEFCAP_DEVICE": "cpu", "REEFCAP_FEEDBACK_DB": str(tmp_path / "fb.sqlite3")}
    env |= {"REEFCAP_API_KEY": KEY, "REEFCAP_GATE_SET": str(world["gate"]), "REEFCAP_NUM_BEAMS": "1"}
    env |= {"REEFCAP_ADMIN_KEY": ADMIN, "REEFCAP_MODELS_DIR": str(tmp_path / "models")}  # reloads by name from there
    (tmp_path / "models").mkdir()
    server = LiveServer(env, tmp_path / "server.log")
    try:
        # 1. A survey through the server: every line keeps the request_id feedback needs.
        records = load_dataset(world["field"])
        results = tmp_path / "survey.jsonl"
        paths = [str(r.path) for r in records]
        assert main(["caption", *paths, "--server", server.url, "--api-key", KEY, "-o", str(results), "-q"]) == 0
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        assert {line["model"]["name"] for line in lines} == {"untrained"}

        # 2. The user's references go back to the server, then out as a training set split by image.
        refs = {str(r.path): list(r.captions) for r in records}
        feedback = tmp_path / "feedback.jsonl"
        feedback.write_text("".join(json.dumps({**line, "references": refs[line["image"]]}) + "\n" for line in lines))
        assert main(["feedback", "post", "--server", server.url, "--api-key", KEY, "--file", str(feedback)]) == 0
        export = tmp_path / "export"
        assert main(["feedback", "export", "--db", str(tmp_path / "fb.sqlite3"), "--out", str(export)]) == 0
        capsys.readouterr()

        # 3. One command adapts, writes the manifest and report, exports ONNX and reloads through the gate.
        new = tmp_path / "models" / "reef-adapted"
        adapt = ["adapt", "--data", str(export), "--base", str(world["pretrained"]), "--out", str(new)]
        adapt += ["--server", server.url, "--admin-key", ADMIN, "--batch-size", "4", "--patience", "2", "--no-progress"]
        assert main([*adapt, "--epochs-scale", "0.6"]) == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["reload"]["swapped"] and summary["reload"]["primary"]["name"] == "reef-adapted"
        gate = summary["reload"]["gate"]
        verdicts = {v["metric"]: v for v in gate["verdicts"]}
        assert gate["accepted"] and gate["gate_set"].startswith("COCO file") and gate["images"] == 8
        assert verdicts["CIDEr"]["candidate"] > verdicts["CIDEr"]["serving"] + 0.1  # truly better, measured
        assert (
            (new / "manifest.json").is_file() and Path(summary["report"]).is_file() and Path(summary["onnx"]).is_dir()
        )
        assert json.loads((new / "manifest.json").read_text())["selection"]["chosen"] == "damf_preserve"

        # 4. The adapted model serves.
        auth = {"Authorization": f"Bearer {KEY}"}
        answer = httpx.post(server.url + "/v1/image-to-text", content=records[0].path.read_bytes(), headers=auth)
        assert answer.status_code == 200
        assert httpx.get(server.url + "/readyz").json()["primary"]["name"] == "reef-adapted"

        # 5. Numbers its weights do not give: refused, with the measured reason.
        liar = shutil.copytree(world["untrained"], tmp_path / "models" / "reef-liar")
        write_manifest(liar, {"metrics": {"val": {"CIDEr": 9.9, "Bleu_4": 0.9, "repetition_rate": 0.0}}})
        admin = {"Authorization": f"Bearer {ADMIN}"}
        r = httpx.post(server.url + "/v1/admin/reload", json={"model": liar.name}, headers=admin, timeout=120)
        assert r.status_code == 409 and r.json()["error"]["code"] == "quality_gate", r.text
        assert "CIDEr: 0.0000 vs serving" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/readyz").json()["primary"]["name"] == "reef-adapted"

        # adapt's reload step names OUT by its folder: outside MODELS_DIR, or with a wrong key, it says why.
        from reefcap.training.adapt import reload_on_server

        with pytest.raises(ReefcapError, match=r"unknown_model.*MODELS_DIR"):
            reload_on_server(server.url, tmp_path / "elsewhere" / "reef-nowhere", ADMIN)
        with pytest.raises(ReefcapError, match="HTTP 401"):
            reload_on_server(server.url, new, "not-the-admin-key")
    finally:
        server.stop()
