"""Feedback from the command line and the clients, against a real `reefcap serve` on loopback: `reefcap caption
--server` keeps request_id/index, `reefcap feedback post` (one or a JSONL), the clients' feedback(), and
`reefcap feedback export`'s deterministic train/val/test splits by image."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from server_helpers import LiveServer

from reefcap.cli import main
from reefcap.clients.http import AsyncReefcapClient, ReefcapClient, ReefcapHTTPError
from reefcap.models.data.datasets import load_dataset
from reefcap.models.errors import ReefcapError
from reefcap.models.policy.rolling import MIN_CIDER_IMAGES
from reefcap.server.feedback import image_split

pytestmark = pytest.mark.timeout(180)
KEY = "feedback-key"


@pytest.fixture(scope="module")
def server(varied_model, tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feedback-live")
    srv = LiveServer.torch_cpu(tmp, varied_model, tiny_model, num_beams=1, max_wait_ms=20, api_key=KEY)
    srv.db = tmp / "fb.sqlite3"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def served(server, euvp_images, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("served") / "results.jsonl"
    args = ["caption", *map(str, euvp_images[:8]), "--server", server.url, "--api-key", KEY, "-o", str(out), "-q"]
    assert main(args) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _export(server, out: Path, capsys) -> dict:
    assert main(["feedback", "export", "--db", str(server.db), "--out", str(out)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_caption_server_lines_keep_request_id_and_index(served):
    assert len(served) == 8 and len({r["request_id"] for r in served}) == 8
    assert all(isinstance(r["request_id"], str) and len(r["request_id"]) >= 8 and r["index"] == 0 for r in served)
    assert all(r["quality"] is None for r in served)  # measured only when asked


def test_quality_through_the_server_is_the_servers_measurement(server, euvp_images, tmp_path):
    from reefcap.models.data.images import ImageLimits
    from reefcap.server.service import decode_one

    paths, out = euvp_images[:3], tmp_path / "quality.jsonl"
    args = ["caption", *map(str, paths), "--server", server.url, "--api-key", KEY, "-o", str(out), "-q", "--quality"]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for path, record in zip(paths, records, strict=True):
        mine = decode_one(path.read_bytes(), ImageLimits(), 0)
        assert record["quality"] == {"uiqm": mine.uiqm, "uciqe": mine.uciqe} and "caption" in record


def test_post_a_jsonl_then_export_splits_by_image(server, served, tmp_path, capsys):
    lines = [{**r, "references": [f"a reef photo number {i}", "an underwater scene"]} for i, r in enumerate(served)]
    lines.insert(3, {"request_id": "never-served", "index": 0, "reference": "a fish"})
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["feedback", "post", "--server", server.url, "--api-key", KEY, "--file", str(feedback)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip()) == {"posted": 8, "failed": 1}
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"{feedback}:4" in err[0] and "unknown_request" in err[0]

    first = _export(server, tmp_path / "export", capsys)
    assert first["images"] == 8 and first["annotations"] == 16 and sum(first["splits"].values()) == 8
    again = _export(server, tmp_path / "again", capsys)
    assert again["splits"] == first["splits"]
    by_split = {}
    for split in ("train", "val", "test"):
        text = (tmp_path / "export" / f"{split}.json").read_text()
        assert text == (tmp_path / "again" / f"{split}.json").read_text().replace("/again/", "/export/")
        records = load_dataset(tmp_path / "export" / f"{split}.json") if first["splits"][split] else []
        by_split[split] = records
        # The split is the image's own (a hash of its bytes), so it holds for every later export.
        assert all(image_split(r.path.read_bytes()) == split for r in records)
    ids = [r.metadata["request_id"] for recs in by_split.values() for r in recs]
    assert sorted(ids) == sorted(r["request_id"] for r in served)
    assert len(load_dataset(tmp_path / "export" / "captions.json")) == 8


def test_bad_jsonl_posts_nothing(server, served, tmp_path, capsys):
    before = _export(server, tmp_path / "before", capsys)["annotations"]
    bad = tmp_path / "bad.jsonl"
    good = {"request_id": served[0]["request_id"], "index": 0, "references": ["a good reference"]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"request_id": served[1]["request_id"]}) + "\n")
    assert main(["feedback", "post", "--server", server.url, "--api-key", KEY, "--file", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2" in err[0] and "reference" in err[0]
    assert _export(server, tmp_path / "after", capsys)["annotations"] == before
    assert main(["feedback", "post", "--server", server.url, "--request-id", "x"]) == 2
    assert "--reference" in capsys.readouterr().err


def test_one_item_from_flags_and_from_both_clients(server, served, capsys):
    rid = served[5]["request_id"]
    args = ["feedback", "post", "--server", server.url, "--api-key", KEY, "--request-id", rid]
    assert main([*args, "--reference", "a diver over coral", "--reference", "coral and a diver"]) == 0
    assert json.loads(capsys.readouterr().out) == {"posted": 1, "failed": 0}
    with ReefcapClient(server.url, api_key=KEY) as client:
        answer = client.feedback(served[6]["request_id"], 0, "a turtle")
        assert answer["stored"] == 1 and answer["request_id"] == served[6]["request_id"]
        # The rolling scores say what they come from; CIDEr only once it means something (ten images).
        rolling = answer["rolling"]
        assert rolling["references"] >= rolling["images"] >= 1 and "Bleu_4" in rolling
        assert ("CIDEr" in rolling) == (rolling["images"] >= MIN_CIDER_IMAGES), rolling
        with pytest.raises(ReefcapHTTPError) as info:
            client.feedback(served[6]["request_id"], 3, ["no such image in that request"])
        assert info.value.status == 404 and info.value.code == "unknown_request"
        with pytest.raises(ReefcapError, match="reference"):
            client.feedback(served[6]["request_id"], 0, [" "])

    async def post():
        async with AsyncReefcapClient(server.url, api_key=KEY) as client:
            return await client.feedback(served[7]["request_id"], 0, ["a ray on sand"])

    assert asyncio.run(post())["stored"] == 1
