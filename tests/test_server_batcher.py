"""The dynamic batcher on its own: batch formation, wait bound, queue bound, deadlines, disconnects, drain."""

from __future__ import annotations

import asyncio
import time

import pytest
from PIL import Image

from reefcap.models.engines.base import DecodeOptions
from reefcap.server.batcher import (
    ClientDisconnectedError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
    ShuttingDownError,
)
from reefcap.server.metrics import Metrics

GREEDY = DecodeOptions.greedy()


def images(n: int) -> list[Image.Image]:
    # Each image's width encodes its identity so the runner's answers can be checked for misrouting.
    return [Image.new("RGB", (i + 1, 1)) for i in range(n)]


class Recorder:
    """A batch runner that answers each image with its width after ``delay`` seconds, and logs batches."""

    def __init__(self, delay: float = 0.0, extra: int = 0) -> None:
        self.delay, self.extra, self.batches = delay, extra, []

    async def __call__(self, batch, options):
        self.batches.append((len(batch), options))
        await asyncio.sleep(self.delay)
        return [im.width for im in batch] + [0] * self.extra


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_and_get_their_own_results():
    async def main():
        runner = Recorder(delay=0.05)
        b = DynamicBatcher(runner, max_batch_size=4, max_wait_s=0.05, metrics=Metrics())
        b.start()
        ims = images(10)
        results = await asyncio.gather(*(b.submit([im], GREEDY, 5) for im in ims))
        await b.close()
        return runner, results

    runner, results = run(main())
    assert results == [[i + 1] for i in range(10)]
    assert [n for n, _ in runner.batches] == [4, 4, 2]


def test_lone_request_waits_at_most_max_wait():
    async def main():
        b = DynamicBatcher(Recorder(), max_batch_size=64, max_wait_s=0.2)
        b.start()
        t = time.monotonic()
        await b.submit(images(1), GREEDY, 5)
        elapsed = time.monotonic() - t
        await b.close()
        return elapsed

    assert 0.18 <= run(main()) < 1.5


def test_different_options_never_share_a_batch():
    async def main():
        runner = Recorder()
        b = DynamicBatcher(runner, max_batch_size=8, max_wait_s=0.05)
        b.start()
        beam = DecodeOptions(num_beams=2)
        await asyncio.gather(b.submit(images(2), GREEDY, 5), b.submit(images(3), beam, 5))
        await b.close()
        return runner.batches

    batches = run(main())
    assert sorted((n, o.num_beams) for n, o in batches) == [(2, 1), (3, 2)]


def test_full_queue_refuses_and_counts():
    async def main():
        m = Metrics()
        b = DynamicBatcher(Recorder(delay=0.3), max_batch_size=2, max_wait_s=0, max_queue=3, metrics=m)
        b.start()
        first = asyncio.create_task(b.submit(images(2), GREEDY, 5))
        await asyncio.sleep(0.05)  # the first batch is running; the queue is empty again
        queued = asyncio.create_task(b.submit(images(3), GREEDY, 5))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError):
            await b.submit(images(1), GREEDY, 5)
        await asyncio.gather(first, queued)
        await b.close()
        return m.dropped.labels(reason="queue_full")._value.get()

    assert run(main()) == 1


def test_deadline_and_disconnect_drop_queued_work():
    async def main():
        m = Metrics()
        runner = Recorder()
        b = DynamicBatcher(runner, max_batch_size=64, max_wait_s=0.5, metrics=m)
        b.start()
        with pytest.raises(DeadlineExceededError):
            await b.submit(images(2), GREEDY, 0.1)
        gone = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(b.submit(images(3), GREEDY, 5, disconnected=gone))
        await asyncio.sleep(0.05)
        gone.set_result(None)
        with pytest.raises(ClientDisconnectedError):
            await task
        await asyncio.sleep(0.6)  # past max_wait: nothing is left to run
        await b.close()
        return m, runner, b

    m, runner, b = run(main())
    assert m.dropped.labels(reason="deadline")._value.get() == 2
    assert m.dropped.labels(reason="disconnected")._value.get() == 3
    assert runner.batches == [] and b.depth == 0


def test_wrong_result_count_fails_the_batch():
    async def main():
        b = DynamicBatcher(Recorder(extra=1), max_batch_size=4, max_wait_s=0)
        b.start()
        try:
            with pytest.raises(RuntimeError, match="2 results for 1 images"):
                await b.submit(images(1), GREEDY, 5)
        finally:
            await b.close()

    run(main())


def test_close_drains_queued_work_then_refuses():
    async def main():
        runner = Recorder(delay=0.05)
        b = DynamicBatcher(runner, max_batch_size=2, max_wait_s=10)
        b.start()
        tasks = [asyncio.create_task(b.submit([im], GREEDY, 30)) for im in images(5)]
        await asyncio.sleep(0.01)
        await b.close(drain_timeout_s=5)  # does not wait the 10 s max_wait: draining flushes at once
        with pytest.raises(ShuttingDownError):
            await b.submit(images(1), GREEDY, 1)
        return [t.result() for t in tasks]

    t = time.monotonic()
    assert run(main()) == [[1], [2], [3], [4], [5]]
    assert time.monotonic() - t < 5


def test_cheap_requests_go_before_queued_expensive_work_whose_batches_are_capped():
    expensive = DecodeOptions(num_beams=4, max_length=32)  # 128 per image: two per batch at a cost cap of 320

    async def main(starve_s):
        runner = Recorder(delay=0.1)  # a batch takes 0.1 s: behind one batch ~0.1-0.2 s, behind four >= 0.4 s
        b = DynamicBatcher(runner, max_batch_size=16, max_wait_s=0.0, max_batch_cost=320, starve_s=starve_s)
        b.start()
        hog = asyncio.create_task(b.submit(images(8), expensive, 10))
        await asyncio.sleep(0.01)  # the first expensive batch is running
        start = time.monotonic()
        cheap = await b.submit(images(1), GREEDY, 10)
        waited = time.monotonic() - start
        assert cheap == [1] and await hog == list(range(1, 9))
        await b.close()
        return runner.batches, waited

    batches, waited = run(main(starve_s=5.0))
    assert [n for n, o in batches if o == expensive] == [2, 2, 2, 2]
    assert batches[1] == (1, GREEDY) and waited < 0.3  # behind the running batch only, not the 3 queued
    # Once the oldest image has waited starve_s, first come goes first again: expensive work is not starved.
    batches, waited = run(main(starve_s=0.0))
    assert batches[-1] == (1, GREEDY) and waited >= 0.3
