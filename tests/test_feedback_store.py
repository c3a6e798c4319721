"""The feedback store writes served images behind, in group commits, and loses none of them on the way."""

from __future__ import annotations

import sqlite3
import threading
import time

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
