"""`reefcap train` leaves a servable, gateable checkpoint: best/manifest.json (measured metrics, recipe, data
provenance, file hashes), a run report beside it, and early stopping on validation CIDEr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from reefcap.cli import main
from reefcap.models.registry import sha256_file

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def synthetic_size() -> int:
    return 8


def _train(small_model: Path, data: Path, out: Path, *extra: str) -> int:
    args = ["train", "--model", str(small_model), "--data", str(data), "--val", str(data), "--out", str(out)]
    return main([*args, "--batch-size", "4", "--eval-beams", "1", "--no-progress", *extra])


def test_train_writes_a_manifest_that_matches_its_weights_and_a_report(small_model, synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = ["--recipe", "pretrain", "--epochs-scale", str(2 / 40)]  # 2 epochs of 4 steps
    assert _train(small_model, synthetic, out, *recipe, "--test", f"shapes={synthetic}") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((out / "best" / "manifest.json").read_text())
    assert printed["manifest"] == str(out / "best" / "manifest.json") and printed["metrics"] == manifest["metrics"]
    # Every checkpoint file is listed with its real hash; the manifest does not list itself.
    files = sorted(p.name for p in (out / "best").iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == files and "model.safetensors" in files
    assert all(sha256_file(out / "best" / n) == h for n, h in manifest["files"].items())
    assert manifest["recipe"] == "pretrain" and manifest["start"] == str(small_model)
    assert manifest["data"]["train"]["sha256"] == sha256_file(synthetic) and manifest["data"]["train"]["images"] == 8
    assert set(manifest["data"]) == {"train", "val", "test/shapes"}
    assert manifest["commands"][0].startswith("reefcap ") or manifest["commands"] == [""]

    # The numbers are the model's own: `reefcap eval` on the same data gives them again.
    assert main(["eval", "--model", str(out / "best"), "--data", str(synthetic), "--no-meteor", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert manifest["metrics"]["val"] == evaluated == manifest["metrics"]["shapes"]

    report = (out / "report.md").read_text()
    assert "selected step" in report and "![report-curves](report-curves.png)" in report
    for png in ("report-curves.png", "report-captions.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and img.width >= 300
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert not any(e["type"] == "early_stop" for e in log)


def test_patience_stops_when_validation_cider_stalls(small_model, synthetic, tmp_path, capsys):
    # An lr too small to change any caption: validation CIDEr is the same at every validation.
    frozen = tmp_path / "frozen.yaml"
    frozen.write_text("base: pretrain\nstages:\n  - lr: 1.0e-12\n    epochs: 4\n")
    out = tmp_path / "run"
    assert _train(small_model, synthetic, out, "--recipe", str(frozen), "--patience", "2", "--no-manifest") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [e for e in log if e["type"] == "eval"]
    stops = [e for e in log if e["type"] == "early_stop"]
    # 4 steps an epoch, a validation each: best at the first, no better at the next two, stop at step 12 of 16.
    assert len(evals) == 3 and len(stops) == 1 and "for 2 validations" in stops[0]["reason"]
    assert summary["steps"] == 12 and summary["stopped_early"] and summary["finished"]
    assert summary["best_step"] == 4 and (out / "last").is_dir() and not (out / "best" / "manifest.json").exists()


def test_bad_test_split_is_a_usage_error_before_training(small_model, synthetic, tmp_path, capsys):
    code = _train(small_model, synthetic, tmp_path / "o", "--recipe", "pretrain", "--test", "val=x.json")
    assert code == 2 and not (tmp_path / "o").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--test" in err[0]
