"""Offline batch captioning: order with bad inputs, crash-safe output, SIGKILL and resume, COCO results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from reefcap.clients.batch import BatchCaptioner
from reefcap.clients.inputs import InputError
from reefcap.clients.results import ResultsWriter, read_results
from reefcap.models.engines.base import DecodeOptions, EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.models.errors import InvalidOptionsError


@pytest.fixture(scope="module")
def engine(varied_model):
    return TorchCaptionEngine.load(str(varied_model), EngineConfig(device="cpu"))


def reefcap(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reefcap.cli", *args], capture_output=True, text=True, **kw)


def test_records_keep_input_order_around_bad_images(engine, euvp_images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"GIF89a broken")
    names = [str(euvp_images[0]), str(bad), str(euvp_images[1]), str(tmp_path / "gone.png"), str(euvp_images[2])]
    batches = list(BatchCaptioner(engine, batch_size=2, options=DecodeOptions.greedy(), workers=3).run_batches(names))
    assert [len(b) for b in batches] == [2, 2, 1]
    records = [r for b in batches for r in b]
    assert [r["image"] for r in records] == names
    assert [("error" in r) for r in records] == [False, True, False, True, False]
    single = engine.caption([euvp_images[1]], DecodeOptions.greedy())[0]
    assert records[2]["caption"] == single.caption


def test_batch_size_and_workers_must_be_positive(engine):
    with pytest.raises(InvalidOptionsError, match="batch_size must be at least 1, got 0"):
        BatchCaptioner(engine, batch_size=0)
    with pytest.raises(InvalidOptionsError, match="workers must be at least 1"):
        BatchCaptioner(engine, workers=-1)


def test_missing_file_record_has_code_not_found(engine, tmp_path):
    (record,) = BatchCaptioner(engine, options=DecodeOptions.greedy()).run([str(tmp_path / "gone.jpg")])
    assert record == {
        "image": str(tmp_path / "gone.jpg"),
        "error": f"{tmp_path / 'gone.jpg'}: no such file",
        "code": "not_found",
    }


def test_writer_reports_an_unwritable_path_as_input_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot write results"):
        ResultsWriter(blocker / "r.jsonl")


def test_writer_refuses_to_clobber_and_cuts_partial_line(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"image": "a", "caption": "x"}) + "\n" + '{"image": "b", "capt')
    with pytest.raises(InputError, match="--resume"):
        ResultsWriter(out)
    with ResultsWriter(out, resume=True) as writer:
        assert writer.done == {"a"}
        writer.write([{"image": "b", "caption": "y"}])
    assert [r["image"] for r in read_results(out)] == ["a", "b"]
    assert out.read_text().count("\n") == 2


def test_sigkill_then_resume_captions_every_image_exactly_once(varied_model, euvp_images, tmp_path):
    images = tmp_path / "survey"
    images.mkdir()
    for rep in range(2):
        for src in euvp_images:
            shutil.copy(src, images / f"{rep}_{src.name}")
    (images / "broken.jpg").write_text("not a jpeg")
    total = 2 * len(euvp_images) + 1
    out = tmp_path / "results.jsonl"
    args = ["caption", str(images), "-o", str(out), "--model", str(varied_model), "--batch-size", "4", "-q"]

    proc = subprocess.Popen([sys.executable, "-m", "reefcap.cli", *args, "--beams", "5", "--max-length", "40"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(read_results(out)))
    assert 8 <= done_before < total

    result = reefcap(*args, "--resume", "--greedy", timeout=300)  # greedy: the rest goes faster
    assert result.returncode == 1, result.stderr  # the broken file is an error line
    records = list(read_results(out))
    names = [r["image"] for r in records]
    assert len(names) == len(set(names)) == total
    assert sorted(names) == sorted(str(p) for p in images.iterdir())


def test_coco_results_and_stdout_mode(varied_model, euvp_images, tmp_path):
    coco = {"images": [{"id": 100 + i, "file_name": str(p)} for i, p in enumerate(euvp_images[:3])], "annotations": []}
    manifest = tmp_path / "set.json"
    manifest.write_text(json.dumps(coco))
    out, res = tmp_path / "r.jsonl", tmp_path / "coco_results.json"
    result = reefcap(
        "caption", str(manifest), "-o", str(out), "--coco-results", str(res), "--model", str(varied_model), "--greedy"
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(res.read_text())
    assert [p["image_id"] for p in payload] == [100, 101, 102]
    summary = json.loads(result.stderr.strip().splitlines()[-1])["summary"]
    assert summary["captioned"] == 3 and summary["failed"] == 0 and summary["images_per_second"] > 0

    again = reefcap("caption", str(manifest), "-o", str(out), "--model", str(varied_model))
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.heavy  # METEOR runs in Java, in two CLI subprocesses
def test_references_are_scored_with_the_caption_metrics(engine, varied_model, euvp_images, tmp_path):
    """References equal to the model's own greedy captions score BLEU-1 = 1; unrelated ones score lower."""
    # The fixture model can caption an image with nothing (it is random); references must be real words.
    candidates = euvp_images[:10]
    captions = [c.caption for c in engine.caption(candidates, DecodeOptions.greedy())]
    pairs = [(p, c) for p, c in zip(candidates, captions, strict=True) if c.split()][:4]
    assert len(pairs) >= 2, captions
    images, own = [p for p, _ in pairs], [c for _, c in pairs]

    def run(refs: list[str], name: str) -> dict:
        coco = {
            "images": [{"id": i, "file_name": str(p)} for i, p in enumerate(images)],
            "annotations": [{"id": i, "image_id": i, "caption": r} for i, r in enumerate(refs)],
        }
        ref_file = tmp_path / f"{name}.json"
        ref_file.write_text(json.dumps(coco))
        out = tmp_path / f"{name}.jsonl"
        args = ["caption", str(ref_file), "-o", str(out), "--references", str(ref_file)]
        # --fallback none: the model's own captions, degenerate ones included (the default fallback replaces them).
        result = reefcap(*args, "--model", str(varied_model), "--fallback", "none", "--greedy", timeout=300)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stderr.strip().splitlines()[-1])["summary"]["metrics"]

    same = run(own, "same")
    other = run(["a large white shark swims above a wreck"] * len(own), "other")
    assert same["images"] == len(own) and same["Bleu_1"] > 0.99
    assert other["Bleu_1"] < same["Bleu_1"] and {"CIDEr", "METEOR", "ROUGE_L", "distinct_2"} <= set(same)
