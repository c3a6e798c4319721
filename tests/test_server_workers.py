"""Two batches in flight (``inference_workers``): they really overlap, each keeps its own answers, and the
policy's single-batch rules still hold per batch."""

from __future__ import annotations

import asyncio
import threading
import time

from PIL import Image

from reefcap.models.engines.base import Caption, CaptionEngine, DecodeOptions, EngineInfo
from reefcap.models.policy import CaptionPolicy
from reefcap.server.batcher import DynamicBatcher
from reefcap.server.pool import ModelPool, choose_workers

GREEDY = DecodeOptions.greedy()


class SlowEngine(CaptionEngine):
    """Captions each image with its width after ``delay`` seconds a batch, recording when each batch ran."""

    def __init__(self, delay: float = 0.2, name: str = "slow") -> None:
        self.delay, self.name, self.spans = delay, name, []
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model, config=None):
        return cls()

    def preprocess(self, images):
        return list(images)

    def generate(self, batch, options):
        start = time.monotonic()
        time.sleep(self.delay)  # releases the GIL, as ONNX Runtime's run does
        with self._lock:
            self.spans.append((start, time.monotonic()))
        return [Caption(f"w{im.width}", self.name, 0.0, 1) for im in batch]

    def describe(self):
        return EngineInfo(self.name, "1", "fake", "cpu", "fp32", "")


def images(first: int, n: int) -> list[Image.Image]:
    return [Image.new("RGB", (first + i, 1)) for i in range(n)]


def overlapped(spans: list[tuple[float, float]]) -> bool:
    (a0, a1), (b0, b1) = sorted(spans)[:2]
    return b0 < a1 and a0 < b1


def test_two_batches_run_at_once_through_batcher_and_pool():
    engine = SlowEngine(delay=0.3)
    pool = ModelPool(engine, None, workers=2)

    async def main():
        batcher = DynamicBatcher(pool.caption_batch, max_batch_size=4, max_wait_s=0.0, workers=2)
        batcher.start()
        # Two requests of four: two full batches, handed over without waiting for each other.
        start = time.monotonic()
        first, second = await asyncio.gather(
            batcher.submit(images(1, 4), GREEDY, 10), batcher.submit(images(101, 4), GREEDY, 10)
        )
        elapsed = time.monotonic() - start
        await batcher.close()
        return first, second, elapsed, batcher.batches_run

    try:
        first, second, elapsed, batches = asyncio.run(main())
    finally:
        pool.close()
    assert batches == 2 and overlapped(engine.spans)
    assert elapsed < 0.55  # one at a time would take 0.6 s
    # Every image got its own caption from the primary, not a batch mate's.
    assert [s.caption for s in first] == [f"w{w}" for w in range(1, 5)]
    assert [s.caption for s in second] == [f"w{w}" for w in range(101, 105)]
    assert all(s.fallback_reason is None for s in first + second)


def test_one_worker_keeps_batches_apart():
    engine = SlowEngine(delay=0.1)
    pool = ModelPool(engine, None, workers=1)

    async def main():
        batcher = DynamicBatcher(pool.caption_batch, max_batch_size=2, max_wait_s=0.0, workers=pool.workers)
        batcher.start()
        await asyncio.gather(*(batcher.submit(images(10 * i, 2), GREEDY, 10) for i in range(1, 4)))
        await batcher.close()

    try:
        asyncio.run(main())
    finally:
        pool.close()
    spans = sorted(engine.spans)
    assert len(spans) == 3 and all(a1 <= b0 for (_, a1), (b0, _) in zip(spans, spans[1:], strict=False))


