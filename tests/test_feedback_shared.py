"""Issue 24: one feedback store shared by several processes, on SQLite (WAL, one host) and on a real PostgreSQL.

Each test opens two :class:`FeedbackStore` objects on one database, as two workers (or two machines) do: what
one served takes feedback through the other, rolling scores follow every post whichever store took it, the
per-image reference limit holds across them, and the generation record is one.
"""

from __future__ import annotations

import threading

import pytest

from reefcap.models.policy.rolling import MIN_CIDER_IMAGES, RollingScores
from reefcap.server.feedback import FeedbackStore, FeedbackUnavailableError, TooManyReferencesError


def _row(idx: int, caption: str) -> dict:
    row = {"idx": idx, "model": "m", "version": "v1", "caption": caption, "fallback_reason": None}
    return row | {"image": f"image {caption}".encode(), "ext": "jpg", "width": 8, "height": 8}


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "fb.sqlite3")
    server = request.getfixturevalue("postgres")
    return server.fresh_database(f"shared_{abs(hash(str(tmp_path))) % 10**9}")


def _exact(store: FeedbackStore, window: int = 500) -> dict:
    rolling = RollingScores(window)
    for key, caption, refs in store.pairs("m", window):
        rolling.update(key, caption, refs, rescore=False)
    return rolling.exact()


def test_feedback_served_by_one_store_is_taken_by_the_other_and_both_score_it(where, tmp_path):
    a, b = FeedbackStore(where), FeedbackStore(where)
    try:
        a.rolling_scores("m", 500)  # a's rolling scores are loaded before b takes any post: it must follow them
        for i in range(MIN_CIDER_IMAGES + 2):
            done = a.record_served(f"r{i}", [_row(0, f"a fish number {i}")])
            assert done.result(10) == 1  # committed: another process may now be asked for its feedback
            # b never served r{i}: before, its own queue was all a store looked at
            got = b.add(f"r{i}", 0, [f"a fish number {i} on the reef", "a fish near a coral"])
            assert got == {"model": "m", "stored": 2, "references": 2}
        assert a.add("r0", 0, ["a striped fish"])["stored"] == 1
        expected = _exact(a)
        for store in (a, b):
            scores = store.rolling_scores("m", 500)
            assert scores["images"] == MIN_CIDER_IMAGES + 2 and scores["references"] == 2 * MIN_CIDER_IMAGES + 5
            assert scores["Bleu_4"] == pytest.approx(expected["Bleu_4"], abs=1e-9)
            assert scores["CIDEr"] == pytest.approx(expected["CIDEr"], abs=1e-6)
            assert store.models_with_feedback() == ["m"]
        out = b.export(tmp_path / "export")
        assert out["images"] == MIN_CIDER_IMAGES + 2 and out["annotations"] == 2 * MIN_CIDER_IMAGES + 5
    finally:
        a.close()
        b.close()


def test_the_reference_limit_holds_across_stores_posting_at_once(where):
    stores = [FeedbackStore(where, max_references=20) for _ in range(2)]
    try:
        stores[0].record_served("r", [_row(0, "a turtle")]).result(10)
        outcomes: list[object] = []

        def post(store: FeedbackStore, k: int) -> None:
            for i in range(8):
                try:
                    outcomes.append(store.add("r", 0, [f"ref {k} {i} a", f"ref {k} {i} b"])["stored"])
                except TooManyReferencesError as exc:
                    outcomes.append(exc)

        threads = [threading.Thread(target=post, args=(stores[k % 2], k)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stored = sum(o for o in outcomes if isinstance(o, int))
        refused = [o for o in outcomes if isinstance(o, TooManyReferencesError)]
        # 32 posts of two new references each; exactly ten fit under the limit of 20, whoever posts them.
        assert stored == 20 and len(refused) == 22, outcomes
        assert len(stores[1].pairs("m", 500)[0][2]) == 20
    finally:
        for store in stores:
            store.close()


def test_one_generation_record_for_every_store(where):
    a, b = FeedbackStore(where), FeedbackStore(where)
    try:
        assert a.serving_record("primary") is None
        assert a.publish_serving("primary", "/models/v2", "ab" * 32, "v2", "1111") == 1
        assert b.publish_serving("primary", "/models/v3", None, "v3", "2222") == 2
        record = a.serving_record("primary")
        assert (record["generation"], record["target"], record["manifest"], record["version"]) == (
            2,
            "/models/v3",
            None,
            "2222",
        )
        assert b.serving_record("another-primary") is None  # servers configured otherwise do not follow it
    finally:
        a.close()
        b.close()


def test_an_unreachable_postgres_is_one_line_without_the_password():
    with pytest.raises(FeedbackUnavailableError) as caught:
        FeedbackStore("postgresql://reefcap:s3cret-pw@127.0.0.1:1/reefcap")
    message = str(caught.value)
    assert "s3cret-pw" not in message and "***" in message and "\n" not in message, message
    assert "REEFCAP_FEEDBACK_DSN" in message


def test_a_caption_is_answered_once_its_record_is_committed_when_the_store_is_shared(tiny_model, tmp_path):
    """Another process may be asked for the feedback next: with a shared store the answer waits for the commit
    (here the writer is held up for a second); a store of its own answers at once and writes behind."""
    import asyncio

    import httpx
    from server_helpers import png_bytes

    from reefcap.models.engines.base import EngineConfig
    from reefcap.models.engines.torch_engine import TorchCaptionEngine
    from reefcap.server.app import Placement, create_app
    from reefcap.server.pool import ModelPool
    from reefcap.server.settings import ServerSettings

    settings = ServerSettings(_env_file=None, feedback_db=tmp_path / "fb.sqlite3", inference_threads=1, max_wait_ms=0)
    engine = TorchCaptionEngine.load(str(tiny_model), EngineConfig(device="cpu"))
    files = [("images", ("a.png", png_bytes(), "image/png"))]

    async def answered_before_commit(shared: bool, warm: int) -> bool:
        store = FeedbackStore(settings.feedback_db)
        app = create_app(settings, ModelPool(engine, None), Placement(shared=shared), store)  # closed with the app
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
                for _ in range(warm):  # the first requests pay one-time costs (threads, kernels) of a second or more
                    assert (await client.post("/v1/captions", files=files)).status_code == 200
                released = []

                def release() -> None:
                    released.append(True)
                    store._lock.release()

                store._lock.acquire()  # the writer cannot commit until this is released, a second on
                asyncio.get_running_loop().call_later(1.0, release)
                r = await client.post("/v1/captions", files=files)
                early = not released
                await asyncio.sleep(1.1)
                assert r.status_code == 200
                return early

    assert asyncio.run(answered_before_commit(False, 4)) is True
    assert asyncio.run(answered_before_commit(True, 1)) is False
