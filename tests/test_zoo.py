"""Bundled models: `reefcap zoo-pack` writes a manifest that matches its files; the shipped ReefScenes models
resolve by name, caption, and score what their manifests claim, re-measured here on the test scenes of the
dataset the manifests name (the first few by default; the whole split, exactly, under ``-m slow``)."""

from __future__ import annotations

import functools
import json
import re

import pytest

from reefcap.cli import main
from reefcap.models.registry import sha256_file as sha256

BUNDLED = ("reefscenes-tiny", "reefscenes-tiny-damf")
BASE, PRIMARY = BUNDLED
SUBSET = 24  # test scenes re-measured by default: about a second of beam search per model and domain
# How far a corpus score over the first SUBSET test scenes may sit from the whole split's (225 underwater, 300
# in air). Measured at most 0.025 (BLEU-1), 0.045 (BLEU-4), 0.008 (ROUGE-L), 0.059 (CIDEr): corpus BLEU and
# CIDEr (whose idf is the subset's) move with the images, ROUGE-L (a mean of per-image scores) barely. Tight
# enough that ROUGE-L tells the two bundled models apart underwater (0.381 against 0.418).
SUBSET_TOLERANCE = {"Bleu_1": 0.05, "Bleu_4": 0.06, "ROUGE_L": 0.03, "CIDEr": 0.12}


def _manifest(name: str) -> dict:
    from reefcap.models.registry import zoo_models

    return json.loads((zoo_models()[name] / "manifest.json").read_text())


def _generator(name: str) -> dict[str, int]:
    """The options of the ``reefcap data reefscenes`` command the manifest's numbers were measured on."""
    command = _manifest(name)["data"]["generator"]
    return {opt: int(re.search(rf"--{opt} (\d+)", command)[1]) for opt in ("images", "surface-images", "seed", "size")}


@functools.cache
def _engine(name: str):
    from reefcap.models.engines.loader import load_engine

    # The manifests' numbers were measured by `reefcap eval` when its engine was PyTorch fp32.
    return load_engine(name, backend="torch", dtype="fp32")


@functools.cache
def _measured(name: str, domain: str, limit: int | None) -> dict[str, float]:
    """``name``'s scores on the first ``limit`` test scenes of ``domain`` (all of them with None), rendered as
    that dataset renders them and decoded as ``reefcap eval`` decodes (BLIP's beam search, batches of 32)."""
    from reefcap.models.engines.base import DecodeOptions
    from reefcap.models.metrics import coco_metrics, collapse_metrics
    from reefcap.models.reefscenes.dataset import scene_split
    from reefcap.models.reefscenes.probe import render_scene

    gen = _generator(name)
    scenes = gen["images"] if domain == "underwater" else gen["surface-images"]
    ids = [i for i in range(scenes) if scene_split(gen["seed"], i) == "test"][:limit]
    items = [render_scene(gen["seed"], i, gen["size"], (domain,))[domain][:2] for i in ids]
    engine = _engine(name)
    captions = []
    for start in range(0, len(items), 32):
        captions += [c.caption for c in engine.caption([d for d, _ in items[start : start + 32]], DecodeOptions())]
    metrics = coco_metrics(dict(enumerate(captions)), {i: list(r) for i, (_, r) in enumerate(items)}, meteor=False)
    return {**metrics, **collapse_metrics(captions), "images": len(items)}


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


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_scores_match_their_manifest_on_its_test_scenes(name):
    """The manifest's numbers describe these weights: re-measured on the first test scenes of the dataset it
    names, every score is within the subset's spread of the one it claims for the whole split."""
    claimed = _manifest(name)["metrics"]
    for domain in ("underwater", "surface"):
        got = _measured(name, domain, SUBSET)
        assert got["images"] == SUBSET
        far = {
            m: (got[m], claimed[domain][m])
            for m, tol in SUBSET_TOLERANCE.items()
            if abs(got[m] - claimed[domain][m]) > tol
        }
        assert not far, (domain, far)


@pytest.mark.slow  # the whole test split at beam 3: half a minute to two on two cores
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_scores_reproduce_their_manifest_on_the_whole_test_split(name):
    claimed = _manifest(name)["metrics"]
    for domain in ("underwater", "surface"):
        got = _measured(name, domain, None)
        assert got["images"] == claimed[domain]["images"]
        for metric in (
            "Bleu_1",
            "Bleu_4",
            "ROUGE_L",
            "CIDEr",
            "repetition_rate",
            "empty_or_one_word",
            "unique_captions",
        ):
            assert got[metric] == pytest.approx(claimed[domain][metric], abs=1e-4), (domain, metric)


def test_bundled_primary_follows_the_selection_rule():
    """README: the primary is the best underwater CIDEr among models that keep >= 90% of the in-air model's
    in-air CIDEr; its manifest lists the candidates measured and the rule holds on the shipped numbers. The
    claims that decide it are measured too, on the same test scenes for both models: the in-air model's
    domain gap and the primary's underwater gain (the 90% in-air rule is too close to call on a subset: it
    is checked on the whole split by the slow test above, through the manifest's numbers)."""
    base = _manifest(BASE)["metrics"]
    manifest = _manifest(PRIMARY)
    primary = manifest["metrics"]
    assert base["underwater"]["CIDEr"] <= 0.6 * base["surface"]["CIDEr"]  # the domain gap
    assert primary["surface"]["CIDEr"] >= 0.9 * base["surface"]["CIDEr"]
    assert primary["underwater"]["CIDEr"] > 1.2 * base["underwater"]["CIDEr"]
    eligible = [c for c in manifest["selection"]["candidates"] if c["in_air_CIDEr"] >= 0.9 * base["surface"]["CIDEr"]]
    assert max(c["underwater_CIDEr"] for c in eligible) == primary["underwater"]["CIDEr"]
    assert any(c["underwater_CIDEr"] == base["underwater"]["CIDEr"] for c in manifest["selection"]["candidates"])
    # Measured on these scenes: 0.19 underwater against 0.96 in air (a 5x gap), and 0.30 against 0.19 (1.6x).
    measured = {(n, d): _measured(n, d, SUBSET)["CIDEr"] for n in BUNDLED for d in ("underwater", "surface")}
    assert measured[BASE, "underwater"] <= 0.6 * measured[BASE, "surface"], measured
    assert measured[PRIMARY, "underwater"] > 1.2 * measured[BASE, "underwater"], measured