def test_a_caption_does_not_depend_on_its_batch_mates(varied_model, euvp_images):
    """A real engine under two workers: each image's caption is the one it gets alone."""
    from reefcap.models.engines.base import EngineConfig
    from reefcap.models.engines.torch_engine import TorchCaptionEngine

    engine = TorchCaptionEngine.load(str(varied_model), EngineConfig(device="cpu"))
    ims = [Image.open(p).convert("RGB") for p in euvp_images[:6]]
    alone = [engine.caption([im], GREEDY)[0].caption for im in ims]
    pool = ModelPool(engine, None, workers=2)

    async def main():
        batcher = DynamicBatcher(pool.caption_batch, max_batch_size=3, max_wait_s=0.0, workers=2)
        batcher.start()
        # Different groupings: one request of six (two batches at once), and reversed single images.
        whole = await batcher.submit(ims, GREEDY, 60)
        singles = await asyncio.gather(*(batcher.submit([im], GREEDY, 60) for im in reversed(ims)))
        await batcher.close()
        return whole, [s[0] for s in reversed(singles)]

    try:
        whole, singles = asyncio.run(main())
    finally:
        pool.close()
    assert [s.caption for s in whole] == alone
    assert [s.caption for s in singles] == alone


def test_busy_means_every_thread_runs_a_batch():
    """With two workers an overrunning batch leaves one thread: the next batch still gets the primary;
    only when both threads are held does the fallback answer (``primary_busy``)."""
    slow, fallback = SlowEngine(delay=0.5), SlowEngine(delay=0.0, name="fallback")
    policy = CaptionPolicy(slow, fallback, primary_timeout_s=0.05, workers=2)
    try:
        first = policy.caption(images(1, 1), GREEDY)  # overruns: the fallback answers, the batch keeps running
        second = policy.caption(images(2, 1), GREEDY)  # the other thread takes it (and overruns too)
        third = policy.caption(images(3, 1), GREEDY)  # both threads held
    finally:
        policy.close()
    assert [first[0].fallback_reason, second[0].fallback_reason] == ["primary_timeout"] * 2
    assert third[0].fallback_reason == "primary_busy"
    assert third[0].caption == "w3"


def test_workers_follow_the_measured_cost(monkeypatch):
    pool = ModelPool(SlowEngine(), None)
    try:
        monkeypatch.setattr("os.cpu_count", lambda: 2)
        assert choose_workers(pool.cost, 0, GREEDY) == 1  # unmeasured: one batch, as before
        pool.cost.observe(4, GREEDY, 0.02)  # cheap: 5 ms an image
        assert choose_workers(pool.cost, 0, GREEDY) == 2
        assert choose_workers(pool.cost, 3, GREEDY) == 3  # an explicit count stands
        monkeypatch.setattr("os.cpu_count", lambda: 1)
        assert choose_workers(pool.cost, 0, GREEDY) == 1
        pool.cost.unit_s = None
        monkeypatch.setattr("os.cpu_count", lambda: 2)
        pool.cost.observe(1, GREEDY, 2.0)  # heavy: already has every core
        assert choose_workers(pool.cost, 0, GREEDY) == 1
        pool.set_workers(2)
        assert pool.workers == 2 and pool.policy.workers == 2
    finally:
        pool.close()


def test_a_served_batch_hops_one_thread_only():
    """The event loop hands a batch straight to the primary's thread (the policy's rules run on the loop): no
    second pool of policy threads waiting on the first, as there was before."""
    seen: list[str] = []

    class Recording(SlowEngine):
        def generate(self, batch, options):
            seen.append(threading.current_thread().name)
            return super().generate(batch, options)

    pool = ModelPool(Recording(delay=0.01), None, workers=2)

    async def main():
        batcher = DynamicBatcher(pool.caption_batch, max_batch_size=2, max_wait_s=0.0, workers=2)
        batcher.start()
        loop_thread = threading.current_thread().name
        out = await asyncio.gather(*(batcher.submit(images(i, 1), GREEDY, 10) for i in range(1, 7)))
        names = {t.name for t in threading.enumerate()}
        await batcher.close()
        return loop_thread, out, names

    try:
        loop_thread, out, names = asyncio.run(main())
    finally:
        pool.close()
    assert [r[0].caption for r in out] == [f"w{i}" for i in range(1, 7)]
    assert seen and all(name.startswith("reefcap-primary") for name in seen), seen
    assert loop_thread not in seen
    # Threads alive while serving: the primary's, and none running the policy for it.
    assert not any(n.startswith(("reefcap-policy", "reefcap-fallback")) for n in names), names
