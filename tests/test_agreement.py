"""`reefcap agreement`: int8 vs fp32 greedy captions measured on this CPU, and the record `serve` then reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from reefcap.cli import main
from reefcap.models.engines.precision import AGREEMENT_KEY, auto_dtype
from reefcap.models.policy.agreement import MIN_IMAGES, Agreement, cpu_kind, merged
from reefcap.models.registry import zoo_models
from reefcap.server.pool import checkpoint_manifest

MODEL = "reefscenes-tiny-damf"


@pytest.fixture(scope="module")
def photos(euvp_images, tmp_path_factory) -> Path:
    """At least MIN_IMAGES images: each EUVP photo as it is, mirrored, rotated and two crops of it."""
    folder = tmp_path_factory.mktemp("agreement-photos")
    for path in euvp_images:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        variants = [image, ImageOps.mirror(image), image.rotate(90), image.crop((0, 0, w * 3 // 4, h * 3 // 4))]
        variants.append(image.crop((w // 4, h // 4, w, h)))
        for i, variant in enumerate(variants):
            variant.save(folder / f"{path.stem}-{i}.png")
    assert len(list(folder.iterdir())) >= MIN_IMAGES
    return folder


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """The bundled primary as a local folder, without the agreement record it ships with."""
    folder = shutil.copytree(zoo_models()[MODEL], tmp_path / "primary")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest[AGREEMENT_KEY]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(["agreement", *args, "-q"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


@pytest.mark.skipif(cpu_kind() is None, reason="no int8 kernel family this record names (an x86 CPU without AVX2)")
def test_the_written_record_makes_serve_pick_int8_and_keeps_the_manifest(capsys, checkpoint, photos):
    before = json.loads((checkpoint / "manifest.json").read_text())
    assert auto_dtype(checkpoint_manifest(str(checkpoint)))[0] == "fp32"  # nothing recorded yet
    code, out, _ = run(capsys, "--model", str(checkpoint), "--images", str(photos), "--write")
    assert code == 0 and out["images"] >= MIN_IMAGES and out["written"] == str(checkpoint / "manifest.json")
    # The figure is the count of identical pairs, and every listed difference really differs.
    assert all(d["fp32"] != d["int8"] for d in out["differences"])
    if len(out["differences"]) < 10:
        assert out["identical"] == out["images"] - len(out["differences"])
    assert out["fraction"] >= 0.95, out["differences"]  # docs/onnx-parity.md: 98-99% on this model, both CPUs
    after = json.loads((checkpoint / "manifest.json").read_text())
    assert {k: v for k, v in after.items() if k != AGREEMENT_KEY} == before
    entry = after[AGREEMENT_KEY]
    assert entry["cpu_flags"] == [cpu_kind()] and entry["images"] == out["images"] and len(entry["runs"]) == 1
    assert auto_dtype(checkpoint_manifest(str(checkpoint))) == ("int8", out["why"])
    assert out["serve_would_pick"] == "int8"


def test_write_refuses_a_bundled_model_and_too_few_images(capsys, checkpoint, euvp_images):
    code, out, err = run(capsys, "--model", MODEL, "--images", str(euvp_images[0].parent), "--write")
    assert code == 2 and out is None and "local checkpoint folder" in err and "Traceback" not in err
    code, out, err = run(capsys, "--model", str(checkpoint), "--images", str(euvp_images[0].parent), "--write")
    assert code == 2 and f"at least {MIN_IMAGES}" in err
    assert AGREEMENT_KEY not in json.loads((checkpoint / "manifest.json").read_text())
    code, _, err = run(capsys, "--model", str(checkpoint), "--images", str(checkpoint), "--batch-size", "0")
    assert code == 2 and "--batch-size" in err


def test_empty_or_identical_fp32_captions_prove_nothing():
    """Random weights (BLIP-base-shape) caption every image as an empty string, whatever the precision."""
    assert (
        "3 of 4 fp32 captions are empty" in Agreement(["a"] * 4, ["", "", "", "x"], ["", "", "", "x"]).uninformative()
    )
    assert "are the same" in Agreement(["a", "b"], ["a fish", "a fish"], ["a fish", "a fish"]).uninformative()
    assert Agreement(["a", "b"], ["a fish", "a reef"], ["a fish", "a rock"]).uninformative() is None


def test_runs_on_other_kinds_of_cpu_merge_and_the_lowest_figure_stands():
    def entry(kind: str, identical: float, weights: str = "w1") -> dict:
        run = {"cpu_flag": kind, "identical": identical, "images": 200, "date": "2026-11-28"}
        return {"identical": identical, "images": 200, "int8_scheme": "s", "weights": weights, "cpu_flags": [kind]} | {
            "runs": [run]
        }

    both = merged(entry("avx512_vnni", 0.99), entry("avx2", 0.96))
    assert both["cpu_flags"] == ["avx2", "avx512_vnni"] and both["identical"] == 0.96 and len(both["runs"]) == 2
    assert merged(both, entry("avx2", 0.97))["identical"] == 0.97  # a new avx2 run replaces the old one
    assert merged(both, entry("avx2", 0.97, weights="w2"))["cpu_flags"] == ["avx2"]  # other weights: start over
    assert merged({"identical": 0.99, "cpu_flags": ["avx2"]}, entry("avx2", 0.9))["identical"] == 0.9  # old format
