"""`reefcap eval`, `reefcap train` and `reefcap compare` end to end with real pycocoevalcap (Java), plus the
same commands on a BLIP-base-shaped checkpoint and under `accelerate launch` with two CPU processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_captions import all_captions

from reefcap.cli import main
from reefcap.models.metrics import coco_metrics, collapse_metrics

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_size() -> int:
    return 12  # fewer images than conftest's default: these commands run end to end, some in subprocesses


REFS = {
    1: ["a red circle on the sand", "a red circle"],
    2: ["a blue square near a rock", "a blue square"],
    3: ["two fish above the reef", "fish over a reef"],
    4: ["a turtle swimming in open water", "a sea turtle"],
}


@pytest.mark.heavy  # METEOR runs in Java
def test_metrics_on_known_predictions():
    perfect = coco_metrics({k: v[0] for k, v in REFS.items()}, REFS)
    assert set(perfect) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert perfect["Bleu_4"] > 0.99 and perfect["ROUGE_L"] > 0.99 and perfect["METEOR"] > 0.9
    assert perfect["CIDEr"] > 2.0
    # Every predicted word matches, but each caption is short: BLEU-1 is the brevity penalty exactly.
    # Closest reference lengths 3+3+4+3 = 13 words against 2+2+2+2 = 8 predicted: exp(1 - 13/8).
    short = coco_metrics({1: "red circle", 2: "blue square", 3: "two fish", 4: "sea turtle"}, REFS, meteor=False)
    assert short["Bleu_1"] == pytest.approx(math.exp(1 - 13 / 8), abs=1e-5)
    shuffled = coco_metrics({1: REFS[2][0], 2: REFS[3][0], 3: REFS[4][0], 4: REFS[1][0]}, REFS, meteor=False)
    assert shuffled["CIDEr"] < 0.3 * perfect["CIDEr"] and shuffled["Bleu_4"] < 0.1


def test_collapse_indicators():
    m = collapse_metrics(["a fish a fish a fish", "a reef", "", "coral"])
    assert m == {"repetition_rate": 0.25, "distinct_2": 0.5, "empty_or_one_word": 0.5, "unique_captions": 1.0}
    assert collapse_metrics(["the the the"] * 3)["repetition_rate"] == 1.0


def test_repetition_rate_is_the_policys_degenerate_rule():
    """One definition: a caption counts as repeated exactly when the server's policy would replace it."""
    from reefcap.models.metrics import degenerate_reason

    ordinary = ["a fish next to a fish", "a fish a fish", "two two fish", "a big big reef"]
    looping = ["coral coral coral", "a fish a fish a fish", "a a b a a c a a d a a"]
    assert collapse_metrics(ordinary)["repetition_rate"] == 0.0
    assert collapse_metrics(looping)["repetition_rate"] == 1.0
    mixed = ordinary + looping + ["", "reef"]
    flagged = [c for c in mixed if degenerate_reason(c) == "repetition"]
    assert collapse_metrics(mixed)["repetition_rate"] == round(len(flagged) / len(mixed), 6) == round(3 / 9, 6)
    # Empty captions are counted once, as empty_or_one_word, never as repetition.
    assert collapse_metrics(["", ""]) == {**collapse_metrics(["", ""]), "repetition_rate": 0.0}
    assert collapse_metrics(["", ""])["empty_or_one_word"] == 1.0


def test_eval_cli_writes_metrics_and_coco_predictions(small_model, synthetic, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    code = main(
        [
            "eval",
            "--model",
            str(small_model),
            "--data",
            str(synthetic),
            "--out",
            str(out),
            "--no-progress",
            "--beams",
            "1",
            "--no-meteor",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads(out.read_text())
    assert saved["metrics"] == printed and {"Bleu_4", "CIDEr", "ROUGE_L", "distinct_2"} <= set(printed)
    assert saved["decode"]["num_beams"] == 1
    preds = json.loads(Path(saved["predictions"]).read_text())
    assert sorted(p["image_id"] for p in preds) == list(range(12)) and all(isinstance(p["caption"], str) for p in preds)


def test_cli_errors_are_one_line(small_model, synthetic, tmp_path, capsys):
    assert main(["eval", "--model", str(small_model), "--data", str(tmp_path / "none.json")]) == 2
    assert (
        main(
            [
                "train",
                "--recipe",
                "nope",
                "--model",
                str(small_model),
                "--data",
                str(synthetic),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("reefcap: error:") for line in err)
    assert "bundled: base, damf" in err[1]


def test_compare_writes_report(small_model, synthetic, tmp_path, capsys):
    report = tmp_path / "docs" / "compare.md"
    args = [
        "compare",
        "--model",
        str(small_model),
        "--recipes",
        "naive,damf_preserve",
        "--seeds",
        "2",
        "--data",
        str(synthetic),
        "--val",
        str(synthetic),
        "--preserve-data",
        str(synthetic),
        "--test",
        str(synthetic),
        "--test-air",
        str(synthetic),
        "--work",
        str(tmp_path / "runs"),
        "--report",
        str(report),
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--eval-beams",
        "1",
        "--no-meteor",
        "--no-progress",
    ]
    assert main(args) == 0
    text = report.read_text()
    for row in ("| start |", "| naive | 2 |", "| damf_preserve | 2 |"):
        assert row in text
    assert "±" in text and "Measured ordering by underwater CIDEr" in text
    for png in ("compare-validation.png", "compare-gradients.png"):
        assert (report.parent / png).stat().st_size > 5000
    data = json.loads(report.with_suffix(".json").read_text())
    assert len(data["results"]["naive"]) == 2 and "in-air" in data["results"]["naive"][0]
    # A second call reuses the finished runs instead of training again.
    mtime = (tmp_path / "runs" / "naive" / "seed0" / "last" / "model.safetensors").stat().st_mtime
    assert main(args) == 0
    assert (tmp_path / "runs" / "naive" / "seed0" / "last" / "model.safetensors").stat().st_mtime == mtime


def _launch(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, **kw)


@pytest.mark.heavy  # two processes under accelerate launch
def test_accelerate_launch_two_cpu_processes(small_model, synthetic, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp"
    proc = _launch(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "reefcap.cli",
            "train",
            "--recipe",
            "damf",
            "--epochs-scale",
            "0.5",
            "--model",
            str(small_model),
            "--data",
            str(synthetic),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--max-steps",
            "4",
            "--no-progress",
        ],
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 4
    stage = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert stage["steps_per_epoch"] == 6  # 24 captions / (2 per process x 2 processes)
    assert {p.name for p in (out / "checkpoint").glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}


@pytest.mark.slow
def test_same_commands_on_blip_base_shape(synthetic, tmp_path, capsys):
    from reefcap.models.factory import init_blip_base_shape

    model = init_blip_base_shape(tmp_path / "base", all_captions(synthetic))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--recipe",
                "damf",
                "--model",
                str(model),
                "--data",
                str(synthetic),
                "--out",
                str(run),
                "--batch-size",
                "2",
                "--max-steps",
                "2",
                "--epochs-scale",
                "0.1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    assert (
        main(
            [
                "eval",
                "--model",
                str(run / "best"),
                "--data",
                str(synthetic),
                "--limit",
                "2",
                "--beams",
                "1",
                "--no-meteor",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "CIDEr" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
