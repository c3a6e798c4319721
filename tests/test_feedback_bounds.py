"""Issue 13 (B): feedback bounded (references per image and per request, repeated posts), rolling scores in
bounded time per post and equal to a full recompute, and a feedback database that cannot be written stopping
`reefcap serve` with one line. Real SQLite, the library's metrics (checked against pycocoevalcap elsewhere)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time

import httpx
import pytest
import torch
from server_helpers import png_bytes

from reefcap.models.engines.base import EngineConfig
from reefcap.models.engines.torch_engine import TorchCaptionEngine
from reefcap.models.metrics import bleu4_cider
from reefcap.models.policy.rolling import MIN_CIDER_IMAGES, RollingScores
from reefcap.server.app import create_app
from reefcap.server.feedback import FeedbackStore, FeedbackUnavailableError, TooManyReferencesError
from reefcap.server.pool import ModelPool
from reefcap.server.settings import ServerSettings

WORDS = [
    "a",
    "the",
    "fish",
    "turtle",
    "reef",
    "coral",
    "ray",
    "shark",
    "diver",
    "swims",
    "over",
    "near",
    "blue",
    "green",
    "small",
    "large",
    "school",
    "of",
]


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 11)))


def test_rolling_scores_equal_a_full_recompute_of_the_window():
    rng = random.Random(0)
    rolling = RollingScores(window=12, refresh=4)
    truth: dict = {}
    for step in range(60):
        key = rng.randrange(30) if step > 20 else step  # new images, then updates to old and new ones
        caption = truth.get(key, (sentence(rng), []))[0]
        refs = truth.get(key, (caption, []))[1] + [sentence(rng) for _ in range(rng.randint(1, 3))]
        if key not in truth and len(truth) == 12:
            del truth[next(iter(truth))]  # the window drops the image that got references first
        truth[key] = (caption, refs)
        rolling.update(key, caption, refs)
        # BLEU-4 is exact at every step; CIDEr after rescoring every image against the current idf.
        expected = bleu4_cider({k: c for k, (c, _) in truth.items()}, {k: r for k, (_, r) in truth.items()})
        assert rolling.scores()["Bleu_4"] == pytest.approx(expected["Bleu_4"], abs=1e-12)
        assert len(rolling) == len(truth)
    assert rolling.exact()["CIDEr"] == pytest.approx(expected["CIDEr"], abs=1e-12)
    # A window no larger than refresh + 1 is rescored in full on every update: exact at every step (CIDEr
    # asked for from one image on: exactness, not the reporting minimum, is checked here).
    small = RollingScores(window=5, refresh=4, min_cider_images=1)
    for key, (caption, refs) in list(truth.items())[:5]:
        small.update(key, caption, refs)
    five = dict(list(truth.items())[:5])
    want = bleu4_cider({k: c for k, (c, _) in five.items()}, {k: r for k, (_, r) in five.items()})
    assert small.scores()["CIDEr"] == pytest.approx(want["CIDEr"], abs=1e-12)


def test_rolling_cider_is_reported_from_ten_images_on_with_its_counts():
    rng = random.Random(3)
    items = [(k, sentence(rng), [sentence(rng) for _ in range(1 + k % 3)]) for k in range(MIN_CIDER_IMAGES)]
    # Why there is a minimum: over one image CIDEr's idf is log(1/1) = 0 for every n-gram, so even a caption
    # equal to its reference scores 0.
    assert bleu4_cider({0: "a fish over the reef"}, {0: ["a fish over the reef"]})["CIDEr"] == 0
    rolling = RollingScores(window=50)
    assert rolling.scores() == {"images": 0, "references": 0}
    for n, (key, caption, refs) in enumerate(items, 1):
        rolling.update(key, caption, refs)
        got = rolling.scores()
        assert got["images"] == n and got["references"] == sum(len(r) for _, _, r in items[:n])
        assert ("CIDEr" in got) == (n >= MIN_CIDER_IMAGES) and "Bleu_4" in got, (n, got)
    want = bleu4_cider({k: c for k, c, _ in items}, {k: r for k, _, r in items})
    assert got["CIDEr"] == pytest.approx(want["CIDEr"], abs=1e-12) and got["CIDEr"] > 0
    # More references for an image already in the window count once each; the image count stays.
    rolling.update(0, items[0][1], [*items[0][2], "a blue fish"])
    assert rolling.scores()["references"] == got["references"] + 1 and rolling.scores()["images"] == n
    assert MIN_CIDER_IMAGES == 10  # the documented minimum (README, models/policy/rolling.py)


def _served_store(tmp_path, images: int, refs_each: int) -> FeedbackStore:
    rng = random.Random(1)
    store = FeedbackStore(tmp_path / "fb.sqlite3")
    for i in range(images):
        row = {"idx": 0, "model": "m", "version": "1", "caption": sentence(rng), "image": b"x", "ext": "jpg"}
        store.record_served(f"r{i}", [{**row, "width": 1, "height": 1}])
    store.flush()
    for i in range(images):
        store.add(f"r{i}", 0, [sentence(rng) for _ in range(refs_each)])
    return store


def _post_ms(store: FeedbackStore, rid: str, window: int, refs: list[str]) -> float:
    start = time.perf_counter()
    store.add(rid, 0, refs)
    store.rolling_scores("m", window)
    return (time.perf_counter() - start) * 1000


def test_a_feedback_post_costs_bounded_time_at_4000_references(tmp_path):
    store = _served_store(tmp_path, images=200, refs_each=20)  # 4,000 references in the window
    store.rolling_scores("m", 500)  # loaded once, from the database (a full recompute, once per model)
    rng = random.Random(2)
    row = {"idx": 0, "model": "m", "version": "1", "caption": "a turtle over the reef", "image": b"x", "ext": "jpg"}
    for i in range(7):
        store.record_served(f"new{i}", [{**row, "width": 1, "height": 1}])
    times = sorted(_post_ms(store, f"new{i}", 500, [sentence(rng), sentence(rng)]) for i in range(7))
    # Before: every post recomputed BLEU/CIDEr over all 4,000 references (seconds). Now: its image plus 16.
    assert times[3] < 150, times
    window = store.pairs("m", 500)
    full = bleu4_cider({k: c for k, c, _ in window}, {k: r for k, _, r in window})
    assert store.rolling_scores("m", 500)["Bleu_4"] == pytest.approx(full["Bleu_4"], abs=1e-12)
    store.close()


def test_references_are_capped_per_image_and_reposts_change_nothing(tmp_path):
    store = _served_store(tmp_path, images=2, refs_each=1)
    before = store.rolling_scores("m", 500)
    again = store.pairs("m", 500)[0][2]
    for _ in range(10):  # the same references posted again and again
        assert store.add("r0", 0, again)["stored"] == 0
    assert store.rolling_scores("m", 500) == before
    assert store.add("r0", 0, [f"ref {i}" for i in range(19)]) == {"model": "m", "stored": 19, "references": 20}
    with pytest.raises(TooManyReferencesError, match="limit of 20 per image"):
        store.add("r0", 0, ["one more"])
    assert len(store.pairs("m", 500)[0][2]) == 20  # the refused post stored nothing
    store.close()


def test_feedback_over_http_caps_and_dedupes(tiny_model, tmp_path):
    s = ServerSettings(
        _env_file=None, feedback_db=tmp_path / "fb.sqlite3", inference_threads=torch.get_num_threads(), max_wait_ms=5
    )
    s.feedback_max_references = 3
    pool = ModelPool(TorchCaptionEngine.load(str(tiny_model), EngineConfig(device="cpu")), None)

    async def main():
        app = create_app(s, pool)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
                r = await client.post("/v1/captions", files=[("images", ("a.png", png_bytes(), "image/png"))])
                rid = r.json()["request_id"]
                post = {"request_id": rid, "references": ["a fish", "a fish", "a reef"]}
                r = await client.post("/v1/feedback", json=post)
                assert r.status_code == 200 and r.json()["stored"] == 2 and r.json()["references"] == 2, r.text
                r = await client.post("/v1/feedback", json=post)
                assert r.status_code == 200 and r.json()["stored"] == 0, r.text
                r = await client.post("/v1/feedback", json={"request_id": rid, "references": ["x y", "y z"]})
                assert r.status_code == 409 and r.json()["error"]["code"] == "too_many_references", r.text
                assert "limit of 3" in r.json()["error"]["message"]
                r = await client.post("/v1/feedback", json={"request_id": rid, "references": ["r"] * 21})
                assert r.status_code == 422, r.text  # per request: at most 20

    asyncio.run(main())


@pytest.mark.parametrize("where", ["directory", "below_a_file", "not_a_database"])
def test_unwritable_feedback_db_stops_serve_with_one_line(tmp_path, where):
    target = {"directory": tmp_path, "below_a_file": tmp_path / "f" / "fb.sqlite3", "not_a_database": tmp_path / "t"}
    (tmp_path / "f").write_text("a file")
    (tmp_path / "t").write_text("not sqlite " * 100)
    with pytest.raises(FeedbackUnavailableError):
        FeedbackStore(target[where])
    cmd = [sys.executable, "-m", "reefcap.cli", "serve", "--model", "none-needed", "--feedback-db", str(target[where])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "feedback database" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
