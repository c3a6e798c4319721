"""Bundled models: `reefcap zoo-pack` writes a manifest that matches its files; the shipped ReefScenes models
resolve by name, caption, and carry the measured benchmark gap their manifests claim."""

from __future__ import annotations

import json

import pytest

from reefcap.cli import main
from reefcap.models.registry import sha256_file as sha256

BUNDLED = ("reefscenes-tiny", "reefscenes-tiny-damf")


def test_zoo_pack_writes_hashes_and_metrics(tiny_model, tmp_path, capsys):
    results = tmp_path / "uw.json"
    results.write_text(json.dumps({"metrics": {"CIDEr": 0.5, "Bleu_4": 0.1}}))
    args = [
        "zoo-pack",
        str(tiny_model),
        "--name",
        "t",
        "--zoo",
        str(tmp_path / "zoo"),
        "--data-seed",
        "3",
        "--command",
        "reefcap train ...",
        "--metrics",
        f"underwater={results}",
    ]
    assert main(args) == 0
    dest = tmp_path / "zoo" / "t"
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["metrics"] == {"underwater": {"CIDEr": 0.5, "Bleu_4": 0.1}} and manifest["data"]["seed"] == 3
    assert manifest["files"] and all(sha256(dest / f) == h for f, h in manifest["files"].items())
    assert main(["zoo-pack", str(tmp_path), "--name", "x", "--zoo", str(tmp_path / "zoo")]) == 2


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_matches_its_manifest(name):
    from reefcap.models.engines.loader import load_engine
    from reefcap.models.registry import zoo_models

    path = zoo_models()[name]
    manifest = json.loads((path / "manifest.json").read_text())
    assert all(sha256(path / f) == h for f, h in manifest["files"].items())
    assert (path / "model.safetensors").stat().st_size < 12 * 2**20
    for split in ("underwater", "surface"):
        assert {"CIDEr", "Bleu_4", "METEOR", "ROUGE_L"} <= set(manifest["metrics"][split])
    engine = load_engine(name)
    assert engine.describe().name == name


def test_bundled_primary_follows_the_selection_rule():
    """README: the primary is the best underwater CIDEr among models that keep >= 90% of the in-air model's
    in-air CIDEr; its manifest lists the candidates measured and the rule holds on the shipped numbers."""
    from reefcap.models.registry import zoo_models

    zoo = zoo_models()
    base = json.loads((zoo["reefscenes-tiny"] / "manifest.json").read_text())["metrics"]
    manifest = json.loads((zoo["reefscenes-tiny-damf"] / "manifest.json").read_text())
    primary = manifest["metrics"]
    assert base["underwater"]["CIDEr"] <= 0.6 * base["surface"]["CIDEr"]  # the domain gap
    assert primary["surface"]["CIDEr"] >= 0.9 * base["surface"]["CIDEr"]
    assert primary["underwater"]["CIDEr"] > 1.2 * base["underwater"]["CIDEr"]
    eligible = [c for c in manifest["selection"]["candidates"] if c["in_air_CIDEr"] >= 0.9 * base["surface"]["CIDEr"]]
    assert max(c["underwater_CIDEr"] for c in eligible) == primary["underwater"]["CIDEr"]
