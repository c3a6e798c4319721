"""The feedback store writes served images behind, in group commits, and loses none of them on the way."""

from __future__ import annotations

import sqlite3
import threading
import time

from reefcap.models.policy.rolling import MIN_CIDER_IMAGES
from reefcap.server.feedback import FeedbackStore


def _row(idx: int = 0, image: bytes = b"\xff\xd8jpeg") -> dict:
    return {
        "idx": idx,
        "model": "m",
        "version": "v1",
        "caption": f"a fish {idx}",
        "fallback_reason": None,
        "image": image,
        "ext": "jpg",
        "width": 8,
        "height": 8,
    }


def _count(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM served").fetchone()[0]


def test_close_writes_everything_queued(tmp_path):
    store = FeedbackStore(tmp_path / "fb.sqlite3")
    for i in range(200):
        store.record_served(f"r{i}", [_row(0), _row(1)])
    store.close()
    assert _count(tmp_path / "fb.sqlite3") == 400


def test_feedback_right_after_serving_finds_the_image_under_concurrent_load(tmp_path):
    """A reader must never overtake rows the writer has taken from the queue but not committed."""
    store = FeedbackStore(tmp_path / "fb.sqlite3")
    commits = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    errors: list[Exception] = []

    def client(k: int) -> None:
        try:
            for i in range(60):
                rid = f"c{k}-{i}"
                store.record_served(rid, [_row()])
                time.sleep(0.0002 * (i % 3))  # sometimes the writer takes the row first, sometimes the reader
                assert store.add(rid, 0, ["a fish"])["model"] == "m"  # no UnknownRequestError
        except Exception as exc:  # surfaced below with its message
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert not errors, errors[:3]
    assert _count(tmp_path / "fb.sqlite3") == 360
    assert store.dropped == 0
    assert commits  # the trace callback saw the transactions it counts


def test_group_commit_and_bounded_queue(tmp_path):
    store = FeedbackStore(tmp_path / "fb.sqlite3", max_pending_bytes=10_000)
    commits = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    with store._lock:  # the writer is stuck behind a slow disk: requests keep queueing
        for i in range(30):
            store.record_served(f"r{i}", [_row(image=b"x" * 500)])
        assert store.dropped == 10  # 20 x 500 bytes fit under the bound; the rest are not kept
    store.flush()
    store.close()
    assert _count(tmp_path / "fb.sqlite3") == 20
    assert len(commits) == 1  # twenty requests, one transaction


def test_a_restarted_server_exports_the_stored_rolling_scores_at_once(tiny_model, tmp_path):
    """Rolling scores live in the database: after a restart /metrics (and the web page) show them before any
    new feedback arrives."""
    import asyncio

    import httpx
    from server_helpers import metric

    from reefcap.models.engines.base import EngineConfig
    from reefcap.models.engines.torch_engine import TorchCaptionEngine
    from reefcap.server.app import create_app
    from reefcap.server.pool import ModelPool
    from reefcap.server.settings import ServerSettings

    db = tmp_path / "fb.sqlite3"
    store = FeedbackStore(db)
    for i in range(MIN_CIDER_IMAGES):  # enough images for CIDEr to be reported at all
        store.record_served(f"r{i}", [_row(0)])
        store.add(f"r{i}", 0, [f"a fish {i} over the reef", "a fish near a coral"])
    expected = store.rolling_scores("m", 500)
    store.close()
    assert expected["images"] == MIN_CIDER_IMAGES and expected["references"] == 2 * MIN_CIDER_IMAGES
    settings = ServerSettings(_env_file=None, feedback_db=db, inference_threads=1)
    pool = ModelPool(TorchCaptionEngine.load(str(tiny_model), EngineConfig(device="cpu")), None)

    async def scrape() -> str:
        app = create_app(settings, pool)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://reefcap.test") as client:
                return (await client.get("/metrics")).text

    text = asyncio.run(scrape())
    for name in ("Bleu_4", "CIDEr"):
        got = metric(text, "reefcap_caption_quality_score", model="m", metric=name, source="feedback", split="rolling")
        assert got == expected[name]
    assert expected["CIDEr"] > 0  # "a fish near a coral" is shared, the numbered references are not
