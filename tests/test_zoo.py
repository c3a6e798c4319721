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

BUNDLED = ("reefscenes-tiny", "reefscenes-tiny-damf", "reefscenes-tiny-underwater")
BASE, PRIMARY = BUNDLED[:2]  # the in-air model, and the primary chosen by the 90% rule before routing
ROUTED = "reefscenes-tiny-underwater"  # the serving default's primary, served routed with BASE
SUBSET = 24  # test scenes re-measured by default: about a second of beam search per model and domain
# How far a corpus score over the first SUBSET test scenes may sit from the whole split's (225 underwater, 300
# in air). Measured at most 0.025 (BLEU-1), 0.045 (BLEU-4), 0.008 (ROUGE-L), 0.059 (CIDEr): corpus BLEU and
# CIDEr (whose idf is the subset's) move with the images, ROUGE-L (a mean of per-image scores) barely. Tight
# enough that ROUGE-L tells the two bundled models apart underwater (0.381 against 0.418).
SUBSET_TOLERANCE = {"Bleu_1": 0.05, "Bleu_4": 0.06, "ROUGE_L": 0.03, "CIDEr": 0.12}
# The routed default's model alone in air (it forgot the surface: routing sends in-air images elsewhere) is less
# even across scenes: its ROUGE-L on the first 24 in-air test scenes is 0.479 against 0.439 on all 300.
WIDER = {("reefscenes-tiny-underwater", "surface"): {"ROUGE_L": 0.05}}


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
def _measured(name: str, domain: str, limit: int | None, data_of: str | None = None) -> dict[str, float]:
    """``name``'s scores on the first ``limit`` test scenes of ``domain`` (all of them with None) of the dataset
    the manifest of ``data_of`` (default ``name``) names, rendered as that dataset renders them and decoded as
    ``reefcap eval`` decodes (BLIP's beam search, batches of 32). ``name`` "routed": the serving default, the
    routed policy of ROUTED and BASE."""
    from reefcap.models.engines.base import DecodeOptions
    from reefcap.models.metrics import coco_metrics, collapse_metrics
    from reefcap.models.policy import CaptionPolicy
    from reefcap.models.reefscenes.dataset import scene_split
    from reefcap.models.reefscenes.probe import render_scene

    gen = _generator(data_of or name)
    scenes = gen["images"] if domain == "underwater" else gen["surface-images"]
    ids = [i for i in range(scenes) if scene_split(gen["seed"], i) == "test"][:limit]
    items = [render_scene(gen["seed"], i, gen["size"], (domain,))[domain][:2] for i in ids]
    engine = CaptionPolicy(_engine(ROUTED), _engine(BASE)) if name == "routed" else _engine(name)
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
            for m, tol in {**SUBSET_TOLERANCE, **WIDER.get((name, domain), {})}.items()
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


def test_the_serving_default_follows_the_selection_rule():
    """README "Serving default": the default is the highest underwater validation CIDEr among the frontier's
    candidates keeping >= 95% of the pretrained model's in-air validation CIDEr; its manifest lists every
    candidate with the scores that decide it, and the rule holds on them. The claims are measured too, here, on
    the first test scenes of the seed the manifest names, through the policy that serves them: routed, more than
    2x the pretrained model's underwater CIDEr and at least 95% of its in-air CIDEr."""
    from reefcap.models.policy import DEFAULT_FALLBACK, DEFAULT_PRIMARY

    assert (DEFAULT_PRIMARY, DEFAULT_FALLBACK) == (ROUTED, BASE)
    selection = _manifest(ROUTED)["selection"]
    candidates = {c["candidate"]: c for c in selection["candidates"]}
    bar = 0.95 * candidates["start"]["val_in_air_CIDEr"]
    eligible = [c for c in candidates.values() if c["val_in_air_CIDEr"] >= bar]
    best = max(eligible, key=lambda c: c["val_underwater_CIDEr"])
    assert selection["chosen"].startswith(best["candidate"] + ":") and best["candidate"].startswith("routed ")
    assert selection["threshold_in_air_CIDEr"] == pytest.approx(bar, abs=1e-6)
    assert best["val_underwater_CIDEr"] > 2 * candidates["start"]["val_underwater_CIDEr"]
    # Alone, the model forgets the surface: only routing makes it eligible.
    alone = candidates[best["candidate"].removeprefix("routed ")]
    assert alone["val_in_air_CIDEr"] < 0.5 * candidates["start"]["val_in_air_CIDEr"]
    measured = {
        d: (_measured("routed", d, SUBSET, ROUTED)["CIDEr"], _measured(BASE, d, SUBSET, ROUTED)["CIDEr"])
        for d in ("underwater", "surface")
    }
    assert measured["underwater"][0] > 2 * measured["underwater"][1], measured
    assert measured["surface"][0] >= 0.95 * measured["surface"][1], measured


def test_the_damf_primary_followed_the_earlier_rule():
    """The damf_preserve model, the primary before routing, was chosen by the earlier rule (the best underwater
    CIDEr among models keeping >= 90% of the in-air model's in-air CIDEr); its manifest keeps that record."""
    base = _manifest(BASE)["metrics"]
    manifest = _manifest(PRIMARY)
    primary = manifest["metrics"]
    assert base["underwater"]["CIDEr"] <= 0.6 * base["surface"]["CIDEr"]  # the domain gap
    assert primary["surface"]["CIDEr"] >= 0.9 * base["surface"]["CIDEr"]
    eligible = [c for c in manifest["selection"]["candidates"] if c["in_air_CIDEr"] >= 0.9 * base["surface"]["CIDEr"]]
    assert max(c["underwater_CIDEr"] for c in eligible) == primary["underwater"]["CIDEr"]
