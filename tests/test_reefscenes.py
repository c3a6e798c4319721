"""ReefScenes: deterministic generation, the COCO contract, caption validity, the optics transform, the CLI."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from reefcap.cli import main
from reefcap.models import quality
from reefcap.models.data.datasets import load_dataset
from reefcap.models.reefscenes.captions import NOUNS, make_captions, names_conditions
from reefcap.models.reefscenes.dataset import ReefScenesConfig, default_counts, generate, render_scene, scene_split
from reefcap.models.reefscenes.optics import JERLOV_N, underwater
from reefcap.models.reefscenes.painter import paint
from reefcap.models.reefscenes.scenes import CATALOGUE, COLOURS, sample_scene, scene_rng
from reefcap.models.reefscenes.subjects import DRAW, Painter


def files_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("rs") / "set"
    config = ReefScenesConfig(seed=7, size=64, counts={"surface": 12, "underwater": 8}, workers=2)
    result = generate(out, config, progress=False)
    return out, result


def test_same_seed_gives_the_same_bytes_and_captions_with_any_worker_count(small_set, tmp_path):
    out, _ = small_set
    again = tmp_path / "again"
    generate(again, ReefScenesConfig(seed=7, size=64, counts={"surface": 12, "underwater": 8}, workers=1), False)
    first, second = files_of(out), files_of(again)
    assert first.keys() == second.keys() and len(first) == 12 + 8 + 6
    assert first == second
    other = tmp_path / "other"
    generate(other, ReefScenesConfig(seed=8, size=64, counts={"surface": 12}, workers=1), False)
    assert files_of(other)["surface/images/000000.jpg"] != first["surface/images/000000.jpg"]


def test_coco_contract_and_scene_splits(small_set):
    out, result = small_set
    seen = {}
    for domain, n in (("surface", 12), ("underwater", 8)):
        total = 0
        for split in ("train", "val", "test"):
            doc = json.loads((out / domain / f"{split}.json").read_text())
            assert doc["info"]["seed"] == 7 and doc["info"]["size"] == 64 and doc["info"]["split"] == split
            for img in doc["images"]:
                assert img["id"] == img["scene_id"] and img["domain"] == domain
                assert img["file_name"] == f"images/{img['scene_id']:06d}.jpg"
                assert (img["width"], img["height"]) == (64, 64)
                assert Image.open(out / domain / img["file_name"]).size == (64, 64)
                assert seen.setdefault(img["scene_id"], split) == split == scene_split(7, img["scene_id"])
                caps = [a["caption"] for a in doc["annotations"] if a["image_id"] == img["id"]]
                assert len(caps) == 5
            total += len(doc["images"])
        assert total == n == sum(result["counts"][domain].values())
    records = load_dataset(out / "underwater")  # the directory form: split JSONs
    assert len(records) == 8 and all(len(r.captions) == 5 for r in records)
    meta = records[0].metadata
    assert meta["water_type"] in JERLOV_N and meta["range_m"] > 0 and meta["turbidity"] > 0
    assert meta["domain"] == "underwater" and "scene_id" in meta


def test_split_is_70_15_15_for_any_prefix_and_depends_on_the_seed():
    names = [scene_split(0, i) for i in range(3176)]
    for n in (20, 40, 3160):
        assert [names[:n].count(s) for s in ("train", "val", "test")] == [n * 14 // 20, n * 3 // 20, n * 3 // 20]
    assert abs(names.count("val") - 476) <= 3
    assert names != [scene_split(1, i) for i in range(3176)]


ALL_NOUN_WORDS = {w for syns in NOUNS.values() for s in syns for w in s.split()}


def test_captions_are_valid_varied_and_match_the_scene():
    texts = set()
    for sid in range(80):
        scene = sample_scene(scene_rng(3, sid), sid)
        caps = make_captions(scene_rng(3, sid, 3), scene)
        assert len(caps) == 5 and len(set(caps)) == 5
        subject_words = {w for s in NOUNS[scene["subject"]["variant"]] for w in s.split()}
        for cap in caps:
            words = cap.split()
            assert 3 <= len(words) <= 30 and cap == cap.lower() and re.fullmatch(r"[a-z' ]+", cap), cap
            assert not names_conditions(cap), cap  # in air never names water conditions
        # Every caption names the subject (or its plural) unless it describes it through the reference.
        named = sum(any(w.rstrip("s") in {x.rstrip("s") for x in subject_words} for w in c.split()) for c in caps)
        assert named >= 4, caps
        if scene["subject"]["count"] == 1:
            assert not any(w in c.split() for c in caps for w in ("two", "three", "four", "several")), caps
        texts.update(caps)
    assert len(texts) >= 0.9 * 400  # variety across scenes, not a handful of sentences repeated


def test_underwater_captions_extend_the_in_air_ones_with_conditions():
    for sid in range(20):
        out = render_scene(5, sid, 64, ("surface", "underwater"))
        air, water = out["surface"][1], out["underwater"][1]
        changed = [(a, w) for a, w in zip(air, water, strict=True) if a != w]
        assert 2 <= len(changed) <= 3
        for a, w in changed:
            assert w.startswith(a + " ") and names_conditions(w[len(a) :]), w


def test_relations_hold_in_the_layout():
    checked = set()
    for sid in range(300):
        scene = sample_scene(scene_rng(0, sid), sid)
        rel, ref = scene["relation"], scene["reference"]
        if rel is None:
            continue
        subj = scene["subject"]["instances"]
        other = ref["instances"][0]
        if rel == "above":
            assert all(s["y"] < other["y"] for s in subj)
        elif rel == "below":
            assert all(s["y"] > other["y"] for s in subj)
        elif rel == "in front of":
            assert all(s["rel_range"] < other["rel_range"] for s in subj)
        checked.add(rel)
    assert checked == {"above", "below", "beside", "in front of"}


def test_every_kind_has_a_drawer_that_labels_what_it_paints():
    # paint() looks subjects up in DRAW by kind: a kind without a drawer would only fail on the seed that picks it.
    assert set(DRAW) == set(CATALOGUE)
    for kind, spec in CATALOGUE.items():
        variant = next(iter(spec["variants"]))
        p = Painter(64)
        p.label = 3
        DRAW[kind](p, p.px(0.5), p.px(0.6), p.px(0.4), COLOURS["red"], 1, np.random.default_rng(0), variant)
        labels = np.asarray(p.labels)
        assert set(np.unique(labels)) == {0, 3}, kind  # its own label, on part of the frame only
        assert np.asarray(p.rgb)[labels == 3].any(), kind  # and colour where it labelled


def test_underwater_transform_types_determinism_and_physics():
    img = Image.new("RGB", (64, 64), (200, 180, 160))
    out, params = underwater(img, seed=1, water_type="II", range_m=4.0, return_params=True)
    assert isinstance(out, Image.Image) and out.size == (64, 64)
    assert params["water_type"] == "II" and params["range_m"] == 4.0
    again = underwater(img, seed=1, water_type="II", range_m=4.0)
    assert np.array_equal(np.asarray(out), np.asarray(again))
    arr, rel = paint(sample_scene(scene_rng(0, 1), 1), 64)  # an in-air scene
    fixed = {"white_balance": 0.0, "artificial_light": 0.0, "marine_snow": 0.0, "light_depth_m": 3.0}
    near, far = (underwater(arr, rel * r, seed=2, water_type="II", range_m=r, **fixed) for r in (0.5, 4.0))
    assert isinstance(near, np.ndarray) and near.dtype == np.uint8 and near.shape == arr.shape
    # Red is lost first, more over a longer path; contrast falls with range (veiling light, blur).
    assert quality.channel_ratios(far)["r_g"] < quality.channel_ratios(near)["r_g"] < quality.channel_ratios(arr)["r_g"]
    assert far.std() < near.std()
    # Oceanic water leaves blue, turbid coastal water green-yellow.
    ocean, coast = (underwater(arr, rel * 2, seed=2, water_type=w, range_m=2.0, **fixed) for w in ("I", "7C"))
    assert quality.channel_ratios(ocean)["b_g"] > quality.channel_ratios(coast)["b_g"]
    for s in range(5):  # a fixed murky type gets ranges drawn for it, not for whatever type was sampled
        _, p = underwater(img, seed=s, water_type="9C", return_params=True)
        assert p["range_m"] <= max(0.7, math.log(0.25) / math.log(JERLOV_N["9C"][1] ** p["turbidity"])) + 1e-3
    _, p = underwater(img, np.full((64, 64), 1.5), seed=0, return_params=True)
    assert p["range_m"] == 1.5  # with a depth map the recorded range is the map's
    with pytest.raises(ValueError, match="water type"):
        underwater(img, water_type="XX")
    with pytest.raises(TypeError, match="bogus"):
        underwater(img, bogus=1)
    with pytest.raises(ValueError, match="depth map"):
        underwater(img, depth=np.ones((3, 3)))


def test_underwater_renderings_look_like_real_raw_photos_and_in_air_do_not(euvp_images):
    raw = [quality.measure(np.asarray(Image.open(p).convert("RGB").resize((128, 128)))) for p in euvp_images]
    lo = {m: min(r[m] for r in raw) for m in ("uiqm", "uciqe", "r_g", "b_g")}
    hi = {m: max(r[m] for r in raw) for m in lo}
    uw, air = [], []
    for sid in range(16):
        out = render_scene(0, sid, 128, ("surface", "underwater"))
        air.append(quality.measure(np.asarray(Image.open(io.BytesIO(out["surface"][0])))))
        uw.append(quality.measure(np.asarray(Image.open(io.BytesIO(out["underwater"][0])))))
    for m in lo:
        assert lo[m] <= np.mean([r[m] for r in uw]) <= hi[m], m
    assert np.mean([r["r_g"] for r in air]) > hi["r_g"]  # in air keeps its red


def test_default_counts_follow_the_issue():
    assert default_counts() == {"surface": 10_000, "underwater": 3_176}
    assert default_counts("underwater") == {"underwater": 3_176}
    assert default_counts("both", 50) == {"surface": 50, "underwater": 50}
    assert default_counts("both", 50, 200) == {"surface": 200, "underwater": 50}


def test_cli_generate_preview_convert_and_errors(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "reefscenes", "--out", str(out), "--images", "6", "--size", "48", "--seed", "2"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["counts"]["underwater"] and "reefscenes" in captured.err  # progress on stderr
    assert main(["data", "reefscenes", "--out", str(out), "--images", "6", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    split = next(
        s for s in ("test", "val", "train") if json.loads((out / "surface" / f"{s}.json").read_text())["images"]
    )
    assert main(["data", "preview", str(out), "--split", split, "--out", str(tmp_path / "p.png")]) == 0
    assert Image.open(tmp_path / "p.png").width > 2 * 192
    assert main(["data", "preview", str(tmp_path)]) == 2
    assert main(["data", "convert", str(out / "surface" / "train.json"), "--out", str(tmp_path / "conv")]) == 0
    counts = json.loads(capsys.readouterr().out.splitlines()[-1])["counts"]
    assert sum(counts.values()) == len(load_dataset(out / "surface" / "train.json"))


def test_training_cli_and_data_modules_do_not_import_torch():
    code = (
        "import sys, reefcap.training.cli, reefcap.models.quality, reefcap.models.data.datasets, "
        "reefcap.models.reefscenes.dataset, reefcap.models.reefscenes.realism; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_renders_any_dataset_underwater_keeping_captions(small_set, tmp_path, capsys):
    out, _ = small_set
    src = load_dataset(out / "surface" / "train.json")
    wet = tmp_path / "wet"
    assert (
        main(["data", "underwater", str(out / "surface" / "train.json"), "--out", str(wet), "--water-type", "3C"]) == 0
    )
    records = load_dataset(wet)
    assert sorted(r.captions for r in records) == sorted(r.captions for r in src)
    for rec in records:
        assert rec.metadata["water_type"] == "3C" and rec.metadata["domain"] == "underwater"
        before = np.asarray(Image.open(rec.metadata["source"]).convert("RGB"), dtype=float)
        after = np.asarray(Image.open(rec.path).convert("RGB"), dtype=float)
        assert after.shape == before.shape and np.abs(after - before).mean() > 10
    capsys.readouterr()
    assert main(["data", "underwater", str(out / "surface" / "train.json"), "--out", str(wet)]) == 2
    assert (
        main(
            [
                "data",
                "underwater",
                str(out / "surface" / "train.json"),
                "--out",
                str(tmp_path / "x"),
                "--water-type",
                "ZZ",
            ]
        )
        == 2
    )
    assert "unknown water type" in capsys.readouterr().err
