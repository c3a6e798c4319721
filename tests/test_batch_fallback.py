"""`reefcap caption` with the server's captioning policy: a failing or collapsed primary is answered by the
fallback, and every result line says so, as the server's results do."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from server_helpers import collapsed_model, corrupt_copy

from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine


def reefcap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reefcap.cli", "caption", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def folder(euvp_images, tmp_path_factory):
    """Four real photos in a folder of their own."""
    root = tmp_path_factory.mktemp("photos")
    for p in euvp_images[:4]:
        (root / p.name).write_bytes(p.read_bytes())
    return root


def lines(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_corrupt_primary_answers_through_the_default_fallback(folder, tiny_model, tmp_path):
    bad = corrupt_copy(tiny_model, tmp_path / "broken")
    result = reefcap(str(folder), "--model", str(bad), "--greedy")
    assert result.returncode == 0, result.stderr
    records = lines(result)
    assert len(records) == 4
    for r in records:
        # The server's default fallback, and the server's reason for a primary that did not load.
        assert r["model"]["name"] == "reefscenes-tiny" and r["caption"]
        assert r["fallback"] == {"used": True, "reason": "primary_unavailable"}
    assert "broken" in result.stderr and "fallback reefscenes-tiny answers every image" in result.stderr
    summary = json.loads(result.stderr.strip().splitlines()[-1])["summary"]
    assert summary["captioned"] == 4 and summary["fallbacks"] == {"primary_unavailable": 4}


def test_corrupt_primary_without_fallback_fails_on_one_line(folder, tiny_model, tmp_path):
    bad = corrupt_copy(tiny_model, tmp_path / "broken")
    result = reefcap(str(folder), "--model", str(bad), "--fallback", "none", "--greedy")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "could not be loaded" in result.stderr and "no fallback is set" in result.stderr


def test_unloadable_fallback_is_a_usage_error(folder, tiny_model, tmp_path):
    result = reefcap(str(folder), "--model", str(tiny_model), "--fallback", str(tmp_path / "nope"), "--greedy")
    assert result.returncode == 2 and result.stdout == ""
    assert "--fallback none" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_collapsed_primary_gets_its_degenerate_captions_replaced(folder, tiny_model, varied_model, tmp_path):
    collapsed = collapsed_model(tiny_model, tmp_path / "collapsed")
    out = tmp_path / "out.jsonl"
    args = ["--model", str(collapsed), "--fallback", str(varied_model), "--greedy", "--batch-size", "3"]
    result = reefcap(str(folder), "-o", str(out), *args)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    fallback = TorchCaptionEngine.load(str(varied_model), EngineConfig(device="cpu"))
    expected = fallback.caption([r["image"] for r in records], DecodeOptions.greedy(max_length=20))
    for r, c in zip(records, expected, strict=True):
        assert r["fallback"] == {"used": True, "reason": "degenerate_repetition"}
        assert r["model"]["name"] == "varied" and r["caption"] == c.caption and "coral coral" not in r["caption"]
    summary = json.loads(result.stderr.strip().splitlines()[-1])["summary"]
    assert summary["fallbacks"] == dict(Counter({"degenerate_repetition": 4}))

    # --fallback none: the collapsed model's own captions, marked as not replaced.
    result = reefcap(str(folder), "--model", str(collapsed), "--fallback", "none", "--greedy")
    assert result.returncode == 0, result.stderr
    for r in lines(result):
        assert r["fallback"] == {"used": False, "reason": None} and "coral coral coral" in r["caption"]


def test_eval_measures_the_model_unless_asked_for_the_served_policy(tiny_model, varied_model, tmp_path):
    from synthetic_captions import make_dataset

    data = make_dataset(tmp_path / "syn", n=4)
    collapsed = collapsed_model(tiny_model, tmp_path / "collapsed")

    def evaluate(*extra: str) -> dict:
        out = tmp_path / f"eval{len(extra)}.json"
        cmd = ["eval", "--model", str(collapsed), "--data", str(data), "--out", str(out), "--beams", "1"]
        cmd += ["--no-meteor", "--no-progress", "--device", "cpu", *extra]
        result = subprocess.run([sys.executable, "-m", "reefcap.cli", *cmd], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return json.loads(out.read_text())

    alone = evaluate()  # default --fallback none: the collapse is what is measured
    assert alone["fallback"] is None and alone["metrics"]["repetition_rate"] == 1.0
    served = evaluate("--fallback", str(varied_model))
    assert served["fallback"] == {"model": str(varied_model), "images": {"degenerate_repetition": 4}}
    assert served["metrics"]["repetition_rate"] < 1.0
