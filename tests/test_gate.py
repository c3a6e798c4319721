"""The quality gate's rules on their own: declared directions, tolerance, relative collapse ceilings, manifest hashes,
the choice of gate set, and the deterministic ReefScenes probe set the library renders."""

from __future__ import annotations

import hashlib
import json

import pytest

from reefcap.models.data.records import CaptionRecord, write_coco
from reefcap.models.metrics import COLLAPSE_KEYS, METRIC_KEYS
from reefcap.models.policy.gate import (
    DIRECTIONS,
    GateConfig,
    choose_gate_set,
    collapse_ceiling,
    compare,
    verify_manifest,
)
from reefcap.models.reefscenes.probe import probe_set
from reefcap.models.registry import sha256_file

CFG = GateConfig(tolerance=0.02, max_repetition=0.05, max_empty=0.05)


def _verdicts(new: dict, old: dict | None) -> dict:
    return {v.metric: v for v in compare(new, old, CFG)}


def test_every_reported_metric_has_a_declared_direction():
    assert set(METRIC_KEYS) | set(COLLAPSE_KEYS) | {"images"} <= set(DIRECTIONS)
    assert DIRECTIONS["CIDEr"] == "higher" and DIRECTIONS["repetition_rate"] == "lower"
    assert DIRECTIONS["images"] == "neutral"


def test_directions_and_tolerance():
    old = {"CIDEr": 0.50, "repetition_rate": 0.03, "empty_or_one_word": 0.0, "images": 40, "distinct_2": 0.3}
    # Less repetition is better, not worse (the old gate refused it); a count of images is never compared.
    v = _verdicts(
        {"CIDEr": 0.49, "repetition_rate": 0.0, "empty_or_one_word": 0.0, "images": 12, "distinct_2": 0.1}, old
    )
    assert all(x.passed for x in v.values()), [x.reason for x in v.values() if not x.passed]
    assert "within 0.02" in v["CIDEr"].reason and v["images"].reason == "not compared (neutral)"
    v = _verdicts({"CIDEr": 0.47, "repetition_rate": 0.049, "empty_or_one_word": 0.03, "images": 40}, old)
    assert not v["CIDEr"].passed and "below by more than 0.02" in v["CIDEr"].reason
    assert v["repetition_rate"].passed  # +0.019: within the tolerance, under the ceiling
    assert not v["empty_or_one_word"].passed and "above by more than 0.02" in v["empty_or_one_word"].reason


def test_collapse_is_refused_against_no_serving_model():
    v = _verdicts({"CIDEr": 2.0, "repetition_rate": 0.9, "empty_or_one_word": 0.5}, None)
    assert not v["repetition_rate"].passed and "(collapse)" in v["repetition_rate"].reason
    assert not v["empty_or_one_word"].passed and v["CIDEr"].passed  # nothing to beat: measured numbers alone
    assert v["repetition_rate"].reason == "0.9000 > 0.05 (collapse)"  # the floor is the whole ceiling
    v = _verdicts({"repetition_rate": 0.05, "empty_or_one_word": 0.04}, None)
    assert all(x.passed for x in v.values())  # at or under the floor: not a collapse


def test_collapse_ceiling_is_relative_to_the_serving_model():
    # A tolerance wide enough that only the collapse ceiling can refuse (the margin is its own setting), and a
    # margin below the floor so that which of the two decides shows.
    loose = GateConfig(tolerance=0.5, max_repetition=0.05, max_empty=0.05, collapse_margin=0.03)
    serving = {"repetition_rate": 0.20, "empty_or_one_word": 0.10}

    def verdicts(new, old):
        return {v.metric: v for v in compare(new, old, loose)}

    # The serving model repeats on this gate set too: a candidate doing as badly, or a little worse, is not
    # collapsed (the absolute 5% ceiling refused it).
    v = verdicts({"repetition_rate": 0.23, "empty_or_one_word": 0.12}, serving)
    assert all(x.passed for x in v.values()), [x.reason for x in v.values()]
    v = verdicts({"repetition_rate": 0.24, "empty_or_one_word": 0.14}, serving)
    assert not v["repetition_rate"].passed and not v["empty_or_one_word"].passed
    assert v["repetition_rate"].reason == "0.2400 > 0.2300 = max(serving 0.2000 + 0.03, 0.05) (collapse)"
    # A serving model that never repeats: the floor (0.05), not serving + margin (0.03), decides.
    clean = {"repetition_rate": 0.0, "empty_or_one_word": 0.0}
    v = verdicts({"repetition_rate": 0.05, "empty_or_one_word": 0.04}, clean)
    assert all(x.passed for x in v.values()), [x.reason for x in v.values()]
    v = verdicts({"repetition_rate": 0.06, "empty_or_one_word": 0.03}, clean)
    assert not v["repetition_rate"].passed and "(collapse)" in v["repetition_rate"].reason
    assert v["empty_or_one_word"].passed
    assert collapse_ceiling("CIDEr", 0.5, loose) is None  # only the two collapse rates have a ceiling


def test_manifest_hashes(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"weights")):
        (m / name).write_bytes(data)
    assert verify_manifest(m) == ["no manifest.json: the model's provenance and file hashes are unknown"]
    (m / "manifest.json").write_text(json.dumps({"metrics": {"test": {"CIDEr": 9.0}}}))
    assert verify_manifest(m) == ["manifest.json lists no file hashes"]
    files = {p.name: sha256_file(p) for p in m.iterdir() if p.name != "manifest.json"}
    (m / "manifest.json").write_text(json.dumps({"files": files}))
    assert verify_manifest(m) == []
    (m / "model.safetensors").write_bytes(b"other weights")
    assert verify_manifest(m) == [
        "model.safetensors: SHA-256 differs from manifest.json (the file changed after the manifest was written)"
    ]
    (m / "manifest.json").write_text(json.dumps({"files": {"config.json": files["config.json"], "../x": "0"}}))
    problems = verify_manifest(m)
    assert "manifest.json does not list model.safetensors" in problems
    assert "../x: listed in manifest.json but not in the model folder" in problems


def test_gate_set_preference(euvp_images, tmp_path):
    coco = tmp_path / "gate.json"
    write_coco([CaptionRecord(i, p, ("a reef",)) for i, p in enumerate(euvp_images[:3])], coco)
    held = [(b"jpeg", ("a fish",))] * 5
    name, items = choose_gate_set(coco, held, GateConfig(min_feedback_images=5))
    assert name == f"COCO file {coco}" and len(items) == 3 and items[0][1] == ("a reef",)
    name, items = choose_gate_set(None, held, GateConfig(min_feedback_images=5))
    assert name == "held-out feedback (5 images)" and items is held
    name, items = choose_gate_set(None, held, GateConfig(min_feedback_images=6))
    assert name == "ReefScenes probe set (5 held-out feedback images < 6)" and items == probe_set()


@pytest.mark.parametrize("n", [4])
def test_probe_set_is_deterministic_underwater_reefscenes(n):
    first = probe_set(n, 64)
    probe_set.cache_clear()
    again = probe_set(n, 64)
    assert [hashlib.sha256(d).hexdigest() for d, _ in first] == [hashlib.sha256(d).hexdigest() for d, _ in again]
    assert all(d[:2] == b"\xff\xd8" and len(refs) == 5 for d, refs in first)  # JPEG bytes, five captions each
    assert len({refs[0] for _, refs in first}) == n
